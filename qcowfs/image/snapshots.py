"""Internal snapshots: create, delete and apply (revert), in QEMU's order.

Each operation holds the dirty bit (v3) while it runs -- see ``Qcow2Writer.dirty_during`` --
first makes the disk match memory (a full flush), then:

- create: copy the active L1 to new clusters, +1 on every refcount of its tree (clearing COPIED
  in the active tables), make all that durable, write the whole snapshot table at a new place,
  switch the header to it with one 12-byte write, free the old table;
- delete: write the table without the entry and switch to it, then -1 over the snapshot's tree,
  free its L1, and set COPIED again where a cluster is the active disk's alone;
- apply: +1 over the snapshot's tree (durable), overwrite the active L1 with one write, then -1
  over the old active tree and recompute COPIED. The disk takes the snapshot's size.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter

from qcowfs.errors import ImageError, UnsupportedError
from qcowfs.format import header as hdr
from qcowfs.format.snapshot import MAX_SNAPSHOTS, SnapshotEntry, serialize_snapshot_table
from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    encode_u64_table,
)

from .write import Qcow2Writer


def tree_references(w: Qcow2Writer, l1: array) -> Counter:
    """How many references the tree under ``l1`` holds on each host cluster."""
    cb = w.cb
    refs: Counter = Counter()
    step = 2 if w.extended else 1
    cache = w.img.l2_cache
    for entry in l1:
        l2 = entry & L1E_OFFSET_MASK
        if not l2:
            continue
        table = cache.get(l2)
        for j in range(0, len(table), step):
            e = table[j]
            if not e:
                continue
            ref = w.old_ref(e)
            if ref is not None:
                off, length = ref
                for c in range(off >> cb, ((off + length - 1) >> cb) + 1):
                    refs[c] += 1
        refs[l2 >> cb] += 1
    return refs


def add_tree(w: Qcow2Writer, l1: array, delta: int) -> None:
    """Change the refcount of everything the tree under ``l1`` references by ``delta``;
    checked before anything changes, so an overflow leaves the refcounts untouched."""
    counts = tree_references(w, l1)
    refs = w.refs
    if delta > 0:
        for c, n in counts.items():
            if refs.get(c) + n * delta > refs.max:
                raise ImageError(w.path, f"refcount of host cluster {c} would overflow "
                                         f"({refs.header.refcount_bits}-bit refcounts)")
    for c, n in sorted(counts.items()):
        refs.add(c, n * delta)


def recompute_copied(w: Qcow2Writer) -> None:
    """COPIED exactly where the active tree's cluster has refcount 1 (in the caches)."""
    refs = w.refs
    cb = w.cb
    l1 = w.img.active.l1
    step = 2 if w.extended else 1
    for i, entry in enumerate(l1):
        l2 = entry & L1E_OFFSET_MASK
        if not l2:
            continue
        own = refs.get(l2 >> cb) == 1
        want = l2 | (COPIED if own else 0)
        if want != entry:
            l1[i] = want
            w.l1_dirty.add(i)
        # A shared table is changed too (only its COPIED flags, which only the active tree
        # reads): after a snapshot is taken every entry in it must lose COPIED.
        table = w.img.l2_cache.get(l2)
        changed = False
        for j in range(0, len(table), step):
            e = table[j]
            host = e & L2E_OFFSET_MASK
            if not host or e & COMPRESSED or w.has_data_file:
                continue
            flag = COPIED if refs.get(host >> cb) == 1 else 0
            if e & COPIED != flag:
                table[j] = (e & ~COPIED) | flag
                changed = True
        if changed:
            w.touch_l2(l2, table)


def _new_id(entries: list[SnapshotEntry]) -> str:
    ids = [int(s.id) for s in entries if s.id.isdigit()]
    return str(max(ids, default=0) + 1)


