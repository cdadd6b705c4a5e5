"""Persistent dirty bitmaps as ``qemu-img bitmap`` changes them: loaded whole into memory,
changed there, stored back in new clusters.

The store is crash-safe in QEMU's order: the bitmap data clusters, the bitmap tables and the
new directory go to freshly allocated clusters and are made durable (refcounts first, by the
writer's flush); then one write inside cluster 0 points the header's bitmaps extension at the
new directory; only then are the old directory, tables and data clusters freed. A crash
leaves the old bitmaps or the new ones, plus at most leaked clusters.
"""

from __future__ import annotations

import struct
from array import array

from qcowfs.errors import FormatError, ImageError
from qcowfs.format import header as hdr
from qcowfs.format.bitmaps import (
    BME_TABLE_OFFSET_MASK,
    FLAG_AUTO,
    FLAG_IN_USE,
    MAX_BITMAPS,
    parse_bitmap_directory,
)
from qcowfs.format.record import field, record
from qcowfs.format.tables import decode_u64_table, encode_u64_table
from qcowfs.image.header_update import write_header

_ENTRY = struct.Struct(">QIIBBHI")
TYPE_DIRTY_TRACKING = 1
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
#: bitmaps larger than this in all are not kept in memory by a writer (they stay in use)
MAX_TRACKED_BYTES = 64 << 20


@record
class Bitmap:
    """One bitmap in memory: bit ``i`` of ``bits`` (least significant first in each byte)
    covers guest bytes ``[i << granularity_bits, (i + 1) << granularity_bits)``."""

    name: str
    granularity_bits: int
    enabled: bool
    bits: bytearray
    extra_data: bytes = b""
    in_use: bool = False
    old_clusters: list[tuple[int, int]] = field(default_factory=list)  # (offset, clusters)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits


