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

import bisect
import sys
from array import array

from qcowfs.errors import ImageError
from qcowfs.format import header as hdr
from qcowfs.format.record import field, record
from qcowfs.format.snapshot import serialize_snapshot_table
from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    ZERO_FLAG,
    decode_u64_table,
    encode_refblock,
    encode_u64_table,
    refblock_entries,
    refcount_max,
)
from qcowfs.image import scanmode, tableruns
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.refcount_read import OnDiskRefcounts, UnreadableRefblock
from qcowfs.image.walk import Tally, tally_references

FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS


@record
class CheckResult:
    """What one pass found (and fixed). ``messages`` are the per-problem lines qemu-img prints
    on stderr."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: the check stopped early (qemu-img then prints no report, only "Check failed")
    aborted: str | None = None
    messages: list[str] = field(default_factory=list)
    #: clusters a leak repair set to refcount 0 (their host space is given back)
    freed: list[int] = field(default_factory=list)

    @property
    def fixed_anything(self) -> bool:
        return bool(self.corruptions_fixed or self.leaks_fixed)


class _Refused(Exception):
    """A repair write would land on other metadata: QEMU's overlap check refuses it. ``args``:
    the metadata kind it overlaps, and the line that says which write failed (or None)."""


# QEMU's metadata kinds, in the order its overlap check tries them
_OVERLAP_KINDS = ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
                  "refcount block", "snapshot table", "inactive L1 table", "bitmap directory")


def _metadata_clusters(image: Qcow2Image, refs: OnDiskRefcounts
                       ) -> dict[str, list[tuple[int, int]]]:
    """Which host clusters hold each kind of metadata (as the image says, right or wrong), as
    [first, end) cluster ranges: a size the image claims costs one range, not one set entry
    per cluster."""
    h = image.header
    cs = image.cluster_size
    f = image.file

    def span(offset: int, length: int) -> list[tuple[int, int]]:
        return [(offset // cs, -(-(offset + length) // cs))] if length > 0 else []

    out: dict[str, list[tuple[int, int]]] = {k: [] for k in _OVERLAP_KINDS}
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


class _Guard:
    """Refuse a metadata write that overlaps other metadata, as QEMU's default overlap check
    does; the image is then marked corrupt."""

    def __init__(self, image: Qcow2Image, refs: OnDiskRefcounts):
        self.image = image
        self.kinds = {k: _sorted_ranges(v) for k, v in _metadata_clusters(image, refs).items()}

    def check(self, kind: str | None, offset: int, length: int, failed: str | None = None
              ) -> None:
        """Refuse a write of ``kind`` (None: a new structure, which may overlap no metadata,
        old refcount structures included) at ``offset``; ``failed`` names the write in the
        message."""
        cs = self.image.cluster_size
        first, end = offset // cs, -(-(offset + length) // cs)
        for other in _OVERLAP_KINDS:
            if other != kind and _overlaps(self.kinds[other], first, end):
                raise _Refused(other, failed)


def _sorted_ranges(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
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


def _overlaps(ranges: tuple[list[int], list[int]], first: int, end: int) -> bool:
    starts, ends = ranges
    i = bisect.bisect_right(starts, end - 1) - 1
    return i >= 0 and ends[i] > first


def check_image(image: Qcow2Image, fix: int = 0) -> CheckResult:
    """One check pass over ``image`` (opened writable when ``fix``)."""
    res = CheckResult()
    try:
        return _check(image, fix, res)
    except _Refused as exc:
        res.messages.append(f"qcow2: Marking image as corrupt: Preventing invalid write on "
                            f"metadata (overlaps with {exc.args[0]}); further corruption "
                            f"events will be suppressed")
        if exc.args[1]:
            res.messages.append(f"{exc.args[1]}: Input/output error")
        h = image.header
        if h.version >= 3:
            flags = h.incompatible_features | hdr.INCOMPAT_CORRUPT
            image.file.write(hdr.OFF_INCOMPAT, flags.to_bytes(8, "big"))
            image.file.sync()
            h.incompatible_features = flags
        res.check_errors += 1
        res.aborted = "Input/output error"
        return res


def _check(image: Qcow2Image, fix: int, res: CheckResult) -> CheckResult:
    cs = image.cluster_size
    if not _trim_snapshot_table(image, fix, res):
        return res
    rewrite_snapshots = _check_snapshot_table(image, fix, res)
    tally = tally_references(image)
    _take_stats(tally, res)
    for d in tally.defects:
        res.corruptions += 1
        res.messages.append(d.line)
    refs = OnDiskRefcounts(image)
    rebuild = _check_refblocks(refs, tally, res)
    nb = _cluster_count(refs, tally)

    before = (res.corruptions, res.leaks)
    freed: list[int] = []
    highest, needs_rebuild = _compare(refs, tally, nb, 0, res)
    rebuild = rebuild or needs_rebuild
    if rebuild and fix & FIX_ERRORS:
        old = (res.corruptions, res.leaks)
        res.messages.append("Rebuilding refcount structure")
        _rebuild(image, tally)
        refs = OnDiskRefcounts(image)
        tally = tally_references(image)
        # QEMU counts afresh after the switch: what the walk finds, no leaks yet
        res.corruptions, res.leaks = len(tally.defects), 0
        saved = res.messages
        scratch = CheckResult(messages=saved)
        nb = _cluster_count(refs, tally)
        highest, _ = _compare(refs, tally, nb, FIX_LEAKS, scratch)
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
            highest, _ = _compare(refs, tally, nb, fix, res)
            freed = res.freed
    # every write of the repair is checked against the overlap rule before the first one, so a
    # refused repair writes nothing but the corrupt bit (the rebuild above checked its own)
    if refs.dirty:
        refs.check_writes(_Guard(image, refs))
    flags = _check_copied(image, refs, res, fix, tally.runs)
    refs.flush()
    _punch(image, freed)
    _write_copied(image, flags)
    if rewrite_snapshots and not res.check_errors:
        highest = max(highest, _rewrite_snapshot_table(image))
    res.image_end_offset = (highest + 1) * cs
    if fix and not res.check_errors and not res.corruptions:
        _mark_clean(image)
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


def _trim_snapshot_table(image: Qcow2Image, fix: int, res: CheckResult) -> bool:
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


def _check_snapshot_table(image: Qcow2Image, fix: int, res: CheckResult) -> bool:
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


def _rewrite_snapshot_table(image: Qcow2Image) -> int:
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
    start = _free_run(refs, n, end)
    counted = start is not None
    if start is None:
        start = end  # no refcount block covers free space: the rebuild below counts it
    _Guard(image, refs).check("snapshot table", start * cs, len(raw))
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
        _rebuild(image, tally_references(image))
        refs, tally = OnDiskRefcounts(image), tally_references(image)
        _compare(refs, tally, _cluster_count(refs, tally), FIX_LEAKS, CheckResult())
        refs.flush()
        return start + n - 1
    refs = OnDiskRefcounts(image)
    for c in range(old_first, old_first + old_count):
        value = refs.get(c)
        if value:
            refs.set(c, value - 1)
    refs.flush()
    return start + n - 1


def _free_run(refs: OnDiskRefcounts, n: int, end: int) -> int | None:
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


def _check_refblocks(refs: OnDiskRefcounts, tally: Tally, res: CheckResult) -> bool:
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


def _cluster_count(refs: OnDiskRefcounts, tally: Tally) -> int:
    """How many clusters the comparison covers: the file's, and the few just past its end
    that a reference may reach (never more than one cluster's worth, see the walk)."""
    nb = -(-refs.file_size // refs.cs)
    nb = max(nb, len(tally.counts))
    if tally.beyond_eof:
        nb = max(nb, max(tally.beyond_eof) + 1)
    return nb


def _compare(refs: OnDiskRefcounts, tally: Tally, nb: int, fix: int, res: CheckResult
             ) -> tuple[int, bool]:
    """qemu-img's comparison of on-disk and expected refcounts: (the highest cluster either
    says is in use, whether the refcount structures need a rebuild)."""
    highest = 0  # QEMU starts from cluster 0 (the header)
    rebuild = False
    counts = tally.counts
    top = refcount_max(refs.order)
    # only the clusters that differ go through the per-cluster code below
    blocks, highest = _blocks_that_differ(refs, tally, nb)
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


def _punch(image: Qcow2Image, clusters: list[int]) -> None:
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


def _blocks_that_differ(refs: OnDiskRefcounts, tally: Tally, nb: int) -> tuple[list[int], int]:
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
        last = _last_used_if_equal(refs, index, want)
        if last is None:
            differ.append(index)
        elif last >= 0:
            highest = lo + last
    return differ, highest


def _last_used_if_equal(refs: OnDiskRefcounts, index: int, want: array) -> int | None:
    """When refcount block ``index`` holds exactly ``want`` (its first ``len(want)`` values):
    the index of the last non-zero one in it, -1 when all are zero; None when it differs."""
    m = len(want)
    off = refs.block_offset(index)
    if index not in refs.blocks and off and refs.order >= 3:
        w = 1 << (refs.order - 3)
        raw = refs.image.file.read(off, m * w)
        equal = _holds(raw, want, w)
        if equal is not None:
            return -(-len(raw.rstrip(b"\0")) // w) - 1 if equal else None
    values = refs.block(index)
    if values is None:
        on = want.tobytes()
        return -1 if on == bytes(len(on)) else None
    if array("Q", values[:m]) != want:
        return None
    return -(-len(want.tobytes().rstrip(b"\0")) // 8) - 1


def _holds(raw: bytes, want: array, width: int) -> bool | None:
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


def _check_copied(image: Qcow2Image, refs: OnDiskRefcounts, res: CheckResult, fix: int,
                  runs: dict[int, tuple[int, int]]) -> list[tuple[int, bytes]]:
    """COPIED must be set exactly on active L1/L2 entries whose cluster has refcount 1
    (``refs`` with its patches). ``runs`` are the tables the walk found to be one run of
    contiguous data clusters (``Tally.runs``): with COPIED set, such a table is right when
    its clusters' refcounts all are 1, one byte comparison per refcount block. Returns the repair's writes, (offset, bytes), each already
    passed by the overlap rule; ``_write_copied`` writes them."""
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
    guard = _Guard(image, refs) if repair else None
    writes: list[tuple[int, bytes]] = []
    refcount = refs.lookup()
    scan = None
    file_clusters = -(-size // cs)
    numpy_ok = scanmode.whole_tables(file_clusters) and not image.has_data_file
    for i, l1e in enumerate(l1):
        l2_off = l1e & L1E_OFFSET_MASK
        if not l2_off or l2_off % cs:
            continue
        try:
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


def _write_copied(image: Qcow2Image, writes: list[tuple[int, bytes]]) -> None:
    for offset, raw in writes:
        image.file.write(offset, raw)
    if writes:
        image.file.sync()
        image.l2_cache.clear()


def _mark_clean(image: Qcow2Image) -> None:
    h = image.header
    if h.version < 3:
        return
    flags = h.incompatible_features & ~(hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT)
    if flags != h.incompatible_features:
        image.file.write(hdr.OFF_INCOMPAT, flags.to_bytes(8, "big"))
        image.file.sync()
        h.incompatible_features = flags


def _rebuild(image: Qcow2Image, tally: Tally) -> None:
    """New refcount table and blocks from ``tally`` in free clusters, durable before the
    header points at them. Every cluster is placed, and checked against QEMU's overlap rule
    (the image's metadata as it stands, the old refcount structures included), before
    anything is written: a refused rebuild (``_Refused``) leaves the file as it was."""
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
    guard = _Guard(image, OnDiskRefcounts(image))
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
