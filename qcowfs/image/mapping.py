"""The guest view of one L1 table: which host bytes, zeros or compressed streams each guest
byte range is, and reads through it.

The read side is built around :meth:`Mapping.extents`, which turns a guest byte range into runs
of the same kind (data contiguous on the host, zeros, unallocated, compressed). Reads, ``map``,
commit, rebase and convert all walk those runs; a run of data becomes one ``preadv``. The active
disk and every internal snapshot are each one ``Mapping`` over the same :class:`Qcow2Image`.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from qcowfs.errors import FormatError
from qcowfs.format.record import record
from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    SUB_ALLOC_MASK,
    SUBCLUSTERS,
    ZERO_FLAG,
    ClusterKind,
)
from qcowfs.image.hostfile import HostFile

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from qcowfs.image.qcow2 import Qcow2Image

UNALLOCATED = ClusterKind.UNALLOCATED
ZERO = ClusterKind.ZERO
NORMAL = ClusterKind.NORMAL
COMPRESSED_KIND = ClusterKind.COMPRESSED

_ZEROS = bytes(1 << 21)

FillFn = Callable[[memoryview, int], None]
_NOT_PLAIN_DATA = COMPRESSED | L2E_STD_RESERVED_MASK | ZERO_FLAG


def zero_fill(buf: memoryview, offset: int = 0) -> None:
    """Fill ``buf`` with zero bytes (the fill for a range nothing below provides)."""
    n = len(buf)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        buf[pos:pos + step] = _ZEROS[:step]
        pos += step


@record(slots=True)
class Extent:
    """A guest byte range of one kind. For NORMAL, ``host`` is the host offset of ``offset``
    (in the data file when the image has one); for ZERO and UNALLOCATED it is the host offset
    of a preallocated cluster (or subclusters of an allocated extended-L2 cluster) or 0;
    for COMPRESSED, ``entry`` is the L2 descriptor (a range never spans two compressed
    clusters)."""

    offset: int
    length: int
    kind: ClusterKind
    host: int = 0
    entry: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


def _continues(last: Extent | None, kind: ClusterKind, host: int) -> bool:
    """Whether a piece of ``kind`` at ``host`` extends the run ``last``: data must continue on
    the host; zero and unallocated pieces merge when neither has a host cluster, or when
    their host clusters are contiguous."""
    if last is None or last.kind != kind or kind == COMPRESSED_KIND:
        return False
    if kind == NORMAL:
        return last.host + last.length == host
    if not host and not last.host:
        return True
    return bool(host and last.host) and last.host + last.length == host


class Mapping:
    """A guest view of one L1 table of an image: the active disk, or one internal snapshot."""

    def __init__(self, image: Qcow2Image, l1: array, size: int, name: str):
        self.image = image
        self.l1 = l1
        self.size = size
        self.name = name

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The runs that make up ``[offset, offset + length)``, in order, merged where the
        kind (and, for data, the host position) continues."""
        img = self.image
        cb = img.cluster_bits
        cs = 1 << cb
        cmask = cs - 1
        l2_bits = img.l2_bits
        l2_mask = (1 << l2_bits) - 1
        extended = img.extended_l2
        has_data_file = img.has_data_file
        version = img.header.version
        l1 = self.l1
        out: list[Extent] = []
        pos = offset
        end = offset + length
        last: Extent | None = None
        while pos < end:
            cidx = pos >> cb
            l1i = cidx >> l2_bits
            span_end = min(end, (l1i + 1) << (l2_bits + cb))
            l1e = l1[l1i] if l1i < len(l1) else 0
            if l1e & L1E_RESERVED_MASK:
                raise FormatError(img.path, f"L1 entry {l1i} (0x{l1e:016x}) has reserved bits set")
            l2_off = l1e & L1E_OFFSET_MASK
            if not l2_off:
                n = span_end - pos
                if last is not None and last.kind == UNALLOCATED and not last.host:
                    last.length += n
                else:
                    last = Extent(pos, n, UNALLOCATED)
                    out.append(last)
                pos = span_end
                continue
            table = img.l2_table(l2_off)
            l2i = cidx & l2_mask
            while pos < span_end:
                within = pos & cmask
                n = cs - within
                if n > span_end - pos:
                    n = span_end - pos
                if not extended:
                    entry = table[l2i]
                    host = entry & L2E_OFFSET_MASK
                    if host and not entry & _NOT_PLAIN_DATA and not host & cmask \
                            and host != l2_off:
                        # The common case, plain data: extend the run or start one.
                        host += within
                        if last is not None and last.kind is NORMAL \
                                and last.host + last.length == host:
                            last.length += n
                        else:
                            last = Extent(pos, n, NORMAL, host)
                            out.append(last)
                        pos += n
                        l2i += 1
                        continue
                else:
                    entry = table[2 * l2i]
                    if not entry & COMPRESSED:
                        # The bitmap alone says what each subcluster is: a host offset with
                        # no allocation bits still reads from the backing file.
                        last = self._subclusters(out, last, pos, n, entry, table[2 * l2i + 1],
                                                 l2i)
                        pos += n
                        l2i += 1
                        continue
                if entry & COMPRESSED:
                    if entry & COPIED or has_data_file:
                        raise FormatError(img.path, f"invalid compressed L2 entry 0x{entry:016x}"
                                                    f" for guest offset {pos}")
                    last = Extent(pos, n, COMPRESSED_KIND, 0, entry)
                    out.append(last)
                    pos += n
                    l2i += 1
                    continue
                if entry & L2E_STD_RESERVED_MASK:
                    raise FormatError(img.path, f"L2 entry 0x{entry:016x} for guest offset {pos}"
                                                f" has reserved bits set")
                host = entry & L2E_OFFSET_MASK
                if host & cmask:
                    raise FormatError(img.path, f"L2 entry for guest offset {pos} points at "
                                                f"unaligned host offset {host}")
                if entry & ZERO_FLAG:
                    if version < 3:
                        raise FormatError(img.path, "zero cluster entry in a version 2 image")
                    kind = ZERO
                    host = host + within if host else 0
                elif host or (has_data_file and entry & COPIED):
                    if host == l2_off and not has_data_file:
                        raise FormatError(img.path, f"L2 entry for guest offset {pos} points at "
                                                    f"its own L2 table")
                    kind = NORMAL
                    host += within
                else:
                    kind = UNALLOCATED
                if _continues(last, kind, host):
                    last.length += n
                else:
                    last = Extent(pos, n, kind, host)
                    out.append(last)
                pos += n
                l2i += 1
        return out

    def _subclusters(self, out: list[Extent], last: Extent | None, pos: int, n: int,
                     entry: int, bitmap: int, l2i: int) -> Extent | None:
        img = self.image
        cs = img.cluster_size
        sub = cs // SUBCLUSTERS
        if entry & (L2E_STD_RESERVED_MASK | ZERO_FLAG):
            raise FormatError(img.path, f"extended L2 entry 0x{entry:016x} has reserved bits set")
        host = entry & L2E_OFFSET_MASK
        if host & (cs - 1):
            raise FormatError(img.path, f"L2 entry for guest offset {pos} points at unaligned "
                                        f"host offset {host}")
        allocated = bool(host) or bool(img.has_data_file and entry & COPIED)
        alloc_bits = bitmap & SUB_ALLOC_MASK
        zero_bits = bitmap >> 32
        if alloc_bits & zero_bits:
            raise FormatError(img.path, f"extended L2 entry {l2i} marks a subcluster both "
                                        f"allocated and zero")
        if alloc_bits and not allocated:
            raise FormatError(img.path, f"extended L2 entry {l2i} allocates subclusters of an "
                                        f"unallocated cluster")
        cluster_start = pos - (pos & (cs - 1))
        end = pos + n
        if alloc_bits == SUB_ALLOC_MASK or not alloc_bits and zero_bits in (0, SUB_ALLOC_MASK):
            # The whole cluster is one kind: one step instead of one per subcluster.
            # zero and unallocated subclusters of an allocated cluster keep their host
            # offset (QEMU's ZERO_ALLOC / UNALLOCATED_ALLOC): map reports it
            h = host + (pos - cluster_start) if allocated else 0
            if alloc_bits:
                kind = NORMAL
            else:
                kind = ZERO if zero_bits else UNALLOCATED
            if _continues(last, kind, h):
                last.length += n
            else:
                last = Extent(pos, n, kind, h)
                out.append(last)
            return last
        while pos < end:
            i = (pos - cluster_start) // sub
            step = min(cluster_start + (i + 1) * sub, end) - pos
            h = host + (pos - cluster_start) if allocated else 0
            if alloc_bits >> i & 1:
                kind = NORMAL
            elif zero_bits >> i & 1:
                kind = ZERO
            else:
                kind = UNALLOCATED
            if _continues(last, kind, h):
                last.length += step
            else:
                last = Extent(pos, step, kind, h)
                out.append(last)
            pos += step
        return last

    def readinto(self, buf: memoryview, offset: int, fill: FillFn = zero_fill) -> None:
        """Fill ``buf`` with the guest bytes at ``offset`` (the caller clips to ``size``).

        ``fill(view, guest_offset)`` supplies unallocated ranges: the backing chain, or zeros.
        """
        img = self.image
        cb = img.cluster_bits
        n = len(buf)
        if n and not img.extended_l2 and offset >> cb == (offset + n - 1) >> cb:
            # One cluster of plain data, the common small read: no extent list.
            cidx = offset >> cb
            l1i = cidx >> img.l2_bits
            l1 = self.l1
            l1e = l1[l1i] if l1i < len(l1) else 0
            l2_off = l1e & L1E_OFFSET_MASK
            if l2_off and not l1e & L1E_RESERVED_MASK:
                entry = img.l2_cache.get(l2_off)[cidx & (img.l2_entries - 1)]
                host = entry & L2E_OFFSET_MASK
                cmask = img.cluster_size - 1
                if host and not entry & _NOT_PLAIN_DATA and not host & cmask \
                        and host != l2_off:
                    img.read_data(buf, host + (offset & cmask), offset)
                    return
        self._readinto_extents(buf, offset, self.extents(offset, n), fill)

    def locate(self, offset: int, n: int) -> tuple[HostFile, int] | None:
        """Where the ``n`` guest bytes at ``offset`` lie when they are one run of plain,
        unencrypted host data inside the data file: ``(file, host offset)``, for a caller
        that reads them itself (the mount's data threads); None when :meth:`readinto` must
        do the read (unallocated, zero or compressed clusters, encryption, several runs, a
        run past the end of the file or over fixed metadata, which it reports)."""
        img = self.image
        if img.encrypted or img.extended_l2 or n <= 0:
            return None
        cb = img.cluster_bits
        if offset >> cb == (offset + n - 1) >> cb:
            cidx = offset >> cb
            l1i = cidx >> img.l2_bits
            l1 = self.l1
            l1e = l1[l1i] if l1i < len(l1) else 0
            l2_off = l1e & L1E_OFFSET_MASK
            if not l2_off or l1e & L1E_RESERVED_MASK:
                return None
            entry = img.l2_cache.get(l2_off)[cidx & (img.l2_entries - 1)]
            host = entry & L2E_OFFSET_MASK
            if not host or entry & _NOT_PLAIN_DATA or host & (img.cluster_size - 1) \
                    or host == l2_off:
                return None
            host += offset & (img.cluster_size - 1)
        else:
            extents = self.extents(offset, n)
            if len(extents) != 1 or extents[0].kind != NORMAL:
                return None
            host = extents[0].host
        f = img.data_file
        if host + n > f.size or (f is img.file and img.metadata_overlap(host, n)):
            return None
        return f, host

    def _readinto_extents(self, buf: memoryview, offset: int, extents: list[Extent],
                          fill: FillFn) -> None:
        img = self.image
        ahead = (img.decompress_ahead(extents)
                 if img.decompressor is not None and not img.encrypted else None)
        for e in extents:
            start = e.offset - offset
            part = buf[start:start + e.length]
            kind = e.kind
            if kind == NORMAL:
                img.read_data(part, e.host, e.offset)
            elif kind == UNALLOCATED:
                fill(part, e.offset)
            elif kind == ZERO:
                zero_fill(part)
            else:
                if img.encrypted:
                    raise FormatError(img.path, f"compressed cluster at guest offset {e.offset} "
                                                f"in an encrypted image")
                data = img.compressed_cluster(e.entry, ahead)
                within = e.offset & (img.cluster_size - 1)
                part[:] = data[within:within + e.length]

    def read(self, offset: int, length: int, fill: FillFn = zero_fill) -> bytes:
        length = max(0, min(length, self.size - offset))
        extents = self.extents(offset, length)
        if len(extents) == 1 and extents[0].kind == NORMAL:
            # One run of host data: the bytes os.pread returns are the answer, no copy (or,
            # encrypted and in whole sectors, those bytes decrypted).
            host, crypto = extents[0].host, self.image.crypto
            if not self.image.encrypted:
                data = self.image.read_data_bytes(host, length)
                if data is not None:
                    return data
            elif crypto is not None and not (host | length) & 511:
                data = self.image.read_data_bytes(host, length)
                if data is not None:
                    return crypto.decrypt(data, host, offset)
        buf = bytearray(length)
        self._readinto_extents(memoryview(buf), offset, extents, fill)
        return bytes(buf)
