"""Walk every piece of qcow2 metadata and tally how many references each host cluster has.

This is the ground truth for ``check`` (compare with the refcounts on disk), for repairing a
dirty image, and for rebuilding refcount structures. The walk never trusts what it reads: every
defect becomes a :class:`Defect` and the walk goes on; only host I/O errors raise.
"""

from __future__ import annotations

from array import array

from qcowfs.errors import ImageError
from qcowfs.format.bitmaps import (
    BME_TABLE_OFFSET_MASK,
    BME_TABLE_RESERVED_MASK,
    parse_bitmap_directory,
)
from qcowfs.format.record import field, record
from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAX_L1_BYTES,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    SUB_ALLOC_MASK,
    ZERO_FLAG,
    decode_u64_table,
)
from qcowfs.image import scanmode, tableruns
from qcowfs.image.qcow2 import Qcow2Image

CORRUPTION = "corruption"


@record
class Defect:
    kind: str  # "corruption" (more kinds may follow)
    message: str
    offset: int = 0  # host offset it concerns, when there is one
    #: how check prints it (qemu-img's own wording, where it has one)
    prefix: str = "ERROR "

    @property
    def line(self) -> str:
        return self.prefix + self.message


@record
class ActiveStats:
    """Fragmentation figures of the active L1, as ``qemu-img check`` reports them."""

    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@record
class Tally:
    """Expected refcount per host cluster index of the image file."""

    cluster_size: int
    counts: array  # array('Q'), one entry per cluster of the file (and beyond, if referenced)
    defects: list[Defect] = field(default_factory=list)
    stats: ActiveStats = field(default_factory=ActiveStats)
    #: clusters referenced past the end of the file (index -> count); only a reference that
    #: ends less than one cluster past the end counts (QEMU's rule), so this stays tiny
    beyond_eof: dict[int, int] = field(default_factory=dict)
    #: active L2 tables the walk took whole (``tableruns``): table offset -> (first entry,
    #: entries in use); the table is that run of plain data entries, then zeros. The COPIED
    #: pass checks these without reading or decoding them again.
    runs: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: with ``fix_errors``: preallocated zero clusters at an unaligned offset, which the repair
    #: turns into plain zero clusters (QEMU's fix during its walk), in walk order: (file offset
    #: of the entry, new entry, whether the table is active, the unaligned host offset). The
    #: walk neither counts them nor their references.
    zero_alloc_fixes: list[tuple[int, int, bool, int]] = field(default_factory=list)

    def expected(self, index: int) -> int:
        if index < len(self.counts):
            return self.counts[index]
        return self.beyond_eof.get(index, 0)

    @property
    def end_offset(self) -> int:
        """One past the last cluster anything references."""
        last = max(self.beyond_eof, default=-1)
        if last < 0:
            last = tableruns.used_entries(self.counts) - 1
        return (last + 1) * self.cluster_size


