"""Block status over a backing chain: which layer provides each guest range, and whether it is
data, zeros or a hole, with the host offset where it lives. ``map`` prints this.

The rules follow what QEMU reports (qemu-img map --output=json) so the two agree extent for
extent:

- a qcow2 data cluster is data at its host offset; a compressed one is data with no offset;
  a zero cluster is zero (with the offset of its preallocated cluster, if any); an
  unallocated range falls through to the layer below;
- an unallocated range of the bottom layer, or past the end of the layer below, is zero and
  not present;
- a raw layer reports what the host file system says (SEEK_DATA/SEEK_HOLE), present either way;
- when a qcow2 file looks metadata-preallocated, holes of the host file under data clusters
  are reported as zero too.
"""

from __future__ import annotations

from collections.abc import Iterator

from qcowfs.format.record import record
from qcowfs.format.tables import ClusterKind
from qcowfs.image import scanmode, tableruns
from qcowfs.image.info import allocated_bytes
from qcowfs.image.mapping import Mapping
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.raw import RawImage
from qcowfs.image.refcount_read import looks_metadata_preallocated

from .resolve import Layer

CHUNK = 1 << 30  # qemu-img map asks for at most this much at a time


@record(slots=True)
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None

    def as_json(self) -> dict:
        out = {"start": self.start, "length": self.length, "depth": self.depth,
               "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def mergeable(self, nxt: MapEntry) -> bool:
        """Whether ``nxt`` continues this entry (qemu-img's rule)."""
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present) != (
                nxt.zero, nxt.data, nxt.depth, nxt.present):
            return False
        if (self.offset is None) != (nxt.offset is None) or self.filename != nxt.filename:
            return False
        return self.offset is None or self.offset + self.length == nxt.offset