def bitmap_bytes(size: int, granularity_bits: int) -> int:
    granules = -(-size // (1 << granularity_bits))
    return -(-granules // 8)


def default_granularity(cluster_size: int) -> int:
    """QEMU's default for a new bitmap: the cluster size, kept between 4 KiB and 64 KiB."""
    return min(max(cluster_size, 4096), 65536)


def load(image, directory: bytes | None = None, max_bytes: int | None = None
         ) -> list[Bitmap] | None:
    """Every bitmap of ``image`` (a Qcow2Image), read whole. ``directory`` overrides the
    directory bytes in the file (the writer marks them in use when it opens the image).
    None when they would take more than ``max_bytes`` of memory."""
    h = image.header
    ext = h.bitmaps
    if ext is None or not ext.nb_bitmaps or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        return []
    cs = image.cluster_size
    if directory is None:
        directory = image.file.read_exact(ext.directory_offset, ext.directory_size,
                                          "bitmap directory")
    try:
        entries = parse_bitmap_directory(directory, ext.nb_bitmaps)
    except FormatError as exc:
        raise FormatError(image.path, exc.reason) from None
    size = image.active.size
    if max_bytes is not None and sum(bitmap_bytes(size, e.granularity_bits) for e in entries
                                     if 0 <= e.granularity_bits <= 63) > max_bytes:
        return None
    out = []
    for e in entries:
        if not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS:
            raise FormatError(image.path, f"bitmap {e.name!r}: invalid granularity")
        nbytes = bitmap_bytes(size, e.granularity_bits)
        if e.table_size != -(-nbytes // cs) or e.table_offset % cs:
            raise FormatError(image.path, f"bitmap {e.name!r}: invalid table")
        bits = bytearray(nbytes)
        old = [(e.table_offset, -(-e.table_size * 8 // cs))] if e.table_size else []
        table = decode_u64_table(image.file.read_exact(e.table_offset, e.table_size * 8,
                                                       f"bitmap {e.name!r} table"))
        for i, entry in enumerate(table):
            start = i * cs
            n = min(cs, nbytes - start)
            off = entry & BME_TABLE_OFFSET_MASK
            if off:
                bits[start:start + n] = image.file.read_exact(off, n, "bitmap data")
                old.append((off, 1))
            elif entry & 1:
                bits[start:start + n] = b"\xff" * n
        out.append(Bitmap(e.name, e.granularity_bits, bool(e.flags & FLAG_AUTO), bits,
                          e.extra_data, bool(e.flags & FLAG_IN_USE), old))
    return out


def fit(bm: Bitmap, size: int) -> None:
    """Resize ``bm`` for a disk of ``size`` bytes: bits past the end dropped, new ones clear
    (what QEMU does to bitmaps when the disk is resized)."""
    n = bitmap_bytes(size, bm.granularity_bits)
    bits = bytearray(bm.bits[:n]).ljust(n, b"\0")
    spare = n * 8 - -(-size // bm.granularity)
    if spare and n:
        bits[-1] &= 0xFF >> spare
    bm.bits = bits


def resized(bitmaps: list[Bitmap], size: int) -> list[Bitmap]:
    """Copies of ``bitmaps`` for a disk of ``size`` bytes, as new bitmaps: not in use, no
    clusters of their own yet."""
    out = []
    for bm in bitmaps:
        copy = Bitmap(bm.name, bm.granularity_bits, bm.enabled, bm.bits, bm.extra_data)
        fit(copy, size)
        out.append(copy)
    return out


def set_range(bm: Bitmap, offset: int, length: int) -> None:
    """Set the bits of every granule ``[offset, offset + length)`` touches: whole bytes with
    one slice assignment, so a write costs the same whatever the granularity."""
    if length <= 0:
        return
    bits = bm.bits
    first = offset >> bm.granularity_bits
    last = min((offset + length - 1) >> bm.granularity_bits, len(bits) * 8 - 1)
    if first > last:
        return
    lo, hi = first >> 3, last >> 3
    if lo == hi:
        bits[lo] |= (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))
        return
    bits[lo] |= (0xFF << (first & 7)) & 0xFF
    bits[hi] |= 0xFF >> (7 - (last & 7))
    if hi > lo + 1:
        bits[lo + 1:hi] = b"\xff" * (hi - lo - 1)


def merge(dst: Bitmap, src: Bitmap) -> None:
    """Set in ``dst`` every granule that overlaps a set granule of ``src``."""
    if src.granularity_bits == dst.granularity_bits and len(src.bits) == len(dst.bits):
        merged = int.from_bytes(dst.bits, "little") | int.from_bytes(src.bits, "little")
        dst.bits[:] = merged.to_bytes(len(dst.bits), "little")
        return
    g = src.granularity
    for i, byte in enumerate(src.bits):
        if byte:
            for b in range(8):
                if byte >> b & 1:
                    set_range(dst, ((i << 3) + b) * g, g)


def store(writer, bitmaps: list[Bitmap], old: list[Bitmap]) -> None:
    """Write ``bitmaps`` as the image's bitmaps (none: drop the extension), then free the
    clusters of ``old`` (what :func:`load` returned)."""
    image = writer.img
    writer.mark_dirty()
    cs = image.cluster_size
    refs = writer.refs
    file = image.file
    if len(bitmaps) > MAX_BITMAPS:
        raise ImageError(image.path, "too many bitmaps")
    directory = bytearray()
    for bm in bitmaps:
        nbytes = len(bm.bits)
        table = [0] * -(-nbytes // cs)
        for i in range(len(table)):
            chunk = bytes(bm.bits[i * cs:(i + 1) * cs])
            if chunk.count(0) != len(chunk):
                off = refs.allocate(1) * cs
                file.write(off, chunk.ljust(cs, b"\0"))
                table[i] = off
        table_off = 0
        if table:
            table_clusters = -(-len(table) * 8 // cs)
            table_off = refs.allocate(table_clusters) * cs
            raw = encode_u64_table(array("Q", table))
            file.write(table_off, raw.ljust(table_clusters * cs, b"\0"))
        name = bm.name.encode()
        flags = (FLAG_AUTO if bm.enabled else 0) | (FLAG_IN_USE if bm.in_use else 0)
        directory += _ENTRY.pack(table_off, len(table), flags, TYPE_DIRTY_TRACKING,
                                 bm.granularity_bits, len(name), len(bm.extra_data))
        directory += bm.extra_data + name
        directory += bytes(-len(directory) % 8)
    h = image.header
    if bitmaps:
        dir_clusters = -(-len(directory) // cs)
        dir_off = refs.allocate(dir_clusters) * cs
        file.write(dir_off, bytes(directory).ljust(dir_clusters * cs, b"\0"))
        ext = hdr.BitmapsExtension(len(bitmaps), len(directory), dir_off)
        autoclear = h.autoclear_features | hdr.AUTOCLEAR_BITMAPS
    else:
        ext = None
        autoclear = h.autoclear_features & ~hdr.AUTOCLEAR_BITMAPS
    writer.note_metadata_write()
    writer.flush()  # refcounts up, then the new clusters durable
    old_ext = h.bitmaps
    write_header(image, h.replace(bitmaps=ext, autoclear_features=autoclear))
    # the writer and its refcounts hold the header object itself
    h.bitmaps, h.autoclear_features = ext, autoclear
    image.header = h
    if old_ext is not None and old_ext.directory_size:
        refs.add_range(old_ext.directory_offset // cs, -(-old_ext.directory_size // cs), -1)
    for bm in old:
        for off, n in bm.old_clusters:
            refs.add_range(off // cs, n, -1)
    writer.flush()
    # what is on disk now is exact: the writer has nothing left to write back
    writer.bitmaps, writer.tracking, writer.bitmap_directory_at_open = None, [], None

