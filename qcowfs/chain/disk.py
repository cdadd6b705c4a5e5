"""The guest's view of a backing chain: one byte array of ``size`` bytes, and each internal
snapshot of the top image as a read-only view over the same chain."""

from __future__ import annotations

import datetime
import errno as _errno
from dataclasses import dataclass

from qcowfs.errors import ImageError, ReadOnlyError, UnsupportedError
from qcowfs.format.snapshot import SnapshotEntry
from qcowfs.image.qcow2 import DEFAULT_L2_CACHE_BYTES, FillFn, Mapping, Qcow2Image, zero_fill
from qcowfs.image.raw import RawImage

from .locks import lock_chain
from .resolve import Keys, Layer, open_chain

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from qcowfs.image.write import Qcow2Writer


def _chain_fill(layers: list[Layer], depth: int) -> FillFn:
    """The function that supplies unallocated guest ranges from ``layers[depth:]``: bytes past
    the end of a shorter backing file read as zeros."""
    if depth >= len(layers):
        return zero_fill
    layer = layers[depth]
    below = _chain_fill(layers, depth + 1)
    if isinstance(layer, Qcow2Image):
        mapping = layer.active

        def fill(buf: memoryview, offset: int) -> None:
            avail = max(0, min(len(buf), mapping.size - offset))
            if avail:
                mapping.readinto(buf[:avail], offset, below)
            if avail < len(buf):
                zero_fill(buf[avail:])
    else:
        def fill(buf: memoryview, offset: int) -> None:
            layer.readinto(buf, offset)
    return fill


@dataclass(frozen=True)
class SnapshotInfo:
    """An internal snapshot as the library shows it. ``size`` is its own disk size,
    ``vm_clock`` the guest clock in nanoseconds."""

    id: str
    name: str
    size: int
    date_sec: int
    date_nsec: int
    vm_clock: int
    vm_state_size: int
    icount: int | None

    @property
    def date(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.date_sec + self.date_nsec / 1e9,
                                               tz=datetime.UTC)

    @classmethod
    def from_entry(cls, entry: SnapshotEntry, image_size: int) -> SnapshotInfo:
        return cls(id=entry.id, name=entry.name,
                   size=entry.disk_size if entry.disk_size is not None else image_size,
                   date_sec=entry.date_sec, date_nsec=entry.date_nsec,
                   vm_clock=entry.vm_clock_nsec, vm_state_size=entry.vm_state_size,
                   icount=entry.icount)


class _View:
    """Reads of one guest view, clipped at its size."""

    size: int
    path: str

    def _readinto_view(self, buf: memoryview, offset: int) -> None:
        raise NotImplementedError

    def readinto(self, buf: memoryview | bytearray, offset: int) -> int:
        """Fill as much of ``buf`` as the disk has from ``offset``; returns the byte count."""
        if offset < 0:
            raise ValueError("negative offset")
        view = memoryview(buf)
        n = max(0, min(len(view), self.size - offset))
        if n:
            self._readinto_view(view[:n], offset)
        return n

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes, fewer only at the end of the disk."""
        if length < 0:
            raise ValueError("negative length")
        if offset < 0:
            raise ValueError("negative offset")
        n = max(0, min(length, self.size - offset))
        if not n:
            return b""
        return self._read_view(offset, n)

    def _read_view(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self._readinto_view(memoryview(buf), offset)
        return bytes(buf)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class SnapshotDisk(_View):
    """A read-only view of an internal snapshot over the top image's current backing chain."""

    writable = False

    def __init__(self, disk: Disk, mapping: Mapping, info: SnapshotInfo):
        self._disk = disk
        self.mapping = mapping
        self.info = info
        self.size = mapping.size
        self.path = disk.path
        self._fill = _chain_fill(disk.layers, 1)
        self._status = None  # the block status behind seek, made at the first one

    @property
    def chain_layers(self) -> list[Layer]:
        """The images this view reads: the top image and its backing chain."""
        return self._disk.layers

    def _readinto_view(self, buf: memoryview, offset: int) -> None:
        self.mapping.readinto(buf, offset, self._fill)

    def _read_view(self, offset: int, n: int) -> bytes:
        return self.mapping.read(offset, n, self._fill)

    def seek(self, offset: int, data: bool) -> int:
        """lseek's SEEK_DATA (``data``) or SEEK_HOLE: the snapshot over the chain below."""
        from .seek import next_boundary
        if self._status is None:
            from .blockstatus import ChainStatus
            self._status = ChainStatus(self._disk.layers, top=self.mapping)
        return next_boundary(self._status, offset, data, self.path)

    def write(self, offset: int, data: bytes) -> None:
        raise ReadOnlyError(self.path, f"snapshot {self.info.id} is read-only")


def _layer_size(layer: Layer) -> int:
    return layer.active.size if isinstance(layer, Qcow2Image) else layer.size


def _read_layer(layer: Layer, buf: memoryview, offset: int, fill: FillFn) -> None:
    """One layer's guest bytes, its unallocated ranges from ``fill`` (the layers below)."""
    if isinstance(layer, Qcow2Image):
        layer.active.readinto(buf, offset, fill)
    else:
        layer.readinto(buf, offset)


