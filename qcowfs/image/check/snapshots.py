"""The snapshot table's part of a check: entries past QEMU's limits dropped, incomplete ones
completed, and the table rewritten at a new place when it changed."""

from __future__ import annotations

from qcowfs.format import header as hdr
from qcowfs.format.snapshot import serialize_snapshot_table
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.refcount_read import OnDiskRefcounts
from qcowfs.image.walk import tally_references

from .compare import cluster_count, compare
from .repair import Guard, rebuild_refcounts
from .result import FIX_ERRORS, FIX_LEAKS, CheckResult


def trim_snapshot_table(image: Qcow2Image, fix: int, res: CheckResult) -> bool:
    """What a snapshot table scan dropped (see ``Qcow2Image.open(scan_snapshots=True)``):
    without FIX_ERRORS the check cannot go on, as with qemu-img; with it, the header's
    snapshot count is cut at once. Returns whether the check goes on."""
    scan = image.snapshot_scan
    if scan is None or not (scan.dropped or scan.long_extra):
        return True
    if not fix & FIX_ERRORS:
        if scan.too_many:
            res.messages.append(f"ERROR snapshot table too large\nYou can force-remove all "
                                f"{scan.too_many} overhanging snapshots with qemu-img check "
                                f"-r all")
        elif scan.long_extra:
            res.messages.append(f"ERROR failed to read the snapshot table: Too much extra "
                                f"metadata in snapshot table entry {scan.long_extra[0][0]}\n"
                                f"You can force-remove this extra metadata with qemu-img check "
                                f"-r all")
        else:
            res.messages.append(f"ERROR failed to read the snapshot table: Snapshot table is "
                                f"too big\nYou can force-remove all {scan.overhanging} "
                                f"overhanging snapshots with qemu-img check -r all")
        res.check_errors += 1
        res.aborted = "File too large"
        return False
    for i, size in scan.long_extra:
        res.messages.append(f"Discarding too much extra metadata in snapshot table entry {i} "
                            f"({size} > 1024)")
        res.corruptions_fixed += 1
    if scan.overhanging:
        res.messages.append(f"Discarding {scan.overhanging} overhanging snapshots (snapshot "
                            f"table is too big)")
    if scan.too_many:
        res.messages.append(f"Discarding {scan.too_many} overhanging snapshots")
    if scan.dropped:
        res.corruptions_fixed += scan.dropped
        h = image.header
        h.nb_snapshots = len(image.snapshots)
        image.file.write(hdr.OFF_SNAPSHOTS, h.nb_snapshots.to_bytes(4, "big"))
        image.file.sync()
    return True


def check_snapshot_table(image: Qcow2Image, fix: int, res: CheckResult) -> bool:
    """v3 entries need 16 bytes of extra data. Returns whether the table must be rewritten
    (such entries, or over-long extra data cut, under FIX_ERRORS)."""
    rewrite = bool(image.snapshot_scan and image.snapshot_scan.long_extra)
    if image.header.version >= 3:
        for i, snap in enumerate(image.snapshots):
            if snap.extra_data_size < 16:
                if fix & FIX_ERRORS:
                    res.corruptions_fixed += 1
                    res.messages.append(f"Repairing snapshot table entry {i} is incomplete")
                    rewrite = True
                else:
                    res.corruptions += 1
                    res.messages.append(f"ERROR snapshot table entry {i} is incomplete")
    return rewrite and bool(fix & FIX_ERRORS)


def rewrite_snapshot_table(image: Qcow2Image) -> int:
    """The snapshot table rewritten as QEMU writes it (every entry with at least the 24 bytes
    of known extra data; unknown extra data kept, up to 1024 bytes in all) at a new place:
    refcounts up and the table durable first, then the one 12-byte header write and fsync,
    then the old table's clusters freed. Returns the highest cluster now in use."""
    h = image.header
    cs = image.cluster_size
    f = image.file
    entries = []
    for e in image.snapshots:
        if e.disk_size is None:
            e.disk_size = h.size  # what an entry without it means
        e.extra_data_size = 24 + len(e.unknown_extra)
        entries.append(e)
    raw = serialize_snapshot_table(entries)
    n = -(-len(raw) // cs)
    refs = OnDiskRefcounts(image)
    old_first = h.snapshots_offset // cs
    old_count = -(-(h.snapshots_offset + image.snapshot_table_bytes) // cs) - old_first
    end = -(-refs.file_size // cs)
    start = free_run(refs, n, end)
    counted = start is not None
    if start is None:
        start = end  # no refcount block covers free space: the rebuild below counts it
    Guard(image, refs).check("snapshot table", start * cs, len(raw))
    f.write(start * cs, raw + bytes(n * cs - len(raw)))
    if counted:
        for c in range(start, start + n):
            refs.set(c, 1)
        refs.flush()
    f.sync()
    f.write(hdr.OFF_SNAPSHOTS, hdr.pack_snapshots_pointer(len(entries), start * cs))
    f.sync()
    h.nb_snapshots, h.snapshots_offset = len(entries), start * cs
    image.snapshot_table_bytes = len(raw)
    image.snapshot_scan = None
    if not counted:
        rebuild_refcounts(image, tally_references(image))
        refs, tally = OnDiskRefcounts(image), tally_references(image)
        compare(refs, tally, cluster_count(refs, tally), FIX_LEAKS, CheckResult())
        refs.flush()
        return start + n - 1
    refs = OnDiskRefcounts(image)
    for c in range(old_first, old_first + old_count):
        value = refs.get(c)
        if value:
            refs.set(c, value - 1)
    refs.flush()
    return start + n - 1


def free_run(refs: OnDiskRefcounts, n: int, end: int) -> int | None:
    """The first ``n`` clusters in a row with refcount 0 that existing refcount blocks cover
    (past the end of the file too, as far as the last block reaches)."""
    run = 0
    limit = max(end + n, len(refs.table) * refs.per_block)
    c = 1
    while c < limit:
        index = c // refs.per_block
        if refs.block(index) is None:
            run = 0
            c = (index + 1) * refs.per_block
            continue
        run = run + 1 if refs.get(c) == 0 else 0
        if run == n:
            return c - n + 1
        c += 1
    return None
