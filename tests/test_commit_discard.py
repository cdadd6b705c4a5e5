"""commit empties tops that cannot simply be rewritten (internal snapshots, bitmaps, an external
data file, v2) by discarding every cluster of the active disk, as qemu-img does. Each case runs
on two identical chains made by qemu-img: one committed by qemu-img, one by qcowfs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import qcowfs
from qemutools import assert_check_clean, compare, create, info, qemu_img, qemu_io, to_raw

MiB = 1 << 20


def _map(d: Path) -> list[dict]:
    """qemu-img map of d/top.qcow2, run in d (where a relative data file name resolves)."""
    return json.loads(qemu_img("map", "--output=json", "top.qcow2", cwd=d).stdout)


def _top(d: Path, kind: str) -> Path:
    base = create(d / "base.qcow2", "4M")
    qemu_io(base, "write -P 1 0 2M")
    options: dict = {}
    if kind == "data-file":
        options["data_file"] = "top.data"
    if kind == "v2":
        options["compat"] = "0.10"
    top = create(d / "top.qcow2", "6M", backing=base.name, backing_fmt="qcow2", cwd=d,
                 **options)
    qemu_io(top, "write -P 2 512k 1M", "write -P 5 5M 64k", cwd=d)
    if kind == "snapshot":
        qemu_img("snapshot", "-c", "s1", "top.qcow2", cwd=d)
    if kind == "bitmap":
        qemu_img("bitmap", "--add", "top.qcow2", "b0", cwd=d)
    qemu_io(top, "write -P 3 1M 1M", "write -P 4 3M 64k", cwd=d)
    return top


@pytest.mark.parametrize("kind", ["snapshot", "bitmap", "data-file", "v2"])
def test_commit_discards_the_top(tmp_path, kind):
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    t, o = _top(theirs, kind), _top(ours, kind)
    want = to_raw(o, tmp_path / "want.raw", cwd=ours)
    snap = to_raw(o, tmp_path / "snap.raw", snapshot="1", cwd=ours) if kind == "snapshot" else None
    qemu_img("commit", "-q", "top.qcow2", cwd=theirs)
    r = qcowfs("commit", o)
    assert r.code == 0 and r.out == "Image committed.\n", r.err

    assert compare(ours / "base.qcow2", theirs / "base.qcow2") == 0
    assert to_raw(ours / "base.qcow2", tmp_path / "base.raw") == want
    assert info(ours / "base.qcow2")["virtual-size"] == 6 * MiB  # grown like qemu-img's
    # the top's active view is its backing file again
    assert qemu_img("compare", "top.qcow2", "base.qcow2", cwd=ours,
                    check=False).returncode == 0
    assert not [e for e in _map(ours) if e["depth"] == 0 and e["present"]]
    assert_check_clean(ours / "base.qcow2")
    qemu_img("check", "top.qcow2", cwd=ours)  # exit 0: no errors, no leaks
    qemu_img("check", "top.qcow2", cwd=theirs)
    if snap is not None:
        after = to_raw(o, tmp_path / "snap-after.raw", snapshot="1", cwd=ours)
        # what the snapshot holds itself is untouched; where it reads the backing file it
        # sees the committed data, with qemu-img as with qcowfs
        assert after[512 * 1024:1536 * 1024] == snap[512 * 1024:1536 * 1024] == b"\2" * MiB
        assert after == to_raw(t, tmp_path / "snap-theirs.raw", snapshot="1", cwd=theirs)
        listed = qemu_img("snapshot", "-l", "top.qcow2", cwd=ours).stdout.decode()
        assert "s1" in listed
    if kind == "bitmap":
        def bitmaps(d):
            return info(d / "top.qcow2")["format-specific"]["data"]["bitmaps"]
        assert bitmaps(ours) == bitmaps(theirs) == [
            {"flags": ["auto"], "name": "b0", "granularity": 65536}]
    if kind == "v2":
        assert info(o)["format-specific"]["data"]["compat"] == "0.10"


def test_plain_v3_top_is_still_rewritten(tmp_path):
    base = create(tmp_path / "base.qcow2", "4M")
    top = create(tmp_path / "top.qcow2", "4M", backing=base)
    qemu_io(top, "write -P 3 0 3M")
    assert qcowfs("commit", top).code == 0
    assert top.stat().st_size <= 4 * 65536  # header, refcount table, refcount block, L1
    assert_check_clean(top)
    assert [e["depth"] for e in _map(tmp_path)] == [1, 1]