def write_table(w: Qcow2Writer, entries: list[SnapshotEntry]) -> None:
    """Write the snapshot table at a new place, durable with everything it points at, then
    switch the header to it (one 12-byte write) and free the old table."""
    img, h, cb = w.img, w.header, w.cb
    raw = serialize_snapshot_table(entries)
    new_off = 0
    clusters = 0
    if entries:
        clusters = -(-len(raw) // w.cs)
        new_off = w.refs.allocate(clusters) << cb
        w.check_overlap(new_off, len(raw), "snapshot table")
        w.file.write(new_off, raw)
        w.note_metadata_write()
    w.full_flush()
    w.file.write(hdr.OFF_SNAPSHOTS, hdr.pack_snapshots_pointer(len(entries), new_off))
    w.file.sync()
    old_off, old_bytes = h.snapshots_offset, img.snapshot_table_bytes if h.nb_snapshots else 0
    h.nb_snapshots, h.snapshots_offset = len(entries), new_off
    img.snapshots = list(entries)
    img.snapshot_table_bytes = len(raw)
    if clusters:
        w.metadata_changed(new_off >> cb, clusters)
    if old_bytes:
        first = old_off >> cb
        count = ((old_off + old_bytes - 1) >> cb) - first + 1
        w.metadata_changed(first, -count)
        w.refs.add_range(first, count, -1)


def create(w: Qcow2Writer, name: str) -> SnapshotEntry:
    img = w.img
    w.check_usable()
    if w.has_data_file:
        raise UnsupportedError(w.path, "internal snapshots are not possible with an external "
                                       "data file")
    if len(img.snapshots) >= MAX_SNAPSHOTS:
        raise ImageError(w.path, "too many snapshots")
    if not name:
        raise ImageError(w.path, "a snapshot needs a name")
    if any(s.name == name for s in img.snapshots):
        raise ImageError(w.path, f"a snapshot named {name!r} already exists")
    with w.dirty_during():
        w.full_flush()
        l1 = array("Q", img.active.l1)
        counts = tree_references(w, l1)
        for c, n in counts.items():
            if w.refs.get(c) + n > w.refs.max:
                raise ImageError(w.path, f"refcount of host cluster {c} would overflow "
                                         f"({w.header.refcount_bits}-bit refcounts)")
        l1_off = 0
        if len(l1):
            clusters = -(-len(l1) * 8 // w.cs)
            l1_off = w.refs.allocate(clusters) << w.cb
            w.check_overlap(l1_off, len(l1) * 8, "snapshot L1 table")
            w.file.write(l1_off, encode_u64_table(l1))
            w.note_metadata_write()
            w.metadata_changed(l1_off >> w.cb, clusters)
        for c, n in sorted(counts.items()):
            w.refs.add(c, n)
        recompute_copied(w)
        now = time.time_ns()
        entry = SnapshotEntry(id=_new_id(img.snapshots), name=name, l1_table_offset=l1_off,
                              l1_size=len(l1), date_sec=now // 10**9, date_nsec=now % 10**9,
                              vm_clock_nsec=0, vm_state_size=0, disk_size=img.active.size,
                              icount=0, extra_data_size=24)
        write_table(w, img.snapshots + [entry])
        w.full_flush()
    return entry


def delete(w: Qcow2Writer, id_or_name: str) -> None:
    img = w.img
    w.check_usable()
    entry = img.find_snapshot(id_or_name)
    mapping = img.snapshot_mapping(entry)
    with w.dirty_during():
        w.full_flush()
        write_table(w, [s for s in img.snapshots if s is not entry])
        add_tree(w, mapping.l1, -1)
        if entry.l1_size:
            first = entry.l1_table_offset >> w.cb
            count = ((entry.l1_table_offset + entry.l1_size * 8 - 1) >> w.cb) - first + 1
            w.metadata_changed(first, -count)
            w.refs.add_range(first, count, -1)
        recompute_copied(w)
        w.full_flush()


def apply(w: Qcow2Writer, id_or_name: str) -> None:
    from .resize import grow_l1, set_size

    img = w.img
    w.check_usable()
    entry = img.find_snapshot(id_or_name)
    mapping = img.snapshot_mapping(entry)
    if w.bitmaps is not None:
        w.mark_bitmaps(0, img.active.size)  # any granule may change
    with w.dirty_during():
        w.full_flush()
        if len(mapping.l1) > len(img.active.l1):
            grow_l1(w, len(mapping.l1))
        add_tree(w, mapping.l1, +1)
        w.full_flush()
        old = array("Q", img.active.l1)
        new = array("Q", bytes(8 * len(old)))
        for i, e in enumerate(mapping.l1):
            new[i] = e & ~COPIED
        if len(new):
            w.file.write(w.header.l1_table_offset, encode_u64_table(new))
            w.file.sync()
        img.active.l1[:] = new
        w.l1_dirty.clear()
        w.rebuild_metadata_set()
        if mapping.size != img.active.size:
            set_size(w, mapping.size)
        add_tree(w, old, -1)
        recompute_copied(w)
        w.full_flush()


__all__ = ["create", "delete", "apply", "add_tree", "recompute_copied", "tree_references"]
