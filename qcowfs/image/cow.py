"""The request path of a qcow2 write: plan each guest cluster of a request, allocate host runs,
write the data with its copy-on-write head and tail, then update the L2 entries in the cache.

:class:`ClusterWrites` is the part of :class:`qcowfs.image.write.Qcow2Writer` that turns one
write request into host writes and L2 changes (QEMU keeps the same concern apart from the rest of
its driver). Everything it reaches on ``self`` -- the caches, the refcounts, the
overlap check, ``writable_l2`` and the deferred frees -- belongs to the writer, which also
decides when any of it reaches the disk (see write.py).
"""

from __future__ import annotations

import errno
from array import array

from qcowfs.errors import ImageError
from qcowfs.format.tables import COMPRESSED, COPIED, L1E_OFFSET_MASK, L2E_OFFSET_MASK, ZERO_FLAG

ALL_ZERO_BITS = 0xFFFFFFFF << 32
ALL_ALLOC_BITS = 0xFFFFFFFF

# Actions the planner gives each guest cluster of a request.
_INPLACE, _FILL, _ALLOC, _ZERO = 1, 2, 3, 4


class ClusterWrites:
    """Planning and executing the cluster writes of one request (mixed into Qcow2Writer)."""

    def _write(self, offset: int, view: memoryview, zero: bool) -> None:
        self.check_usable()
        n = len(view)
        size = self.img.active.size
        if offset < 0 or offset + n > size:
            raise ImageError(self.path, f"write of {n} bytes at offset {offset} lies outside the "
                                        f"disk ({size} bytes)", errno=errno.EINVAL)
        if not n:
            return
        zero = zero and not self.raw_data_file
        span_bits = self.cb + self.l2_bits
        pos = offset
        end = offset + n
        while pos < end:
            span_end = min(end, ((pos >> span_bits) + 1) << span_bits)
            self._write_span(pos, view[pos - offset:span_end - offset], zero)
            pos = span_end

    def _reads_zero_unallocated(self, guest: int) -> bool:
        return guest >= self.backing_size

    def _write_span(self, pos: int, data: memoryview, zero: bool) -> None:
        """Write ``data`` at guest ``pos``; the range lies inside one L2 table."""
        img = self.img
        cb, cs = self.cb, self.cs
        extended = self.extended
        l1i = pos >> (cb + self.l2_bits)
        l1 = img.active.l1
        l1e = l1[l1i]
        l2_off = l1e & L1E_OFFSET_MASK
        table = img.l2_cache.get(l2_off) if l2_off else None
        l2_mask = img.l2_entries - 1
        end = pos + len(data)
        plan: list[list] = []
        needs_table = False
        p = pos
        while p < end:
            gc = p >> cb
            cstart = gc << cb
            a = p - cstart
            b = min(end, cstart + cs) - cstart
            i = gc & l2_mask
            if table is None:
                entry = bitmap = 0
            elif extended:
                entry, bitmap = table[2 * i], table[2 * i + 1]
            else:
                entry, bitmap = table[i], 0
            act = self._plan_cluster(cstart, a, b, entry, bitmap, zero)
            if act is not None:
                plan.append(act)
                if act[0] != _INPLACE:
                    needs_table = True
            p = cstart + b
        if not plan:
            return
        if needs_table:
            self.mark_dirty()
            l2_off, table = self.writable_l2(l1i)
        self._execute(plan, data, pos, l2_off, table)

    def _plan_cluster(self, cstart: int, a: int, b: int, entry: int, bitmap: int,
                      zero: bool) -> list | None:
        """[action, cluster start, a, b, lo, hi, host, new entry, new bitmap, old reference].

        [a, b) is the written part of the cluster; [lo, hi) the part the host write covers
        (the written part plus its copy-on-write head and tail)."""
        cs = self.cs
        v3 = self.header.version >= 3
        compressed = bool(entry & COMPRESSED)
        host = 0 if compressed else entry & L2E_OFFSET_MASK
        allocated = not compressed and (bool(host) or (self.has_data_file and bool(entry & COPIED)))
        if not self.extended:
            is_zero_entry = not compressed and bool(entry & ZERO_FLAG)
            if zero:
                reads_zero = (is_zero_entry or
                              (not allocated and not compressed and
                               self._reads_zero_unallocated(cstart)))
                if reads_zero:
                    return None
                if v3 and a == 0 and b == cs and not self.raw_data_file:
                    return [_ZERO, cstart, a, b, 0, 0, 0, ZERO_FLAG, 0, self.old_ref(entry)]
            if allocated and not is_zero_entry and entry & COPIED:
                return [_INPLACE, cstart, a, b, a, b, host, 0, 0, None]
            if self.has_data_file:
                return [_FILL, cstart, a, b, 0, cs, cstart, cstart | COPIED, 0, None]
            if allocated and is_zero_entry and entry & COPIED:
                return [_FILL, cstart, a, b, 0, cs, host, host | COPIED, 0, None]
            return [_ALLOC, cstart, a, b, 0, cs, 0, COPIED, 0, self.old_ref(entry)]
        # Extended L2: 32 subclusters per cluster.
        ss = self.sub_size
        sa, sb = a // ss, -(-b // ss)
        touched = ((1 << (sb - sa)) - 1) << sa
        alloc_bits = bitmap & ALL_ALLOC_BITS
        zero_bits = bitmap >> 32
        if zero and not compressed:
            unalloc = ~(alloc_bits | zero_bits) & touched
            if not (alloc_bits & touched) and (
                    not unalloc or self._reads_zero_unallocated(cstart)):
                return None  # reads as zeros already
            if a % ss == 0 and (b % ss == 0 or cstart + b >= self.img.active.size):
                if a == 0 and b == cs:
                    return [_ZERO, cstart, a, b, 0, 0, 0, 0, ALL_ZERO_BITS,
                            self.old_ref(entry)]
                new_bitmap = (alloc_bits & ~touched) | ((zero_bits | touched) << 32)
                return [_ZERO, cstart, a, b, 0, 0, 0, entry, new_bitmap, None]
        lo, hi = sa * ss, sb * ss
        if allocated and entry & COPIED:
            if alloc_bits & touched == touched:
                return [_INPLACE, cstart, a, b, a, b, host, 0, 0, None]
            new_bitmap = (alloc_bits | touched) | ((zero_bits & ~touched) << 32)
            return [_FILL, cstart, a, b, lo, hi, host, entry, new_bitmap, None]
        if self.has_data_file:
            new_bitmap = (alloc_bits | touched) | ((zero_bits & ~touched) << 32)
            return [_FILL, cstart, a, b, lo, hi, cstart, cstart | COPIED, new_bitmap, None]
        if compressed:
            return [_ALLOC, cstart, a, b, 0, cs, 0, COPIED, ALL_ALLOC_BITS, self.old_ref(entry)]
        if allocated:  # shared with a snapshot: copy the whole cluster
            new_bitmap = (alloc_bits | touched) | ((zero_bits & ~touched) << 32)
            return [_ALLOC, cstart, a, b, 0, cs, 0, COPIED, new_bitmap, self.old_ref(entry)]
        new_bitmap = touched | ((zero_bits & ~touched) << 32)
        return [_ALLOC, cstart, a, b, lo, hi, 0, COPIED, new_bitmap, None]

    def _execute(self, plan: list[list], data: memoryview, pos: int, l2_off: int,
                 table: array | None) -> None:
        cb, cs = self.cb, self.cs
        refs = self.refs
        # Allocate one contiguous host run per run of adjacent clusters that need space.
        allocated: list[tuple[int, int]] = []
        try:
            i = 0
            while i < len(plan):
                if plan[i][0] != _ALLOC:
                    i += 1
                    continue
                j = i
                while (j + 1 < len(plan) and plan[j + 1][0] == _ALLOC
                       and plan[j + 1][1] == plan[j][1] + cs):
                    j += 1
                count = j - i + 1
                first = refs.allocate(count)
                self._deps_pending = True
                allocated.append((first, count))
                for k in range(count):
                    plan[i + k][6] = (first + k) << cb
                    plan[i + k][7] |= (first + k) << cb
                i = j + 1
            self._write_data(plan, data, pos)
        except BaseException:
            for first, count in allocated:
                refs.add_range(first, count, -1)
            raise
        if table is None:
            return
        changed = False
        l2_mask = self.img.l2_entries - 1
        extended = self.extended
        for act in plan:
            kind = act[0]
            if kind == _INPLACE:
                continue
            idx = (act[1] >> cb) & l2_mask
            if extended:
                table[2 * idx] = act[7]
                table[2 * idx + 1] = act[8]
            else:
                table[idx] = act[7]
            if act[9] is not None:
                self.deferred.append(act[9])
            changed = True
        if changed:
            self._deps_pending = True
            self.touch_l2(l2_off, table)

    def _write_data(self, plan: list[list], data: memoryview, pos: int) -> None:
        """The host writes of a plan: written bytes with their COW head and tail, merged where
        the host ranges continue each other (one ``pwritev`` per host run)."""
        img = self.img
        target = self.data_file if self.has_data_file else self.file
        crypto = self.crypto
        # A piece is a memoryview (head or tail) or a (start, end) slice of ``data``.
        pieces: list = []
        run_start = run_end = -1

        def emit() -> None:
            if run_start < 0 or run_end == run_start:
                return
            if target is self.file:
                self.check_overlap(run_start, run_end - run_start)
            target.writev(run_start, [data[p[0]:p[1]] if isinstance(p, tuple) else p
                                      for p in pieces])
            if target is self.file:
                self._image_unsynced = True
            else:
                self._data_unsynced = True

        for act in plan:
            kind, cstart, a, b, lo, hi, host = act[:7]
            if kind == _ZERO:
                continue
            if kind == _INPLACE:
                lo, hi = a, b
            h = host + lo
            if h != run_end:
                emit()
                pieces = []
                run_start = run_end = h
            if lo < a and b < hi:
                # Head and tail: one read of the whole range (as QEMU does), the middle of
                # which the written bytes replace.
                whole = memoryview(bytearray(hi - lo))
                img.active.readinto(whole, cstart + lo, self.fill)
                head, tail = whole[:a - lo], whole[b - lo:]
            else:
                head = tail = None
                if lo < a:
                    head = memoryview(bytearray(a - lo))
                    img.active.readinto(head, cstart + lo, self.fill)
                if b < hi:
                    tail = memoryview(bytearray(hi - b))
                    img.active.readinto(tail, cstart + b, self.fill)
            s, e = cstart + a - pos, cstart + b - pos
            if crypto is not None:
                plain = b"".join((head or b"", data[s:e], tail or b""))
                pieces.append(memoryview(crypto.encrypt(plain, h, cstart + lo)))
                run_end = h + (hi - lo)
                continue
            if head is not None:
                pieces.append(head)
            if pieces and isinstance(pieces[-1], tuple) and pieces[-1][1] == s:
                pieces[-1] = (pieces[-1][0], e)
            else:
                pieces.append((s, e))
            if tail is not None:
                pieces.append(tail)
            run_end = h + (hi - lo)
        emit()
