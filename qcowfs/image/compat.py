"""Changing an open image's qcow2 version (``amend -o compat=``), as QEMU 7.2 allows it.

Upgrade (v2 to v3): snapshot entries without the extra data v3 requires are completed (the
table is rewritten at a new place first), then the header is rewritten as v3 in one write.

Downgrade (v3 to v2) refuses what v2 cannot hold -- a refcount width other than 16 bits, an
external data file, snapshots of another disk size or with a VM state past 4 GiB, extended L2
entries, zstd-compressed clusters -- and checks all of that before it changes anything. Then it
makes the image v2-shaped: refcounts exact and the dirty bit cleared, persistent bitmaps
removed (a v2 header cannot mark them consistent: QEMU would drop them and leak their clusters),
zero clusters turned into what v2 has (an unallocated entry where nothing lies below, else a
cluster of written zeros), all of it durable before one header write makes the image v2. A
crash before that write leaves a v3 image that reads the same, with leaks at worst.

Zero clusters are expanded in every L2 table, the snapshots' too. QEMU 7.2 writes zeros into a
preallocated zero cluster even when a snapshot still holds data there (that snapshot then reads
zeros); qcowfs writes the zeros into a new cluster instead whenever anything else references
the old one.
"""

from __future__ import annotations

from qcowfs.errors import ImageError
from qcowfs.format import header as hdr
from qcowfs.format.tables import COMPRESSED, COPIED, L1E_OFFSET_MASK, L2E_OFFSET_MASK, ZERO_FLAG
from qcowfs.image import bitmaps as persistent
from qcowfs.image.header_update import write_header

from .write import Qcow2Writer

_U32_MAX = (1 << 32) - 1


def downgrade_refusal(w: Qcow2Writer, *, refcount_order: int | None = None,
                      size: int | None = None) -> str | None:
    """Why the image cannot become v2, in QEMU's words and order (None: it can); the refcount
    width and disk size are the ones the image will have by then, when given."""
    img, h = w.img, w.header
    if (h.refcount_order if refcount_order is None else refcount_order) != 4:
        return "compat=0.10 requires refcount_bits=16"
    if h.has_data_file:
        return "Cannot downgrade an image with a data file"
    if size is None:
        size = img.active.size
    for s in img.snapshots:
        disk_size = s.disk_size if s.disk_size is not None else h.size
        if s.vm_state_size > _U32_MAX or disk_size != size:
            return "Internal snapshots prevent downgrade of image"
    rest = h.incompatible_features & ~(hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_COMPRESSION)
    if rest:
        return f"Cannot downgrade an image with incompatible features 0x{rest:x} set"
    if h.compression_type != hdr.COMPRESSION_ZLIB and _has_compressed(w):
        return ("Cannot downgrade an image with zstd compression type and existing compressed "
                "clusters")
    return None


def _l1_tables(w: Qcow2Writer) -> list:
    img = w.img
    return [img.active.l1] + [img.snapshot_mapping(s).l1 for s in img.snapshots]


def _l2_tables(w: Qcow2Writer) -> list[int]:
    """Every distinct L2 table offset of the active disk and the snapshots, in order."""
    seen: dict[int, None] = {}
    for l1 in _l1_tables(w):
        for entry in l1:
            off = entry & L1E_OFFSET_MASK
            if off:
                seen.setdefault(off)
    return list(seen)


def _has_compressed(w: Qcow2Writer) -> bool:
    """Any compressed cluster, in the active disk or a snapshot (QEMU looks at the active disk
    only, and a downgraded snapshot would then decode zstd data as zlib)."""
    cache = w.img.l2_cache
    step = 2 if w.extended else 1
    for off in _l2_tables(w):
        table = cache.get(off)
        for j in range(0, len(table), step):
            if table[j] & COMPRESSED:
                return True
    return False


