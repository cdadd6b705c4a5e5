"""How big a new image would be (``qemu-img measure``): the same three numbers QEMU 7.2
computes, from the same inputs.

``fully-allocated`` is the size of a qcow2 file with every cluster and every table present:
header, L2 tables, the L1 table rounded to clusters, the refcount structures that count all of
that (and themselves), and the data. ``required`` drops the data clusters the source does not
need: a cluster counts when any byte of it is data in the source (zeros and holes do not); with
a backing file or full/falloc preallocation every cluster counts. ``bitmaps`` is the room the
source's persistent bitmaps would take, each assumed fully allocated.
"""

from __future__ import annotations

from qcowfs.format.bitmaps import BitmapEntry
from qcowfs.format.record import record
from qcowfs.format.tables import MAX_L1_BYTES

from .blockstatus import ChainStatus

L1E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8
BITMAP_TABLE_ENTRY_SIZE = 8
BITMAP_DIR_ENTRY_SIZE = 24


@record
class Measure:
    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def as_json(self) -> dict:
        out: dict = {}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        out["required"] = self.required
        out["fully-allocated"] = self.fully_allocated
        return out


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def _round_up(value: int, align: int) -> int:
    return _ceil_div(value, align) * align


def l1_too_large(size: int, cluster_size: int, extended_l2: bool) -> bool:
    """Whether ``size`` needs more L2 tables than QEMU's 32 MiB L1 table can point at."""
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    return _ceil_div(_ceil_div(size, cluster_size), l2_entries) * L1E_SIZE > MAX_L1_BYTES


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks that count ``clusters`` clusters plus themselves:
    the fixed point where adding them needs no further block or table cluster."""
    per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    last, n = -1, 0
    while n != last:
        last = n
        blocks = _ceil_div(clusters + table + blocks, per_block)
        table = _ceil_div(blocks, per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def fully_allocated_size(virtual_size: int, cluster_size: int, refcount_order: int,
                         extended_l2: bool) -> int:
    """A qcow2 file of ``virtual_size`` with every table and data cluster allocated."""
    data = _round_up(virtual_size, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    meta = cluster_size  # header
    l2_entries = _round_up(data // cluster_size, cluster_size // l2e_size)
    meta += l2_entries * l2e_size
    l1_entries = _round_up(l2_entries * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta += l1_entries * L1E_SIZE
    meta += refcount_metadata_size((meta + data) // cluster_size, cluster_size, refcount_order)
    return meta + data


def data_clusters_bytes(status: ChainStatus, cluster_size: int) -> int:
    """Bytes of the output clusters that hold any data of the source (whole clusters, the
    last one too, even past the source's end)."""
    total = 0
    counted_end = 0
    for e in status.entries():
        if e.zero or not e.data:
            continue
        first = max(e.start // cluster_size * cluster_size, counted_end)
        end = _round_up(e.start + e.length, cluster_size)
        if end > first:
            total += end - first
            counted_end = end
    return total


def bitmaps_size(bitmaps: list[BitmapEntry], virtual_size: int, cluster_size: int) -> int:
    """Room for ``bitmaps`` in a new image: every bitmap's data clusters, its table rounded to
    clusters, and the directory rounded to clusters."""
    total = 0
    directory = 0
    for bm in bitmaps:
        granules = _ceil_div(virtual_size, 1 << bm.granularity_bits)
        clusters = _ceil_div(_ceil_div(granules, 8), cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * BITMAP_TABLE_ENTRY_SIZE, cluster_size)
        directory += _round_up(BITMAP_DIR_ENTRY_SIZE + len(bm.name.encode()), 8)
    return total + _round_up(directory, cluster_size)


def measure_qcow2(*, size: int, cluster_size: int, refcount_order: int, extended_l2: bool,
                  all_clusters: bool, status: ChainStatus | None = None,
                  bitmaps: int | None = None) -> Measure:
    """``size`` is the virtual size (the source's when ``status`` is given);
    ``all_clusters`` says every data cluster counts (backing file, full preallocation);
    ``bitmaps`` is :func:`bitmaps_size`, or None when the output cannot hold bitmaps."""
    data = _round_up(size, cluster_size)
    full = fully_allocated_size(data, cluster_size, refcount_order, extended_l2)
    if all_clusters:
        needed = data
    elif status is not None:
        needed = data_clusters_bytes(status, cluster_size)
    else:
        needed = 0
    return Measure(full - data + needed, full, bitmaps)


def measure_raw(size: int) -> Measure:
    """A raw file is its virtual size, allocated or not."""
    return Measure(size, size)
