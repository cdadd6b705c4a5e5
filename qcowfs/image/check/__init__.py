"""Consistency check and repair of a qcow2 image, with qemu-img check's verdicts.

The expected refcount of every host cluster comes from :mod:`qcowfs.image.walk`. Against the
refcounts on disk, a higher on-disk value is a leak and a lower one a corruption; a referenced
cluster with refcount 0 (or a broken refcount block) means the refcount structures must be
rebuilt. COPIED flags must say "refcount is 1". Repairs never touch guest data:

- FIX_LEAKS lowers leaked refcounts;
- FIX_ERRORS raises refcounts that are too low, fixes COPIED flags, and rebuilds the refcount
  structures when patching cannot work: a new refcount table and blocks, built from the walk,
  are written to free clusters (at the end of the file), made durable, and switched to with one
  header write followed by fsync; the old structures are then freed;
- after a repair that leaves no corruption, the dirty and corrupt bits are cleared.

The snapshot table comes first (FIX_ERRORS only): snapshots past QEMU's limits are dropped
from the header's count at once, over-long extra data is cut, incomplete v3 entries are
completed; a table that changed is rewritten at a new place at the end of the repair.
"""

from __future__ import annotations

from qcowfs.errors import ImageError
from qcowfs.format import header as hdr
from qcowfs.image.header_update import set_incompatible
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.refcount_read import OnDiskRefcounts
from qcowfs.image.walk import Tally, tally_references

from .compare import check_refblocks, cluster_count, compare, punch
from .repair import (
    Guard,
    Refused,
    check_copied,
    fix_zero_alloc,
    mark_clean,
    rebuild_refcounts,
    write_copied,
)
from .result import FIX_ALL, FIX_ERRORS, FIX_LEAKS, CheckResult
from .snapshots import check_snapshot_table, rewrite_snapshot_table, trim_snapshot_table


def check_image(image: Qcow2Image, fix: int = 0) -> CheckResult:
    """One check pass over ``image`` (opened writable when ``fix``)."""
    res = CheckResult()
    try:
        return _check(image, fix, res)
    except Refused as exc:
        res.messages.append(f"qcow2: Marking image as corrupt: Preventing invalid write on "
                            f"metadata (overlaps with {exc.args[0]}); further corruption "
                            f"events will be suppressed")
        if exc.args[1]:
            res.messages.append(f"{exc.args[1]}: Input/output error")
        set_incompatible(image, image.header.incompatible_features | hdr.INCOMPAT_CORRUPT)
        res.check_errors += 1
        res.aborted = "Input/output error"
        return res


def _check(image: Qcow2Image, fix: int, res: CheckResult) -> CheckResult:
    cs = image.cluster_size
    if not trim_snapshot_table(image, fix, res):
        return res
    rewrite_snapshots = check_snapshot_table(image, fix, res)
    tally = tally_references(image, fix_errors=bool(fix & FIX_ERRORS))
    if tally.zero_alloc_fixes:
        fix_zero_alloc(image, tally, res)
    _take_stats(tally, res)
    for d in tally.defects:
        res.corruptions += 1
        res.messages.append(d.line)
    refs = OnDiskRefcounts(image)
    rebuild = check_refblocks(refs, tally, res)
    nb = cluster_count(refs, tally)

    before = (res.corruptions, res.leaks)
    freed: list[int] = []
    highest, needs_rebuild = compare(refs, tally, nb, 0, res)
    rebuild = rebuild or needs_rebuild
    if rebuild and fix & FIX_ERRORS:
        old = (res.corruptions, res.leaks)
        res.messages.append("Rebuilding refcount structure")
        rebuild_refcounts(image, tally)
        refs = OnDiskRefcounts(image)
        tally = tally_references(image)
        # QEMU counts afresh after the switch: what the walk finds, no leaks yet
        res.corruptions, res.leaks = len(tally.defects), 0
        saved = res.messages
        scratch = CheckResult(messages=saved)
        nb = cluster_count(refs, tally)
        highest, _ = compare(refs, tally, nb, FIX_LEAKS, scratch)
        freed = scratch.freed
        if res.corruptions < old[0]:
            res.corruptions_fixed += old[0] - res.corruptions
        if res.leaks < old[1]:
            res.leaks_fixed += old[1] - res.leaks
        res.leaks += scratch.leaks
    elif fix:
        if rebuild:
            res.messages.append("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            res.aborted = "Input/output error"
            return res
        if res.leaks or res.corruptions:
            res.corruptions, res.leaks = before
            highest, _ = compare(refs, tally, nb, fix, res)
            freed = res.freed
    # every write of the repair is checked against the overlap rule before the first one, so a
    # refused repair writes nothing but the corrupt bit (the rebuild above checked its own)
    if refs.dirty:
        refs.check_writes(Guard(image, refs))
    flags = check_copied(image, refs, res, fix, tally.runs)
    refs.flush()
    punch(image, freed)
    write_copied(image, flags)
    if rewrite_snapshots and not res.check_errors:
        highest = max(highest, rewrite_snapshot_table(image))
    res.image_end_offset = (highest + 1) * cs
    if fix and not res.check_errors and not res.corruptions:
        mark_clean(image)
    return res


def repair_dirty(image: Qcow2Image) -> CheckResult:
    """Make the refcounts of a dirty (lazy-refcounts) image true again, as QEMU does when it
    opens one read/write. Raises ImageError when the image cannot be repaired."""
    res = check_image(image, FIX_ALL)
    if res.check_errors or res.corruptions:
        raise ImageError(image.path, "could not repair dirty image")
    return res


# --- pieces -------------------------------------------------------------------------------


def _take_stats(tally: Tally, res: CheckResult) -> None:
    s = tally.stats
    res.total_clusters = s.total_clusters
    res.allocated_clusters = s.allocated_clusters
    res.fragmented_clusters = s.fragmented_clusters
    res.compressed_clusters = s.compressed_clusters


__all__ = ["FIX_ALL", "FIX_ERRORS", "FIX_LEAKS", "CheckResult", "check_image", "repair_dirty"]
