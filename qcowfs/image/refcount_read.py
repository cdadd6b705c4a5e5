"""Refcounts as they are on disk, for check, repair and reporting (not for allocation)."""

from __future__ import annotations

from qcowfs.format.tables import (
    REFT_OFFSET_MASK,
    decode_refblock,
    decode_u64_table,
    encode_refblock,
    refblock_entries,
)
from qcowfs.image import scanmode
from qcowfs.image.qcow2 import Qcow2Image


class UnreadableRefblock(Exception):
    """A refcount block that cannot be read (its table entry is misaligned)."""


class OnDiskRefcounts:
    """The on-disk refcount structures as they are, readable and patchable in place.

    Unlike the writer's :class:`qcowfs.image.refcount.Refcounts`, this never refuses a
    broken structure: a refblock that is misaligned or past the end of the file reads as
    absent, so check and map work on damaged images."""

    def __init__(self, image: Qcow2Image):
        self.image = image
        h = image.header
        self.cs = image.cluster_size
        self.order = h.refcount_order
        self.per_block = refblock_entries(h.cluster_bits, h.refcount_order)
        self.file_size = image.file.refresh_size()
        size = h.refcount_table_clusters * self.cs
        raw = image.file.read(h.refcount_table_offset, size)
        raw += bytes(size - len(raw))
        self.table = decode_u64_table(raw)
        self.blocks: dict[int, list[int]] = {}
        self.dirty: set[int] = set()

    def block_offset(self, index: int) -> int:
        """The refblock offset for table index ``index``, or 0 when none (or unusable)."""
        if index >= len(self.table):
            return 0
        entry = self.table[index]
        off = entry & REFT_OFFSET_MASK
        if not off or off % self.cs or off + self.cs > self.file_size:
            return 0
        return off

    def block(self, index: int) -> list[int] | None:
        off = self.block_offset(index)
        if not off:
            return None
        values = self.blocks.get(index)
        if values is None:
            values = decode_refblock(self.image.file.read(off, self.cs), self.order)
            self.blocks[index] = values
        return values

    def all_equal(self, first: int, n: int, value: int) -> bool:
        """Whether clusters [first, first + n) all have refcount ``value`` (with the patches),
        compared a block's part at a time as bytes. False also where a block cannot be read:
        the caller's per-cluster code then says what it makes of that."""
        per = self.per_block
        c, end = first, first + n
        while c < end:
            index, within = divmod(c, per)
            stop = min(end, (index + 1) * per)
            m = stop - c
            if index < len(self.table) and self.table[index] & REFT_OFFSET_MASK & (self.cs - 1):
                return False
            values = self.blocks.get(index)
            if values is None and self.order < 3:
                values = self.block(index)
            if values is not None:
                if values[within:within + m].count(value) != m:
                    return False
            else:
                off = self.block_offset(index)
                if not off:
                    if value:
                        return False
                else:
                    w = 1 << (self.order - 3)
                    if self.image.file.read(off + within * w, m * w) != \
                            value.to_bytes(w, "big") * m:
                        return False
            c = stop
        return True

    def lookup(self):
        """``get`` for a tight loop: the same answers, without the method calls per
        cluster once a block has been seen."""
        seen: dict[int, list[int] | None] = {}
        per = self.per_block

        def get(cluster: int) -> int:
            index, within = divmod(cluster, per)
            try:
                values = seen[index]
            except KeyError:
                self.get(cluster)  # raises for an unreadable block
                values = seen[index] = self.block(index)
            return values[within] if values is not None else 0

        return get

    def get(self, cluster: int) -> int:
        index, within = divmod(cluster, self.per_block)
        if index < len(self.table) and self.table[index] & REFT_OFFSET_MASK & (self.cs - 1):
            raise UnreadableRefblock
        values = self.block(index)
        return values[within] if values is not None else 0

    def get_one(self, cluster: int) -> int:
        """``get`` for a lone cluster: reads just its refcount, without decoding (and
        keeping) its whole block, unless the block is already at hand."""
        index, within = divmod(cluster, self.per_block)
        if index in self.blocks or self.order < 3:
            return self.get(cluster)
        if index < len(self.table) and self.table[index] & REFT_OFFSET_MASK & (self.cs - 1):
            raise UnreadableRefblock
        off = self.block_offset(index)
        if not off:
            return 0
        w = 1 << (self.order - 3)
        return int.from_bytes(self.image.file.read(off + within * w, w), "big")

    def set(self, cluster: int, value: int) -> bool:
        index, within = divmod(cluster, self.per_block)
        values = self.block(index)
        if values is None:
            return False
        values[within] = value
        self.dirty.add(index)
        return True

    def check_writes(self, guard) -> None:
        """Pass every patched block's write to ``guard.check`` (which raises to refuse one),
        before any is written."""
        for index in sorted(self.dirty):
            guard.check("refcount block", self.block_offset(index), self.cs)

    def flush(self, guard=None) -> None:
        """Write back patched blocks (all first passed to ``guard.check``), then fsync."""
        f = self.image.file
        if guard is not None:
            self.check_writes(guard)
        for index in sorted(self.dirty):
            f.write(self.block_offset(index), encode_refblock(self.blocks[index], self.order))
        if self.dirty:
            f.sync()
        self.dirty.clear()