class _Walker:
    def __init__(self, image: Qcow2Image, fix_errors: bool = False):
        self.image = image
        self.fix_errors = fix_errors
        self.h = image.header
        self.cs = image.cluster_size
        self.file = image.file
        self.file_size = self.file.refresh_size()
        self.file_clusters = -(-self.file_size // self.cs)
        # array("Q", [0]) * n writes only the array's own pages (from bytes(8 n) it copies)
        self.tally = Tally(self.cs, array("Q", [0]) * self.file_clusters)
        self._next_host = 0
        #: whole tables that are one run of contiguous data clusters, without numpy
        self.runs = scanmode.TABLE_RUNS and not image.has_data_file and not image.extended_l2
        #: qcowfs.image.tablescan (numpy) for the other tables of a large image without a
        #: data file, loaded at the first such table
        self.numpy_ok = scanmode.whole_tables(self.file_clusters) and not image.has_data_file
        self.scan = None
        self._counts = None  # the tally's counts as a numpy array, while walking

    def defect(self, message: str, offset: int = 0) -> None:
        self.tally.defects.append(Defect(CORRUPTION, message, offset))

    def ref(self, offset: int, length: int, what: str) -> None:
        """+1 for every cluster overlapping [offset, offset + length).

        A region that ends one cluster or more past the end of the file is one error and is
        not counted (QEMU's rule): the work stays bounded by the file, whatever the entry
        claims."""
        if length <= 0:
            return
        cs = self.cs
        if offset + length - self.file_size >= cs:
            self.tally.defects.append(Defect(
                CORRUPTION, f"counting reference for region exceeding the end of the file by "
                            f"one cluster or more: offset {offset:#x} size {length:#x}",
                offset, prefix="ERROR: "))
            return
        first = offset // cs
        last = (offset + length - 1) // cs
        counts = self.tally.counts
        for i in range(first, last + 1):
            if i < len(counts):
                counts[i] += 1
            else:
                beyond = self.tally.beyond_eof
                beyond[i] = beyond.get(i, 0) + 1

    def read_table(self, offset: int, nbytes: int, what: str) -> array | None:
        """A table as QEMU's check reads it: the part past the end of the file as zero entries,
        so only the part inside the file is read (the work stays bounded by the file). Ending
        a cluster or more past the end is also an error."""
        size = self.file.size
        if offset + nbytes > size:
            if offset >= size or offset + nbytes - size >= self.cs:
                self.defect(f"{what} at offset {offset} lies past the end of the file", offset)
            if offset >= size:
                return None
            nbytes = (size - offset) // 8 * 8
        return decode_u64_table(self.file.read(offset, nbytes))

    def read_l2(self, offset: int) -> array:
        """An L2 table; the part past the end of the file reads as zeros, as QEMU reads it."""
        size = self.file.size
        raw = self.file.read(offset, max(0, min(self.cs, size - offset)))
        return decode_u64_table(raw + bytes(self.cs - len(raw)))

    # --- pieces -----------------------------------------------------------------------------

    def walk(self) -> Tally:
        h = self.h
        self.ref(0, self.cs, "header")
        self.walk_l1(h.l1_table_offset, h.l1_size, "active L1 table", active=True)
        for snap in self.image.snapshots:
            self.walk_snapshot_l1(snap.l1_table_offset, snap.l1_size, snap.id)
        if h.nb_snapshots:
            self.ref(h.snapshots_offset, self.image.snapshot_table_bytes, "snapshot table")
        self.ref(h.refcount_table_offset, h.refcount_table_clusters * self.cs, "refcount table")
        if h.crypto:
            self.ref(h.crypto.offset, h.crypto.length, "encryption header")
        if h.bitmaps:
            self.walk_bitmaps()
        self.walk_refblocks()
        self._counts = None  # let the array grow again
        return self.tally

    def walk_snapshot_l1(self, offset: int, size: int, sid: str) -> None:
        if offset % self.cs:
            self.defect(f"snapshot {sid}: L1 table at unaligned offset {offset}", offset)
            return
        if size * 8 > MAX_L1_BYTES:
            self.defect(f"snapshot {sid}: L1 table too large", offset)
            return
        self.walk_l1(offset, size, f"L1 table of snapshot {sid}", active=False)

    def walk_l1(self, offset: int, size: int, what: str, active: bool) -> None:
        if not size:
            return
        self.ref(offset, size * 8, what)
        l1 = self.read_table(offset, size * 8, what)
        if l1 is None:
            return
        stats = self.tally.stats
        if active:
            stats.total_clusters = -(-self.h.size // self.cs)
        for i, entry in enumerate(l1):
            if not entry:
                continue
            # QEMU's check takes any non-zero entry as an L2 table, one with only flags set as a
            # table at offset 0 (reads see none there): its counts are the ones -r all must keep
            l2_off = entry & L1E_OFFSET_MASK
            if entry & L1E_RESERVED_MASK:
                self.defect(f"{what}: entry {i} has reserved bits set (0x{entry:016x})", offset)
            if l2_off % self.cs:
                # QEMU counts the (two) clusters the misplaced table covers and still reads it
                self.defect(f"{what}: L2 table at unaligned offset {l2_off}", l2_off)
            self.ref(l2_off, self.cs, "L2 table")
            if l2_off < self.file_size:
                self.walk_l2(self.read_l2(l2_off), l2_off, active)

    def walk_l2(self, table: array, l2_off: int, active: bool) -> None:
        if self.runs and self._walk_l2_run(table, l2_off, active):
            return
        if self.numpy_ok and self.scan is None:
            from qcowfs.image import tablescan
            self.scan = tablescan
            self._counts = tablescan.as_u64(self.tally.counts)
        if self.scan is not None:
            found = self.scan.l2_references(self.image, table, self.file_size)
            if found is not None:
                self.scan.add_references(self._counts, found.clusters)
                if active:
                    stats = self.tally.stats
                    stats.allocated_clusters += found.allocated
                    stats.compressed_clusters += found.compressed
                    stats.fragmented_clusters += found.fragmented
                return
        self._walk_l2_entries(table, l2_off, active)

    def _walk_l2_run(self, table: array, l2_off: int, active: bool) -> bool:
        """A standard L2 table that is one run of plain data entries on contiguous host
        clusters inside the file, then zeros (or all zeros), counted whole: one slice of the
        tally gets +1. False for any other table (the caller's exact code takes it)."""
        n = tableruns.used_entries(table)
        if not n:
            return True
        cs = self.cs
        e0 = tableruns.contiguous_run(table, 0, n, cs)
        if not e0:
            return False
        host = e0 & L2E_OFFSET_MASK
        if host + n * cs > self.file_size:
            return False  # the per-entry code counts (and words) what lies past the end
        first = host // cs
        if self._counts is not None:
            self._counts[first:first + n] += 1
        else:
            tableruns.add_one(self.tally.counts, first, n)
        if active:
            stats = self.tally.stats
            stats.allocated_clusters += n  # contiguous: none fragmented within the table
            self.tally.runs[l2_off] = (e0, n)
        return True

    def _walk_l2_entries(self, table: array, l2_off: int, active: bool) -> None:
        """One entry at a time: every defect found and worded."""
        img = self.image
        cs = self.cs
        extended = img.extended_l2
        step = 2 if extended else 1
        data_file = img.has_data_file
        stats = self.tally.stats
        layout = img.compressed
        self._next_host = 0  # QEMU counts fragmentation within each L2 table
        for j in range(0, len(table), step):
            entry = table[j]
            if not entry and (not extended or not table[j + 1]):
                continue
            if entry & COMPRESSED:
                if entry & COPIED:
                    self.defect(f"compressed L2 entry in table at {l2_off} has the COPIED flag",
                                l2_off)
                if extended and table[j + 1]:
                    self.defect(f"compressed extended L2 entry in table at {l2_off} has a "
                                f"subcluster bitmap", l2_off)
                host, length = layout.decode(entry)
                start = host & ~511
                self.ref(start, (host - start) + length, "compressed cluster")
                if active:
                    # QEMU counts every compressed cluster as fragmented: neighbours share sectors.
                    stats.allocated_clusters += 1
                    stats.compressed_clusters += 1
                    stats.fragmented_clusters += 1
                continue
            reserved = L2E_STD_RESERVED_MASK | (ZERO_FLAG if extended else 0)
            if entry & reserved:
                # an error, and still an entry: QEMU counts the cluster it points at
                self.defect(f"L2 entry 0x{entry:016x} in table at {l2_off} has reserved bits "
                            f"set", l2_off)
            host = entry & L2E_OFFSET_MASK
            if extended:
                bitmap = table[j + 1]
                if (bitmap & SUB_ALLOC_MASK) & (bitmap >> 32):
                    self.defect(f"extended L2 entry in table at {l2_off} marks subclusters "
                                f"both allocated and zero", l2_off)
                if bitmap & SUB_ALLOC_MASK and not host and not (data_file and entry & COPIED):
                    self.defect(f"extended L2 entry in table at {l2_off} allocates subclusters"
                                f" of an unallocated cluster", l2_off)
            if entry & ZERO_FLAG and self.h.version < 3:
                self.defect(f"zero cluster entry in version 2 image (table at {l2_off})",
                            l2_off)
            if not host and not (data_file and entry & COPIED):
                continue
            if host % cs and self.fix_errors and not (
                    table[j + 1] & SUB_ALLOC_MASK if extended else not entry & ZERO_FLAG):
                # QEMU's repair makes it a plain zero cluster at once and counts nothing
                self.tally.zero_alloc_fixes.append(
                    (l2_off + 8 * j, 0 if extended else ZERO_FLAG, active, host))
                continue
            if active:
                stats.allocated_clusters += 1
                self._fragment(host)
            if host % cs:
                # QEMU counts it allocated and referencing the clusters it overlaps
                self.defect(f"L2 entry in table at {l2_off} points at unaligned offset {host}",
                            l2_off)
            if not data_file:
                if not host % cs and host + cs <= self.file_size:
                    self.tally.counts[host // cs] += 1  # the common case of ref()
                else:
                    self.ref(host, cs, "data cluster")

    def _fragment(self, host: int) -> None:
        if self._next_host and host != self._next_host:
            self.tally.stats.fragmented_clusters += 1
        self._next_host = host + self.cs

    def walk_bitmaps(self) -> None:
        ext = self.h.bitmaps
        assert ext is not None
        if ext.directory_offset % self.cs or ext.directory_size > 1024 * 65535:
            self.defect("bitmap directory has an invalid offset or size", ext.directory_offset)
            return
        self.ref(ext.directory_offset, ext.directory_size, "bitmap directory")
        over = ext.directory_offset + ext.directory_size - self.file.size
        if over > 0 and (ext.directory_offset >= self.file.size or over >= self.cs):
            self.defect("bitmap directory lies past the end of the file", ext.directory_offset)
            return
        raw = self.file.read(ext.directory_offset, ext.directory_size)
        try:
            # cut inside the file's last cluster: the rest reads as zeros, as in QEMU
            entries = parse_bitmap_directory(raw.ljust(ext.directory_size, b"\0"),
                                             ext.nb_bitmaps)
        except ImageError as exc:
            self.defect(f"bitmap directory: {exc.reason}", ext.directory_offset)
            return
        for bm in entries:
            if bm.table_offset % self.cs or bm.table_size * 8 > MAX_L1_BYTES:
                self.defect(f"bitmap {bm.name!r}: invalid table", bm.table_offset)
                continue
            self.ref(bm.table_offset, bm.table_size * 8, "bitmap table")
            table = self.read_table(bm.table_offset, bm.table_size * 8, "bitmap table")
            if table is None:
                continue
            for entry in table:
                if entry & BME_TABLE_RESERVED_MASK:
                    self.defect(f"bitmap {bm.name!r}: table entry has reserved bits set",
                                bm.table_offset)
                    continue
                off = entry & BME_TABLE_OFFSET_MASK
                if off:
                    self.ref(off, self.cs, "bitmap data")

    def walk_refblocks(self) -> None:
        h = self.h
        table = self.read_table(h.refcount_table_offset, h.refcount_table_clusters * self.cs,
                                "refcount table")
        if table is None:
            return
        for i in range(tableruns.used_entries(table)):  # none after the last non-zero entry
            entry = table[i]
            off = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED_MASK:
                self.defect(f"refcount table entry {i} has reserved bits set",
                            h.refcount_table_offset)
            if not off:
                continue
            if off % self.cs:
                self.defect(f"refblock {i} at unaligned offset {off}", off)
                continue
            self.ref(off, self.cs, "refcount block")


def tally_references(image: Qcow2Image, fix_errors: bool = False) -> Tally:
    """Walk all metadata of ``image`` (as it is on disk) and count references per cluster.
    ``fix_errors``: for ``check -r all``, which repairs some entries during the walk, as QEMU
    does (:attr:`Tally.zero_alloc_fixes`)."""
    return _Walker(image, fix_errors).walk()
