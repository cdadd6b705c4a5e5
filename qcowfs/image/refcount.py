"""Host cluster reference counts: the refcount table, refcount blocks in a write-back cache,
the cluster allocator, and growing the refcount table.

Refcount blocks are cached decoded (a list of ints per block). Increments and decrements only
change the cache; the writer (``image.write``) decides when blocks reach the disk, which is
where QEMU's ordering is enforced. Two rules hold here:

- a new refcount block is hooked into the refcount table only after the block itself has been
  written (the table entry is dirty until :meth:`Refcounts.write_blocks` runs);
- a new refcount table is written in full, made durable, and only then switched to with one
  12-byte header write; the old table is freed after the switch is durable.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from qcowfs.errors import CorruptionError, FormatError
from qcowfs.format import header as hdr
from qcowfs.format.tables import (
    MAX_HOST_OFFSET,
    MAX_REFTABLE_BYTES,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    decode_refblock,
    decode_u64_table,
    encode_refblock,
    encode_u64_table,
    refcount_max,
)
from qcowfs.image.cache import TableCache
from qcowfs.image.hostfile import HostFile

DEFAULT_REFBLOCK_CACHE_BYTES = 4 * 1024 * 1024


class Refcounts:
    """The refcounts of one image file. Cluster numbers are host offsets >> cluster_bits."""

    def __init__(self, file: HostFile, header: hdr.Header, *,
                 cache_bytes: int = DEFAULT_REFBLOCK_CACHE_BYTES):
        self.file = file
        self.path = file.path
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.order = header.refcount_order
        self.max = refcount_max(self.order)
        self.block_bits = header.cluster_bits + 3 - self.order
        self.block_mask = (1 << self.block_bits) - 1
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        raw = file.read_exact(self.table_offset, self.table_clusters * self.cluster_size,
                              "refcount table")
        self.table = decode_u64_table(raw)
        for i, entry in enumerate(self.table):
            if entry & REFT_RESERVED_MASK:
                raise FormatError(self.path, f"refcount table entry {i} has reserved bits set")
        self.cache: TableCache[list[int]] = TableCache(
            max(4, cache_bytes // self.cluster_size), self._load, self._write_block)
        #: refcount table indices whose entry changed in memory and is not on disk yet
        self.dirty_entries: set[int] = set()
        #: lowest cluster that may be free
        self.free_hint = 0
        #: called with (first cluster, count) for clusters that become metadata, and with
        #: count < 0 when they stop being metadata (the writer's overlap set)
        self.on_metadata: Callable[[int, int], None] = lambda first, count: None
        self.on_freed: Callable[[int], None] = lambda cluster: None

    # --- blocks -----------------------------------------------------------------------------

    def _load(self, offset: int) -> list[int]:
        if offset & (self.cluster_size - 1) or offset >= MAX_HOST_OFFSET:
            raise FormatError(self.path, f"refcount block at invalid offset {offset}")
        raw = self.file.read_exact(offset, self.cluster_size, "refcount block")
        return decode_refblock(raw, self.order)

    def _write_block(self, offset: int, block: list[int]) -> None:
        self.file.write(offset, encode_refblock(block, self.order))

    def block_offset(self, index: int) -> int:
        """Host offset of refcount block ``index`` (0 when it has none)."""
        table = self.table
        return table[index] & REFT_OFFSET_MASK if index < len(table) else 0

    def get(self, cluster: int) -> int:
        off = self.block_offset(cluster >> self.block_bits)
        if not off:
            return 0
        return self.cache.get(off)[cluster & self.block_mask]

    def add(self, cluster: int, delta: int) -> int:
        """Change one refcount in the cache; returns the new value."""
        off = self.block_offset(cluster >> self.block_bits)
        if not off:
            if delta < 0:
                raise CorruptionError(self.path, f"refcount of host cluster {cluster} would drop "
                                                 f"below zero")
            raise FormatError(self.path, f"host cluster {cluster} has no refcount block")
        block = self.cache.get(off)
        i = cluster & self.block_mask
        value = block[i] + delta
        if value < 0:
            raise CorruptionError(self.path, f"refcount of host cluster {cluster} would drop "
                                             f"below zero")
        if value > self.max:
            raise FormatError(self.path, f"refcount of host cluster {cluster} would overflow "
                                         f"({self.header.refcount_bits}-bit refcounts)")
        block[i] = value
        self.cache.mark_dirty(off)
        if value == 0:
            if cluster < self.free_hint:
                self.free_hint = cluster
            self.on_freed(cluster)
        return value

    def add_range(self, first: int, count: int, delta: int) -> None:
        for c in range(first, first + count):
            self.add(c, delta)

    def free_bytes(self, offset: int, length: int) -> None:
        """-1 on every cluster overlapping [offset, offset + length) (a compressed cluster)."""
        self.add_bytes(offset, length, -1)

    def add_bytes(self, offset: int, length: int, delta: int) -> None:
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        self.add_range(first, last - first + 1, delta)

    # --- allocation -------------------------------------------------------------------------

    def _find_free_run(self, count: int) -> tuple[int, int]:
        """The first run of ``count`` free clusters at or after ``free_hint``, and the first
        free cluster the search met (the run's start unless shorter runs come before it)."""
        bb = self.block_bits
        per = 1 << bb
        start = self.free_hint
        first_free = -1
        run = 0
        c = start
        while run < count:
            index = c >> bb
            off = self.block_offset(index)
            if not off:
                # A range without a block is all free.
                step = per - (c & self.block_mask)
                if run == 0:
                    start = c
                    if first_free < 0:
                        first_free = c
                run += step
                c += step
                continue
            block = self.cache.get(off)
            i = c & self.block_mask
            while i < per and run < count:
                if block[i]:
                    run = 0
                else:
                    if run == 0:
                        start = (index << bb) + i
                        if first_free < 0:
                            first_free = start
                    run += 1
                i += 1
            c = (index << bb) + i
        if (start + count) << self.cluster_bits > MAX_HOST_OFFSET:
            raise FormatError(self.path, "image file would grow past the largest host offset")
        return start, first_free

    def allocate(self, count: int) -> int:
        """``count`` contiguous free clusters, refcount 1 each (in the cache); returns the first.
        Free clusters (refcount 0) are reused before the file grows. Ranges the run reaches
        that have no refcount block get new blocks, placed just in front of the run."""
        bb = self.block_bits
        extra = 0
        while True:
            start, first_free = self._find_free_run(count + extra)
            end = start + count + extra
            uncovered = [i for i in range(start >> bb, ((end - 1) >> bb) + 1)
                         if not self.block_offset(i)]
            if uncovered and uncovered[-1] >= len(self.table):
                self.grow_table(uncovered[-1] + 1)
                continue
            if len(uncovered) > extra:
                extra = len(uncovered)
                continue
            if uncovered:
                self._new_blocks(uncovered, start)
            first = start + len(uncovered)
            for c in range(first, first + count):
                self.add(c, 1)
            # Nothing below the hint is free: the search began there, and the run (with its
            # new blocks) is used now; a shorter free run met on the way stays the hint.
            self.free_hint = first + count if first_free >= start else first_free
            return first

    def _new_blocks(self, indices: list[int], at: int) -> None:
        """Refcount blocks for the ranges ``indices`` (which have none), in clusters
        ``at``, ``at + 1``...; these are free and lie in ranges the new or old blocks cover."""
        bb = self.block_bits
        placed = []
        for k, index in enumerate(indices):
            cluster = at + k
            offset = cluster << self.cluster_bits
            self.cache.put(offset, [0] * (1 << bb), dirty=True)
            self.table[index] = offset
            self.dirty_entries.add(index)
            placed.append(cluster)
        for cluster in placed:
            self.add(cluster, 1)
            self.on_metadata(cluster, 1)

    def grow_table(self, min_entries: int) -> None:
        """Build a bigger refcount table (with the refcount blocks that cover it) past the end
        of everything in use, make it durable, switch the header to it with one 12-byte write,
        then free the old table."""
        cs = self.cluster_size
        bb = self.block_bits
        per_cluster = cs // 8
        entries = max(min_entries, len(self.table) * 3 // 2 + 1)
        first = max(-(-self.file.size // cs), self.end_of_used())
        n_blocks = 0
        while True:
            table_clusters = -(-entries // per_cluster)
            area_end = first + table_clusters + n_blocks
            uncovered = [i for i in range(first >> bb, ((area_end - 1) >> bb) + 1)
                         if not self.block_offset(i)]
            need = max(min_entries, (uncovered[-1] + 1) if uncovered else 0, len(self.table))
            if len(uncovered) != n_blocks:
                n_blocks = len(uncovered)
                continue
            if entries < need:
                entries = need
                continue
            break
        if table_clusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError(self.path, "refcount table would grow past QEMU's 8 MiB limit")
        entries = table_clusters * per_cluster
        new_table = array("Q", bytes(8 * entries))
        new_table[:len(self.table)] = self.table
        area_end = first + table_clusters + n_blocks
        for k, index in enumerate(uncovered):
            cluster = first + table_clusters + k
            block = [0] * (1 << bb)
            lo = max(first, index << bb)
            hi = min(area_end, (index + 1) << bb)
            for c in range(lo, hi):
                block[c & self.block_mask] = 1
            offset = cluster << self.cluster_bits
            self.cache.put(offset, block, dirty=True)
            new_table[index] = offset
        # Clusters of the new area that lie in ranges that already had blocks.
        old_table = self.table
        self.table = new_table
        for c in range(first, area_end):
            if (c >> bb) not in uncovered:
                self.add(c, 1)
        # Everything the new table points at must be on disk before the table is.
        self.cache.write_all()
        table_offset = first << self.cluster_bits
        self.file.write(table_offset, encode_u64_table(new_table))
        self.file.sync()
        self.file.write(hdr.OFF_REFTABLE, hdr.pack_reftable_pointer(table_offset, table_clusters))
        self.file.sync()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table_offset, self.table_clusters = table_offset, table_clusters
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters
        self.dirty_entries.clear()
        self.on_metadata(first, table_clusters)
        for index in uncovered:
            self.on_metadata(new_table[index] >> self.cluster_bits, 1)
        del old_table
        self.on_metadata(old_offset >> self.cluster_bits, -old_clusters)
        self.add_range(old_offset >> self.cluster_bits, old_clusters, -1)

    def end_of_used(self) -> int:
        """One past the last cluster any refcount block counts as used."""
        bb = self.block_bits
        for index in range(len(self.table) - 1, -1, -1):
            off = self.block_offset(index)
            if not off:
                continue
            block = self.cache.get(off)
            for i in range(len(block) - 1, -1, -1):
                if block[i]:
                    return (index << bb) + i + 1
        return 0

    # --- writing ----------------------------------------------------------------------------

    @property
    def has_dirty(self) -> bool:
        return bool(self.cache.dirty or self.dirty_entries)

    def write_blocks(self) -> None:
        """Write every dirty refcount block (no sync)."""
        self.cache.write_all()

    def write_entries(self) -> None:
        """Write the refcount table entries of new blocks (the blocks must be durable)."""
        if not self.dirty_entries:
            return
        lo, hi = min(self.dirty_entries), max(self.dirty_entries) + 1
        raw = encode_u64_table(self.table[lo:hi])
        self.file.write(self.table_offset + 8 * lo, raw)
        self.dirty_entries.clear()

    def metadata_clusters(self) -> list[tuple[int, int]]:
        """(first cluster, count) of the table and of every block."""
        out = [(self.table_offset >> self.cluster_bits, self.table_clusters)]
        for entry in self.table:
            off = entry & REFT_OFFSET_MASK
            if off:
                out.append((off >> self.cluster_bits, 1))
        return out
