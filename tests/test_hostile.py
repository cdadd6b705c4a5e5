"""Broken and hostile images: byte-patched copies of good qemu-img images.

Each must raise a subclass of ``qcowfs.ImageError`` naming the file, at open or at the read that
touches the bad spot: never another exception, never a hang, never memory in proportion to what
a header claims. The cases follow QEMU's iotests 080, 060, 036, 108, 261 and 287.
"""

from __future__ import annotations

import os
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import qcowfs
from qcowfs import (
    BackingChainError,
    FormatError,
    ImageError,
    KeyRequiredError,
    UnsupportedError,
)
from tests import qemutools as q

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB
COPIED = 1 << 63
COMPRESSED = 1 << 62
MEMORY_BOUND = 64 * MiB

# Header field offsets (qcow2 spec).
BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS, SIZE = 8, 16, 20, 24
CRYPT, L1_SIZE, L1_OFFSET = 32, 36, 40
REFTABLE_OFFSET, REFTABLE_CLUSTERS = 48, 56
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 60, 64
INCOMPAT, COMPAT, AUTOCLEAR, REFCOUNT_ORDER, HEADER_LENGTH, COMPRESSION_TYPE = (
    72, 80, 88, 96, 100, 104)


@dataclass
class Layout:
    """Where things are in a good image, read here from the spec (not by qcowfs)."""

    cluster_size: int
    l1_offset: int
    l1_size: int
    reftable_offset: int
    snapshots_offset: int
    nb_snapshots: int
    file_size: int
    l2_offset: int  # the L2 table L1[0] points at
    l2_entries: list[int]  # the first few entries of that table
    snapshot_entries: list[int]  # byte offsets of the snapshot table entries
    path: Path


def layout(path: Path) -> Layout:
    data = path.read_bytes()

    def u32(o):
        return struct.unpack_from(">I", data, o)[0]

    def u64(o):
        return struct.unpack_from(">Q", data, o)[0]

    cs = 1 << u32(CLUSTER_BITS)
    l1 = u64(L1_OFFSET)
    l2 = u64(l1) & 0x00FFFFFFFFFFFE00
    entries = [u64(l2 + 8 * i) for i in range(8)] if l2 else []
    snaps, pos = [], u64(SNAPSHOTS_OFFSET)
    for _ in range(u32(NB_SNAPSHOTS)):
        snaps.append(pos)
        id_len, name_len = struct.unpack_from(">HH", data, pos + 12)
        pos += 40 + u32(pos + 36) + id_len + name_len
        pos = (pos + 7) & ~7
    return Layout(cs, l1, u32(L1_SIZE), u64(REFTABLE_OFFSET), u64(SNAPSHOTS_OFFSET),
                  u32(NB_SNAPSHOTS), len(data), l2, entries, snaps, path)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def read_everything(path: Path, fmt: str | None = None) -> None:
    """Open the image and read the whole disk and every snapshot, in 1 MiB pieces."""
    with qcowfs.open_image(str(path), format=fmt) as disk:
        views = [disk]
        for s in disk.snapshots:
            views.append(disk.snapshot(s.id))
        for view in views:
            for off in range(0, view.size, MiB):
                view.read(off, MiB)


