"""Every image QEMU writes reads back byte for byte as ``qemu-img convert -O raw`` shows it.

Fixtures are made at test time with qemu-img and qemu-io only; the expected bytes come from
QEMU reading the same image. Each image is a few MiB so the whole matrix stays quick.
"""

from __future__ import annotations

import json
import os
import random
import struct
import tracemalloc
from pathlib import Path

import pytest

import qcowfs
from tests import qemutools as q

KiB = 1024
MiB = 1024 * KiB

CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 2 * MiB]
REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]
PATTERN_LENGTHS = (4093, 5003, 6007, 7919)
_FOUR_LETTERS = bytes(b"ACGT"[i % 4] for i in range(256))


# --- helpers ------------------------------------------------------------------------------------


def first_difference(got: bytes, expected: bytes) -> str:
    if len(got) != len(expected):
        return f"length {len(got)} != {len(expected)}"
    for start in range(0, len(got), 1 << 16):
        if got[start:start + (1 << 16)] != expected[start:start + (1 << 16)]:
            for i in range(start, min(start + (1 << 16), len(got))):
                if got[i] != expected[i]:
                    return (f"first difference at byte {i}: got {got[i:i + 16].hex()} "
                            f"expected {expected[i:i + 16].hex()}")
    return "identical"


def random_reads(size: int, count: int, seed: int, max_len: int) -> list[tuple[int, int]]:
    """Unaligned (offset, length) pairs, some crossing clusters, some running off the end."""
    rng = random.Random(seed)
    reads = [(0, 1), (size - 1, 1), (size - 3, 10), (max(0, size - 70000), 70000)]
    for _ in range(count):
        off = rng.randrange(size)
        reads.append((off, rng.randrange(1, max_len)))
    return reads


def assert_view_matches(view, expected: bytes, what: str, *, seed: int = 1,
                        partial_reads: int = 60, max_len: int = 300 * KiB) -> None:
    assert view.size == len(expected), f"{what}: size {view.size} != {len(expected)}"
    got = view.read(0, view.size)
    assert got == expected, f"{what}: whole read differs: {first_difference(got, expected)}"
    for off, length in random_reads(len(expected), partial_reads, seed, max_len):
        want = expected[off:off + length]
        part = view.read(off, length)
        assert part == want, (f"{what}: read({off}, {length}) differs: "
                              f"{first_difference(part, want)}")
    # readinto a reused, oversized buffer: only the counted bytes are written
    buf = bytearray(b"\xee" * (max_len + 7))
    for off, length in random_reads(len(expected), 10, seed + 1, max_len):
        n = view.readinto(memoryview(buf)[:length], off)
        assert n == len(expected[off:off + length])
        assert buf[:n] == expected[off:off + n], f"{what}: readinto({off}, {length}) differs"


