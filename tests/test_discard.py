"""Disk.discard: whole clusters of the active disk become unallocated again and read from the
backing file; snapshots keep their data. Checked against a bytearray model with qemu-img
compare, check and map, on images made by qemu-img."""

from __future__ import annotations

import random

import pytest
from qemutools import assert_check_clean, compare, create, map_json, qemu_img, qemu_io, to_raw

import qcowfs
from qcowfs.errors import ImageError

MiB = 1 << 20
SIZE = 8 * MiB

CONFIGS = {
    "c64k": {},
    "c4k": {"cluster_size": 4096},  # 2 MiB per L2 table: whole tables get dropped
    "extl2": {"extended_l2": True},
    "v2": {"compat": "0.10"},
    "lazy": {"lazy_refcounts": True},
}


def _chain(tmp_path, options):
    base = create(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 6M")
    top = create(tmp_path / "top.qcow2", SIZE, backing=base, **options)
    cmds = ["write -P 0x22 512k 3M", "write -P 0x23 7M 1M"]
    if options.get("compat") != "0.10":
        cmds.append("write -z 4M 256k")
    qemu_io(top, *cmds)
    qemu_img("snapshot", "-c", "before", str(top))
    qemu_io(top, "write -P 0x24 1M 1M", "write -c -P 0x25 6M 128k")  # compressed clusters
    return base, top


@pytest.mark.parametrize("name", CONFIGS)
def test_discard_matches_a_model(tmp_path, name):
    options = CONFIGS[name]
    base, top = _chain(tmp_path, options)
    cs = options.get("cluster_size", 65536)
    backing = to_raw(base, tmp_path / "base.raw")
    model = bytearray(to_raw(top, tmp_path / "before.raw"))
    snap = to_raw(top, tmp_path / "snap-before.raw", snapshot="1")
    rng = random.Random(sum(map(ord, name)))
    discarded: set[int] = set()
    with qcowfs.open_image(str(top), writable=True) as disk:
        for step in range(40):
            off = rng.randrange(0, SIZE - 1)
            n = rng.randrange(1, min(3 * MiB, SIZE - off) + 1)
            if step % 3:
                data = rng.randbytes(n)
                disk.write(off, data)
                model[off:off + n] = data
                discarded -= set(range(off // cs, (off + n - 1) // cs + 1))
            else:
                disk.discard(off, n)
                first, last = -(-off // cs), (off + n) // cs
                for c in range(first, last):
                    model[c * cs:(c + 1) * cs] = backing[c * cs:(c + 1) * cs]
                    discarded.add(c)
            if step % 10 == 9:
                disk.flush()
        disk.discard(2 * MiB, 4 * MiB)  # two whole L2 tables with 4 KiB clusters
        for c in range(2 * MiB // cs, 6 * MiB // cs):
            discarded.add(c)
        model[2 * MiB:6 * MiB] = backing[2 * MiB:6 * MiB]
        assert disk.read(0, SIZE) == bytes(model)
    assert_check_clean(top)
    (tmp_path / "model.raw").write_bytes(model)
    assert compare(tmp_path / "model.raw", top) == 0
    assert to_raw(top, tmp_path / "snap-after.raw", snapshot="1") == snap
    for e in map_json(top):
        if e["depth"] == 0 and e["present"]:
            clusters = set(range(e["start"] // cs, (e["start"] + e["length"]) // cs))
            assert not clusters & discarded, e


def test_discard_keeps_partial_clusters_and_takes_the_tail_of_the_disk(tmp_path):
    base = create(tmp_path / "base.qcow2", "1M")
    qemu_io(base, "write -P 0x11 0 1M")
    top = create(tmp_path / "top.qcow2", 1 * MiB - 512, backing=base)
    qemu_io(top, "write -P 0x22 0 1047552")
    with qcowfs.open_image(str(top), writable=True) as disk:
        disk.discard(1000, 65536)  # no whole cluster inside: nothing changes
        disk.discard(15 * 65536, 65536 - 512)  # the last, partial cluster of the disk
        with pytest.raises(ImageError):
            disk.discard(0, MiB)
    assert_check_clean(top)
    data = to_raw(top, tmp_path / "after.raw")
    assert data[:15 * 65536] == b"\x22" * (15 * 65536)
    assert data[15 * 65536:] == b"\x11" * (65536 - 512)
    depth0 = [e for e in map_json(top) if e["depth"] == 0 and e["present"]]
    assert depth0 == [{"start": 0, "length": 15 * 65536, "depth": 0, "present": True,
                       "zero": False, "data": True, "offset": depth0[0]["offset"]}]