class LayerDisk(_View):
    """A read-only view of one image of the chain over everything below it: the guest disk as
    that layer saw it, at its own virtual size (the chain's external checkpoints)."""

    writable = False

    def __init__(self, layers: list[Layer], depth: int):
        self.depth = depth
        self.layer = layers[depth]
        self._below = layers[depth:]
        self._status = None  # the block status behind seek, made at the first one
        self.path = self.layer.path
        self._fill = _chain_fill(layers, depth + 1)

    @property
    def size(self) -> int:
        return _layer_size(self.layer)

    def _readinto_view(self, buf: memoryview, offset: int) -> None:
        _read_layer(self.layer, buf, offset, self._fill)

    def seek(self, offset: int, data: bool) -> int:
        """lseek's SEEK_DATA (``data``) or SEEK_HOLE over this layer and those below it."""
        from .seek import next_boundary
        if self._status is None:
            from .blockstatus import ChainStatus
            self._status = ChainStatus(self._below)
        return next_boundary(self._status, offset, data, self.path)

    def write(self, offset: int, data: bytes) -> None:
        raise ReadOnlyError(self.path, f"layer {self.depth} is read-only")


class Disk(_View):
    """The guest disk of an image and its backing chain (see :func:`qcowfs.open_image`).

    Opened writable, the top image takes writes (copy-on-write over the backing files, which
    stay read-only); see docs/design.md, "The write path"."""

    def __init__(self, layers: list[Layer], writable: bool, *, zero_detect: bool = True):
        for layer in layers:
            if isinstance(layer, Qcow2Image):
                layer.require_key()
        self.layers = layers
        self.top = layers[0]
        self.path = self.top.path
        self.writable = writable
        self._fill = _chain_fill(layers, 1)
        self._closed = False
        self.writer: Qcow2Writer | None = None
        if writable and isinstance(self.top, Qcow2Image):
            # the write path loads only with a writable qcow2 (read-only mounts start faster)
            from qcowfs.image.write import Qcow2Writer

            backing_size = _layer_size(layers[1]) if len(layers) > 1 else 0
            self.writer = Qcow2Writer(self.top, self._fill, backing_size,
                                      zero_detect=zero_detect)

    @property
    def size(self) -> int:
        top = self.top
        return top.active.size if isinstance(top, Qcow2Image) else top.size

    def _readinto_view(self, buf: memoryview, offset: int) -> None:
        _read_layer(self.top, buf, offset, self._fill)

    def _read_view(self, offset: int, n: int) -> bytes:
        top = self.top
        if isinstance(top, Qcow2Image):
            return top.active.read(offset, n, self._fill)
        return super()._read_view(offset, n)

    @property
    def snapshots(self) -> list[SnapshotInfo]:
        top = self.top
        if not isinstance(top, Qcow2Image):
            return []
        return [SnapshotInfo.from_entry(s, top.header.size) for s in top.snapshots]

    def snapshot(self, id_or_name: str) -> SnapshotDisk:
        """A read-only view of an internal snapshot, by id or (unambiguous) name."""
        top = self.top
        if not isinstance(top, Qcow2Image):
            raise ImageError(self.path, "a raw image has no snapshots")
        entry = top.find_snapshot(id_or_name)
        mapping = top.snapshot_mapping(entry)
        return SnapshotDisk(self, mapping, SnapshotInfo.from_entry(entry, top.header.size))

    def layer(self, depth: int) -> LayerDisk:
        """Layer ``depth`` of the chain (0 is the top) over the layers below it, read-only."""
        if not 0 <= depth < len(self.layers):
            raise ImageError(self.path, f"the chain has no layer {depth}")
        return LayerDisk(self.layers, depth)

    def layer_size(self, depth: int) -> int:
        return _layer_size(self.layers[depth])

    # --- writing ----------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self._closed:
            raise ImageError(self.path, "disk is closed")
        if not self.writable:
            raise ReadOnlyError(self.path, "image is open read-only")

    def write(self, offset: int, data) -> None:
        """Write ``data`` at guest ``offset`` (inside the disk) into the top image."""
        self._require_writable()
        if self.writer is not None:
            self.writer.write(offset, data)
        else:
            n = len(memoryview(data).cast("B"))
            if offset < 0 or offset + n > self.size:
                raise ImageError(self.path, f"write of {n} bytes at offset {offset} lies outside"
                                            f" the disk ({self.size} bytes)", errno=_errno.EINVAL)
            self.top.write(offset, data)

    def prepare_in_place(self, offset: int, data):
        """For a write that needs no metadata change (a plain overwrite in place), everything
        but the data write: ``(HostFile, host offset, bytes)`` to write, or None when
        :meth:`write` must do it (see :meth:`Qcow2Writer.prepare_in_place`)."""
        self._require_writable()
        if self.writer is None:
            return None
        return self.writer.prepare_in_place(offset, data)

    def locate_read(self, offset: int, n: int):
        """``(HostFile, host offset)`` where the ``n`` bytes at ``offset`` (inside the disk)
        lie as one run of plain host data of the top image, for a caller that reads them
        itself, from any thread, before any call that changes or frees clusters (the mount's
        barrier); None: read them with :meth:`readinto` (see :meth:`Mapping.locate`)."""
        top = self.top
        if isinstance(top, Qcow2Image):
            return top.active.locate(offset, n)
        f = top.file
        return (f, offset) if offset + n <= f.size else None

    def flush(self) -> None:
        """Everything written so far is durable when this returns."""
        self._require_writable()
        if self.writer is not None:
            self.writer.flush()
        else:
            self.top.flush()

    def discard(self, offset: int, length: int) -> None:
        """Unallocate the whole clusters of ``[offset, offset + length)`` in the top image:
        the guest reads the backing chain there again (zeros without one); internal
        snapshots keep their data. Partial clusters are left as they are (a partial cluster
        at the end of the disk counts as whole). Durable at the next ``flush()``."""
        from qcowfs.image import discard
        discard.discard(self._qcow2_writer("discard"), offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """Make the range read as zeros and give back the top image's clusters there (see
        :func:`qcowfs.image.discard.punch_hole`). Durable at the next ``flush()``."""
        from qcowfs.image import discard
        discard.punch_hole(self._qcow2_writer("punching holes"), offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros: zero clusters where whole clusters are covered (v3),
        zeros written at the edges and on v2. Durable at the next ``flush()``."""
        w = self._qcow2_writer("writing zeroes")
        w.check_usable()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(self.path, f"write of {length} zero bytes at offset {offset} "
                                        f"lies outside the disk ({self.size} bytes)",
                             errno=_errno.EINVAL)
        w.write_zeroes(offset, length)

    def seek(self, offset: int, data: bool) -> int:
        """lseek's SEEK_DATA (``data``) or SEEK_HOLE over the whole chain."""
        from .seek import next_boundary
        return next_boundary(self._status(), offset, data, self.path)

    def _status(self):
        status = getattr(self, "_chain_status", None)
        if status is None:
            from .blockstatus import ChainStatus
            status = self._chain_status = ChainStatus(self.layers)
        return status

    def _qcow2_writer(self, what: str) -> Qcow2Writer:
        self._require_writable()
        if self.writer is None:
            raise UnsupportedError(self.path, f"{what} needs a qcow2 image")
        return self.writer

    def create_snapshot(self, name: str) -> SnapshotInfo:
        """An internal snapshot of the disk as it is now."""
        from qcowfs.image import snapshots
        entry = snapshots.create(self._qcow2_writer("an internal snapshot"), name)
        return SnapshotInfo.from_entry(entry, self.top.header.size)

    def delete_snapshot(self, id_or_name: str) -> None:
        from qcowfs.image import snapshots
        snapshots.delete(self._qcow2_writer("an internal snapshot"), id_or_name)

    def apply_snapshot(self, id_or_name: str) -> None:
        """Revert the disk to a snapshot (its size too, as QEMU 7.2 does)."""
        from qcowfs.image import snapshots
        snapshots.apply(self._qcow2_writer("an internal snapshot"), id_or_name)

    def resize(self, new_size: int, shrink: bool = False) -> None:
        """Grow the disk; shrink it only when ``shrink`` is true."""
        self._require_writable()
        if self.writer is not None:
            from qcowfs.image import resize
            resize.resize(self.writer, new_size, shrink=shrink)
        else:
            if new_size < self.size and not shrink:
                raise ImageError(self.path, "shrinking needs shrink=True", errno=_errno.EINVAL)
            self.top.truncate(new_size)

    def close(self) -> None:
        """A clean close: metadata written, dirty bit cleared, locks released."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.writer is not None:
                self.writer.close()
            elif self.writable:
                self.top.flush()
        finally:
            for layer in self.layers:
                layer.close()


def open_image(path: str, writable: bool = False, *, format: str | None = None,
               l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES, zero_detect: bool = True,
               keys: Keys = None, direct: bool = False) -> Disk:
    """Open ``path`` and its whole backing chain as one guest disk.

    Backing files are always opened read-only; ``writable`` opens the top image read/write.
    ``format`` is 'qcow2' or 'raw' (probed when None). ``zero_detect`` turns writes of all-zero
    buffers into zero clusters (v3). ``keys`` are the passwords of encrypted layers, by depth
    (``{0: b"top's", 1: b"its backing file's"}``, or a list top first). ``direct`` opens
    every file of the chain with O_DIRECT as well: the aligned reads and writes (all guest
    I/O in whole sectors) bypass the host's page cache (the mount's ``-o cache=none``).
    Every problem raises a subclass of
    :class:`qcowfs.ImageError`; an image another process writes raises LockedError.
    """
    layers = open_chain(path, fmt=format, writable=writable, l2_cache_bytes=l2_cache_bytes,
                        keys=keys, direct=direct)
    try:
        lock_chain(layers, write_top=writable)
        return Disk(layers, writable, zero_detect=zero_detect)
    except BaseException:
        for layer in layers:
            layer.close()
        raise


__all__ = ["Disk", "LayerDisk", "SnapshotDisk", "SnapshotInfo", "open_image", "RawImage"]
