"""Writing a fresh qcow2 image front to back: what ``convert`` needs before (and apart from)
the random-access writer.

Guest clusters arrive in increasing order; each data cluster (or compressed stream, packed
byte-contiguously as QEMU packs them) is appended at the end of the file, the L2 tables follow
at the end, then the L1 entries are written. Refcounts come last and from the metadata itself:
the walk tallies every reference, and the refcount blocks are rewritten from that tally (or, when
the image outgrew its first refcount block, rebuilt by the check/repair code). Nothing points at
a cluster before it is written.

The image is built under a temporary name next to the destination (``.NAME.partial-PID``) and
renamed over it only once it is complete and durable: a fresh header is a valid empty image, so
building in place would leave an interrupted convert looking whole (the crash campaign found
that). An interrupted convert leaves the partial file to delete and the destination as it was.
"""

from __future__ import annotations

import os
from array import array

from qcowfs.errors import HostIOError, ImageError
from qcowfs.format.compression import compress_cluster
from qcowfs.format.tables import (
    COPIED,
    REFT_OFFSET_MASK,
    ZERO_FLAG,
    CompressedLayout,
    encode_refblock,
    encode_u64_table,
    refblock_entries,
)
from qcowfs.image.check import FIX_ALL, check_image
from qcowfs.image.create import QcowOptions, create_qcow2
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.walk import tally_references
from qcowfs.image.writebehind import WriteBehind

SUB_ALL = 0xFFFFFFFF


