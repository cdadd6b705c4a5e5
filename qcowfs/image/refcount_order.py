"""Changing an open image's refcount width (``amend -o refcount_bits=``), in QEMU's order.

1. Refuse, before anything changes, a refcount the new width cannot hold (QEMU's message).
2. Allocate the new refcount blocks and the new refcount table with the old allocator, until
   the set is stable (new clusters may need new blocks); the old refcounts count them, and
   they are made durable first, so a crash from here on leaks at worst.
3. Write the new blocks (every cluster's refcount, the new structures' own included) and the
   new table; fsync.
4. Switch the header -- refcount_order, the table's offset and size -- with one write inside
   cluster 0; fsync.
5. Free the old table and blocks in the new refcounts (a crash before that leaks them).
"""

from __future__ import annotations

from array import array

from qcowfs.errors import ImageError
from qcowfs.format.tables import encode_refblock, encode_u64_table, refcount_max
from qcowfs.image.header_update import write_header

from .write import Qcow2Writer


def _old_blocks(w: Qcow2Writer) -> list[tuple[int, list[int]]]:
    """(first cluster, refcounts) of every old refcount block."""
    refs = w.refs
    out = []
    for index in range(len(refs.table)):
        off = refs.block_offset(index)
        if off:
            out.append((index << refs.block_bits, refs.cache.get(off)))
    return out


def _used_new_blocks(w: Qcow2Writer, new_bb: int) -> set[int]:
    """The new block indices whose range holds a cluster in use."""
    used: set[int] = set()
    per_new = 1 << new_bb
    for first, values in _old_blocks(w):
        n = len(values)
        if per_new >= n:
            if any(values):
                used.add(first >> new_bb)
            continue
        for lo in range(0, n, per_new):
            if any(values[lo:lo + per_new]):
                used.add((first + lo) >> new_bb)
    return used


def _values(w: Qcow2Writer, first: int, n: int) -> list[int]:
    """The refcounts of clusters ``[first, first + n)``, from the old blocks."""
    refs = w.refs
    bb = refs.block_bits
    out: list[int] = []
    c, end = first, first + n
    while c < end:
        index = c >> bb
        lo = c & refs.block_mask
        hi = min(1 << bb, lo + end - c)
        off = refs.block_offset(index)
        out.extend(refs.cache.get(off)[lo:hi] if off else [0] * (hi - lo))
        c += hi - lo
    return out


def refusal(w: Qcow2Writer, order: int) -> str | None:
    """QEMU's message when some refcount does not fit ``order`` (None when all do)."""
    top = refcount_max(order)
    if top >= w.refs.max:
        return None
    for first, values in _old_blocks(w):
        if max(values, default=0) > top:
            i = next(i for i, v in enumerate(values) if v > top)
            return (f"Cannot decrease refcount entry width to {1 << order} bits: Cluster at "
                    f"offset {(first + i) << w.cb:#x} has a refcount of {values[i]}")
    return None


def change_refcount_order(w: Qcow2Writer, order: int) -> None:
    """Rewrite the refcount structures with ``1 << order``-bit entries (see the module
    docstring). Raises ImageError with QEMU's message when a refcount does not fit."""
    h = w.header
    if order == h.refcount_order:
        return
    why = refusal(w, order)
    if why:
        raise ImageError(None, why)
    w.full_flush()
    refs, cb, cs = w.refs, w.cb, w.cs
    new_bb = cb + 3 - order
    blocks: dict[int, int] = {}  # new block index -> its cluster
    table_at, table_clusters = 0, 0
    while True:
        missing = sorted(_used_new_blocks(w, new_bb) - blocks.keys())
        for index in missing:
            blocks[index] = refs.allocate(1)
        want = -(-(max(blocks) + 1) * 8 // cs)
        if want > table_clusters:
            if table_clusters:
                refs.add_range(table_at, table_clusters, -1)
            table_clusters = want
            table_at = refs.allocate(table_clusters)
            continue
        if not missing:
            break
    # the old structures count the new clusters, durably, before anything is written there
    w.note_metadata_write()
    w.full_flush()
    w._stage_refcounts(force=True)
    old_table = (refs.table_offset >> cb, refs.table_clusters)
    old_blocks = [off >> cb for off in (refs.block_offset(i) for i in range(len(refs.table)))
                  if off]
    per_new = 1 << new_bb
    for index, cluster in sorted(blocks.items()):
        first = index << new_bb
        values = _values(w, first, per_new)
        w.file.write(cluster << cb, encode_refblock(values, order))
    table = array("Q", bytes(table_clusters * cs))
    for index, cluster in blocks.items():
        table[index] = cluster << cb
    w.file.write(table_at << cb, encode_u64_table(table))
    w.file.sync()
    write_header(w.img, h.replace(refcount_order=order, refcount_table_offset=table_at << cb,
                                  refcount_table_clusters=table_clusters))
    w.reload_refcounts()
    new = w.refs
    new.add_range(old_table[0], old_table[1], -1)
    for c in old_blocks:
        new.add(c, -1)
    w.rebuild_metadata_set()
    w.full_flush()
    w._stage_refcounts(force=True)
