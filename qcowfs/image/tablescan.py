"""Whole-table passes for large images: one L2 table or refcount block per numpy step.

check and map walk every L2 entry and every refcount of an image. One entry at a time in
Python that is about a microsecond each, seconds for a 64 GiB preallocated image. Here a whole
table is decoded, classified, counted and compared as arrays. Importing numpy costs about
0.1 s, more than a small image's whole pass, so callers import this module only when
:func:`worth_it` says the image is large (see docs/design.md, "Whole-table passes").

Every function answers only for tables that are entirely regular; for a table with anything
odd (a reserved bit, an unaligned or out-of-file offset, a flag QEMU would report) it returns
None, and the caller runs its exact per-entry code on that one table, which words the error
or repairs it. So the fast path never has to agree with QEMU on messages, only on the sums.
"""

from __future__ import annotations

from array import array

import numpy as np

from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    REFT_OFFSET_MASK,
    SUB_ALLOC_MASK,
    ZERO_FLAG,
    ClusterKind,
)
from qcowfs.image.mapping import Extent
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.refcount_read import OnDiskRefcounts

U64 = np.uint64
_COMPRESSED = U64(COMPRESSED)
_COPIED = U64(COPIED)
_OFFSET = U64(L2E_OFFSET_MASK)
_ZERO = U64(ZERO_FLAG)
_SUB_ALLOC = U64(SUB_ALLOC_MASK)
_KIND_NORMAL, _KIND_ZERO = int(ClusterKind.NORMAL), int(ClusterKind.ZERO)
_KIND_COMPRESSED = int(ClusterKind.COMPRESSED)


def as_u64(table: array) -> np.ndarray:
    """A decoded table (``array('Q')``) as a numpy array over the same memory."""
    return np.frombuffer(table, dtype=U64)


def descriptors(image: Qcow2Image, table: array) -> tuple[np.ndarray, np.ndarray | None]:
    """(descriptors, subcluster bitmaps or None) of one L2 table."""
    t = as_u64(table)
    if image.extended_l2:
        return t[0::2], t[1::2]
    return t, None


# --- check: references --------------------------------------------------------------------


class L2Refs:
    """What one regular L2 table adds to the walk."""

    __slots__ = ("clusters", "allocated", "compressed", "fragmented")

    def __init__(self, clusters: np.ndarray, allocated: int, compressed: int, fragmented: int):
        self.clusters = clusters  # host cluster indices, one per reference
        self.allocated = allocated
        self.compressed = compressed
        self.fragmented = fragmented


def l2_references(image: Qcow2Image, table: array, file_size: int) -> L2Refs | None:
    """The references and fragmentation figures of one L2 table of an image without an
    external data file, or None when the table holds anything the walk reports."""
    cb = image.cluster_bits
    cs = 1 << cb
    d, bitmap = descriptors(image, table)
    comp = (d & _COMPRESSED) != 0
    std = ~comp
    reserved = U64(L2E_STD_RESERVED_MASK | (ZERO_FLAG if bitmap is not None else 0))
    host = d & _OFFSET
    bad = comp & ((d & _COPIED) != 0)
    bad |= std & ((d & reserved) != 0)
    bad |= std & ((host & U64(cs - 1)) != 0)
    bad |= std & (host >= U64(file_size))
    if image.header.version < 3:
        bad |= std & ((d & _ZERO) != 0)
    if bitmap is not None:
        alloc_bits = bitmap & _SUB_ALLOC
        bad |= comp & (bitmap != 0)
        bad |= std & ((alloc_bits & (bitmap >> U64(32))) != 0)
        bad |= std & (alloc_bits != 0) & (host == 0)
    if bad.any():
        return None
    data = host[std & (host != 0)]
    parts = [data >> U64(cb)]
    n_comp = int(np.count_nonzero(comp))
    if n_comp:
        layout = image.compressed
        entries = d[comp]
        offset = entries & U64(layout.offset_mask)
        sectors = ((entries >> U64(layout.sectors_shift)) & U64(layout.sectors_mask)) + U64(1)
        start = offset & ~U64(511)
        end = start + sectors * U64(512)
        if bool((end - U64(1) >= U64(file_size)).any()):
            return None  # past the end of the file (the walk words it, or counts the tail)
        first, last = start >> U64(cb), (end - U64(1)) >> U64(cb)
        for k in range(int((last - first).max()) + 1):
            parts.append(first[first + U64(k) <= last] + U64(k))
    fragmented = int(np.count_nonzero(data[1:] != data[:-1] + U64(cs))) + n_comp
    return L2Refs(np.concatenate(parts), len(data) + n_comp, n_comp, fragmented)


