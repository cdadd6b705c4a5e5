"""The refcounts on disk against the walk's expected ones: leaks, corruptions, broken refcount
blocks, and the leak fixes (the refcount comparison of ``qemu-img check``). Whole refcount
blocks are compared as bytes first; only blocks that differ are decoded."""

from __future__ import annotations

import sys
from array import array

from qcowfs.format.tables import (
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    refcount_max,
)
from qcowfs.image import scanmode, tableruns
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.refcount_read import OnDiskRefcounts, UnreadableRefblock
from qcowfs.image.walk import Tally

from .result import FIX_ERRORS, FIX_LEAKS, CheckResult


def check_refblocks(refs: OnDiskRefcounts, tally: Tally, res: CheckResult) -> bool:
    """Refcount table entries that cannot be used; returns whether a rebuild is needed."""
    rebuild = False
    cs = refs.cs
    table = refs.table
    for i in range(tableruns.used_entries(table)):  # the zeros after the last entry: none
        entry = table[i]
        off = entry & REFT_OFFSET_MASK
        if entry & REFT_RESERVED_MASK or (off and off % cs):
            rebuild = True  # the walk already counted it
            continue
        if not off:
            continue
        if off + cs > refs.file_size:
            res.corruptions += 1
            res.messages.append(f"ERROR refcount block {i} is outside image")
            rebuild = True
            continue
        count = tally.expected(off // cs)
        if count != 1:
            res.corruptions += 1
            res.messages.append(f"ERROR refcount block {i} refcount={count}")
            rebuild = True
    return rebuild


def cluster_count(refs: OnDiskRefcounts, tally: Tally) -> int:
    """How many clusters the comparison covers: the file's, and the few just past its end
    that a reference may reach (never more than one cluster's worth, see the walk)."""
    nb = -(-refs.file_size // refs.cs)
    nb = max(nb, len(tally.counts))
    if tally.beyond_eof:
        nb = max(nb, max(tally.beyond_eof) + 1)
    return nb


def compare(refs: OnDiskRefcounts, tally: Tally, nb: int, fix: int, res: CheckResult
             ) -> tuple[int, bool]:
    """qemu-img's comparison of on-disk and expected refcounts: (the highest cluster either
    says is in use, whether the refcount structures need a rebuild)."""
    highest = 0  # QEMU starts from cluster 0 (the header)
    rebuild = False
    counts = tally.counts
    top = refcount_max(refs.order)
    # only the clusters that differ go through the per-cluster code below
    blocks, highest = blocks_that_differ(refs, tally, nb)
    if blocks and scanmode.whole_tables(nb):
        from qcowfs.image import tablescan
        clusters, in_blocks = tablescan.compare_candidates(refs, counts, tally.beyond_eof, nb,
                                                           blocks)
        highest = max(highest, in_blocks)
    else:
        per = refs.per_block
        clusters = [i for b in blocks for i in range(b * per, min(nb, (b + 1) * per))]
    for i in clusters:
        try:
            on = refs.get(i)
        except UnreadableRefblock:
            res.messages.append(f"Can't get refcount for cluster {i}: Input/output error")
            res.check_errors += 1
            continue
        want = counts[i] if i < len(counts) else tally.beyond_eof.get(i, 0)
        if (on or want) and i > highest:
            highest = i
        if on == want:
            continue
        fixed = None
        if on == 0:
            rebuild = True
        elif on > want and fix & FIX_LEAKS:
            fixed = "leaks"
        elif on < want and fix & FIX_ERRORS and want <= top:
            fixed = "corruptions"
        label = "Repairing" if fixed else ("ERROR" if on < want else "Leaked")
        res.messages.append(f"{label} cluster {i} refcount={on} reference={want}")
        if fixed and refs.set(i, want):
            if fixed == "leaks":
                res.leaks_fixed += 1
                if want == 0:
                    res.freed.append(i)
            else:
                res.corruptions_fixed += 1
            continue
        if on < want:
            res.corruptions += 1
        else:
            res.leaks += 1
    return highest, rebuild


def punch(image: Qcow2Image, clusters: list[int]) -> None:
    """Give back the host space of clusters a repair freed (their refcount 0 is durable),
    where they lie inside the file, as QEMU discards them: one hole per run."""
    cs = image.cluster_size
    size = image.file.size
    runs: list[list[int]] = []
    for c in sorted(clusters):
        if c == 0 or c * cs >= size:
            continue
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    for first, end in runs:
        image.file.punch_hole(first * cs, min(end * cs, size) - first * cs)


def blocks_that_differ(refs: OnDiskRefcounts, tally: Tally, nb: int) -> tuple[list[int], int]:
    """The refcount blocks over clusters [0, nb) whose on-disk values differ from the walk's
    (or cannot be read), by index, and the highest cluster in use in the others. The walk's
    counts are encoded as the block would hold them and compared as bytes with the block as
    it is on disk: nothing is decoded unless it differs (or the refcounts are narrower than a
    byte)."""
    per = refs.per_block
    counts = tally.counts
    differ: list[int] = []
    highest = 0
    for index in range(-(-nb // per)):
        lo, hi = index * per, min(nb, (index + 1) * per)
        want = counts[lo:hi]
        if len(want) < hi - lo:
            want.extend([tally.beyond_eof.get(i, 0) for i in range(lo + len(want), hi)])
        entry = refs.table[index] if index < len(refs.table) else 0
        if entry & REFT_OFFSET_MASK & (refs.cs - 1):
            differ.append(index)  # unreadable: each cluster says so
            continue
        last = last_used_if_equal(refs, index, want)
        if last is None:
            differ.append(index)
        elif last >= 0:
            highest = lo + last
    return differ, highest


def last_used_if_equal(refs: OnDiskRefcounts, index: int, want: array) -> int | None:
    """When refcount block ``index`` holds exactly ``want`` (its first ``len(want)`` values):
    the index of the last non-zero one in it, -1 when all are zero; None when it differs."""
    m = len(want)
    off = refs.block_offset(index)
    if index not in refs.blocks and off and refs.order >= 3:
        w = 1 << (refs.order - 3)
        raw = refs.image.file.read(off, m * w)
        equal = holds(raw, want, w)
        if equal is not None:
            return -(-len(raw.rstrip(b"\0")) // w) - 1 if equal else None
    values = refs.block(index)
    if values is None:
        on = want.tobytes()
        return -1 if on == bytes(len(on)) else None
    if array("Q", values[:m]) != want:
        return None
    return -(-len(want.tobytes().rstrip(b"\0")) // 8) - 1


def holds(raw: bytes, want: array, width: int) -> bool | None:
    """Whether ``raw``, ``len(want)`` big-endian refcounts of ``width`` bytes, holds the
    values of ``want`` (an ``array('Q')``), as byte comparisons: the common block (one value
    in every slot in use, zeros after) against that pattern; any other block by spreading
    ``raw``'s bytes into words. None on a big-endian host (the caller decodes)."""
    m = len(want)
    words = want.tobytes()
    used = -(-len(words.rstrip(b"\0")) // 8)
    v = want[0] if used else 0
    if v < 1 << (8 * width) and words[:8 * used] == words[:8] * used:
        return raw == v.to_bytes(width, "big") * used + bytes(width * (m - used))
    if sys.byteorder != "little":
        return None
    spread = bytearray(8 * m)
    for k in range(width):
        spread[width - 1 - k::8] = raw[k::width]
    return spread == words
