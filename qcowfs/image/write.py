"""Writing a qcow2 image: copy-on-write, allocation, zero clusters, and the order in which
metadata reaches the disk.

The write path plans each L2 table's worth of a request first (what every guest cluster needs),
then allocates one contiguous host run per run of clusters that need new space, then writes the
data with its copy-on-write head and tail in as few ``pwritev`` calls as it can, and only then
changes the L2 entries -- in the cache. Dirty L2 tables and refcount blocks stay in their
write-back caches until a flush, an eviction or the close, which write them in stages:

1. refcount blocks (increments only) and all data, then ``fsync``; then the refcount table
   entries of new blocks, then ``fsync``;
2. L2 tables, then ``fsync``; then changed L1 entries, then ``fsync``;
3. only now the deferred decrements: the references they drop are durably gone.

So a crash at any instant leaves at worst leaked clusters (see docs/design.md, "The write path").
"""

from __future__ import annotations

import errno
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager

from qcowfs.errors import (
    CorruptionError,
    FormatError,
    ImageError,
    ReadOnlyError,
)
from qcowfs.format import header as hdr
from qcowfs.format.bitmaps import mark_in_use
from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    SUBCLUSTERS,
    ZERO_FLAG,
    encode_u64_table,
)
from qcowfs.format.zeros import is_zero
from qcowfs.image import bitmaps as persistent
from qcowfs.image.cow import ClusterWrites
from qcowfs.image.header_update import set_incompatible, write_header
from qcowfs.image.hostfile import HostFile
from qcowfs.image.mapping import FillFn
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.refcount import Refcounts

_ZEROS = bytes(1 << 21)