class ChainStatus:
    """Block status of a chain (top first). ``names`` are the layers' file names as reported
    (the human map output prints them)."""

    def __init__(self, layers: list[Layer], names: list[str] | None = None, *,
                 top: Mapping | None = None):
        self.layers = layers
        #: the top layer's guest view when it is not the active disk (an internal snapshot)
        self.top = top
        self.names = names or [layer.path for layer in layers]
        self._prealloc: dict[int, bool] = {}
        self._whole: dict[int, bool] = {}

    @property
    def size(self) -> int:
        return self.top.size if self.top is not None else _layer_size(self.layers[0])

    def entries(self, offset: int = 0, length: int | None = None) -> Iterator[MapEntry]:
        """Unmerged entries, in order, covering ``[offset, offset + length)``."""
        end = self.size if length is None else min(self.size, offset + length)
        pos = offset
        # A chunk that is one run (a long unallocated stretch, say) doubles the next one, up to
        # 2^21 clusters (today's most per chunk, at 512-byte clusters): the steps follow the
        # runs present, not the disk size the header claims (a 1 PiB disk with no L2 tables
        # was a million 1 GiB steps).
        top = self.layers[0]
        most = max(CHUNK, getattr(top, "cluster_size", 512) << 21)
        step = CHUNK
        while pos < end:
            n = min(step, end - pos)
            runs = 0
            for e in self._status(0, pos, n):
                runs += 1
                yield e
            step = min(step * 2, most) if runs == 1 else CHUNK
            pos += n

    def merged(self, offset: int = 0, length: int | None = None) -> Iterator[MapEntry]:
        """Entries merged the way qemu-img map merges them."""
        cur: MapEntry | None = None
        for e in self.entries(offset, length):
            if cur is not None and cur.mergeable(e):
                cur.length += e.length
                continue
            if cur is not None:
                yield cur
            cur = e
        if cur is not None:
            yield cur

    # --- one layer ------------------------------------------------------------------------

    def _status(self, depth: int, pos: int, n: int) -> Iterator[MapEntry]:
        layer = self.layers[depth]
        name = self.names[depth]
        below = self.layers[depth + 1] if depth + 1 < len(self.layers) else None
        below_size = _layer_size(below) if below is not None else 0
        if isinstance(layer, RawImage):
            for e in layer.extents(pos, n):
                data = e.kind == ClusterKind.NORMAL
                yield MapEntry(e.offset, e.length, depth, True, not data, data, e.offset, name)
            return
        data_name = _data_file_name(layer, name)
        for e in self._extents(depth, pos, n):
            kind = e.kind
            if kind == ClusterKind.NORMAL:
                if self._metadata_preallocated(depth):
                    yield from self._recurse(layer, e, depth, data_name)
                elif layer.encrypted:  # as QEMU: no host offset for encrypted data
                    yield MapEntry(e.offset, e.length, depth, True, False, True)
                else:
                    yield MapEntry(e.offset, e.length, depth, True, False, True, e.host,
                                   data_name)
            elif kind == ClusterKind.COMPRESSED:
                yield MapEntry(e.offset, e.length, depth, True, False, True)
            elif kind == ClusterKind.ZERO:
                host = e.host or None
                yield MapEntry(e.offset, e.length, depth, True, True, False, host,
                               data_name if host is not None else None)
            else:
                host = e.host or None
                fname = data_name if host is not None else None
                if below is None:
                    yield MapEntry(e.offset, e.length, depth, False, True, False, host, fname)
                    continue
                split = max(e.offset, min(e.end, below_size))
                if split > e.offset:
                    yield from self._status(depth + 1, e.offset, split - e.offset)
                if split < e.end:
                    h = host + (split - e.offset) if host is not None else None
                    yield MapEntry(split, e.end - split, depth, False, True, False, h, fname)

    def _recurse(self, layer: Qcow2Image, e, depth: int, name: str) -> Iterator[MapEntry]:
        """A data run of a metadata-preallocated image, split by the holes of the file under
        it: holes (and the range past its end) are reported as zero data."""
        f = layer.data_file
        raw = RawImage(f.path, f)
        pos, end, host = e.offset, e.end, e.host
        fsize = f.refresh_size()
        while pos < end:
            n = end - pos
            if host >= fsize:
                yield MapEntry(pos, n, depth, True, True, True, host, name)
                return
            first = raw.extents(host, n)[0]
            hole = first.kind != ClusterKind.NORMAL
            if hole and first.end >= fsize:
                yield MapEntry(pos, n, depth, True, True, True, host, name)
                return
            step = first.length
            yield MapEntry(pos, step, depth, True, hole, True, host, name)
            pos += step
            host += step

    def _extents(self, depth: int, pos: int, n: int) -> list:
        """The layer's extents: a large image's whole L2 tables at once (see
        qcowfs.image.scanmode), a small one's entry by entry."""
        layer = self.layers[depth]
        assert isinstance(layer, Qcow2Image)
        mapping = self.top if depth == 0 and self.top is not None else layer.active
        whole = self._whole.get(depth)
        if whole is None:
            whole = scanmode.whole_tables(-(-layer.file.size // layer.cluster_size))
            self._whole[depth] = whole
        return tableruns.mapping_extents(mapping, pos, n, whole)

    def _metadata_preallocated(self, depth: int) -> bool:
        found = self._prealloc.get(depth)
        if found is None:
            layer = self.layers[depth]
            assert isinstance(layer, Qcow2Image)
            found = looks_metadata_preallocated(
                layer, allocated_bytes(layer.file.fd, layer.path))
            self._prealloc[depth] = found
        return found


def _layer_size(layer: Layer) -> int:
    return layer.active.size if isinstance(layer, Qcow2Image) else layer.size


def _data_file_name(image: Qcow2Image, name: str) -> str:
    if not image.has_data_file or image.data_file is image.file:
        return name
    # QEMU opens (and so names) the data file exactly as the header spells it
    return image.header.data_file or image.data_file.path
