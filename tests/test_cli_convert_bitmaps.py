"""convert --bitmaps copies persistent bitmaps as qemu-img convert --bitmaps does: the same
bitmap tables (parsed from both outputs), the same info bitmaps field, a clean check, and
qemu-img's refusals."""

from __future__ import annotations

import pytest
from cli_helpers import qcowfs
from qemutools import (
    assert_check_clean,
    bitmap_bits,
    create,
    info,
    qemu_img,
    qemu_io,
    qemu_io_killed,
)


@pytest.fixture
def source(tmp_path):
    img = create(tmp_path / "src.qcow2", "12M")
    qemu_img("bitmap", "--add", str(img), "on")
    qemu_img("bitmap", "--add", "-g", "512", str(img), "fine")
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", str(img), "off")
    qemu_io(img, "write -P 1 0 100k", "write -P 2 5M 3M", "write -z 11M 4k")
    qemu_img("snapshot", "-c", "s", str(img))
    qemu_io(img, "write -P 3 9M 64k")
    return img


def _both(tmp_path, src, *extra: str):
    want, got = tmp_path / "want.qcow2", tmp_path / "got.qcow2"
    w = qemu_img("convert", "--bitmaps", *extra, str(src), str(want), check=False)
    g = qcowfs("convert", "--bitmaps", *extra, str(src), str(got))
    return w, g, want, got


@pytest.mark.parametrize("extra", [["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"],
                                   ["-O", "qcow2", "-c"], ["-O", "qcow2", "-l", "s"]])
def test_same_bitmaps_as_qemu(tmp_path, source, extra):
    w, g, want, got = _both(tmp_path, source, *extra)
    assert w.returncode == 0 and g.code == 0, (w.stderr, g.err)
    assert bitmap_bits(got) == bitmap_bits(want)
    spec = "format-specific"
    assert info(got)[spec]["data"]["bitmaps"] == info(want)[spec]["data"]["bitmaps"]
    assert_check_clean(got)


def test_refusals_and_skipping_broken(tmp_path, source):
    raw = create(tmp_path / "r.raw", "1M", fmt="raw")
    for src, extra in ((source, ["-O", "raw"]), (source, ["-O", "qcow2", "-o", "compat=0.10"]),
                       (raw, ["-f", "raw", "-O", "qcow2"])):
        w, g, _, _ = _both(tmp_path, src, *extra)
        first = w.stderr.decode().splitlines()[0].removeprefix("qemu-img: ")
        assert (g.code, g.err) == (1, f"qcowfs: convert: {first}\n"), extra
    qemu_img("bitmap", "--add", str(source), "late")
    qemu_io_killed(source, "write 0 4k")  # leaves every bitmap in use
    qemu_img("bitmap", "--remove", str(source), "late")
    qemu_img("bitmap", "--add", str(source), "fresh")
    w, g, _, _ = _both(tmp_path, source, "-O", "qcow2")
    first = w.stderr.decode().splitlines()[0].removeprefix("qemu-img: ")
    assert (g.code, g.err) == (w.returncode, f"qcowfs: convert: {first}\n")
    w, g, want, got = _both(tmp_path, source, "-O", "qcow2", "--skip-broken-bitmaps")
    assert w.returncode == 0 and g.code == 0, (w.stderr, g.err)
    assert bitmap_bits(got) == bitmap_bits(want) and list(bitmap_bits(got)) == ["fresh"]
    assert_check_clean(got)
