"""Changing the virtual size: L1 growth (new table durable, then one 12-byte header switch,
then the old table freed), zeroing new space a longer backing file would show through, and
shrinking (the clusters cut off are dropped before the size changes)."""

from __future__ import annotations

import errno
from array import array

from qcowfs.errors import ImageError, UnsupportedError
from qcowfs.format import header as hdr
from qcowfs.format.tables import MAX_L1_BYTES, encode_u64_table

from .discard import discard
from .write import Qcow2Writer


def grow_l1(w: Qcow2Writer, entries: int) -> None:
    img, h, cb = w.img, w.header, w.cb
    if entries * 8 > MAX_L1_BYTES:
        raise ImageError(w.path, "the L1 table would grow past QEMU's 32 MiB limit",
                         errno=errno.EFBIG)
    w.full_flush()
    old = img.active.l1
    new = array("Q", old)
    new.extend(array("Q", bytes(8 * (entries - len(old)))))
    clusters = -(-entries * 8 // w.cs)
    new_off = w.refs.allocate(clusters) << cb
    w.check_overlap(new_off, entries * 8, "L1 table")
    w.file.write(new_off, encode_u64_table(new))
    w.note_metadata_write()
    w.full_flush()  # the new table and its refcounts are durable
    w.file.write(hdr.OFF_L1, hdr.pack_l1_pointer(entries, new_off))
    w.file.sync()
    old_off, old_size = h.l1_table_offset, h.l1_size
    h.l1_table_offset, h.l1_size = new_off, entries
    img.active.l1 = new
    w.metadata_changed(new_off >> cb, clusters)
    if old_size:
        first = old_off >> cb
        count = -(-old_size * 8 // w.cs)
        w.metadata_changed(first, -count)
        w.refs.add_range(first, count, -1)


def set_size(w: Qcow2Writer, size: int) -> None:
    w.resize_bitmaps(size)
    w.file.write(hdr.OFF_SIZE, hdr.pack_u64(size))
    w.file.sync()
    w.header.size = size
    w.img.active.size = size


def resize(w: Qcow2Writer, new_size: int, *, shrink: bool = False) -> None:
    img, h = w.img, w.header
    w.check_usable()
    if new_size < 0 or new_size % 512:
        raise ImageError(w.path, "the new size must be a multiple of 512", errno=errno.EINVAL)
    old_size = img.active.size
    if new_size == old_size:
        return
    if h.version < 3 and img.snapshots:
        raise UnsupportedError(w.path, "cannot resize a version 2 image that has snapshots")
    if new_size < old_size and not shrink:
        raise ImageError(w.path, "shrinking the disk must be asked for explicitly (shrink=True)",
                         errno=errno.EINVAL)
    w.mark_dirty()
    need = hdr.l1_entries_needed(new_size, w.cb, w.extended)
    if new_size > old_size:
        zero_new = w.backing_size > old_size
        if zero_new and h.version < 3:
            raise UnsupportedError(w.path, "cannot zero the new space over a longer backing file"
                                           " in a version 2 image")
        if need > len(img.active.l1):
            grow_l1(w, need)
        if w.has_data_file:
            w.data_file.truncate(new_size)  # as QEMU: the data file follows the disk size
        if zero_new:
            img.active.size = new_size
            try:
                w.write_zeroes(old_size, min(new_size, w.backing_size) - old_size)
                w.flush()
            except BaseException:
                img.active.size = old_size
                raise
        set_size(w, new_size)
        return
    discard(w, new_size, old_size - new_size)  # references first; refcounts drop on flush
    w.flush()
    set_size(w, new_size)
    w.full_flush()
    _truncate_free_tail(w)
    if w.has_data_file:
        w.data_file.truncate(new_size)
        w.data_file.sync()


def _truncate_free_tail(w: Qcow2Writer) -> None:
    """Cut the image file after its last used cluster, as QEMU does after a shrink. Called
    with everything durable: a cluster past the last nonzero refcount is referenced by nothing
    (refcount blocks count themselves)."""
    end = w.refs.end_of_used() << w.cb
    if end < w.file.size:
        w.file.truncate(end)
        w.file.sync()
        w.refs.free_hint = min(w.refs.free_hint, end >> w.cb)


