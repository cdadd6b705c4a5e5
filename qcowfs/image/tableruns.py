"""Whole L2 tables recognised in one step, without numpy: a table (or the part of one a range
covers) that is a single run of contiguous plain data clusters, or that is all zeros.

Metadata-preallocated images, and most of what QEMU writes front to back, are made of such
tables. A table part is read as one big integer (``int.from_bytes`` over its decoded words);
a run of ``count`` entries ``e0, e0 + cs, e0 + 2 cs, ...`` is exactly the integer
``e0 * R1 + cs * R2``, where R1 has a 1 in every word and R2 the word's index (no word can carry
into the next: every entry stays below 2^64). ``e0 * R1`` is ``e0`` repeated, ``cs * R2`` is
made once per table length. So one multiplication and one comparison decide a
whole table, about 30 us for 8192 entries, where numpy would first cost 0.1 s to import.

Anything else (another shape, a reserved bit, an entry the per-entry code would refuse) is
left to the caller's exact code: this module only ever answers for tables it can prove regular.
"""

from __future__ import annotations

import sys
from array import array

from qcowfs.format.tables import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    ZERO_FLAG,
    ClusterKind,
)
from qcowfs.image.mapping import Extent, Mapping
from qcowfs.image.qcow2 import Qcow2Image

_BYTEORDER = sys.byteorder  # the decoded tables are native words
_NOT_PLAIN_DATA = COMPRESSED | L2E_STD_RESERVED_MASK | ZERO_FLAG
_OFFSET_LIMIT = 1 << 56  # one past the largest host offset an entry can hold
_ramps: dict[tuple[int, int], int] = {}


def _ramp(count: int, step: int) -> int:
    """``step * R2`` for ``count`` words (word i holds ``i * step``); R1 (a 1 in every word)
    for step 0."""
    r = _ramps.get((count, step))
    if r is None:
        words = array("Q", range(0, count * step, step)) if step else array("Q", [1]) * count
        r = _ramps[count, step] = int.from_bytes(words, _BYTEORDER)
    return r


def used_entries(table: array) -> int:
    """How many words of ``table`` there are up to the last non-zero one."""
    return -(-len(bytes(table).rstrip(b"\0")) // table.itemsize)


_ones: dict[int, tuple[bytes, int, bytes]] = {}


def add_one(counts: array, first: int, count: int) -> None:
    """``counts[first:first + count] += 1`` (an ``array('Q')`` of counts far below 2^64):
    the slice as one big integer plus a 1 in every word; a slice of zeros is just
    overwritten with ones."""
    ones = _ones.get(count)
    if ones is None:
        raw = array("Q", [1]) * count
        ones = _ones[count] = (raw.tobytes(), int.from_bytes(raw, _BYTEORDER),
                               bytes(8 * count))
    view = memoryview(counts).cast("B")[first * 8:(first + count) * 8]
    now = bytes(view)
    if now == ones[2]:
        view[:] = ones[0]
    else:
        view[:] = (int.from_bytes(now, _BYTEORDER) + ones[1]).to_bytes(len(now), _BYTEORDER)


def contiguous_run(table: array, first: int, count: int, cluster_size: int) -> int | None:
    """The first entry of ``table[first:first + count]`` when the part is one run of plain
    data entries with the same flags on contiguous host clusters; 0 when the part is all
    zeros; None otherwise."""
    x = int.from_bytes(memoryview(table)[first:first + count], _BYTEORDER)
    if not x:
        return 0
    e0 = table[first]
    host = e0 & L2E_OFFSET_MASK
    if not host or e0 & _NOT_PLAIN_DATA or host & (cluster_size - 1) \
            or host + count * cluster_size > _OFFSET_LIMIT:
        return None
    return e0 if x - _ramp(count, cluster_size) == e0 * _ramp(count, 0) else None


def uniform_extent(image: Qcow2Image, table: array, l2_off: int, first: int, count: int,
                   guest: int) -> Extent | None:
    """The one extent ``count`` whole clusters of a standard L2 table from entry ``first``
    (guest offset ``guest``) make, as ``Mapping.extents`` would merge them; None when they
    are not one run (or the table is extended)."""
    if image.extended_l2:
        return None
    cb = image.cluster_bits
    e0 = contiguous_run(table, first, count, 1 << cb)
    if e0 is None:
        return None
    if not e0:
        return Extent(guest, count << cb, ClusterKind.UNALLOCATED)
    host = e0 & L2E_OFFSET_MASK
    if not image.has_data_file and host <= l2_off < host + (count << cb):
        return None  # points at its own table: the per-entry code words the error
    return Extent(guest, count << cb, ClusterKind.NORMAL, host)


def _joins(last: Extent | None, e: Extent) -> bool:
    """Whether ``e`` continues ``last`` (the rule of ``Mapping.extents``)."""
    if last is None or last.kind != e.kind or e.kind is ClusterKind.COMPRESSED:
        return False
    if e.kind is ClusterKind.NORMAL:
        return last.host + last.length == e.host
    if not e.host and not last.host:
        return True
    return bool(e.host and last.host) and last.host + last.length == e.host


def mapping_extents(mapping: Mapping, offset: int, length: int, whole: bool) -> list[Extent]:
    """``mapping.extents(offset, length)``, one whole L2 table per step where the table is
    one run (``uniform_extent``), else with numpy when ``whole`` (a large image:
    ``tablescan.l2_extents``), else entry by entry. A table part none of these takes whole (a
    partial first cluster, anything invalid) goes to ``mapping.extents``, which also raises
    the errors."""
    img = mapping.image
    cb = img.cluster_bits
    cs = 1 << cb
    l2_bits = img.l2_bits
    l1 = mapping.l1
    out: list[Extent] = []
    pos, end = offset, offset + length
    scan = None
    while pos < end:
        cidx = pos >> cb
        l1i = cidx >> l2_bits
        span_end = min(end, (l1i + 1) << (l2_bits + cb))
        l1e = l1[l1i] if l1i < len(l1) else 0
        l2_off = l1e & L1E_OFFSET_MASK
        pieces = None
        if l1e & L1E_RESERVED_MASK:
            pass  # mapping.extents words the error
        elif not l2_off:
            pieces = [Extent(pos, span_end - pos, ClusterKind.UNALLOCATED)]
        elif not pos & (cs - 1):
            count = -(-(span_end - pos) // cs)
            table = img.l2_table(l2_off)
            first = cidx & ((1 << l2_bits) - 1)
            one = uniform_extent(img, table, l2_off, first, count, pos)
            if one is not None:
                pieces = [one]
            elif whole:
                if scan is None:
                    from qcowfs.image import tablescan as scan
                pieces = scan.l2_extents(img, table, l2_off, first, count, pos)
            if pieces:
                last = pieces[-1]
                last.length = span_end - last.offset
        if pieces is None:
            pieces = mapping.extents(pos, span_end - pos)
        for e in pieces:
            if out and _joins(out[-1], e):
                out[-1].length += e.length
            else:
                out.append(e)
        pos = span_end
    return out
