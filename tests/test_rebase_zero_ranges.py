"""Safe rebase skips the ranges that read as zeros in the old chain and in the new one (it
reads neither), and still makes the image hold zeros where only the new backing file has
data: the guest view stays as qemu-img reads it."""

from __future__ import annotations

import shutil

from cli_helpers import qcowfs
from qemutools import compare, create, map_json, qemu_io


def test_zeros_over_new_data_are_written_and_zeros_over_zeros_are_not(tmp_path):
    old = create(tmp_path / "old.qcow2", "64M")
    qemu_io(old, "write -P 1 40M 1M")
    new = create(tmp_path / "new.qcow2", "64M")
    qemu_io(new, "write -P 9 1M 2M", "write -P 1 40M 1M")
    top = create(tmp_path / "top.qcow2", "64M", backing="old.qcow2", backing_fmt="qcow2",
                 cwd=tmp_path)
    before = tmp_path / "before.qcow2"
    shutil.copy(top, before)
    r = qcowfs("rebase", "-b", "new.qcow2", "-F", "qcow2", top)
    assert r.code == 0, r.err
    assert compare(before, top) == 0  # the guest view did not change
    held = [(e["start"], e["length"], e["zero"]) for e in map_json(top) if e["depth"] == 0]
    # the top now holds exactly the 2 MiB where the new backing file has data, as zeros
    assert held == [(1 << 20, 2 << 20, True)]
