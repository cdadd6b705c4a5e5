"""Shrinking frees what lies beyond the new end and cuts the image file after its last used
cluster, as ``qemu-img resize --shrink`` does; the result is clean and reads as QEMU's."""

from __future__ import annotations

import shutil

from qemutools import assert_check_clean, compare, create, qemu_img, qemu_io

import qcowfs


def test_shrink_cuts_the_free_tail(tmp_path):
    ours = create(tmp_path / "ours.qcow2", "64M")
    qemu_io(ours, "write -P 1 0 4M", "write -P 2 40M 8M", "write -P 3 60M 4M")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    before = ours.stat().st_size
    with qcowfs.open_image(str(ours), writable=True) as disk:
        disk.resize(8 << 20, shrink=True)
    qemu_img("resize", "--shrink", str(theirs), "8M")
    assert_check_clean(ours)
    assert compare(ours, theirs) == 0
    assert ours.stat().st_size < before - (8 << 20)
    assert ours.stat().st_size <= theirs.stat().st_size + (64 << 10)