def upgrade(w: Qcow2Writer) -> None:
    """v2 to v3."""
    from .snapshots import write_table

    img, h = w.img, w.header
    if h.version >= 3:
        return
    if any(s.extra_data_size < 16 for s in img.snapshots):
        entries = []
        for s in img.snapshots:
            if s.disk_size is None:
                s.disk_size = h.size
            s.extra_data_size = 24 + len(s.unknown_extra)
            entries.append(s)
        write_table(w, entries)
    w.full_flush()
    write_header(img, h.replace(version=3, refcount_order=4, incompatible_features=0,
                                compatible_features=0, autoclear_features=0,
                                compression_type=hdr.COMPRESSION_ZLIB))


def downgrade(w: Qcow2Writer) -> None:
    """v3 to v2 (see the module docstring). Raises ImageError with QEMU's message when the
    image cannot be downgraded, before anything changes."""
    h = w.header
    if h.version < 3:
        return
    why = downgrade_refusal(w)
    if why:
        raise ImageError(None, why)
    _drop_bitmaps(w)
    expand_zero_clusters(w)
    w.lazy = False
    w.full_flush()
    w._stage_refcounts(force=True)
    write_header(w.img, h.replace(version=2, refcount_order=4, incompatible_features=0,
                                  compatible_features=0, autoclear_features=0,
                                  compression_type=hdr.COMPRESSION_ZLIB, bitmaps=None,
                                  unknown_header_fields=b""))


def _drop_bitmaps(w: Qcow2Writer) -> None:
    h = w.header
    if not h.bitmaps:
        return
    loaded = w.bitmaps
    if loaded is None and h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        ext = h.bitmaps
        raw = w.file.read(ext.directory_offset, ext.directory_size)
        try:
            loaded = persistent.load(w.img, raw)
        except ImageError:
            loaded = None
    if loaded is not None:
        persistent.store(w, [], loaded)
    w.bitmaps, w.tracking, w.bitmap_directory_at_open = None, [], None


def expand_zero_clusters(w: Qcow2Writer) -> int:
    """Replace every zero cluster by what v2 can say (see the module docstring); returns how
    many entries changed. The changes go through the writer's caches and reach the disk in its
    order (zeros and refcounts first, then the tables)."""
    img, refs, cb, cs = w.img, w.refs, w.cb, w.cs
    cache = img.l2_cache
    backed = w.backing_size > 0 or img.header.backing_file is not None
    zeros = bytes(cs)
    l2_mask = img.l2_entries - 1
    # the guest offset of each table (for encryption whose IV follows the guest offset)
    guest_of: dict[int, int] = {}
    for l1 in _l1_tables(w):
        for i, entry in enumerate(l1):
            off = entry & L1E_OFFSET_MASK
            if off:
                guest_of.setdefault(off, i << (cb + w.l2_bits))
    changed = 0
    for l2_off in guest_of:
        table = cache.get(l2_off)
        sharers = refs.get(l2_off >> cb)
        dirty = False
        for j, entry in enumerate(table):
            if not entry & ZERO_FLAG or entry & COMPRESSED:
                continue
            host = entry & L2E_OFFSET_MASK
            if not host and not backed:
                table[j] = 0
                dirty = True
                changed += 1
                continue
            if not host or refs.get(host >> cb) > sharers:
                new = refs.allocate(1)
                if sharers > 1:
                    refs.add(new, sharers - 1)
                w.note_metadata_write()
                if host:
                    w.deferred.extend([(host, cs)] * sharers)
                host = new << cb
            w.check_overlap(host, cs, "zero cluster expansion")
            data = zeros
            if w.crypto is not None:
                guest = guest_of[l2_off] + ((j & l2_mask) << cb)
                data = bytes(w.crypto.encrypt(memoryview(zeros), host, guest))
            w.file.write(host, data)
            w.note_metadata_write()
            table[j] = host | (COPIED if refs.get(host >> cb) == 1 else 0)
            dirty = True
            changed += 1
        if dirty:
            w.touch_l2(l2_off, table)
    return changed