def assert_refused(path: Path, error: type[ImageError], *, names: Path | None = None,
                   match: str | None = None, fmt: str | None = None) -> ImageError:
    """Opening and reading ``path`` raises ``error`` (exactly that class or a subclass), with
    a message that names the file, in bounded memory."""
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            read_everything(path, fmt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    exc = info.value
    assert isinstance(exc, error), f"{type(exc).__name__} ({exc}) is not a {error.__name__}"
    named = str(names or path)
    assert named in str(exc), f"message does not name {named}: {exc}"
    assert exc.path, "the error carries no path"
    if match is not None:
        assert match in str(exc), f"{match!r} not in {exc}"
    assert peak < MEMORY_BOUND, f"peak memory {peak} bytes"
    return exc


# --- good images, made once per module ----------------------------------------------------------


class Goods:
    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self._made:
            self._made[name] = getattr(self, f"_make_{name}")(self.root / f"{name}.qcow2")
        return self._made[name]

    def _make_data(self, p: Path) -> Path:
        """v3, 64 KiB clusters: data in clusters 0-3 and 10, a zero cluster at 5."""
        q.create(p, 4 * MiB)
        q.qemu_io(p, "write -P 0x11 0 256K", "write -z 320K 64K", "write -P 0x12 640K 64K")
        return p

    def _make_small(self, p: Path) -> Path:
        """512-byte clusters, 1 MiB of data: many L2 tables and data clusters."""
        q.create(p, 2 * MiB, cluster_size=512)
        q.qemu_io(p, "write -P 0x21 0 1M")
        return p

    def _make_v2(self, p: Path) -> Path:
        q.create(p, 4 * MiB, compat="0.10")
        q.qemu_io(p, "write -P 0x31 0 128K")
        return p

    def _make_snap(self, p: Path) -> Path:
        q.create(p, 4 * MiB)
        q.qemu_io(p, "write -P 0x41 0 128K")
        q.qemu_img("snapshot", "-c", "first", str(p))
        q.qemu_io(p, "write -P 0x42 0 64K")
        return p

    def _make_backed(self, p: Path) -> Path:
        base = q.create(self.root / "backed-base.qcow2", 4 * MiB)
        q.qemu_io(base, "write -P 0x51 0 1M")
        q.create(p, 4 * MiB, backing=base.name, backing_fmt="qcow2")
        q.qemu_io(p, "write -P 0x52 64K 64K")
        return p

    def _compressed(self, p: Path, ctype: str) -> Path:
        raw = self.root / f"seed-{ctype}.raw"
        raw.write_bytes((b"compressible text " * 20000)[:MiB])
        return q.convert(raw, p, compress=True, compression_type=ctype)

    def _make_zlib(self, p: Path) -> Path:
        return self._compressed(p, "zlib")

    def _make_zstd(self, p: Path) -> Path:
        return self._compressed(p, "zstd")

    def _make_extl2(self, p: Path) -> Path:
        q.create(p, 4 * MiB, extended_l2=True)
        q.qemu_io(p, "write -P 0x61 4K 8K", "write -P 0x62 64K 64K")
        return p


@pytest.fixture(scope="module")
def goods(tmp_path_factory: pytest.TempPathFactory) -> Goods:
    return Goods(tmp_path_factory.mktemp("good"))


def copy_of(goods: Goods, name: str, tmp_path: Path) -> tuple[Path, Layout]:
    """A fresh copy of a good image, plus its layout. The good image itself reads fine."""
    src = goods.get(name)
    dst = tmp_path / f"hostile-{name}.qcow2"
    shutil.copyfile(src, dst)
    for sibling in src.parent.glob("backed-base.qcow2"):
        shutil.copyfile(sibling, tmp_path / sibling.name)
    return dst, layout(dst)


@pytest.mark.parametrize("name", ["data", "small", "v2", "snap", "backed", "zlib", "zstd",
                                  "extl2"])
def test_good_images_read_cleanly(goods: Goods, tmp_path: Path, name: str):
    """The unpatched originals open and read: the failures below come from the patches."""
    img, _ = copy_of(goods, name, tmp_path)
    read_everything(img)
    expected = q.to_raw(img, tmp_path / "expected.raw")
    with qcowfs.open_image(str(img)) as disk:
        assert disk.read(0, disk.size) == expected


# --- the cases: (good image, patch, expected error class, text the message must hold) -----------

Patch = Callable[[Path, Layout], None]


def poke(offset_fn, data_fn) -> Patch:
    def patch(p: Path, lay: Layout) -> None:
        q.poke(p, offset_fn(lay), data_fn(lay))
    return patch


def at(offset: int, data: bytes) -> Patch:
    return poke(lambda lay: offset, lambda lay: data)


def l1_entry(value_fn) -> Patch:
    return poke(lambda lay: lay.l1_offset, lambda lay: u64(value_fn(lay)))


def l2_entry(index: int, value_fn) -> Patch:
    return poke(lambda lay: lay.l2_offset + 8 * index, lambda lay: u64(value_fn(lay)))


def snap_field(offset: int, data_fn) -> Patch:
    return poke(lambda lay: lay.snapshot_entries[0] + offset, data_fn)


def two_unknown_extensions(magic_a: int, magic_b: int) -> Patch:
    def patch(p: Path, lay: Layout) -> None:
        ext = u32(magic_a) + u32(8) + b"A" * 8 + u32(magic_b) + u32(8) + b"B" * 8 + bytes(8)
        q.poke(p, 112, ext)
    return patch


def truncate_at(offset_fn) -> Patch:
    def patch(p: Path, lay: Layout) -> None:
        os.truncate(p, offset_fn(lay))
    return patch


def snapshot_l1(lay: Layout) -> int:
    """Where the first snapshot's L1 table is."""
    return struct.unpack(">Q", lay.path.read_bytes()[lay.snapshot_entries[0]:][:8])[0]


def compressed_entry(lay: Layout) -> int:
    e = lay.l2_entries[0]
    assert e & COMPRESSED, "cluster 0 of the good image should be compressed"
    return e


def compressed_host(lay: Layout) -> int:
    shift = 62 - (lay.cluster_size.bit_length() - 1 - 8)
    return compressed_entry(lay) & ((1 << shift) - 1)


def with_compressed_host(lay: Layout, host: int) -> int:
    shift = 62 - (lay.cluster_size.bit_length() - 1 - 8)
    return compressed_entry(lay) & ~((1 << shift) - 1) | host


CASES: dict[str, tuple[str, Patch, type[ImageError], str | None]] = {
    # header (080)
    "header_length_huge": ("data", at(HEADER_LENGTH, u32(0xFFFFFFFF)), FormatError, None),
    "header_length_7fffffff": ("data", at(HEADER_LENGTH, u32(0x7FFFFFFF)), FormatError, None),
    "header_length_too_small": ("data", at(HEADER_LENGTH, u32(96)), FormatError, None),
    "header_length_unaligned": ("data", at(HEADER_LENGTH, u32(108)), FormatError, None),
    "header_length_past_cluster0": ("data", at(HEADER_LENGTH, u32(64 * KiB + 8)), FormatError,
                                    None),
    "version_4": ("data", at(4, u32(4)), UnsupportedError, None),
    "cluster_bits_8": ("data", at(CLUSTER_BITS, u32(8)), FormatError, None),
    "cluster_bits_40": ("data", at(CLUSTER_BITS, u32(40)), FormatError, None),
    "refcount_order_7": ("data", at(REFCOUNT_ORDER, u32(7)), FormatError, None),
    "extension_length_huge": ("data", at(116, u32(0x7FFFFFFF)), FormatError, None),
    "extension_past_cluster0": ("data", at(116, u32(64 * KiB - 112)), FormatError, None),
    "extension_duplicated": ("data", two_unknown_extensions(0x12345678, 0x12345678),
                             FormatError, None),
    "backing_offset_past_cluster0": ("backed", at(BACKING_OFFSET, u64(64 * KiB + 8)),
                                     FormatError, None),
    "backing_offset_huge": ("backed", at(BACKING_OFFSET, u64(0xFFFFFFFFFFFFFFFF)), FormatError,
                            None),
    "backing_size_huge": ("backed", at(BACKING_SIZE, u32(0xFFFFFFFF)), FormatError, None),
    "backing_name_past_cluster0": ("backed", at(BACKING_OFFSET, u64(64 * KiB - 4)),
                                   FormatError, None),
    "extension_into_backing_name": ("backed", at(116, u32(0x7FFFFFFF)), FormatError, None),
    # tables (080, 060, 108)
    "l1_offset_unaligned": ("data", poke(lambda lay: L1_OFFSET,
                                         lambda lay: u64(lay.l1_offset + 512)), FormatError, None),
    "l1_offset_past_eof": ("data", at(L1_OFFSET, u64(0x7FFF0000)), FormatError, None),
    "l1_offset_huge": ("data", at(L1_OFFSET, u64(0xFFFFFFFFFFFF0000)), FormatError, None),
    "l1_size_huge": ("data", at(L1_SIZE, u32(0xFFFFFFFF)), FormatError, None),
    "l1_size_7fffffff": ("data", at(L1_SIZE, u32(0x7FFFFFFF)), FormatError, None),
    "l1_size_over_32mib": ("data", at(L1_SIZE, u32(32 * MiB // 8 + 1)), FormatError, None),
    "l1_size_too_small": ("data", at(L1_SIZE, u32(0)), FormatError, None),
    "size_larger_than_l1": ("data", at(SIZE, u64(1 << 50)), FormatError, None),
    "reftable_clusters_0": ("data", at(REFTABLE_CLUSTERS, u32(0)), FormatError, None),
    "reftable_clusters_huge": ("data", at(REFTABLE_CLUSTERS, u32(0xFFFFFFFF)), FormatError, None),
    "reftable_clusters_20001": ("data", at(REFTABLE_CLUSTERS, u32(0x00020001)), FormatError,
                                None),
    "reftable_offset_unaligned": ("data", at(REFTABLE_OFFSET, u64(0x1234567890ABCDEF)),
                                  FormatError, None),
    "reftable_offset_0": ("data", at(REFTABLE_OFFSET, u64(0)), FormatError, None),
    "reftable_offset_past_eof": ("data", at(REFTABLE_OFFSET, u64(0x7FFF0000)), FormatError,
                                 None),
    "reftable_offset_huge": ("data", at(REFTABLE_OFFSET, u64(0xFFFFFFFFFFFF0000)), FormatError,
                             None),
    # snapshots (080, 261)
    "nb_snapshots_ffffffff": ("snap", at(NB_SNAPSHOTS, u32(0xFFFFFFFF)), FormatError, None),
    "nb_snapshots_7fffffff": ("snap", at(NB_SNAPSHOTS, u32(0x7FFFFFFF)), FormatError, None),
    "nb_snapshots_65537": ("snap", at(NB_SNAPSHOTS, u32(65537)), FormatError, None),
    "nb_snapshots_past_table": ("snap", at(NB_SNAPSHOTS, u32(1000)), FormatError, None),
    "snapshots_offset_unaligned": ("snap", poke(lambda lay: SNAPSHOTS_OFFSET,
                                                lambda lay: u64(lay.snapshots_offset + 8)),
                                   FormatError, None),
    "snapshots_offset_past_eof": ("snap", at(SNAPSHOTS_OFFSET, u64(0x7FFF0000)), FormatError,
                                  None),
    "snapshots_offset_huge": ("snap", at(SNAPSHOTS_OFFSET, u64(0xFFFFFFFFFFFF0000)),
                              FormatError, None),
    "snapshot_extra_data_over_1024": ("snap", snap_field(36, lambda lay: u32(1025)),
                                      FormatError, None),
    "snapshot_extra_data_64k": ("snap", snap_field(36, lambda lay: u32(65536)), FormatError,
                                None),
    "snapshot_l1_unaligned": ("snap", snap_field(0, lambda lay: u64(0x400200)), FormatError,
                              "snapshot 1"),
    "snapshot_l1_size_huge": ("snap", snap_field(8, lambda lay: u32(0x10000000)), FormatError,
                              "snapshot 1"),
    "snapshot_l1_past_eof": ("snap", snap_field(0, lambda lay: u64(0x7FFF0000)), FormatError,
                             "snapshot 1"),
    "snapshot_l1_size_too_small": ("snap", snap_field(8, lambda lay: u32(0)), FormatError,
                                   "snapshot 1"),
    "snapshot_l1_entry_reserved_bits": ("snap", poke(lambda lay: snapshot_l1(lay),
                                                     lambda lay: u64(COPIED | 0x40000 | 0x100)),
                                        FormatError, None),
    # L1 entries (080, 060)
    "l1_entry_reserved_low_bits": ("data", l1_entry(lambda lay: COPIED | lay.l2_offset | 1),
                                   FormatError, None),
    "l1_entry_reserved_high_bits": ("data", l1_entry(lambda lay: lay.l2_offset | 1 << 60),
                                    FormatError, None),
    "l1_entry_unaligned_l2": ("data", l1_entry(lambda lay: COPIED | lay.l2_offset + 512),
                              FormatError, None),
    "l1_entry_l2_past_eof": ("data", l1_entry(lambda lay: COPIED | 0x7FFF0000), FormatError,
                             None),
    "l1_entry_l2_is_the_l1": ("data", l1_entry(lambda lay: COPIED | lay.l1_offset), FormatError,
                              None),
    "l1_entry_l2_is_the_header": ("data", l1_entry(lambda lay: COPIED | 0), None, None),
    "l1_entry_l2_is_the_reftable": ("data", l1_entry(lambda lay: COPIED | lay.reftable_offset),
                                    FormatError, None),
    # L2 entries (080, 060)
    "l2_entry_reserved_bits": ("data", l2_entry(0, lambda lay: lay.l2_entries[0] | 2),
                               FormatError, None),
    "l2_entry_reserved_high_bits": ("data", l2_entry(1, lambda lay: lay.l2_entries[1] | 1 << 57),
                                    FormatError, None),
    "l2_entry_unaligned_host": ("data", l2_entry(0, lambda lay: lay.l2_entries[0] + 512),
                                FormatError, None),
    "l2_entry_host_beyond_2_56": ("data", l2_entry(0, lambda lay: COPIED | 1 << 56),
                                  FormatError, None),
    "l2_entry_host_huge_compressed": ("data", l2_entry(0, lambda lay: 0xBFFFFFFFFFFF0000),
                                      FormatError, None),
    "l2_entry_host_past_eof": ("data", l2_entry(0, lambda lay: 0x800000FFFFFF0000), FormatError,
                               None),
    "l2_entry_host_just_past_eof": ("data", l2_entry(2, lambda lay: COPIED | (
        lay.file_size + 2 * lay.cluster_size) // lay.cluster_size * lay.cluster_size),
        FormatError, None),
    "l2_entry_data_in_the_l1": ("data", l2_entry(0, lambda lay: COPIED | lay.l1_offset),
                                FormatError, None),
    "l2_entry_data_in_the_header": ("data", l2_entry(1, lambda lay: COPIED | 0), None, None),
    "l2_entry_data_in_its_own_l2": ("data", l2_entry(0, lambda lay: COPIED | lay.l2_offset),
                                    FormatError, None),
    "l2_entry_data_in_the_reftable": ("data", l2_entry(0, lambda lay: COPIED |
                                                      lay.reftable_offset), FormatError, None),
    "l2_entry_zero_unaligned_prealloc": ("data", l2_entry(0, lambda lay: lay.l2_entries[0]
                                                         + 512 | 1), FormatError, None),
    "l2_entry_zero_flag_in_v2": ("v2", l2_entry(0, lambda lay: lay.l2_entries[0] | 1),
                                 FormatError, None),
    "l2_small_cluster_reserved": ("small", l2_entry(3, lambda lay: lay.l2_entries[3] | 0x100),
                                  FormatError, None),
    "extl2_alloc_and_zero_bits": ("extl2", l2_entry(1, lambda lay: 0x3 | 0x3 << 32), FormatError,
                                  None),
    "extl2_alloc_bits_unallocated": ("extl2", l2_entry(5, lambda lay: 0xFF), FormatError, None),
    "extl2_zero_flag_in_descriptor": ("extl2", l2_entry(0, lambda lay: lay.l2_entries[0] | 1),
                                      FormatError, None),
    # compressed clusters (zlib and zstd)
    "zlib_past_eof": ("zlib", l2_entry(0, lambda lay: with_compressed_host(
        lay, lay.file_size + 4096)), FormatError, None),
    "zstd_past_eof": ("zstd", l2_entry(0, lambda lay: with_compressed_host(
        lay, lay.file_size + 4096)), FormatError, None),
    "zlib_runs_past_eof": ("zlib", l2_entry(0, lambda lay: with_compressed_host(
        lay, lay.file_size - 20)), FormatError, None),
    "zstd_runs_past_eof": ("zstd", l2_entry(0, lambda lay: with_compressed_host(
        lay, lay.file_size - 20)), FormatError, None),
    "zlib_garbage": ("zlib", poke(compressed_host, lambda lay: bytes(range(256)) * 4),
                     FormatError, None),
    "zstd_garbage": ("zstd", poke(compressed_host, lambda lay: bytes(range(256)) * 4),
                     FormatError, None),
    "zlib_points_at_header": ("zlib", l2_entry(0, lambda lay: with_compressed_host(lay, 0)),
                              FormatError, None),
    "zstd_points_at_l1": ("zstd", l2_entry(0, lambda lay: with_compressed_host(
        lay, lay.l1_offset)), FormatError, None),
    "compressed_with_copied": ("zlib", l2_entry(0, lambda lay: lay.l2_entries[0] | COPIED),
                               FormatError, None),
    "zstd_image_without_compression_bit": ("zstd", at(INCOMPAT, u64(0)), FormatError, None),
    "zlib_with_compression_bit": ("data", at(INCOMPAT, u64(1 << 3)), FormatError, None),
    "zstd_type_without_bit": ("data", at(COMPRESSION_TYPE, b"\x01"), FormatError, None),
    "compression_type_unknown": ("data", lambda p, lay: (q.poke(p, COMPRESSION_TYPE, b"\x02"),
                                                         q.poke(p, INCOMPAT, u64(1 << 3))),
                                 UnsupportedError, None),
    # feature bits (036)
    # extensions with bad contents
    "bitmaps_extension_bad_length": ("data", lambda p, lay: q.poke(
        p, 112, u32(0x23852875) + u32(8) + bytes(8) + bytes(8)), FormatError, None),
    "crypto_extension_bad_length": ("data", lambda p, lay: q.poke(
        p, 112, u32(0x0537BE77) + u32(8) + bytes(8) + bytes(8)), FormatError, None),
    "backing_format_too_long": ("data", lambda p, lay: q.poke(
        p, 112, u32(0xE2792ACA) + u32(24) + b"q" * 24 + bytes(8)), FormatError, None),
    "backing_name_not_utf8": ("backed", poke(lambda lay: struct.unpack(
        ">Q", lay.path.read_bytes()[BACKING_OFFSET:BACKING_OFFSET + 8])[0],
        lambda lay: b"\xff\xfe"), FormatError, "UTF-8"),
    "backing_name_with_nul": ("backed", poke(lambda lay: struct.unpack(
        ">Q", lay.path.read_bytes()[BACKING_OFFSET:BACKING_OFFSET + 8])[0] + 2,
        lambda lay: b"\0"), FormatError, "NUL"),
    "unknown_incompatible_bit_unnamed": ("data", at(INCOMPAT, u64(1 << 63)), UnsupportedError,
                                         "63"),
    "crypt_method_unknown": ("data", at(CRYPT, u32(7)), FormatError, None),
    "external_data_bit_without_name": ("data", at(INCOMPAT, u64(1 << 2)), FormatError, None),
    "raw_data_bit_without_data_file": ("data", at(AUTOCLEAR, u64(1 << 1)), FormatError, None),
    "extended_l2_with_4k_clusters": ("small", at(INCOMPAT, u64(1 << 4)), FormatError, None),
}

# Cases where the patched image is one QEMU itself reads without complaint and qcowfs may read
# too; listed with the expected class None, they must still never raise anything else.
TOLERATED = {name for name, (_, _, err, _) in CASES.items() if err is None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_image_is_refused_with_an_image_error(goods: Goods, tmp_path: Path, case: str):
    base, patch, error, match = CASES[case]
    img, lay = copy_of(goods, base, tmp_path)
    patch(img, lay)
    if case in TOLERATED:
        tracemalloc.start()
        try:
            try:
                read_everything(img)
            except ImageError as exc:
                assert str(img) in str(exc)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_BOUND
        return
    assert_refused(img, error, match=match)


def test_distinct_unknown_extensions_are_accepted(goods: Goods, tmp_path: Path):
    """The control for ``extension_duplicated``: the same patch with two different magics
    opens and reads, so only the duplicate is refused."""
    img, lay = copy_of(goods, "data", tmp_path)
    two_unknown_extensions(0x12345678, 0x12345679)(img, lay)
    read_everything(img)


def test_unknown_incompatible_feature_is_named_from_the_feature_table(goods: Goods,
                                                                      tmp_path: Path):
    img, _ = copy_of(goods, "data", tmp_path)
    data = img.read_bytes()
    table_magic = struct.pack(">I", 0x6803F857)
    start = data.index(table_magic, 104) + 8
    # Rename the entry of incompatible bit 4 into one for bit 9, then set bit 9.
    for i in range(start, start + 8 * 48, 48):
        if data[i] == 0 and data[i + 1] == 4:
            q.poke(img, i, bytes([0, 9]) + b"frobnication journal".ljust(46, b"\0"))
            break
    else:
        raise AssertionError("no feature table entry for incompatible bit 4")
    q.poke(img, INCOMPAT, u64(1 << 9))
    assert q.qemu_img("info", str(img), check=False).returncode != 0
    assert_refused(img, UnsupportedError, match="frobnication journal")


@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_encrypted_image_without_key_is_refused(tmp_path: Path, fmt: str):
    img = q.create_encrypted(tmp_path / f"{fmt}.qcow2", "1M", "123456", encrypt_format=fmt)
    exc = assert_refused(img, KeyRequiredError)
    assert "encrypt" in exc.reason.lower()


# --- chains and external files ------------------------------------------------------------------


def test_missing_backing_file_is_refused(tmp_path: Path):
    base = q.create(tmp_path / "base.qcow2", MiB)
    top = q.create(tmp_path / "top.qcow2", MiB, backing=base.name)
    base.unlink()
    assert_refused(top, BackingChainError, match=str(base))


def test_backing_loop_is_refused(tmp_path: Path):
    a = q.create(tmp_path / "a.qcow2", MiB)
    b = q.create(tmp_path / "b.qcow2", MiB, backing=a.name)
    q.qemu_img("rebase", "-u", "-b", b.name, "-F", "qcow2", str(a))
    assert_refused(b, BackingChainError, match="loop")


def test_image_that_backs_itself_is_refused(tmp_path: Path):
    a = q.create(tmp_path / "a.qcow2", MiB)
    q.qemu_img("rebase", "-u", "-b", a.name, "-F", "qcow2", str(a))
    assert_refused(a, BackingChainError, match="loop")


def test_chain_deeper_than_64_is_refused(tmp_path: Path):
    prev = q.create(tmp_path / "layer0.qcow2", MiB)
    for i in range(1, 70):
        prev = q.create(tmp_path / f"layer{i}.qcow2", MiB, backing=prev.name)
    assert_refused(prev, BackingChainError, names=tmp_path, match="64")


def test_missing_external_data_file_is_refused(tmp_path: Path):
    data = tmp_path / "img.data"
    img = q.create(tmp_path / "img.qcow2", MiB, data_file=str(data))
    q.qemu_io(img, "write -P 0x11 0 64K")
    data.unlink()
    assert_refused(img, BackingChainError, match=str(data))


def test_unsupported_backing_format_is_refused(tmp_path: Path):
    base = q.create(tmp_path / "base.qcow2", MiB)
    top = q.create(tmp_path / "top.qcow2", MiB, backing=base.name)
    data = top.read_bytes()
    pos = data.index(b"qcow2", 112)
    q.poke(top, pos, b"vmdk\0")
    q.poke(top, pos - 4, u32(4))
    assert_refused(top, UnsupportedError, match="vmdk")


def test_backing_file_that_is_broken_is_refused_naming_it(goods: Goods, tmp_path: Path):
    base, _ = copy_of(goods, "data", tmp_path)
    top = q.create(tmp_path / "top.qcow2", 4 * MiB, backing=base.name)
    q.poke(base, HEADER_LENGTH, u32(0xFFFFFFFF))
    assert_refused(top, FormatError, names=base)


# --- truncated files ----------------------------------------------------------------------------

TRUNCATIONS: dict[str, tuple[str, Callable[[Layout], int]]] = {
    "empty": ("data", lambda lay: 0),
    "magic_only": ("data", lambda lay: 4),
    "inside_v2_header": ("data", lambda lay: 50),
    "inside_v3_header": ("data", lambda lay: 100),
    "inside_extensions": ("data", lambda lay: 200),
    "end_of_cluster0": ("data", lambda lay: lay.cluster_size),
    "inside_l1": ("data", lambda lay: lay.l1_offset + 4),
    "start_of_l2": ("data", lambda lay: lay.l2_offset),
    "inside_l2": ("data", lambda lay: lay.l2_offset + 100),
    "first_data_cluster": ("data", lambda lay: lay.l2_entries[0] & 0x00FFFFFFFFFFFE00),
    "inside_snapshot_table": ("snap", lambda lay: lay.snapshots_offset + 30),
    "before_compressed_data": ("zlib", lambda lay: compressed_host(lay)),
    "small_cluster_data": ("small", lambda lay: lay.l2_entries[0] & 0x00FFFFFFFFFFFE00),
    "v2_inside_header": ("v2", lambda lay: 60),
}


@pytest.mark.parametrize("case", sorted(TRUNCATIONS))
def test_truncated_image_is_refused(goods: Goods, tmp_path: Path, case: str):
    base, point = TRUNCATIONS[case]
    img, lay = copy_of(goods, base, tmp_path)
    cut = point(lay)
    assert 0 <= cut < lay.file_size
    os.truncate(img, cut)
    # Opened as qcow2: a file cut before its magic would otherwise be probed as raw.
    assert_refused(img, FormatError, fmt="qcow2")


def test_backing_file_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path):
    """A FIFO would block an open() forever (qemu-img itself hangs on one)."""
    fifo = tmp_path / "base.fifo"
    os.mkfifo(fifo)
    top = tmp_path / "top.qcow2"
    q.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", fifo.name, "-F", "raw", str(top), "1M")
    assert_refused(top, ImageError, names=fifo)


def test_image_that_is_a_directory_is_refused(tmp_path: Path):
    folder = tmp_path / "not-an-image"
    folder.mkdir()
    assert_refused(folder, ImageError)


def test_broken_snapshot_l1_fails_only_that_snapshot(goods: Goods, tmp_path: Path):
    """A bad snapshot L1 table is an error when that snapshot is opened; the active disk and
    the snapshot list still work (as in QEMU, which fails only to load that snapshot)."""
    img, lay = copy_of(goods, "snap", tmp_path)
    q.poke(img, lay.snapshot_entries[0], u64(0x400200))
    expected = q.to_raw(img, tmp_path / "expected.raw")
    with qcowfs.open_image(str(img)) as disk:
        assert disk.read(0, disk.size) == expected
        assert [s.name for s in disk.snapshots] == ["first"]
        with pytest.raises(FormatError, match="snapshot 1") as info:
            disk.snapshot("first")
        assert str(img) in str(info.value)


@pytest.mark.parametrize("name", ["data", "small", "v2", "snap", "zlib", "zstd", "extl2"])
def test_random_metadata_damage_gives_only_image_errors(goods: Goods, tmp_path: Path, name: str):
    """Seeded random damage to the header, the L1, the first L2 table and the snapshot table:
    every copy reads or raises an ImageError naming it, in bounded memory."""
    import random
    src = goods.get(name)
    good = src.read_bytes()
    lay = layout(src)
    regions = [(0, 700), (lay.l1_offset, lay.l1_offset + max(8, lay.l1_size * 8))]
    if lay.l2_offset:
        regions.append((lay.l2_offset, lay.l2_offset + min(lay.cluster_size, 4096)))
    if lay.snapshots_offset:
        regions.append((lay.snapshots_offset, lay.snapshots_offset + 200))
    rng = random.Random(f"damage-{name}")
    img = tmp_path / f"damaged-{name}.qcow2"
    refused = 0
    for _ in range(40):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            start, end = rng.choice(regions)
            pos = rng.randrange(start, min(end, len(data)))
            if rng.random() < 0.5:
                data[pos] = rng.randrange(256)
            else:
                data[pos] ^= 1 << rng.randrange(8)
        img.write_bytes(data)
        tracemalloc.start()
        try:
            read_everything(img)
        except ImageError as exc:
            refused += 1
            assert str(img) in str(exc) or str(tmp_path) in str(exc), str(exc)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < MEMORY_BOUND
    assert refused, "no damage was noticed at all"
