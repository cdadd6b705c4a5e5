"""amend changes what it supports as qemu-img amend does (same qemu-img info afterwards, a
clean check), lists qemu-img's -o help, refuses what qemu-img refuses, and refuses by name
what qcowfs cannot change yet (format changes: test_cli_amend_formats.py)."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import qcowfs
from qemutools import assert_check_clean, create, info, qemu_img, qemu_io, qemu_io_killed


def _info(path) -> dict:
    out = info(path)
    out.pop("filename")
    out.pop("actual-size")
    return out


def _both(tmp_path, img, *args: str):
    ours = tmp_path / f"ours-{img.name}"
    shutil.copy(img, ours)
    want = qemu_img("amend", *args, str(img), check=False)
    got = qcowfs("amend", *args, str(ours))
    return want, got, ours


@pytest.mark.parametrize("opts", ["lazy_refcounts=on", "lazy_refcounts=off",
                                  "lazy_refcounts=on,size=5M", "size=2M", "size=1M",
                                  "lazy_refcounts=off,size=64k", "compat=1.1",
                                  "refcount_bits=16,lazy_refcounts=yes"])
@pytest.mark.parametrize("start", ["lazy_refcounts=on", "lazy_refcounts=off"])
def test_same_as_qemu(tmp_path, opts, start):
    img = create(tmp_path / "a.qcow2", "2M", lazy_refcounts=start.endswith("on"))
    qemu_io(img, "write -P 1 0 100k")
    want, got, ours = _both(tmp_path, img, "-o", opts)
    assert want.returncode == got.code == 0, (want.stderr, got.err)
    assert _info(ours) == _info(img)
    assert_check_clean(ours)


def test_lazy_off_on_a_dirty_image(tmp_path):
    img = create(tmp_path / "a.qcow2", "2M", lazy_refcounts=True)
    qemu_io_killed(img, "write -P 1 0 100k")
    assert info(img)["dirty-flag"]
    want, got, ours = _both(tmp_path, img, "-o", "lazy_refcounts=off")
    assert want.returncode == got.code == 0, (want.stderr, got.err)
    assert _info(ours) == _info(img) and not _info(ours)["dirty-flag"]
    assert_check_clean(ours)


def test_help_is_qemus(tmp_path):
    img = create(tmp_path / "a.qcow2", "1M")
    assert qcowfs("amend", "-o", "help", str(img)).out == qemu_img(
        "amend", "-o", "help", str(img)).stdout.decode()


def test_refusals(tmp_path):
    img = create(tmp_path / "a.qcow2", "1M")
    v2 = create(tmp_path / "v2.qcow2", "1M", compat="0.10")
    raw = create(tmp_path / "r.raw", "1M", fmt="raw")
    for path, args in ((img, []), (img, ["-o", "foo=1"]), (img, ["-o", "cluster_size=4k"]),
                       (img, ["-o", "lazy_refcounts=maybe"]), (raw, ["-f", "raw", "-o", "size=2M"]),
                       (v2, ["-o", "lazy_refcounts=on"])):
        want, got, _ = _both(tmp_path, path, *args)
        first = want.stderr.decode().splitlines()[0].removeprefix("qemu-img: ")
        assert (got.code, got.err) == (want.returncode, f"qcowfs: amend: {first}\n"), args
    assert_check_clean(img)
