"""The repairs that write metadata: QEMU's overlap rule (every write is checked before the
first one is made), the COPIED flags, the refcount rebuild, and clearing the dirty and corrupt
bits."""

from __future__ import annotations

import bisect
from array import array

from qcowfs.format import header as hdr
from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    REFT_OFFSET_MASK,
    ZERO_FLAG,
    decode_u64_table,
    encode_refblock,
    encode_u64_table,
    refblock_entries,
    refcount_max,
)
from qcowfs.image import scanmode
from qcowfs.image.header_update import set_incompatible
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.refcount_read import OnDiskRefcounts, UnreadableRefblock
from qcowfs.image.walk import Tally

from .result import FIX_ERRORS, FIX_LEAKS, CheckResult


class Refused(Exception):
    """A repair write would land on other metadata: QEMU's overlap check refuses it. ``args``:
    the metadata kind it overlaps, and the line that says which write failed (or None)."""


# QEMU's metadata kinds, in the order its overlap check tries them
OVERLAP_KINDS = ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
                  "refcount block", "snapshot table", "inactive L1 table", "bitmap directory")


def metadata_clusters(image: Qcow2Image, refs: OnDiskRefcounts
                       ) -> dict[str, list[tuple[int, int]]]:
    """Which host clusters hold each kind of metadata (as the image says, right or wrong), as
    [first, end) cluster ranges: a size the image claims costs one range, not one set entry
    per cluster."""
    h = image.header
    cs = image.cluster_size
    f = image.file

    def span(offset: int, length: int) -> list[tuple[int, int]]:
        return [(offset // cs, -(-(offset + length) // cs))] if length > 0 else []

    out: dict[str, list[tuple[int, int]]] = {k: [] for k in OVERLAP_KINDS}
    out["qcow2_header"] = [(0, 1)]
    out["active L1 table"] = span(h.l1_table_offset, h.l1_size * 8)
    if h.l1_size and h.l1_table_offset + h.l1_size * 8 <= f.size:
        for entry in decode_u64_table(f.read(h.l1_table_offset, h.l1_size * 8)):
            off = entry & L1E_OFFSET_MASK
            if off:
                out["active L2 table"] += span(off, cs)
    out["refcount table"] = span(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for entry in refs.table:
        off = entry & REFT_OFFSET_MASK
        if off:
            out["refcount block"] += span(off, cs)
    if h.nb_snapshots:
        out["snapshot table"] = span(h.snapshots_offset, image.snapshot_table_bytes)
    for snap in image.snapshots:
        out["inactive L1 table"] += span(snap.l1_table_offset, snap.l1_size * 8)
    if h.bitmaps:
        out["bitmap directory"] = span(h.bitmaps.directory_offset, h.bitmaps.directory_size)
    return out


class Guard:
    """Refuse a metadata write that overlaps other metadata, as QEMU's default overlap check
    does; the image is then marked corrupt."""

    def __init__(self, image: Qcow2Image, refs: OnDiskRefcounts):
        self.image = image
        self.kinds = {k: sorted_ranges(v) for k, v in metadata_clusters(image, refs).items()}

    def check(self, kind: str | None, offset: int, length: int, failed: str | None = None
              ) -> None:
        """Refuse a write of ``kind`` (None: a new structure, which may overlap no metadata,
        old refcount structures included) at ``offset``; ``failed`` names the write in the
        message."""
        cs = self.image.cluster_size
        first, end = offset // cs, -(-(offset + length) // cs)
        for other in OVERLAP_KINDS:
            if other != kind and overlaps(self.kinds[other], first, end):
                raise Refused(other, failed)


def sorted_ranges(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Ranges merged into disjoint ones: (starts, ends), sorted, for a bisect lookup."""
    starts: list[int] = []
    ends: list[int] = []
    for first, end in sorted(ranges):
        if ends and first <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(first)
            ends.append(end)
    return starts, ends


def overlaps(ranges: tuple[list[int], list[int]], first: int, end: int) -> bool:
    starts, ends = ranges
    i = bisect.bisect_right(starts, end - 1) - 1
    return i >= 0 and ends[i] > first


def check_copied(image: Qcow2Image, refs: OnDiskRefcounts, res: CheckResult, fix: int,
                  runs: dict[int, tuple[int, int]]) -> list[tuple[int, bytes]]:
    """COPIED must be set exactly on active L1/L2 entries whose cluster has refcount 1
    (``refs`` with its patches). ``runs`` are the tables the walk found to be one run of
    contiguous data clusters (``Tally.runs``): with COPIED set, such a table is right when
    its clusters' refcounts all are 1, one byte comparison per refcount block. Returns the repair's writes, (offset, bytes), each already
    passed by the overlap rule; ``write_copied`` writes them."""
    h = image.header
    cs = image.cluster_size
    f = image.file
    if fix & FIX_ERRORS:
        repair = True
    else:
        # with leaks-only repair, QEMU fixes the flags too once nothing else is wrong
        repair = bool(fix & FIX_LEAKS) and not (res.check_errors or res.corruptions or res.leaks)
    size = f.refresh_size()
    if not h.l1_size or h.l1_table_offset + h.l1_size * 8 > size:
        return []
    l1 = decode_u64_table(f.read(h.l1_table_offset, h.l1_size * 8))
    step = 2 if image.extended_l2 else 1
    guard = Guard(image, refs) if repair else None
    writes: list[tuple[int, bytes]] = []
    refcount = refs.lookup()
    scan = None
    file_clusters = -(-size // cs)
    numpy_ok = scanmode.whole_tables(file_clusters) and not image.has_data_file
    for i, l1e in enumerate(l1):
        l2_off = l1e & L1E_OFFSET_MASK
        if not l2_off:
            continue
        try:  # an unaligned table counts for the cluster it starts in, and is read there
            rc = refs.get_one(l2_off // cs)
        except UnreadableRefblock:
            rc = None
        if rc is not None and (rc == 1) != bool(l1e & COPIED):
            res.corruptions += 1
            res.messages.append(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 "
                                f"cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}")
            if repair:
                new = l1e | COPIED if rc == 1 else l1e & ~COPIED
                assert guard is not None
                guard.check("active L1 table", h.l1_table_offset + i * 8, 8)
                writes.append((h.l1_table_offset + i * 8, new.to_bytes(8, "big")))
                res.corruptions -= 1
                res.corruptions_fixed += 1
        if l2_off >= size:
            continue  # reads as zeros: nothing to check
        run = runs.get(l2_off)
        if run is not None and run[0] & COPIED and \
                refs.all_equal((run[0] & L2E_OFFSET_MASK) // cs, run[1], 1):
            continue
        raw = f.read(l2_off, min(cs, size - l2_off))
        table = decode_u64_table(raw + bytes(cs - len(raw)))
        if numpy_ok and scan is None:
            from qcowfs.image import tablescan as scan
            is_one, unreadable = scan.refcount_is_one(refs, file_clusters)
        if scan is not None and scan.copied_is_right(image, table, is_one, unreadable):
            continue
        changed = False
        for j in range(0, len(table), step):
            entry = table[j]
            if entry & COMPRESSED:
                continue
            host = entry & L2E_OFFSET_MASK
            if image.has_data_file:
                if not host and not entry & COPIED:
                    continue
                rc = 1
            else:
                if not host:
                    continue
                try:  # an unaligned host counts for the cluster it starts in, as in QEMU
                    rc = refcount(host // cs)
                except UnreadableRefblock:
                    continue
            if entry & ZERO_FLAG and not host and not image.has_data_file:
                continue
            if (rc == 1) != bool(entry & COPIED):
                res.corruptions += 1
                res.messages.append(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data "
                                    f"cluster: l2_entry={entry:x} refcount={rc}")
                if repair:
                    table[j] = entry | COPIED if rc == 1 else entry & ~COPIED
                    changed = True
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
        if changed:
            assert guard is not None
            guard.check("active L2 table", l2_off, cs)
            writes.append((l2_off, encode_u64_table(table)))
    return writes


def fix_zero_alloc(image: Qcow2Image, tally: Tally, res: CheckResult) -> None:
    """Turn the walk's preallocated zero clusters at unaligned offsets into plain zero
    clusters, in walk order, each write passing the overlap rule first (a refusal stops the
    check with the entries before it written, as QEMU's repair during its walk does)."""
    guard = Guard(image, OnDiskRefcounts(image))
    f = image.file
    try:
        for offset, entry, active, host in tally.zero_alloc_fixes:
            res.messages.append(f"Repairing L2 entry at {offset}: preallocated zero cluster at "
                                f"unaligned offset {host}")
            guard.check("active L2 table" if active else "inactive L2 table", offset, 8)
            f.write(offset, entry.to_bytes(8, "big"))
            res.corruptions_fixed += 1
    finally:
        if res.corruptions_fixed:
            f.sync()


def write_copied(image: Qcow2Image, writes: list[tuple[int, bytes]]) -> None:
    for offset, raw in writes:
        image.file.write(offset, raw)
    if writes:
        image.file.sync()
        image.l2_cache.clear()


def mark_clean(image: Qcow2Image) -> None:
    h = image.header
    if h.version < 3:
        return
    flags = h.incompatible_features & ~(hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT)
    if flags != h.incompatible_features:
        set_incompatible(image, flags)


def rebuild_refcounts(image: Qcow2Image, tally: Tally) -> None:
    """New refcount table and blocks from ``tally`` in free clusters, durable before the
    header points at them. Every cluster is placed, and checked against QEMU's overlap rule
    (the image's metadata as it stands, the old refcount structures included), before
    anything is written: a refused rebuild (``Refused``) leaves the file as it was."""
    h = image.header
    cs = image.cluster_size
    per_block = refblock_entries(h.cluster_bits, h.refcount_order)
    counts = array("Q", tally.counts)
    beyond = max(tally.beyond_eof, default=-1)
    if beyond >= len(counts):
        counts.extend([0] * (beyond + 1 - len(counts)))
    for i, c in tally.beyond_eof.items():
        counts[i] = c
    # the old refcount table and blocks stay counted until the switch (QEMU does the same);
    # they are freed afterwards as leaks

    def used(i: int) -> bool:
        return i < len(counts) and counts[i] > 0

    def take(i: int) -> None:
        if i >= len(counts):
            counts.extend([0] * (i + 1 - len(counts)))
        counts[i] += 1

    def first_fit(n: int) -> int:
        start = 0
        while True:
            for k in range(start, start + n):
                if used(k):
                    start = k + 1
                    break
            else:
                return start

    blocks: dict[int, int] = {}
    table_at = -1
    table_clusters = 0
    def in_use() -> set[int]:
        """The refcount blocks with a count in them, a block's bytes at a time."""
        raw = memoryview(counts).cast("B")
        step = 8 * per_block
        return {k for k in range(-(-len(counts) // per_block))
                if bytes(raw[k * step:(k + 1) * step]).strip(b"\0")}

    while True:
        needed = in_use()
        missing = sorted(needed - set(blocks))
        for index in missing:
            c = first_fit(1)
            take(c)
            blocks[index] = c
        want = -(-(max(blocks) + 1) * 8 // cs)
        if want > table_clusters:
            table_clusters = want
            table_at = first_fit(table_clusters)
            for k in range(table_at, table_at + table_clusters):
                take(k)
            continue
        if not missing:
            break
    guard = Guard(image, OnDiskRefcounts(image))
    for _index, c in sorted(blocks.items()):
        guard.check(None, c * cs, cs, "ERROR writing refblock")
    guard.check(None, table_at * cs, table_clusters * cs, "ERROR writing reftable")
    f = image.file
    order = h.refcount_order
    top = refcount_max(order)  # a count the width cannot hold stays at its maximum, as in QEMU
    for index, c in sorted(blocks.items()):
        first = index * per_block
        values = [min(counts[k], top) if k < len(counts) else 0
                  for k in range(first, first + per_block)]
        f.write(c * cs, encode_refblock(values, order))
    table = array("Q", bytes(8 * table_clusters * cs // 8))
    for index, c in blocks.items():
        table[index] = c * cs
    f.write(table_at * cs, encode_u64_table(table))
    f.sync()
    f.write(hdr.OFF_REFTABLE, hdr.pack_reftable_pointer(table_at * cs, table_clusters))
    f.sync()
    h.refcount_table_offset = table_at * cs
    h.refcount_table_clusters = table_clusters