def add_references(counts: np.ndarray, clusters: np.ndarray) -> None:
    """counts[i] += how often i appears in ``clusters`` (every index < len(counts)). One
    table's indices are most often strictly increasing: then a plain indexed add is exact."""
    idx = clusters.view(np.int64)
    if len(idx) < 2 or bool((idx[1:] > idx[:-1]).all()):
        counts[idx] += U64(1)
    else:
        np.add.at(counts, idx, U64(1))


# --- check: refcounts on disk -------------------------------------------------------------


def refblock_values(raw: bytes, order: int) -> np.ndarray:
    """One refcount block, decoded whole."""
    if order >= 3:
        return np.frombuffer(raw, dtype=np.dtype(f">u{1 << (order - 3)}")).astype(U64)
    bits = 1 << order
    b = np.frombuffer(raw, dtype=np.uint8)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((b[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1).astype(U64)


def _blocks(refs: OnDiskRefcounts, n: int, indices=None):
    """(first cluster, values or None, unreadable) per refcount block over clusters [0, n)
    (only the blocks ``indices`` when given): the on-disk values (with ``refs``' patches);
    None where no block is there; unreadable where the table entry is not cluster-aligned.
    One block in memory at a time."""
    per = refs.per_block
    f = refs.image.file
    for index in (range(-(-n // per)) if indices is None else indices):
        lo, hi = index * per, min(n, (index + 1) * per)
        entry = refs.table[index] if index < len(refs.table) else 0
        if entry & REFT_OFFSET_MASK & (refs.cs - 1):
            yield lo, None, True
            continue
        patched = refs.blocks.get(index)
        if patched is not None:
            yield lo, np.asarray(patched[:hi - lo], dtype=U64), False
            continue
        off = refs.block_offset(index)
        values = refblock_values(f.read(off, refs.cs), refs.order)[:hi - lo] if off else None
        yield lo, values, False


def refcount_is_one(refs: OnDiskRefcounts, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(refcount is 1, unreadable) for clusters [0, n): two bytes a cluster, what the COPIED
    pass needs."""
    is_one = np.zeros(n, dtype=bool)
    unreadable = np.zeros(n, dtype=bool)
    for lo, values, bad in _blocks(refs, n):
        if bad:
            unreadable[lo:lo + refs.per_block] = True
        elif values is not None:
            is_one[lo:lo + len(values)] = values == 1
    return is_one, unreadable


def compare_candidates(refs: OnDiskRefcounts, counts: array, beyond: dict[int, int], nb: int,
                       blocks: list[int] | None = None) -> tuple[list[int], int]:
    """The clusters of [0, nb) (of the refcount blocks ``blocks`` when given, in order) whose
    refcount is not what the walk expects (or cannot be read), in order, and the highest
    cluster either side says is in use there. One refcount block at a time, so memory stays
    at a block's worth besides the tally."""
    per = refs.per_block
    want_all = as_u64(counts)
    candidates: list[int] = []
    highest = 0
    for lo, values, bad in _blocks(refs, nb, blocks):
        hi = min(nb, lo + per)
        if bad:
            candidates.extend(range(lo, hi))
            continue
        want = np.zeros(hi - lo, dtype=U64)
        m = max(0, min(hi, len(want_all)) - lo)
        want[:m] = want_all[lo:lo + m]
        for i, c in beyond.items():
            if lo <= i < hi:
                want[i - lo] = c
        on = values if values is not None else np.zeros(hi - lo, dtype=U64)
        used = np.flatnonzero((on != 0) | (want != 0))
        if len(used):
            highest = lo + int(used[-1])
        candidates.extend((np.flatnonzero(on != want) + lo).tolist())
    return candidates, highest


def copied_is_right(image: Qcow2Image, table: array, is_one: np.ndarray,
                    unreadable: np.ndarray) -> bool:
    """Whether every data entry of one L2 table has COPIED exactly when its cluster's refcount
    is 1 (``is_one``, over the file's clusters). False sends the table to the per-entry pass
    (which also repairs)."""
    cb = image.cluster_bits
    d, _ = descriptors(image, table)
    host = d & _OFFSET
    data = ((d & _COMPRESSED) == 0) & (host != 0)
    idx = (host[data] >> U64(cb)).astype(np.intp)
    if len(idx) and int(idx.max()) >= len(is_one):
        return False
    keep = ~unreadable[idx]
    copied = (d[data] & _COPIED) != 0
    return bool(np.array_equal(is_one[idx][keep], copied[keep]))


def nonzero_refcounts(refs: OnDiskRefcounts, n: int, enough: int) -> int:
    """How many of clusters [0, n) have a refcount, counting one refcount block at a time
    and stopping once ``enough`` are found (unreadable blocks count nothing)."""
    found = 0
    for _, values, _bad in _blocks(refs, n):
        if values is not None:
            found += int(np.count_nonzero(values))
            if found >= enough:
                break
    return found


# --- map: extents -------------------------------------------------------------------------


def l2_extents(image: Qcow2Image, table: array, l2_off: int, first: int, count: int,
               guest: int) -> list[Extent] | None:
    """The extents of ``count`` whole clusters of a standard L2 table from entry ``first``
    (guest offset ``guest``), merged as ``Mapping.extents`` merges them; None when the table
    part holds anything ``Mapping.extents`` would refuse or when it is an extended table."""
    if image.extended_l2:
        return None
    cb = image.cluster_bits
    cs = 1 << cb
    data_file = image.has_data_file
    d = as_u64(table)[first:first + count]
    comp = (d & _COMPRESSED) != 0
    std = ~comp
    host = d & _OFFSET
    zero = std & ((d & _ZERO) != 0)
    bad = comp & (((d & _COPIED) != 0) | data_file)
    bad |= std & ((d & U64(L2E_STD_RESERVED_MASK)) != 0)
    bad |= std & ((host & U64(cs - 1)) != 0)
    if image.header.version < 3:
        bad |= zero
    normal = std & ~zero & ((host != 0) | (data_file & ((d & _COPIED) != 0)))
    if not data_file:
        bad |= normal & (host == U64(l2_off))
    if bad.any():
        return None
    kind = np.zeros(count, dtype=np.int8)
    kind[zero] = _KIND_ZERO
    kind[normal] = _KIND_NORMAL
    kind[comp] = _KIND_COMPRESSED
    host = np.where(comp, U64(0), host)
    # a run goes on while the kind does, and the host position where there is one
    cont = np.zeros(count, dtype=bool)
    same = kind[1:] == kind[:-1]
    contiguous = host[1:] == host[:-1] + U64(cs)
    hostless = (host[1:] == 0) & (host[:-1] == 0)
    k = kind[1:]
    cont[1:] = same & (k != _KIND_COMPRESSED) & np.where(
        k == _KIND_NORMAL, contiguous, hostless | (contiguous & (host[:-1] != 0)))
    starts = np.flatnonzero(~cont)
    ends = np.append(starts[1:], count)
    out = []
    entries = d.tolist() if len(starts) > count // 4 else None
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        kd = ClusterKind(int(kind[s]))
        entry = (entries[s] if entries is not None else int(d[s])) if kd is ClusterKind.COMPRESSED \
            else 0
        out.append(Extent(guest + (s << cb), (e - s) << cb, kd, int(host[s]), entry))
    return out