class SequentialQcow2Writer:
    """Create ``path`` with ``options`` and fill it cluster by cluster, in guest order."""

    def __init__(self, path: str, options: QcowOptions, *, compress: bool = False,
                 durable: bool = True):
        if options.data_file:
            raise ImageError(path, "writing into an external data file is not supported here")
        self.path = path
        self.partial = partial_name(path)
        create_qcow2(self.partial,
                     QcowOptions(**{**options.__dict__, "preallocation": "off"}))
        try:
            self.image = Qcow2Image.open(self.partial, writable=True, open_data_file=False)
        except BaseException:
            _unlink(self.partial)
            raise
        self._done = False
        self.durable = durable
        #: the data writes run on a thread of their own (``write_clusters``, ``write_streams``)
        self._io = WriteBehind()
        h = self.image.header
        self.cs = self.image.cluster_size
        self.version = h.version
        self.compression_type = h.compression_type
        self.compress = compress
        self.extended = self.image.extended_l2
        self.words = 2 if self.extended else 1
        self.l2_entries = self.image.l2_entries
        self.layout = CompressedLayout(h.cluster_bits)
        self.l1 = array("Q", bytes(8 * h.l1_size))
        self.l2: dict[int, array] = {}
        self.end = -(-self.image.file.refresh_size() // self.cs) * self.cs
        self._closed = False

    def _table(self, guest_cluster: int) -> tuple[array, int]:
        index, slot = divmod(guest_cluster, self.l2_entries)
        table = self.l2.get(index)
        if table is None:
            table = self.l2[index] = array("Q", bytes(8 * self.words * self.l2_entries))
        return table, slot * self.words

    def write_cluster(self, guest_cluster: int, data: bytes) -> None:
        """Store one whole guest cluster of data (the last one padded with zeros)."""
        if self.compress:
            self.write_packed(guest_cluster, data,
                              compress_cluster(data, self.compression_type))
            return
        self.write_clusters(guest_cluster, data)

    def write_clusters(self, first: int, data: bytes | memoryview) -> None:
        """Store whole guest clusters ``first, first + 1, ...`` of data, uncompressed, with
        one write: they get host clusters in a row."""
        cs = self.cs
        host = -(-self.end // cs) * cs
        self._io.submit(self.image.file.write, host, data)
        self.end = host + len(data)
        for i in range(len(data) // cs):
            table, slot = self._table(first + i)
            table[slot] = (host + i * cs) | COPIED
            if self.extended:
                table[slot + 1] = SUB_ALL

    def write_packed(self, guest_cluster: int, data: bytes | memoryview,
                     packed: bytes | None) -> None:
        """Store one guest cluster as ``packed`` (its compressed stream, from
        ``compress_cluster``, made wherever the caller likes), or as ``data`` when
        compressing would not save a sector (None)."""
        if packed is None:
            self.write_clusters(guest_cluster, data)
            return
        self.write_streams([(guest_cluster, packed)])

    def write_streams(self, streams: list[tuple[int, bytes]]) -> None:
        """Store (guest cluster, compressed stream) pairs back to back, as QEMU packs them,
        with one write."""
        host = self.end
        for guest_cluster, packed in streams:
            table, slot = self._table(guest_cluster)
            table[slot] = self.layout.encode(host, len(packed))
            host += len(packed)
        self._io.submit(self.image.file.writev, self.end, [p for _, p in streams])
        self.end = host

    def zero_cluster(self, guest_cluster: int) -> None:
        """Make one guest cluster read as zeros whatever the backing file holds."""
        table, slot = self._table(guest_cluster)
        if self.extended:
            table[slot + 1] = SUB_ALL << 32
        elif self.version >= 3:
            table[slot] = ZERO_FLAG
        else:
            self.write_cluster(guest_cluster, bytes(self.cs))

    def finish(self) -> None:
        """Write the tables and the refcounts; the image is then complete and clean."""
        self._io.drain()
        img = self.image
        f = img.file
        cs = self.cs
        h = img.header
        pos = -(-self.end // cs) * cs
        for index in sorted(self.l2):
            f.write(pos, encode_u64_table(self.l2[index]))
            self.l1[index] = pos | COPIED
            pos += cs
        self._sync()
        if len(self.l1):
            f.write(h.l1_table_offset, encode_u64_table(self.l1))
        self._sync()
        img.l2_cache.clear()
        self._write_refcounts()
        self.close()
        publish(self.partial, self.path, durable=self.durable)
        self._done = True

    def _write_refcounts(self) -> None:
        img = self.image
        h = img.header
        cs = self.cs
        f = img.file
        tally = tally_references(img)
        if tally.defects:
            raise ImageError(self.path, f"internal error: {tally.defects[0].message}")
        per_block = refblock_entries(h.cluster_bits, h.refcount_order)
        table = f.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
        counts = tally.counts
        blocks = -(-len(counts) // per_block)
        offsets = [int.from_bytes(table[8 * i:8 * i + 8], "big") & REFT_OFFSET_MASK
                   for i in range(min(blocks, len(table) // 8))]
        if tally.beyond_eof or len(offsets) < blocks or not all(offsets):
            # outgrew the first refcount block: let the repair code lay down new structures
            res = check_image(img, FIX_ALL)
            if res.corruptions or res.check_errors:
                raise ImageError(self.path, "internal error: refcounts could not be written")
            return
        for i, off in enumerate(offsets):
            values = [counts[k] if k < len(counts) else 0
                      for k in range(i * per_block, (i + 1) * per_block)]
            f.write(off, encode_refblock(values, h.refcount_order))
        self._sync()

    def _sync(self) -> None:
        """An fsync of the image, unless the caller asked for no durability (qemu-img's
        ``cache=unsafe``, convert's default): the write order still holds for the process,
        and a SIGKILL leaves the partial file; only a host crash can lose what was written."""
        if self.durable:
            self.image.file.sync()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._io.close()
            self.image.close()

    def abandon(self) -> None:
        """Close, and remove the partial image unless ``finish`` completed."""
        self.close()
        if not self._done:
            _unlink(self.partial)


def partial_name(path: str) -> str:
    """The temporary name an output is built under, next to ``path``."""
    return os.path.join(os.path.dirname(path) or ".",
                        f".{os.path.basename(path)}.partial-{os.getpid()}")


def publish(partial: str, path: str, *, durable: bool = True) -> None:
    """Rename the finished ``partial`` over ``path`` (durably, when ``durable``)."""
    try:
        os.replace(partial, path)
        if durable:
            _sync_dir(os.path.dirname(path) or ".")
    except OSError as exc:
        raise HostIOError.from_oserror(path, exc, "cannot rename the output") from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