def looks_metadata_preallocated(image: Qcow2Image, allocated_bytes: int) -> bool:
    """QEMU's heuristic for "metadata was preallocated": clearly more host clusters carry a
    refcount than the host file system has allocated. Where it holds, QEMU asks the file
    system about holes under data clusters (so ``map`` reports them as zero)."""
    cs = image.cluster_size
    real_clusters = allocated_bytes // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = (image.file.size + cs - 1) // cs
    reader = OnDiskRefcounts(image)
    if reader.order >= 3:  # whole bytes per refcount: whole blocks at a time, no numpy
        return nonzero_refcounts(reader, end_cluster, threshold) >= threshold
    if scanmode.whole_tables(end_cluster):
        from qcowfs.image import tablescan
        return tablescan.nonzero_refcounts(reader, end_cluster, threshold) >= threshold
    count = 0
    for i in range(end_cluster):
        if count >= threshold:
            break
        try:
            if reader.get(i):
                count += 1
        except UnreadableRefblock:
            continue  # a block that cannot be read says nothing (QEMU only warns)
    return count >= threshold


def nonzero_refcounts(refs: OnDiskRefcounts, n: int, enough: int) -> int:
    """How many of clusters [0, n) have a refcount, one refcount block at a time, stopping
    once ``enough`` are found (a block that cannot be read counts nothing). Refcounts of
    whole bytes only (``refcount_order`` 3 and up)."""
    width = 1 << (refs.order - 3)
    per = refs.per_block
    cs = refs.cs
    f = refs.image.file
    found = 0
    for index in range(-(-n // per)):
        lo, hi = index * per, min(n, (index + 1) * per)
        entry = refs.table[index] if index < len(refs.table) else 0
        if entry & REFT_OFFSET_MASK & (cs - 1):
            continue
        patched = refs.blocks.get(index)
        if patched is not None:
            found += sum(1 for v in patched[:hi - lo] if v)
        else:
            off = refs.block_offset(index)
            if not off:
                continue
            found += count_nonzero_words(f.read(off, cs)[:(hi - lo) * width], width)
        if found >= enough:
            break
    return found


def count_nonzero_words(raw: bytes, width: int) -> int:
    """How many of the ``width``-byte words of ``raw`` are not zero, without a loop over
    them: the words' bytes, taken lane by lane, are OR-ed together as big integers and the
    zero bytes of the result counted."""
    n = len(raw) // width
    if width == 1:
        return n - raw.count(0)
    raw = raw[:n * width]
    lanes = int.from_bytes(raw[0::width], "little")
    for k in range(1, width):
        lanes |= int.from_bytes(raw[k::width], "little")
    return n - lanes.to_bytes(n, "little").count(0)
