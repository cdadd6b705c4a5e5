"""A raw image file: a backing file, a convert source or target. The guest disk is the file."""

from __future__ import annotations

import errno
import os

from qcowfs.errors import HostIOError, ImageError, ReadOnlyError
from qcowfs.format.probe import PROBE_SIZE, announced_format
from qcowfs.format.tables import ClusterKind
from qcowfs.image.hostfile import HostFile
from qcowfs.image.mapping import Extent, FillFn, zero_fill


class RawImage:
    format = "raw"

    def __init__(self, path: str, file: HostFile, *, probed: bool = False):
        self.path = path
        self.file = file
        self.writable = file.writable
        #: The format was probed, not given: writes must not make it probe as another one.
        self.probed = probed

    @classmethod
    def open(cls, path: str, *, writable: bool = False, probed: bool = False,
             direct: bool = False) -> RawImage:
        return cls(path, HostFile(path, writable, direct=direct), probed=probed)

    @property
    def size(self) -> int:
        return self.file.size

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and holes as the host file system reports them (SEEK_DATA/SEEK_HOLE); holes
        read as zeros."""
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        fd = self.file.fd
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    data = end
                else:
                    out.append(Extent(pos, end - pos, ClusterKind.NORMAL, pos))
                    break
            data = min(data, end)
            if data > pos:
                out.append(Extent(pos, data - pos, ClusterKind.ZERO))
                pos = data
                if pos >= end:
                    break
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(hole, end)
            out.append(Extent(pos, hole - pos, ClusterKind.NORMAL, pos))
            pos = hole
        return out

    def readinto(self, buf: memoryview, offset: int, fill: FillFn = zero_fill) -> None:
        got = self.file.readinto(buf, offset)
        if got < len(buf):
            zero_fill(buf[got:])

    def write(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise ReadOnlyError(self.path, "image is open read-only")
        if self.probed and offset < PROBE_SIZE and len(data):
            self._check_first_sector(offset, data)
        self.file.write(offset, data)

    def _check_first_sector(self, offset: int, data) -> None:
        """Refuse a write that would make the first sector announce another format (QEMU's
        rule for probed raw images; see qcowfs.format.probe)."""
        sector = bytearray(self.file.read(0, PROBE_SIZE).ljust(PROBE_SIZE, b"\0"))
        view = memoryview(data).cast("B")
        part = view[:PROBE_SIZE - offset]
        sector[offset:offset + len(part)] = part
        fmt = announced_format(bytes(sector))
        if fmt is not None:
            raise ImageError(self.path, f"write to the first sector refused: the image would "
                                        f"look like a {fmt} image (its format was probed; "
                                        f"give the format raw to allow this)",
                             errno=errno.EPERM)

    def flush(self) -> None:
        self.file.sync()

    def truncate(self, size: int) -> None:
        self.file.truncate(size)

    def close(self) -> None:
        self.file.close()


__all__ = ["RawImage", "HostIOError"]
