"""Persistent dirty bitmaps stay exact across qcowfs writes: every write, zero write and
discard sets its granules in every enabled bitmap, disabled ones are untouched, a clean close
writes them back with in-use cleared, and a crash leaves them in use. Judged by parsing the
bitmap tables, by qemu-img check, and by QEMU itself (convert --bitmaps, bitmap --merge)."""

from __future__ import annotations

import os
import shutil

import pytest
from cli_helpers import qcowfs as qcowfs_cli
from crashtools import run_and_kill
from mounttools import mounted, needs_fuse
from qemutools import (
    assert_check_clean,
    bitmap_bits,
    check,
    create,
    info,
    qemu_img,
    qemu_io,
)

import qcowfs

MiB = 1 << 20


def _granules(bits: bytes) -> set[int]:
    return {i for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}


def _touched(ranges, gbits: int) -> set[int]:
    return {g for off, n in ranges for g in range(off >> gbits, ((off + n - 1) >> gbits) + 1)}


@pytest.fixture
def image(tmp_path):
    """Three bitmaps (64k enabled, 4k enabled, 64k disabled), some bits already set by QEMU."""
    img = create(tmp_path / "a.qcow2", "32M")
    qemu_img("bitmap", "--add", str(img), "big")
    qemu_img("bitmap", "--add", "-g", "4k", str(img), "small")
    qemu_img("bitmap", "--add", str(img), "off")
    qemu_io(img, "write -P 1 20M 64k")
    qemu_img("bitmap", "--disable", str(img), "off")
    qemu_io(img, "write -P 2 0 64k", "write -P 3 30M 4k")
    return img


def _assert_exact(img, before, ranges) -> None:
    after = bitmap_bits(img)
    assert after["off"] == before["off"]  # disabled: untouched
    for name in ("big", "small"):
        gbits, flags, bits = after[name]
        assert flags == before[name][1]  # auto, not in use
        assert _granules(bits) == _granules(before[name][2]) | _touched(ranges, gbits), name
    flags = info(img)["format-specific"]["data"]["bitmaps"]
    assert not any("in-use" in b["flags"] for b in flags)
    assert_check_clean(img)


def test_library_writes_keep_bitmaps_exact(image, tmp_path):
    before = bitmap_bits(image)
    ranges = [(1 * MiB + 100, 5000), (3 * MiB, 64 * 1024), (5 * MiB - 1, 2), (7 * MiB, 3 * MiB)]
    with qcowfs.open_image(str(image), writable=True) as disk:
        disk.write(*_data(ranges[0]))
        disk.write(*_data(ranges[1]))
        disk.write(ranges[2][0], bytes(ranges[2][1]))  # a zero write
        disk.discard(*ranges[3])
    _assert_exact(image, before, ranges)
    # QEMU reads the same bits: it copies them into a new image
    out = tmp_path / "copy.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", str(image), str(out))
    assert {k: v[2] for k, v in bitmap_bits(out).items()} == {
        k: v[2] for k, v in bitmap_bits(image).items()}


def _data(r):
    off, n = r
    return off, bytes([off % 251 + 1]) * n


def test_snapshot_apply_dirties_everything(image):
    qemu_img("snapshot", "-c", "s", str(image))
    with qcowfs.open_image(str(image), writable=True) as disk:
        disk.apply_snapshot("s")
    for name in ("big", "small"):
        gbits, _, bits = bitmap_bits(image)[name]
        assert _granules(bits) == _touched([(0, 32 * MiB)], gbits)
    assert_check_clean(image)


CHILD = """
import sys, qcowfs
disk = qcowfs.open_image(sys.argv[1], writable=True)
disk.write(1 << 20, b"x" * 4096)
disk.flush()
print("F 0", flush=True)
import time
time.sleep(600)
"""


def test_a_crash_leaves_them_in_use(image):
    run_and_kill(CHILD, [str(image)], reports=1)
    bitmaps = info(image)["format-specific"]["data"]["bitmaps"]
    assert all("in-use" in b["flags"] for b in bitmaps if b["name"] != "off")
    code, _ = check(image)
    assert code in (0, 3)  # leaked clusters at worst


@needs_fuse
@pytest.mark.fuse
def test_writes_through_the_mount_keep_bitmaps_exact(image, tmp_path):
    before = bitmap_bits(image)
    ranges = [(2 * MiB, 4096), (4 * MiB + 8192, 128 * 1024), (9 * MiB, 4 * MiB)]
    with mounted(image, tmp_path / "mnt", "rw") as mp:
        fd = os.open(mp / "disk", os.O_RDWR)
        try:
            for off, n in ranges[:2]:
                assert os.pwrite(fd, b"\x5a" * n, off) == n
            off, n = ranges[2]
            assert os.pwrite(fd, bytes(n), off) == n  # zeros: a zero write
            os.fsync(fd)
        finally:
            os.close(fd)
    _assert_exact(image, before, ranges)
    fresh = create(tmp_path / "fresh.qcow2", "32M")
    qemu_img("bitmap", "--add", str(fresh), "m")
    qemu_img("bitmap", "--merge", "big", "-b", str(image), "-F", "qcow2", str(fresh), "m")
    assert bitmap_bits(fresh)["m"][2] == bitmap_bits(image)["big"][2]


@pytest.mark.parametrize("args", [["40M"], ["+1M"], ["--shrink", "10M"], ["--shrink", "31M"]])
def test_resize_resizes_them_as_qemu(image, tmp_path, args):
    ours = tmp_path / "ours.qcow2"
    shutil.copy(image, ours)
    want = qemu_img("resize", str(image), *args, check=False)
    got = qcowfs_cli("resize", str(ours), *args)
    assert want.returncode == got.code == 0, (want.stderr, got.err)
    assert bitmap_bits(ours) == bitmap_bits(image)
    spec = "format-specific"
    assert info(ours)[spec]["data"]["bitmaps"] == info(image)[spec]["data"]["bitmaps"]
    assert_check_clean(ours)
