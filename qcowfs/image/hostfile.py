"""A host file under an image: positional I/O that turns OSError into HostIOError."""

from __future__ import annotations

import os
import stat

from qcowfs.errors import FormatError, HostIOError, UnsupportedError

# Offsets from a hostile header can exceed what a file offset (off_t) holds; reads there are
# past the end of any file.
MAX_FILE_OFFSET = 1 << 63


_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02
_fallocate = None


def _libc_fallocate():
    """libc's fallocate(2) wrapper (os has no mode argument), or None where there is none."""
    global _fallocate
    if _fallocate is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
        except (OSError, AttributeError):
            _fallocate = False
            return None
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate = fn
    return _fallocate or None


class HostFile:
    """An open file descriptor with exact positional reads and writes.

    Short reads only happen at the end of the file; ``read_exact`` turns them into a
    FormatError because a table that runs past the end of the file is a broken image.
    """

    def __init__(self, path: str, writable: bool = False):
        self.path = path
        self.writable = writable
        # O_NONBLOCK: opening a FIFO that a hostile backing name points at must not wait for
        # a writer; anything but a regular file or a block device is refused below.
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise HostIOError.from_oserror(path, exc, "cannot open") from None
        try:
            mode = os.fstat(self.fd).st_mode
            self.is_block_device = stat.S_ISBLK(mode)
            if not (stat.S_ISREG(mode) or self.is_block_device):
                raise UnsupportedError(path, "not a regular file or a block device")
            os.set_blocking(self.fd, True)
            self._size = self._stat_size()
        except OSError as exc:
            self.close()
            raise HostIOError.from_oserror(path, exc, "cannot stat") from None
        except BaseException:
            self.close()
            raise

    def _stat_size(self) -> int:
        try:
            if self.is_block_device:
                # stat says 0 for a block device; its size is where its end is.
                return os.lseek(self.fd, 0, os.SEEK_END)
            return os.fstat(self.fd).st_size
        except OSError as exc:
            raise HostIOError.from_oserror(self.path, exc, "cannot stat") from None

    @property
    def size(self) -> int:
        """The file's size as last seen (kept current by this object's own writes)."""
        return self._size

    def refresh_size(self) -> int:
        self._size = self._stat_size()
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer only at the end of the file."""
        if offset >= MAX_FILE_OFFSET:
            return b""  # no file reaches there (os.pread would raise OverflowError)
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) < length and data:
                parts = [data]
                got = len(data)
                while got < length:
                    more = os.pread(self.fd, length - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            return data
        except OSError as exc:
            raise HostIOError.from_oserror(self.path, exc, f"read at offset {offset} failed") \
                from None

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        data = self.read(offset, length)
        if len(data) != length:
            raise FormatError(self.path, f"{what} at offset {offset} runs past the end of the file")
        return data

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns how many bytes came (less only at EOF)."""
        if offset >= MAX_FILE_OFFSET:
            return 0
        total = 0
        want = len(buf)
        try:
            while total < want:
                n = os.preadv(self.fd, [buf[total:]], offset + total)
                if n == 0:
                    break
                total += n
        except OSError as exc:
            raise HostIOError.from_oserror(self.path, exc, f"read at offset {offset} failed") \
                from None
        return total

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise HostIOError.from_oserror(self.path, exc, f"write at offset {offset} failed") \
                from None
        end = offset + len(view)
        if end > self._size:
            self._size = end

    def writev(self, offset: int, buffers: list) -> None:
        """Write ``buffers`` back to back from ``offset`` (one pwritev when it goes through)."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        total = sum(len(v) for v in views)
        done = 0
        try:
            while done < total:
                n = os.pwritev(self.fd, views, offset + done)
                done += n
                if done < total:
                    skip = n
                    while skip and skip >= len(views[0]):
                        skip -= len(views[0])
                        views.pop(0)
                    if skip:
                        views[0] = views[0][skip:]
        except OSError as exc:
            raise HostIOError.from_oserror(self.path, exc, f"write at offset {offset} failed") \
                from None
        end = offset + total
        if end > self._size:
            self._size = end

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise HostIOError.from_oserror(self.path, exc, "fsync failed") from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise HostIOError.from_oserror(self.path, exc, f"truncate to {size} failed") from None
        self._size = size

    def punch_hole(self, offset: int, length: int) -> bool:
        """Give the host space of ``[offset, offset + length)`` back (the range then reads as
        zeros; the size stays), as QEMU discards freed clusters. Best effort, as in QEMU: a
        file system that cannot punch holes, or a block device, keeps its space. Returns
        whether the hole was punched."""
        if self.is_block_device or length <= 0:
            return False
        fallocate = _libc_fallocate()
        if fallocate is None:
            return False
        return fallocate(self.fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length) == 0

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1