class Qcow2Writer(ClusterWrites):
    """The read/write side of one open qcow2 image (the top of a chain).

    ``fill`` supplies what the guest sees where the image has nothing (the backing chain);
    ``backing_size`` is where that stops (bytes past it read as zeros).
    """

    def __init__(self, image: Qcow2Image, fill: FillFn, backing_size: int, *,
                 zero_detect: bool = True):
        if not image.file.writable:
            raise ReadOnlyError(image.path, "image is open read-only")
        h = image.header
        if h.corrupt:
            raise FormatError(image.path, "image is marked corrupt and cannot be opened "
                                          "read/write (repair it with 'qemu-img check -r all')")
        image.require_key()
        self.img = image
        #: the data cipher of an encrypted image: writes go out in whole encrypted sectors
        self.crypto = image.crypto
        self.path = image.path
        self.file = image.file
        self.data_file = image.data_file
        self.header = h
        self.cb = image.cluster_bits
        self.cs = image.cluster_size
        self.l2_bits = image.l2_bits
        self.extended = image.extended_l2
        self.sub_size = self.cs // SUBCLUSTERS if self.extended else self.cs
        self.has_data_file = image.has_data_file
        self.raw_data_file = h.data_file_raw
        self.fill = fill
        self.backing_size = backing_size
        self.zero_detect = zero_detect
        self.lazy = h.lazy_refcounts
        if h.dirty:
            # Refcounts may be stale (lazy refcounts and a crash): repair them as QEMU does on a
            # read/write open, before anything reads them. (The checker loads only here.)
            from qcowfs.image.check import repair_dirty

            repair_dirty(image)
            image.l2_cache.clear()
            image.active.l1 = image.read_l1(h.l1_table_offset, h.l1_size, "active L1 table")
        self.refs = Refcounts(self.file, h)
        self.l1_dirty: set[int] = set()
        #: (host byte offset, length) whose refcounts drop once the L2/L1 changes are durable
        self.deferred: list[tuple[int, int]] = []
        self._deps_pending = False  # data or refcount increments not yet durable
        self._image_unsynced = False
        self._data_unsynced = False
        self._meta: set[int] = set()
        self._meta_sorted: list[int] | None = None
        self.broken: str | None = None
        self.closed = False
        self.refs.on_metadata = self.metadata_changed
        self.refs.on_freed = self._cluster_freed
        image.l2_cache.set_write_back(self._write_l2)
        self.rebuild_metadata_set()
        self.bitmap_directory_at_open: bytes | None = None
        #: every persistent bitmap, in memory, while they are kept exact (else None)
        self.bitmaps: list | None = None
        #: the enabled, consistent ones: each write sets its granules in these
        self.tracking: list = []
        self.bitmaps_touched = False
        self._open_fixups()

    # --- opening --------------------------------------------------------------------------

    def _open_fixups(self) -> None:
        """With a consistent bitmaps extension, mark every bitmap in use before anything is
        written -- what QEMU itself does while it runs, so a crash leaves them distrusted --
        and load them to keep them exact (written back at a clean close). Their clusters stay
        referenced (clearing the autoclear bit instead would make QEMU drop the directory and
        count every bitmap cluster as leaked). Unknown autoclear bits are cleared."""
        h = self.header
        if h.version < 3:
            return
        known = hdr.AUTOCLEAR_BITMAPS | hdr.AUTOCLEAR_DATA_FILE_RAW
        if h.bitmaps and h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            ext = h.bitmaps
            marked = raw = None
            placed = (ext.directory_offset >= self.cs and not ext.directory_offset % self.cs
                      and ext.directory_offset + ext.directory_size <= self.file.size)
            if placed:
                raw = self.file.read(ext.directory_offset, ext.directory_size)
                try:
                    marked = mark_in_use(raw, ext.nb_bitmaps)
                except ImageError:
                    marked = None
            if marked is None:
                known &= ~hdr.AUTOCLEAR_BITMAPS  # unreadable: let QEMU drop it
            else:
                self._load_bitmaps(raw)
                if marked != raw:
                    self.bitmap_directory_at_open = raw
                    self.file.write(ext.directory_offset, marked)
                    self.file.sync()
        if h.autoclear_features & ~known:
            write_header(self.img, h.replace(autoclear_features=h.autoclear_features & known))

    def _load_bitmaps(self, directory: bytes) -> None:
        try:
            loaded = persistent.load(self.img, directory,
                                     max_bytes=persistent.MAX_TRACKED_BYTES)
        except ImageError:
            return  # they stay in use, as QEMU leaves bitmaps it cannot load
        if loaded is None:
            return
        self.bitmaps = loaded
        self.bitmaps_size = self.img.active.size
        self.tracking = [bm for bm in loaded if bm.enabled and not bm.in_use]

    def mark_bitmaps(self, offset: int, length: int) -> None:
        """A guest write, zero write or discard of ``[offset, offset + length)``: set its
        granules in every enabled bitmap."""
        self.bitmaps_touched = True
        for bm in self.tracking:
            persistent.set_range(bm, offset, length)

    def resize_bitmaps(self, size: int) -> None:
        """The disk is now ``size`` bytes: every bitmap follows (bits past the end dropped,
        new ones clear), as QEMU resizes them."""
        if self.bitmaps is None:
            return
        for bm in self.bitmaps:
            persistent.fit(bm, size)
        self.bitmaps_size = size
        self.bitmaps_touched = True

    def _close_bitmaps(self) -> None:
        """Write the kept bitmaps back with in-use cleared: the directory as it was when
        nothing was written, else every bitmap in new clusters (image/bitmaps.py)."""
        if self.bitmaps is None or self.img.active.size != self.bitmaps_size:
            return
        if not self.bitmaps_touched:
            self.restore_bitmaps()
            return
        persistent.store(self, self.bitmaps, self.bitmaps)
        self.bitmaps = None

    def restore_bitmaps(self) -> None:
        """Put the bitmap directory back as it was at open: only for an operation that leaves
        the guest view unchanged (commit's discard), once that is durable."""
        self.bitmaps = None
        self.tracking = []
        raw = self.bitmap_directory_at_open
        if raw is not None and self.header.bitmaps:
            self.file.write(self.header.bitmaps.directory_offset, raw)
            self.file.sync()
            self.bitmap_directory_at_open = None

    def _set_incompat(self, value: int) -> None:
        """Setting the dirty bit writes those 8 bytes; every other change of the bits is a
        header update of all of cluster 0, as QEMU makes them (header_update)."""
        h = self.header
        if value == h.incompatible_features | hdr.INCOMPAT_DIRTY:
            h.incompatible_features = value
            self.file.write(hdr.OFF_INCOMPAT, hdr.pack_u64(value))
            self.file.sync()
        else:
            set_incompatible(self.img, value)

    def mark_dirty(self) -> None:
        """With lazy refcounts: the dirty bit is durable before any metadata changes."""
        if self.lazy and not self.header.dirty:
            self._set_incompat(self.header.incompatible_features | hdr.INCOMPAT_DIRTY)

    @contextmanager
    def dirty_during(self) -> Iterator[None]:
        """Hold the dirty bit (durably) around an operation whose refcount and COPIED changes
        cannot reach the disk in one write (snapshot create, delete, apply).

        qcow2 has no atomic way to change both: a crash between them leaves COPIED flags that
        disagree with refcounts, which QEMU's check calls corruption. With the dirty bit set
        the image says its refcounts may be off, and its next read/write open -- by QEMU or by
        qcowfs -- repairs it. v2 images have no dirty bit and keep QEMU's window.
        """
        set_here = self.header.version >= 3 and not self.header.dirty
        if set_here:
            self._set_incompat(self.header.incompatible_features | hdr.INCOMPAT_DIRTY)
        yield
        if set_here and not self.lazy:
            self.full_flush()
            self._set_incompat(self.header.incompatible_features & ~hdr.INCOMPAT_DIRTY)

    def reload_refcounts(self) -> None:
        """The header names new refcount structures (another width, another table): read
        them afresh; nothing may be waiting in the old cache."""
        assert not self.refs.has_dirty, "refcount changes would be lost"
        self.refs = Refcounts(self.file, self.header)
        self.refs.on_metadata = self.metadata_changed
        self.refs.on_freed = self._cluster_freed

    # --- metadata overlap -----------------------------------------------------------------

    def rebuild_metadata_set(self) -> None:
        img, h, cs = self.img, self.header, self.cs
        meta = self._meta
        meta.clear()
        meta.add(0)

        # A table's claimed length is clipped at the end of the file: a hostile size (a
        # snapshot L1 of 2^32 entries) must not grow this set past the clusters that exist.
        file_clusters = -(-img.file.size // cs)

        def add(offset: int, nbytes: int) -> None:
            if nbytes > 0:
                first = offset >> self.cb
                end = min(((offset + nbytes - 1) >> self.cb) + 1, max(file_clusters, first + 1))
                meta.update(range(first, end))

        add(h.l1_table_offset, h.l1_size * 8)
        for first, count in self.refs.metadata_clusters():
            meta.update(range(first, first + count))
        if h.nb_snapshots:
            add(h.snapshots_offset, img.snapshot_table_bytes)
        for s in img.snapshots:
            add(s.l1_table_offset, s.l1_size * 8)
        for entry in img.active.l1:
            off = entry & L1E_OFFSET_MASK
            if off:
                meta.add(off >> self.cb)
        del cs
        self._meta_sorted = None

    def metadata_changed(self, first: int, count: int) -> None:
        if count > 0:
            self._meta.update(range(first, first + count))
        else:
            self._meta.difference_update(range(first, first - count))
        self._meta_sorted = None

    def _cluster_freed(self, cluster: int) -> None:
        if cluster in self._meta:
            self._meta.discard(cluster)
            self._meta_sorted = None
        self.img.l2_cache.drop(cluster << self.cb)

    def check_overlap(self, host: int, length: int, what: str = "data") -> None:
        """Refuse (and mark the image corrupt) a write into the image's own metadata."""
        first = host >> self.cb
        last = (host + length - 1) >> self.cb
        meta = self._meta
        if first == last:
            hit = first in meta
        else:
            if self._meta_sorted is None:
                self._meta_sorted = sorted(meta)
            s = self._meta_sorted
            i = bisect_left(s, first)
            hit = i < len(s) and s[i] <= last
        if hit:
            self.signal_corruption(f"{what} write at host offset {host} (+{length}) would "
                                   f"overwrite metadata")

    def signal_corruption(self, message: str) -> None:
        self.broken = message
        try:
            self._set_incompat(self.header.incompatible_features | hdr.INCOMPAT_CORRUPT)
        finally:
            raise CorruptionError(self.path, f"{message}; the image is marked corrupt")

    # --- the caches' write-back -------------------------------------------------------------

    def _write_l2(self, offset: int, table: array) -> None:
        if self._deps_pending:
            self._stage_refcounts()
        self.file.write(offset, encode_u64_table(table))
        self._image_unsynced = True

    def _stage_refcounts(self, force: bool = False) -> None:
        """Stage 1: data and refcount increments durable; then new refcount blocks hooked in."""
        refs = self.refs
        if (force or not self.lazy or refs.dirty_entries) and refs.cache.dirty:
            refs.write_blocks()
            self._image_unsynced = True
        if self._data_unsynced and self.data_file is not self.file:
            self.data_file.sync()
        self._data_unsynced = False
        if self._image_unsynced:
            self.file.sync()
            self._image_unsynced = False
        if refs.dirty_entries:
            refs.write_entries()
            self.file.sync()
        self._deps_pending = False

    def _stage_tables(self) -> None:
        """Stage 2: L2 tables, then the L1 entries that point at new ones."""
        cache = self.img.l2_cache
        if cache.dirty:
            cache.write_all()
        if self._image_unsynced:
            self.file.sync()
            self._image_unsynced = False
        if self.l1_dirty:
            lo, hi = min(self.l1_dirty), max(self.l1_dirty) + 1
            l1 = self.img.active.l1
            self.file.write(self.header.l1_table_offset + 8 * lo, encode_u64_table(l1[lo:hi]))
            self.l1_dirty.clear()
            self.file.sync()

    def _apply_deferred(self) -> None:
        """Stage 3: drop the refcounts of clusters the durable tables no longer reference."""
        refs = self.refs
        while self.deferred:
            offset, length = self.deferred[-1]
            refs.free_bytes(offset, length)
            self.deferred.pop()

    def flush(self) -> None:
        """Everything written so far is durable when this returns."""
        self.check_usable()
        self._stage_refcounts()
        self._stage_tables()
        self._apply_deferred()

    def close(self) -> None:
        """Clean close: all metadata written, refcounts exact, dirty bit cleared."""
        if self.closed:
            return
        if not self.broken:
            self._close_bitmaps()
        self.closed = True
        if self.broken:
            return
        self._stage_refcounts()
        self._stage_tables()
        self._apply_deferred()
        self._stage_refcounts(force=True)
        if self.header.dirty:
            self._set_incompat(self.header.incompatible_features & ~hdr.INCOMPAT_DIRTY)

    def check_usable(self) -> None:
        if self.closed:
            raise ImageError(self.path, "image is closed", errno=errno.EBADF)
        if self.broken:
            raise CorruptionError(self.path, f"image was marked corrupt: {self.broken}")

    # --- L1/L2 ----------------------------------------------------------------------------

    def writable_l2(self, l1i: int) -> tuple[int, array]:
        """The active L2 table for L1 index ``l1i``, owned by the active L1 alone: a new zeroed
        table when there is none, a copy when it is shared with a snapshot."""
        img = self.img
        l1 = img.active.l1
        entry = l1[l1i]
        old = entry & L1E_OFFSET_MASK
        if old and entry & COPIED:
            return old, img.l2_cache.get(old)
        self.mark_dirty()
        table = array("Q", img.l2_cache.get(old)) if old else array("Q", bytes(self.cs))
        new = self.refs.allocate(1) << self.cb
        self._deps_pending = True
        if new >> self.cb in self._meta:
            self.signal_corruption(f"new L2 table at host offset {new} overlaps metadata")
        img.l2_cache.put(new, table, dirty=True)
        self.metadata_changed(new >> self.cb, 1)
        if old:
            self.metadata_changed(old >> self.cb, -1)
            self.deferred.append((old, self.cs))
        l1[l1i] = new | COPIED
        self.l1_dirty.add(l1i)
        return new, table

    def touch_l2(self, offset: int, table: array) -> None:
        cache = self.img.l2_cache
        if offset in cache:
            cache.mark_dirty(offset)
        else:
            cache.put(offset, table, dirty=True)

    def old_ref(self, entry: int) -> tuple[int, int] | None:
        """The host bytes an L2 entry holds a reference to (None for none)."""
        if self.has_data_file:
            return None
        if entry & COMPRESSED:
            host, length = self.img.compressed.decode(entry)
            start = host & ~511
            return start, host - start + length
        host = entry & L2E_OFFSET_MASK
        return (host, self.cs) if host else None

    # --- writing --------------------------------------------------------------------------

    def note_metadata_write(self) -> None:
        """Something was written to the image file that a later pointer will depend on."""
        self._image_unsynced = True
        self._deps_pending = True

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros (zero clusters where it can)."""
        if self.bitmaps is not None:
            self.mark_bitmaps(offset, length)
        pos = offset
        while pos < offset + length:
            n = min(offset + length - pos, len(_ZEROS))
            self._write(pos, memoryview(_ZEROS)[:n], True)
            pos += n

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        if self.crypto is not None and (offset | len(view)) & 511:
            offset, view = self._whole_sectors(offset, view)
        if self.bitmaps is not None:
            self.mark_bitmaps(offset, len(view))
        zero = self.zero_detect and not self.raw_data_file and is_zero(view)
        if not zero and self._write_in_place(offset, view):
            return
        self._write(offset, view, zero)

    def _whole_sectors(self, offset: int, view: memoryview) -> tuple[int, memoryview]:
        """An encrypted image is written in whole 512-byte sectors (QEMU's request alignment):
        the partial sectors at either end are completed from what the guest reads there."""
        n = len(view)
        size = self.img.active.size
        if offset < 0 or offset + n > size or not n:
            return offset, view  # the general path reports it
        start = offset & ~511
        end = min((offset + n + 511) & ~511, size)
        buf = memoryview(bytearray(end - start))
        if start < offset:
            self.img.active.readinto(buf[:512], start, self.fill)
        if end > offset + n and end - 512 >= start:
            tail = max(end - 512, start)
            self.img.active.readinto(buf[tail - start:], tail, self.fill)
        buf[offset - start:offset - start + n] = view
        return start, buf

    def _write_in_place(self, offset: int, view: memoryview) -> bool:
        """The common case in one step: the range lies in clusters of one L2 table that the
        active disk owns alone and that follow each other on the host (standard L2, no data
        file): one ``pwrite``, no plan. False when the general path must handle it."""
        at = self._in_place_host(offset, len(view))
        if at is None:
            return False
        if self.crypto is not None:
            view = memoryview(self.crypto.encrypt(view, at, offset))
        self.file.write(at, view)
        self._image_unsynced = True
        return True

    def _in_place_host(self, offset: int, n: int) -> int | None:
        """Where in the image file ``[offset, offset + n)`` is overwritten in place (see
        :meth:`_write_in_place`), or None when the write needs the general path."""
        cb = self.cb
        if (self.extended or self.has_data_file or self.broken or self.closed or not n
                or offset < 0 or offset + n > self.img.active.size):
            return None
        first, last = offset >> cb, (offset + n - 1) >> cb
        l2_bits = self.l2_bits
        if first >> l2_bits != last >> l2_bits:
            return None
        img = self.img
        l1e = img.active.l1[first >> l2_bits]
        if not l1e & COPIED:
            return None
        table = img.l2_cache.get(l1e & L1E_OFFSET_MASK)
        i = first & (img.l2_entries - 1)
        entry = table[i]
        if not entry & COPIED or entry & (ZERO_FLAG | COMPRESSED):
            return None
        host = entry & L2E_OFFSET_MASK
        meta = self._meta
        if not host or host >> cb in meta:
            return None  # the general path reports the overlap
        expect = entry
        for _ in range(last - first):
            i += 1
            expect += self.cs
            # Same flags, next host cluster: anything else goes the general way.
            if table[i] != expect or (expect & L2E_OFFSET_MASK) >> cb in meta:
                return None
        return host + (offset & (self.cs - 1))

    def prepare_in_place(self, offset: int, data) -> tuple[HostFile, int, memoryview] | None:
        """Everything of a plain overwrite in place but the data write itself.

        When writing ``data`` at guest ``offset`` changes no metadata (an unencrypted
        overwrite of clusters the active disk owns alone, not all zeros under
        ``zero_detect``), this does the bookkeeping (bitmaps, the flush's duty to sync) and
        returns ``(file, host offset, bytes)``: the caller writes them there itself, from any
        thread, and must finish that before any other call into this writer that changes or
        frees clusters, or flushes (the mount's barrier). None: call :meth:`write`.
        Encrypted data in whole sectors comes back encrypted (here, on the caller's thread);
        a part of a sector needs the old data, so that goes through :meth:`write`."""
        view = memoryview(data).cast("B")
        crypto = self.crypto
        if crypto is not None and (offset | len(view)) & 511:
            return None
        if self.zero_detect and not self.raw_data_file and is_zero(view):
            return None
        at = self._in_place_host(offset, len(view))
        if at is None:
            return None
        if self.bitmaps is not None:
            self.mark_bitmaps(offset, len(view))
        if crypto is not None:
            view = memoryview(crypto.encrypt(view, at, offset))
        self._image_unsynced = True
        return self.file, at, view

    # --- whole-image helpers for snapshots and resize ---------------------------------------

    def full_flush(self) -> None:
        """Flush, then write the refcount changes of the deferred frees too: afterwards the
        disk holds exactly what memory holds."""
        self.flush()
        self._stage_refcounts()

