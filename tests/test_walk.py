"""The metadata walk must count exactly the references QEMU's refcounts record on a clean
image QEMU wrote, whatever the cluster size, refcount width and features."""

from __future__ import annotations

import pytest
from qemutools import create, qemu_img, qemu_io

from qcowfs.format.tables import decode_refblock, decode_u64_table
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.walk import tally_references


def on_disk_refcounts(img: Qcow2Image) -> dict[int, int]:
    h = img.header
    cs = img.cluster_size
    table = decode_u64_table(img.file.read(h.refcount_table_offset,
                                           h.refcount_table_clusters * cs))
    per_block = cs * 8 // h.refcount_bits
    out = {}
    for i, entry in enumerate(table):
        if entry:
            values = decode_refblock(img.file.read(entry & ~511, cs), h.refcount_order)
            out.update({i * per_block + j: v for j, v in enumerate(values) if v})
    return out


def expected_from_walk(img: Qcow2Image) -> dict[int, int]:
    tally = tally_references(img)
    assert tally.defects == []
    return {i: c for i, c in enumerate(tally.counts) if c}


@pytest.mark.parametrize(("cluster_size", "refcount_bits"), [
    (512, 16), (512, 1), (4096, 2), (4096, 64), (65536, 4), (65536, 8), (65536, 32),
    (2 * 1024 * 1024, 16),
])
def test_tally_equals_qemu_refcounts(tmp_path, cluster_size, refcount_bits):
    path = create(tmp_path / "img.qcow2", "8M", cluster_size=cluster_size,
                  refcount_bits=refcount_bits)
    qemu_io(path, "write -P 1 0 1M", "write -z 2M 64k", f"write -c 4M {cluster_size}")
    if refcount_bits > 1:  # a snapshot needs refcount 2
        qemu_img("snapshot", "-c", "one", str(path))
    qemu_io(path, "write -P 2 512k 700k")
    qemu_img("bitmap", "--add", str(path), "dirty0")
    img = Qcow2Image.open(str(path))
    try:
        assert expected_from_walk(img) == on_disk_refcounts(img)
    finally:
        img.close()


def test_tally_counts_shared_compressed_sectors(tmp_path):
    """Two compressed clusters sharing one host cluster count twice there, as QEMU does."""
    raw = tmp_path / "src.raw"
    create(raw, "1M", fmt="raw")
    qemu_io(raw, "write -P 7 0 1M", fmt="raw")
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(raw), str(path))
    img = Qcow2Image.open(str(path))
    try:
        counts = expected_from_walk(img)
        assert counts == on_disk_refcounts(img)
        assert max(counts.values()) > 1
    finally:
        img.close()


def test_stats_match_qemu_check(tmp_path):
    path = create(tmp_path / "img.qcow2", "16M")
    qemu_io(path, "write 0 1M", "write 8M 64k", "write 2M 64k", "write -c 4M 64k")
    report = __import__("qemutools").check(path)[1]
    img = Qcow2Image.open(str(path))
    try:
        stats = tally_references(img).stats
    finally:
        img.close()
    bfi = report["allocated-clusters"], report.get("fragmented-clusters", 0), \
        report.get("compressed-clusters", 0), report["total-clusters"]
    assert (stats.allocated_clusters, stats.fragmented_clusters, stats.compressed_clusters,
            stats.total_clusters) == bfi


def test_leak_shows_as_missing_reference(tmp_path):
    """A refcount QEMU recorded for a cluster nothing references is absent from the tally."""
    path = create(tmp_path / "img.qcow2", "4M")
    qemu_io(path, "write 0 128k")
    img = Qcow2Image.open(str(path))
    try:
        l1 = img.active.l1
        l2_off = l1[0] & 0x00FFFFFFFFFFFE00
        entry = img.l2_table(l2_off)[1]
    finally:
        img.close()
    # Drop the reference to the second data cluster: its refcount stays 1 (a leak).
    from qemutools import poke
    poke(path, l2_off + 8, bytes(8))
    code, report = __import__("qemutools").check(path)
    assert code == 3 and report["leaks"] == 1
    img = Qcow2Image.open(str(path))
    try:
        counts = expected_from_walk(img)
        on_disk = on_disk_refcounts(img)
    finally:
        img.close()
    leaked = (entry & 0x00FFFFFFFFFFFE00) // 65536
    assert on_disk[leaked] == 1 and leaked not in counts