def assert_reads_like_qemu(image: Path, workdir: Path, *, snapshots: list[str] = (),
                           partial_reads: int = 60, cwd: Path | None = None) -> None:
    """The active disk (and each snapshot id given) reads exactly as QEMU reads it.

    A snapshot is compared at its own disk size against a ``snapshot -a`` copy, and against
    ``convert -l`` (which QEMU 7.2 clips or pads to the current size) where both have bytes.
    """
    expected = q.to_raw(image, workdir / f"{image.name}.expected.raw", cwd=cwd)
    with qcowfs.open_image(str(image)) as disk:
        assert_view_matches(disk, expected, f"{image.name} active", partial_reads=partial_reads)
        for sid in snapshots:
            want = q.snapshot_to_raw(image, workdir / f"{image.name}.snap{sid}.raw", sid)
            loaded = q.to_raw(image, workdir / f"{image.name}.snap{sid}-l.raw", snapshot=sid)
            common = min(len(want), len(loaded))
            assert want[:common] == loaded[:common], "the two QEMU oracles disagree"
            with disk.snapshot(sid) as snap:
                assert_view_matches(snap, want, f"{image.name} snapshot {sid}",
                                    seed=int(sid) + 10, partial_reads=partial_reads // 2)


class Fixtures:
    """Pattern files and seed content for qemu-io and qemu-img convert."""

    def __init__(self, root: Path):
        self.root = root
        rng = random.Random(2)
        self.patterns: list[Path] = []
        for i, n in enumerate(PATTERN_LENGTHS):
            p = root / f"pattern{i}.bin"
            p.write_bytes(rng.randbytes(n))
            self.patterns.append(p)

    def pattern(self, i: int) -> Path:
        return self.patterns[i % len(self.patterns)]

    def seed_raw(self, name: str, size: int, *, seed: int, compressible: bool = False,
                 chunk: int = 64 * KiB) -> Path:
        """A raw file of ``size`` bytes: data in about half of its ``chunk``-sized pieces,
        holes in the rest. Compressible data uses a four-letter alphabet."""
        rng = random.Random(seed)
        path = self.root / name
        with open(path, "wb") as f:
            f.truncate(size)
            for start in range(0, size, chunk):
                if rng.random() < 0.5:
                    continue
                n = min(chunk, size - start)
                data = rng.randbytes(n)
                if compressible:
                    data = data.translate(_FOUR_LETTERS)
                f.seek(start)
                f.write(data)
        return path

    def workload(self, cs: int, size: int) -> list[str]:
        """qemu-io commands that make data, zero, unallocated and partly-written clusters,
        with unaligned offsets and lengths and writes that cross cluster boundaries."""
        c = cs
        return [
            f"write -s {self.pattern(0)} 0 {3 * c + 1000}",
            f"write -P 0x5a {5 * c + 512} {c + 1024}",
            f"write -s {self.pattern(1)} {8 * c + 7} {2 * c + 13}",
            f"write -z {c + 512} {c}",
            f"write -z -u {9 * c} {c}",
            f"write -z {11 * c} {c}",
            f"discard {2 * c} {c}",
            f"write -s {self.pattern(2)} {size - c - 700} {c + 700}",
            f"write -P 0xc3 {size // 2 + 3} {3 * c}",
        ]


@pytest.fixture
def fx(tmp_path: Path) -> Fixtures:
    return Fixtures(tmp_path)


def size_for(cs: int) -> int:
    return max(3 * MiB, 16 * cs)


def header_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


# --- cluster sizes, versions, refcount widths ---------------------------------------------------


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=lambda c: f"cluster{c}")
def test_cluster_size_and_version_read_like_qemu(fx: Fixtures, tmp_path: Path, cs: int,
                                                 compat: str):
    size = size_for(cs)
    seed = fx.seed_raw("seed.raw", size, seed=cs, chunk=max(cs, 16 * KiB) * 2)
    img = q.convert(seed, tmp_path / "img.qcow2", cluster_size=cs, compat=compat)
    q.qemu_io(img, *fx.workload(cs, size))
    assert_reads_like_qemu(img, tmp_path)


@pytest.mark.parametrize("bits", REFCOUNT_BITS, ids=lambda b: f"refcount{b}")
def test_refcount_width_reads_like_qemu(fx: Fixtures, tmp_path: Path, bits: int):
    cs = 4 * KiB
    size = size_for(cs)
    img = q.create(tmp_path / "img.qcow2", size, cluster_size=cs, refcount_bits=bits)
    q.qemu_io(img, *fx.workload(cs, size))
    assert q.info(img)["format-specific"]["data"]["refcount-bits"] == bits
    assert_reads_like_qemu(img, tmp_path)


# --- compressed clusters ------------------------------------------------------------------------


