"""Discarding guest ranges of the active disk: whole clusters become unallocated again, so the
guest reads the backing chain there (zeros without one). Internal snapshots keep their data.

The order is the writer's: references go first, refcounts last. An L2 table the range covers
entirely is dropped from the active L1; in a partly covered table the entries are cleared (in
a copy first when the table is shared with a snapshot). The host clusters they held join the
writer's deferred decrements, which run only once the new tables are durable (stage 3 of the
flush), so a crash leaves at most leaked clusters. Only whole clusters are discarded, as QEMU
does; a partial cluster at the end of the disk counts as whole.
"""

from __future__ import annotations

import errno

from qcowfs.errors import ImageError
from qcowfs.format.tables import L1E_OFFSET_MASK

from .write import Qcow2Writer


def discard(w: Qcow2Writer, offset: int, length: int) -> None:
    """Unallocate the whole clusters of ``[offset, offset + length)`` in the active disk.

    Changes stay in the writer's caches like writes do; ``flush()`` makes them durable."""
    w.check_usable()
    size = w.img.active.size
    if offset < 0 or length < 0 or offset + length > size:
        raise ImageError(w.path, f"discard of {length} bytes at offset {offset} lies outside "
                                 f"the disk ({size} bytes)", errno=errno.EINVAL)
    if w.bitmaps is not None:
        w.mark_bitmaps(offset, length)  # the request, as QEMU marks it
    cs = w.cs
    first = -(-offset // cs)
    end = offset + length
    last = -(-end // cs) if end == size else end // cs  # one past the last whole cluster
    if first >= last:
        return
    per_table = w.img.l2_entries
    for l1i in range(first // per_table, -(-last // per_table)):
        lo = max(first - l1i * per_table, 0)
        hi = min(last - l1i * per_table, per_table)
        _discard_in_table(w, l1i, lo, hi)


def _discard_in_table(w: Qcow2Writer, l1i: int, lo: int, hi: int) -> None:
    """Clear entries ``[lo, hi)`` of the L2 table under active L1 entry ``l1i``."""
    img, cb, cs = w.img, w.cb, w.cs
    l1 = img.active.l1
    if l1i >= len(l1):
        return
    l2 = l1[l1i] & L1E_OFFSET_MASK
    if not l2:
        return
    step = 2 if w.extended else 1
    table = img.l2_cache.get(l2)
    span = table[lo * step:hi * step]
    if not any(span):
        return
    w.mark_dirty()
    if lo == 0 and hi == img.l2_entries:
        # The whole table goes: one L1 entry, and the active tree's references under it.
        for j in range(0, len(table), step):
            ref = w.old_ref(table[j]) if table[j] else None
            if ref is not None:
                w.deferred.append(ref)
        w.deferred.append((l2, cs))
        w.metadata_changed(l2 >> cb, -1)
        l1[l1i] = 0
        w.l1_dirty.add(l1i)
        return
    l2, table = w.writable_l2(l1i)  # a copy when a snapshot shares it
    for k in range(lo, hi):
        j = k * step
        entry = table[j]
        if entry or (step == 2 and table[j + 1]):
            ref = w.old_ref(entry) if entry else None
            if ref is not None:
                w.deferred.append(ref)
            table[j] = 0
            if step == 2:
                table[j + 1] = 0
    w.touch_l2(l2, table)


def punch_hole(w: Qcow2Writer, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeros, giving back what the top image can.

    Whole clusters past the end of the backing chain (all of them without one) become
    unallocated: nothing shows through there. Below that end a freed cluster would show the
    backing file, so it becomes a zero cluster (v3, its host cluster freed) or is written with
    zeros (v2, which has no zero clusters: QEMU's discard would let the backing data show,
    which punch-hole must not). Partial clusters are written with zeros. Every step is an
    ordinary writer change, so the flush order keeps it crash-safe."""
    w.check_usable()
    size = w.img.active.size
    if offset < 0 or length < 0 or offset + length > size:
        raise ImageError(w.path, f"punch of {length} bytes at offset {offset} lies outside "
                                 f"the disk ({size} bytes)", errno=errno.EINVAL)
    end = offset + length
    split = min(end, max(offset, w.backing_size))
    if split > offset:
        w.write_zeroes(offset, split - offset)
    if end > split:
        discard(w, split, end - split)
        # what discard left (partial clusters) still holds data: zero it; clusters that now
        # read zeros from the metadata alone are left as they are
        w.write_zeroes(split, end - split)
