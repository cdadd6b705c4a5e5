"""dd makes the same output as qemu-img dd: same size, same bytes, the same allocation (raw
written densely; qcow2 with every cluster holding data, laid out the same), the same
refusals and the same warning when skip runs past the end."""

from __future__ import annotations

import os

import pytest
from cli_fixtures import build_samples
from cli_helpers import qcowfs
from qemutools import assert_check_clean, compare, create, info, map_json, qemu_img, qemu_io

OPERANDS = [
    [],
    ["bs=1M", "count=3", "skip=1"],
    ["bs=1k", "count=3k", "skip=1"],
    ["bs=64k", "count=10"],
    ["bs=1000", "count=3", "skip=1"],
    ["bs=1.5k", "skip=100"],
    ["bs=4k", "count=0"],
    ["bs=512", "skip=1G"],
]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("dd")
    names = ["plain", "chain_raw_base", "compressed_zlib", "extended_l2", "v2", "raw",
             "snapshots"]
    return build_samples(d, names)


def _dd(tool, out_fmt: str, src, dst, operands):
    args = ["dd", "-O", out_fmt, f"if={src}", f"of={dst}", *operands]
    if tool == "qemu":
        p = qemu_img(*args, check=False)
        return p.returncode, p.stderr.decode()
    r = qcowfs(*args)
    return r.code, r.err


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_same_output_as_qemu(samples, tmp_path, out_fmt):
    for name, src in samples.items():
        for i, operands in enumerate(OPERANDS):
            want = tmp_path / f"{name}-{i}-want.{out_fmt}"
            got = tmp_path / f"{name}-{i}-got.{out_fmt}"
            wcode, werr = _dd("qemu", out_fmt, src, want, operands)
            gcode, gerr = _dd("qcowfs", out_fmt, src, got, operands)
            where = (name, operands)
            assert gcode == wcode == 0, (where, werr, gerr)
            assert gerr == werr.replace("qemu-img: ", "qcowfs: dd: "), where
            assert info(got)["virtual-size"] == info(want)["virtual-size"], where
            assert compare(want, got, "-s", "-f", out_fmt, "-F", out_fmt) == 0, where
            assert os.path.getsize(got) == os.path.getsize(want), where
            if out_fmt == "qcow2":
                assert_check_clean(got)
                assert map_json(got) == map_json(want), where
            else:
                assert os.stat(got).st_blocks == os.stat(want).st_blocks, where


def test_input_format_and_chain(tmp_path):
    base = create(tmp_path / "base.qcow2", "2M")
    qemu_io(base, "write -P 5 0 2M")
    top = create(tmp_path / "top.qcow2", "3M", backing=base, backing_fmt="qcow2")
    qemu_io(top, "write -P 6 1M 64k")
    for fmt in ("qcow2", "raw"):
        want, got = tmp_path / f"want-{fmt}.raw", tmp_path / f"got-{fmt}.raw"
        qemu_img("dd", "-f", fmt, f"if={top}", f"of={want}", "bs=64k", "skip=3")
        assert qcowfs("dd", "-f", fmt, f"if={top}", f"of={got}", "bs=64k", "skip=3").code == 0
        assert compare(want, got, "-s", "-f", "raw", "-F", "raw") == 0


def test_refusals(tmp_path):
    img = create(tmp_path / "a.qcow2", "1M")
    out = tmp_path / "o.raw"
    for operands in ([], [f"if={img}"], [f"of={out}"], [f"if={img}", f"of={out}", "bs=x"],
                     [f"if={img}", f"of={out}", "bs=0"], [f"if={img}", f"of={out}", "bs=4G"],
                     [f"if={img}", f"of={out}", "count=-1"],
                     [f"if={img}", f"of={out}", "skip=y"],
                     [f"if={img}", f"of={out}", "foo=1"], [f"if={img}", f"of={out}", "bs"]):
        want = qemu_img("dd", *operands, check=False)
        got = qcowfs("dd", *operands)
        lines = [line.removeprefix("qemu-img: ") for line in want.stderr.decode().splitlines()]
        reason = lines[0] if lines[0][-1] in ".')s" else " ".join(lines[:2])
        assert (got.code, got.err) == (want.returncode, f"qcowfs: dd: {reason}\n"), operands
    got = qcowfs("dd", "-O", "foo", f"if={img}", f"of={out}")
    assert (got.code, got.err) == (1, "qcowfs: dd: Unknown file format\n")