@pytest.mark.parametrize("ctype,compat", [("zlib", "0.10"), ("zlib", "1.1"), ("zstd", "1.1")])
@pytest.mark.parametrize("cs", [512, 4 * KiB, 64 * KiB, 2 * MiB], ids=lambda c: f"cluster{c}")
def test_compressed_clusters_read_like_qemu(fx: Fixtures, tmp_path: Path, cs: int, ctype: str,
                                            compat: str):
    size = max(3 * MiB, 9 * cs)
    seed = fx.seed_raw("seed.raw", size, seed=cs + 7, compressible=True, chunk=cs)
    opts = {"cluster_size": cs, "compat": compat}
    if compat == "1.1":
        opts["compression_type"] = ctype
    img = q.convert(seed, tmp_path / "img.qcow2", compress=True, **opts)
    # Overwrite some compressed clusters whole, some in part (copy-on-write from the
    # compressed data), zero and discard others, and add compressed writes.
    q.qemu_io(img,
              f"write -P 0x71 {2 * cs} {cs}",
              f"write -s {fx.pattern(0)} {4 * cs + 100} {cs // 3}",
              f"write -z {6 * cs} {cs}",
              f"discard {7 * cs} {cs}",
              f"write -P 0x72 {cs - 512} 1024")
    code, report = q.check(img)
    assert code == 0 and report.get("compressed-clusters", 0) > 0, report
    data = q.qemu_img("info", "--output=json", str(img)).stdout
    assert json.loads(data)["format-specific"]["data"].get("compression-type", "zlib") == ctype
    assert_reads_like_qemu(img, tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_writes_over_backing_read_like_qemu(fx: Fixtures, tmp_path: Path, ctype: str):
    cs = 64 * KiB
    size = 2 * MiB
    base = q.convert(fx.seed_raw("base.raw", size, seed=3), tmp_path / "base.qcow2")
    img = q.create(tmp_path / "top.qcow2", size, backing=base, compression_type=ctype)
    q.qemu_io(img, f"write -c -s {fx.pattern(1)} 0 {cs}", f"write -c -P 0x41 {3 * cs} {cs}",
              f"write -c -P 0x42 {5 * cs} {cs}", f"write -P 0x43 {5 * cs + 4096} 512")
    assert_reads_like_qemu(img, tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters_with_extended_l2_read_like_qemu(fx: Fixtures, tmp_path: Path,
                                                             ctype: str):
    cs = 64 * KiB
    size = 2 * MiB
    seed = fx.seed_raw("seed.raw", size, seed=13, compressible=True, chunk=cs)
    img = q.convert(seed, tmp_path / "img.qcow2", compress=True, extended_l2=True,
                    compression_type=ctype)
    q.qemu_io(img, f"write -P 0x21 {cs + 2048} 2048", f"write -z {3 * cs + 4096} 4096",
              f"discard {5 * cs} {cs}")
    assert_reads_like_qemu(img, tmp_path)


def test_small_l2_cache_evicts_and_still_reads_like_qemu(fx: Fixtures, tmp_path: Path):
    """512-byte clusters: ~100 L2 tables through a cache of 16."""
    size = 3 * MiB
    seed = fx.seed_raw("seed.raw", size, seed=17, chunk=8 * KiB)
    img = q.convert(seed, tmp_path / "img.qcow2", cluster_size=512)
    q.qemu_io(img, *fx.workload(512, size))
    expected = q.to_raw(img, tmp_path / "expected.raw")
    with qcowfs.open_image(str(img), l2_cache_bytes=1) as disk:
        assert_view_matches(disk, expected, "small cache", partial_reads=100)
        assert len(disk.top.l2_cache._entries) <= 16


# --- extended L2 --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "over-backing"])
@pytest.mark.parametrize("cs", [32 * KiB, 64 * KiB, 2 * MiB], ids=lambda c: f"cluster{c}")
def test_extended_l2_subclusters_read_like_qemu(fx: Fixtures, tmp_path: Path, cs: int,
                                                with_backing: bool):
    size = max(3 * MiB, 8 * cs)
    sub = cs // 32
    backing = None
    if with_backing:
        backing = q.convert(fx.seed_raw("base.raw", size, seed=5, chunk=sub * 3),
                            tmp_path / "base.qcow2", cluster_size=cs)
    img = q.create(tmp_path / "img.qcow2", size, backing=backing, cluster_size=cs,
                   extended_l2=True)
    q.qemu_io(img,
              f"write -P 0x11 {sub * 2} {sub * 2}",  # subclusters 2-3 of cluster 0
              f"write -z {sub * 4} {sub}",  # zero bit of subcluster 4
              f"write -s {fx.pattern(0)} {cs + 100} {sub}",  # unaligned: partial subclusters
              f"write -z -u {2 * cs + sub * 5} {sub * 3}",
              f"write -P 0x22 {3 * cs} {cs}",  # a whole cluster
              f"discard {3 * cs + sub * 8} {sub * 2}",
              f"write -z {3 * cs + sub * 20} {sub}",
              f"write -s {fx.pattern(1)} {5 * cs - sub} {2 * sub}",  # across clusters
              f"write -z -u {6 * cs} {cs}")
    assert q.info(img)["format-specific"]["data"]["extended-l2"] is True
    assert_reads_like_qemu(img, tmp_path)


def test_extended_l2_preallocated_metadata_reads_like_qemu(fx: Fixtures, tmp_path: Path):
    cs = 64 * KiB
    size = 2 * MiB
    base = q.convert(fx.seed_raw("base.raw", size, seed=9, chunk=cs // 4), tmp_path / "b.qcow2")
    img = q.create(tmp_path / "img.qcow2", size, backing=base, extended_l2=True,
                   preallocation="metadata")
    q.qemu_io(img, f"write -P 0x33 {cs + 2048} 4096", f"write -z {3 * cs} 8192")
    assert_reads_like_qemu(img, tmp_path)


# --- external data files ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_external_data_file_reads_like_qemu(fx: Fixtures, tmp_path: Path, raw: bool,
                                            monkeypatch: pytest.MonkeyPatch):
    cs = 64 * KiB
    size = size_for(cs)
    folder = tmp_path / "images"
    folder.mkdir()
    # A relative data file name: QEMU resolves it against the image's folder.
    img = q.create(folder / "img.qcow2", size, cwd=folder, data_file="img.data",
                   data_file_raw=raw)
    # QEMU 7.2 looks for a relative data file name in its working directory: run it in the
    # image's folder, where that agrees with qcowfs's rule (the image's folder).
    q.qemu_io(img, *fx.workload(cs, size), cwd=folder)
    assert (folder / "img.data").exists()
    assert header_u64(img, 72) & 4, "the external data file bit should be set"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert_reads_like_qemu(img, tmp_path, cwd=folder)


# --- dirty images, bitmaps, preallocation, zero clusters ----------------------------------------


def test_dirty_lazy_refcounts_image_reads_like_qemu(fx: Fixtures, tmp_path: Path):
    cs = 64 * KiB
    size = size_for(cs)
    img = q.create(tmp_path / "img.qcow2", size, lazy_refcounts=True)
    q.qemu_io_killed(img, *fx.workload(cs, size))
    assert q.info(img)["dirty-flag"] is True
    assert_reads_like_qemu(img, tmp_path)


def test_persistent_bitmaps_image_reads_like_qemu(fx: Fixtures, tmp_path: Path):
    cs = 64 * KiB
    size = size_for(cs)
    img = q.create(tmp_path / "img.qcow2", size)
    q.qemu_io(img, f"write -P 0x10 0 {cs}")
    q.qemu_img("bitmap", "--add", str(img), "b0")
    q.qemu_img("bitmap", "--add", "-g", "128K", str(img), "b1")
    q.qemu_io(img, *fx.workload(cs, size))
    bitmaps = q.info(img)["format-specific"]["data"]["bitmaps"]
    assert {b["name"] for b in bitmaps} == {"b0", "b1"}
    assert header_u64(img, 88) & 1, "the bitmaps autoclear bit should be set"
    assert_reads_like_qemu(img, tmp_path)


@pytest.mark.parametrize("bits", [
    pytest.param((72, 1 << 1), id="corrupt-bit"),
    pytest.param((80, 1 << 17), id="unknown-compatible-bit"),
    pytest.param((88, 1 << 40), id="unknown-autoclear-bit"),
])
def test_feature_bits_that_allow_reading_read_like_qemu(fx: Fixtures, tmp_path: Path, bits):
    """The corrupt bit, unknown compatible and unknown autoclear bits do not stop a read-only
    open (QEMU opens such images read-only too)."""
    cs = 64 * KiB
    size = size_for(cs)
    img = q.create(tmp_path / "img.qcow2", size)
    q.qemu_io(img, *fx.workload(cs, size))
    field, bit = bits
    q.poke(img, field, struct.pack(">Q", header_u64(img, field) | bit))
    assert_reads_like_qemu(img, tmp_path)


def test_version3_header_of_104_bytes_reads_like_qemu(fx: Fixtures, tmp_path: Path):
    """header_length 104 is a valid v3 header without the compression type field."""
    img = q.create(tmp_path / "img.qcow2", 2 * MiB)
    q.qemu_io(img, *fx.workload(64 * KiB, 2 * MiB))
    q.poke(img, 100, struct.pack(">I", 104))
    with open(img, "rb") as f:
        f.seek(104)
        assert f.read(8) == bytes(8), "bytes 104-111 should be zlib and padding"
    assert_reads_like_qemu(img, tmp_path)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocated_image_reads_like_qemu(fx: Fixtures, tmp_path: Path, prealloc: str,
                                            compat: str):
    cs = 64 * KiB
    size = 2 * MiB + 3 * 512  # not a whole number of clusters
    img = q.create(tmp_path / "img.qcow2", size, preallocation=prealloc, compat=compat)
    q.qemu_io(img, f"write -s {fx.pattern(0)} 1000 {cs * 2}", f"write -z {4 * cs} {cs}",
              f"write -z {6 * cs + 512} 1024", f"discard {8 * cs} {cs}",
              f"write -P 0x66 {size - 1024} 1024")
    assert_reads_like_qemu(img, tmp_path)


def test_zero_clusters_hide_backing_data(fx: Fixtures, tmp_path: Path):
    """Plain zero clusters (no host cluster) and preallocated zero clusters (host cluster
    kept) both read as zeros, not as the backing file's data."""
    cs = 64 * KiB
    size = 2 * MiB
    base = q.create(tmp_path / "base.qcow2", size)
    q.qemu_io(base, f"write -s {fx.pattern(3)} 0 {size}")
    img = q.create(tmp_path / "img.qcow2", size, backing=base)
    q.qemu_io(img, f"write -P 0x44 0 {8 * cs}",
              f"write -z {cs} {cs}",  # allocated -> preallocated zero
              f"write -z -u {3 * cs} {cs}",  # allocated, unmap -> plain zero
              f"write -z -u {10 * cs} {2 * cs}",  # unallocated -> plain zero
              f"write -z {13 * cs} {cs}",
              f"write -z {5 * cs + 1000} 3000")  # partial: the rest of the cluster stays
    m = q.map_json(img)
    zero_with_offset = [e for e in m if e["zero"] and e["depth"] == 0 and "offset" in e]
    zero_without = [e for e in m if e["zero"] and e["depth"] == 0 and "offset" not in e]
    assert zero_with_offset and zero_without, m
    assert_reads_like_qemu(img, tmp_path)


# --- internal snapshots -------------------------------------------------------------------------


def test_snapshots_read_like_qemu_including_one_before_resize(fx: Fixtures, tmp_path: Path):
    cs = 64 * KiB
    size = 2 * MiB
    img = q.create(tmp_path / "img.qcow2", size)
    q.qemu_io(img, f"write -s {fx.pattern(0)} 0 {size}")
    q.qemu_img("snapshot", "-c", "full", str(img))
    q.qemu_io(img, f"write -P 0x01 {cs} {cs * 3}", f"write -z -u {6 * cs} {cs}",
              f"discard {9 * cs} {cs}")
    q.qemu_img("snapshot", "-c", "edited", str(img))
    q.qemu_img("resize", str(img), str(size + 3 * MiB))  # grow: snapshots keep their size
    q.qemu_io(img, f"write -P 0x02 {size - 512} {MiB}", f"write -P 0x03 {size + 2 * MiB} 4096")
    q.qemu_img("snapshot", "-c", "grown", str(img))
    q.qemu_img("resize", "--shrink", str(img), str(size + MiB))
    q.qemu_io(img, f"write -P 0x04 0 {cs}")
    q.qemu_img("snapshot", "-c", "shrunk", str(img))
    q.qemu_io(img, f"write -P 0x05 {cs // 2} {cs}")

    snaps = q.info(img)["snapshots"]
    ids = [s["id"] for s in snaps]
    assert len(ids) == 4
    with qcowfs.open_image(str(img)) as disk:
        sizes = {s.id: s.size for s in disk.snapshots}
    assert sizes == {ids[0]: size, ids[1]: size, ids[2]: size + 3 * MiB, ids[3]: size + MiB}
    assert_reads_like_qemu(img, tmp_path, snapshots=ids)


def test_snapshots_in_version2_image_read_like_qemu(fx: Fixtures, tmp_path: Path):
    cs = 4 * KiB
    size = 1 * MiB
    img = q.create(tmp_path / "img.qcow2", size, compat="0.10", cluster_size=cs)
    q.qemu_io(img, *fx.workload(cs, size)[:3])
    q.qemu_img("snapshot", "-c", "one", str(img))
    q.qemu_io(img, *fx.workload(cs, size)[3:])
    q.qemu_img("snapshot", "-c", "two", str(img))
    q.qemu_io(img, f"write -P 0x09 0 {size}")
    ids = [s["id"] for s in q.info(img)["snapshots"]]
    assert_reads_like_qemu(img, tmp_path, snapshots=ids)


def test_snapshot_of_overlay_reads_through_backing_chain(fx: Fixtures, tmp_path: Path):
    cs = 64 * KiB
    size = 2 * MiB
    base = q.convert(fx.seed_raw("base.raw", size, seed=11), tmp_path / "base.qcow2")
    img = q.create(tmp_path / "img.qcow2", size, backing=base)
    q.qemu_io(img, f"write -P 0x31 {cs + 5} {cs}")
    q.qemu_img("snapshot", "-c", "s", str(img))
    q.qemu_io(img, f"write -P 0x32 0 {size}")
    assert_reads_like_qemu(img, tmp_path, snapshots=["1"])


def test_snapshot_lookup_by_name_and_id(fx: Fixtures, tmp_path: Path):
    img = q.create(tmp_path / "img.qcow2", MiB)
    q.qemu_io(img, "write -P 0x61 0 4096")
    q.qemu_img("snapshot", "-c", "alpha", str(img))
    q.qemu_io(img, "write -P 0x62 0 4096")
    q.qemu_img("snapshot", "-c", "beta", str(img))
    with qcowfs.open_image(str(img)) as disk:
        with disk.snapshot("alpha") as a, disk.snapshot("2") as b:
            assert a.read(0, 4096) == b"\x61" * 4096
            assert b.read(0, 4096) == b"\x62" * 4096
        with pytest.raises(qcowfs.ImageError, match="img.qcow2"):
            disk.snapshot("gamma")
    # qemu-img allows two snapshots of one name: then only the ids tell them apart
    q.qemu_img("snapshot", "-c", "beta", str(img))
    with qcowfs.open_image(str(img)) as disk:
        with pytest.raises(qcowfs.ImageError, match="ambiguous"):
            disk.snapshot("beta")
        with disk.snapshot("3") as third:
            assert third.read(0, 4096) == b"\x62" * 4096


def _snapshot_table_entries(path: Path) -> list[int]:
    """Byte offsets of the snapshot table entries (read here, in the test, from the spec)."""
    with open(path, "rb") as f:
        data = f.read()
    nb, = struct.unpack_from(">I", data, 60)
    pos, = struct.unpack_from(">Q", data, 64)
    out = []
    for _ in range(nb):
        out.append(pos)
        id_len, name_len = struct.unpack_from(">HH", data, pos + 12)
        extra, = struct.unpack_from(">I", data, pos + 36)
        pos += 40 + extra + id_len + name_len
        pos = (pos + 7) & ~7
    return out


def test_snapshot_metadata_matches_qemu_img_info(fx: Fixtures, tmp_path: Path):
    img = q.create(tmp_path / "img.qcow2", 2 * MiB)
    q.qemu_io(img, "write -P 0x61 0 4096")
    q.qemu_img("snapshot", "-c", "first snapshot", str(img))
    q.qemu_img("resize", str(img), "3M")
    q.qemu_img("snapshot", "-c", "second", str(img))
    # qemu-img cannot save VM state or a guest clock; patch them into the second entry (the
    # 32-bit vm_state_size, vm_clock_nsec and the 64-bit vm_state_size_large), then let
    # qemu-img info say what they mean.
    second = _snapshot_table_entries(img)[1]
    q.poke(img, second + 20, struct.pack(">IQI", 123456789, 7 * 10**9 + 42, 0xFFFF0000))
    q.poke(img, second + 40, struct.pack(">Q", 5 * 2**32 + 17))
    info = q.info(img)
    with qcowfs.open_image(str(img)) as disk:
        ours = disk.snapshots
    theirs = info["snapshots"]
    assert len(ours) == len(theirs) == 2
    for mine, qemu in zip(ours, theirs, strict=True):
        assert mine.id == qemu["id"]
        assert mine.name == qemu["name"]
        assert mine.vm_state_size == qemu["vm-state-size"]
        assert mine.date_sec == qemu["date-sec"] and mine.date_nsec == qemu["date-nsec"]
        assert mine.date.timestamp() == pytest.approx(qemu["date-sec"] + qemu["date-nsec"] / 1e9)
        assert mine.vm_clock == qemu["vm-clock-sec"] * 10**9 + qemu["vm-clock-nsec"]
        if "icount" in qemu:
            assert mine.icount == qemu["icount"]
    assert ours[1].vm_state_size == 5 * 2**32 + 17
    assert ours[1].vm_clock == 7 * 10**9 + 42
    assert [s.size for s in ours] == [2 * MiB, 3 * MiB]
    # qemu-img snapshot -l agrees on names and ids
    listing = q.qemu_img("snapshot", "-l", str(img)).stdout.decode()
    for s in ours:
        assert s.name in listing


# --- backing chains -----------------------------------------------------------------------------


def test_chain_qcow2_over_qcow2_over_raw_in_different_folders(fx: Fixtures, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """Relative backing names resolve against the folder of the image that names them, the
    backing files are shorter than the overlays, and a raw base of odd length reads as
    zeros past its end."""
    for d in ("d1", "d2", "d3", "cwd"):
        (tmp_path / d).mkdir()
    base_size = 1 * MiB + 12345  # raw, odd length
    base = fx.seed_raw("d3/base.raw", base_size, seed=21, chunk=48 * KiB)
    mid = q.create(tmp_path / "d2/mid.qcow2", 2 * MiB, backing="../d3/base.raw",
                   backing_fmt="raw", cluster_size=4 * KiB)
    q.qemu_io(mid, f"write -P 0x7a {MiB - 5000} 10000", f"write -z {300 * KiB} 8192",
              f"write -s {fx.pattern(2)} {MiB + 60000} 70000")
    top = q.create(tmp_path / "d1/top.qcow2", 3 * MiB, backing="../d2/mid.qcow2",
                   backing_fmt="qcow2", cluster_size=64 * KiB)
    q.qemu_io(top, f"write -P 0x7b {64 * KiB + 3} 1000", f"write -z -u {512 * KiB} {64 * KiB}",
              f"write -s {fx.pattern(3)} {2 * MiB - 100} 200")
    assert base.stat().st_size == base_size
    monkeypatch.chdir(tmp_path / "cwd")
    assert_reads_like_qemu(top, tmp_path, partial_reads=150)
    monkeypatch.chdir(tmp_path)
    with qcowfs.open_image("d1/top.qcow2") as disk:
        assert [layer.path for layer in disk.layers][0] == "d1/top.qcow2"
        expected = (tmp_path / "top.qcow2.expected.raw").read_bytes()
        assert disk.read(0, disk.size) == expected


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_short_middle_layer_hides_a_longer_base(fx: Fixtures, tmp_path: Path, base_fmt: str):
    """Past the end of a short backing file the guest reads zeros, even where a longer file
    further down the chain has data."""
    base_raw = tmp_path / "base.raw"
    base_raw.write_bytes(random.Random(60).randbytes(4 * MiB))
    base = base_raw if base_fmt == "raw" else q.convert(base_raw, tmp_path / "base.qcow2")
    mid = q.create(tmp_path / "mid.qcow2", MiB + 4096, backing=base.name, backing_fmt=base_fmt)
    q.qemu_io(mid, "write -P 0x3c 4096 4096")
    top = q.create(tmp_path / "top.qcow2", 4 * MiB, backing=mid.name)
    q.qemu_io(top, f"write -P 0x3d {2 * MiB} 4096")
    expected = q.to_raw(top, tmp_path / "expected.raw")
    assert expected[MiB + 4096:2 * MiB] == bytes(MiB - 4096)
    assert_reads_like_qemu(top, tmp_path)
    with qcowfs.open_image(str(top)) as disk:
        assert disk.read(MiB, 8192) == base_raw.read_bytes()[MiB:MiB + 4096] + bytes(4096)


def test_backing_chain_of_several_qcow2_layers(fx: Fixtures, tmp_path: Path):
    size = 2 * MiB
    prev = q.convert(fx.seed_raw("l0.raw", size // 2, seed=30), tmp_path / "l0.qcow2",
                     cluster_size=512)
    for i, cs in enumerate([4 * KiB, 64 * KiB, 2 * MiB, 32 * KiB], start=1):
        layer = q.create(tmp_path / f"l{i}.qcow2", size // 2 + i * 256 * KiB, backing=prev.name,
                         backing_fmt="qcow2", cluster_size=cs)
        q.qemu_io(layer, f"write -P {0x40 + i} {i * 100000 + i} {50000 + i}",
                  f"write -z {i * 170000} 4096")
        prev = layer
    assert_reads_like_qemu(prev, tmp_path, partial_reads=100)


def test_raw_backing_starting_with_qcow2_magic_is_not_probed(fx: Fixtures, tmp_path: Path):
    """A backing file declared raw (-F raw) is read raw even when it looks like qcow2."""
    looks_qcow2 = q.create(tmp_path / "inner.qcow2", 4 * MiB)
    q.qemu_io(looks_qcow2, "write -P 0x55 0 1M")
    raw_base = tmp_path / "base.img"
    raw_base.write_bytes(looks_qcow2.read_bytes())
    assert raw_base.read_bytes()[:4] == b"QFI\xfb"
    top = q.create(tmp_path / "top.qcow2", raw_base.stat().st_size, backing=raw_base,
                   backing_fmt="raw")
    q.qemu_io(top, "write -P 0x66 512 512")
    assert_reads_like_qemu(top, tmp_path)
    with qcowfs.open_image(str(top)) as disk:
        assert disk.read(0, 4) == b"QFI\xfb"


@pytest.fixture
def loop_device(tmp_path: Path):
    """Attach a raw file to a loop device (root only); detached in a finally."""
    attached: list[str] = []

    def attach(path: Path) -> str:
        p = q.run("losetup", "--find", "--show", "--read-only", path, check=False)
        if p.returncode:
            pytest.skip(f"no loop device: {p.stderr.decode().strip()}")
        dev = p.stdout.decode().strip()
        attached.append(dev)
        return dev

    try:
        yield attach
    finally:
        for dev in attached:
            q.run("losetup", "-d", dev, check=False)


def test_raw_backing_on_a_block_device_reads_like_qemu(fx: Fixtures, tmp_path: Path,
                                                       loop_device):
    """A block device's size comes from the device, not from stat (which says 0)."""
    base = fx.seed_raw("base.raw", 2 * MiB, seed=50, chunk=32 * KiB)
    dev = loop_device(base)
    top = q.create(tmp_path / "top.qcow2", 3 * MiB, backing=dev, backing_fmt="raw")
    q.qemu_io(top, "write -P 0x77 100000 5000")
    assert_reads_like_qemu(top, tmp_path)
    with qcowfs.open_image(dev, format="raw") as disk:
        assert disk.size == 2 * MiB
        assert disk.read(0, disk.size) == base.read_bytes()


def test_raw_image_opened_directly_reads_its_bytes(fx: Fixtures, tmp_path: Path):
    raw = fx.seed_raw("plain.raw", MiB + 77, seed=40)
    with qcowfs.open_image(str(raw), format="raw") as disk:
        assert disk.size == MiB + 77
        assert disk.read(0, disk.size) == raw.read_bytes()


# --- a huge sparse image ------------------------------------------------------------------------


def test_4tib_sparse_image_opens_without_proportional_work(tmp_path: Path):
    size = 4 * 1024**4
    img = q.create(tmp_path / "huge.qcow2", size)
    spots = [0, 2 * 1024**4 + 64 * KiB, size - 64 * KiB]
    q.qemu_io(img, *(f"write -P {0x20 + i} {off + 100} 1000" for i, off in enumerate(spots)))
    tracemalloc.start()
    try:
        disk = qcowfs.open_image(str(img))
        _, open_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        try:
            assert disk.size == size
            for i, off in enumerate(spots):
                want = q.read_range(img, tmp_path / f"spot{i}.raw", off, 64 * KiB)
                assert disk.read(off, 64 * KiB) == want
                assert disk.read(off + 100, 1000) == bytes([0x20 + i]) * 1000
            for off in (1024**4, 3 * 1024**4 + 12345, size - 3 * MiB):
                assert disk.read(off, MiB) == bytes(MiB)
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            disk.close()
    finally:
        tracemalloc.stop()
    assert open_peak < 2 * MiB, f"open allocated {open_peak} bytes for a 4 TiB image"
    assert read_peak < 8 * MiB, f"reads allocated {read_peak} bytes"


def test_readinto_reports_the_count_and_stops_at_the_end(tmp_path: Path):
    size = 100352
    img = q.create(tmp_path / "img.qcow2", size)
    q.qemu_io(img, f"write -P 0x12 0 {size}")
    with qcowfs.open_image(str(img)) as disk:
        assert disk.size == q.info(img)["virtual-size"] == size
        buf = bytearray(b"\xff" * 4096)
        assert disk.readinto(buf, size - 1000) == 1000
        assert buf[:1000] == b"\x12" * 1000 and buf[1000:] == b"\xff" * 3096
        assert disk.readinto(buf, size) == 0
        assert disk.read(size - 10, 100) == b"\x12" * 10
        assert disk.read(2 * size, 10) == b""


def test_reading_leaves_the_image_and_its_folder_untouched(tmp_path: Path):
    """Reading never writes next to the image (no lock files, no temporary files)."""
    img = q.create(tmp_path / "img.qcow2", MiB)
    q.qemu_io(img, "write -P 0x12 0 4096")
    before = sorted(os.listdir(tmp_path))
    stat_before = img.stat()
    with qcowfs.open_image(str(img)) as disk:
        disk.read(0, MiB)
    assert sorted(os.listdir(tmp_path)) == before
    assert img.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert img.stat().st_size == stat_before.st_size
