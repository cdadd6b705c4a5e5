"""A host file under an image: positional I/O that turns OSError into HostIOError.

Opened with ``direct=True`` (the mount's ``-o cache=none``) a HostFile keeps a second
descriptor opened with O_DIRECT beside the buffered one, and every read and write whose offset
and length are multiples of the file's direct I/O alignment goes through it, so the host's page
cache holds none of the image's data. The source or target memory is used as it is when the
kernel takes it (a page-aligned ``mmap`` buffer, as the mount reads into) and is copied through
an aligned bounce buffer otherwise. Requests the alignment does not allow (a header field, a
refcount entry, a sub-sector guest write) go through the buffered descriptor: the kernel keeps
the two coherent (a direct read writes back cached dirty pages of its range first, a direct
write drops the cached pages it overwrites), and this object never has two requests in flight.
"""

from __future__ import annotations

import errno
import os
import stat

from qcowfs.errors import FormatError, HostIOError, UnsupportedError

# Offsets from a hostile header can exceed what a file offset (off_t) holds; reads there are
# past the end of any file.
MAX_FILE_OFFSET = 1 << 63
#: The alignments O_DIRECT may need, smallest first: a probe at open picks the first that works.
DIRECT_ALIGNMENTS = (512, 4096)


def aligned_buffer(size: int) -> memoryview:
    """``size`` writable bytes (rounded up to whole pages) at a page-aligned address, which
    O_DIRECT takes as they are."""
    import mmap  # only for O_DIRECT and the writer: not at every CLI start
    pages = max(1, -(-size // mmap.PAGESIZE)) * mmap.PAGESIZE
    return memoryview(mmap.mmap(-1, pages))


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

    def __init__(self, path: str, writable: bool = False, *, direct: bool = False):
        self.path = path
        self.writable = writable
        #: the O_DIRECT descriptor (-1 when the file is buffered only) and its alignment
        self.direct_fd = -1
        self.align = 0
        self._bounce: memoryview | None = None
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
        if direct:
            self._open_direct(flags & ~os.O_NONBLOCK)

    def _open_direct(self, flags: int) -> None:
        """The O_DIRECT descriptor, and the smallest alignment a probe read accepts."""
        try:
            self.direct_fd = os.open(f"/proc/self/fd/{self.fd}", flags | os.O_DIRECT)
        except OSError as exc:
            self.close()
            raise HostIOError.from_oserror(self.path, exc, "cannot open with O_DIRECT "
                                           "(cache=none)") from None
        probe = aligned_buffer(DIRECT_ALIGNMENTS[-1])
        for align in DIRECT_ALIGNMENTS:
            try:
                os.preadv(self.direct_fd, [probe[:align]], 0)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    continue
                self.close()
                raise HostIOError.from_oserror(self.path, exc, "O_DIRECT read failed") \
                    from None
            self.align = align
            return
        self.close()
        raise HostIOError(self.path, "the file system takes no O_DIRECT reads of "
                                     f"{DIRECT_ALIGNMENTS[-1]} bytes (cache=none)")

    @property
    def direct(self) -> bool:
        return self.direct_fd >= 0

    def _aligned(self, offset: int, length: int) -> bool:
        return self.direct_fd >= 0 and not (offset | length) & (self.align - 1) and length > 0

    def _bounce_buffer(self, length: int) -> memoryview:
        buf = self._bounce
        if buf is None or len(buf) < length:
            buf = self._bounce = aligned_buffer(max(length, 1 << 20))
        return buf[:length]

    def _direct_readinto(self, buf: memoryview, offset: int) -> int:
        """One O_DIRECT read of aligned ``offset`` and ``len(buf)`` into ``buf`` (through the
        bounce buffer when the kernel refuses its address); what lies past the end of the
        file comes through the buffered descriptor (it returns nothing there)."""
        want = len(buf)
        try:
            got = os.preadv(self.direct_fd, [buf], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            bounce = self._bounce_buffer(want)
            try:
                got = os.preadv(self.direct_fd, [bounce], offset)
            except OSError as again:
                if again.errno != errno.EINVAL:
                    raise
                got = 0  # not for O_DIRECT after all: the buffered way below
            else:
                buf[:got] = bounce[:got]
            if not got:
                got = os.preadv(self.fd, [buf], offset)
        while 0 < got < want:
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if not n:
                break
            got += n
        return got

    def _direct_write(self, offset: int, views: list[memoryview], total: int) -> None:
        """``views`` (``total`` bytes, aligned offset and length) in one O_DIRECT write from
        the bounce buffer."""
        bounce = self._bounce_buffer(total)
        pos = 0
        for v in views:
            bounce[pos:pos + len(v)] = v
            pos += len(v)
        done = 0
        while done < total:
            try:
                n = os.pwritev(self.direct_fd, [bounce[done:]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                n = 0
            if n <= 0 or n & (self.align - 1):
                # A short write at an unaligned point: the rest goes the buffered way.
                done += n
                while done < total:
                    done += os.pwrite(self.fd, bounce[done:total], offset + done)
                return
            done += n

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
        if self._aligned(offset, length):
            buf = self._bounce_buffer(length)
            try:
                n = self._direct_readinto(buf, offset)
            except OSError as exc:
                raise HostIOError.from_oserror(self.path, exc, f"read at offset {offset} "
                                                               f"failed") from None
            return bytes(buf[:n])
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
            if self._aligned(offset, want):
                return self._direct_readinto(buf, offset)
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
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        done = 0
        try:
            if self._aligned(offset, len(view)):
                self._direct_write(offset, [view], len(view))
                done = len(view)
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
            if self._aligned(offset, total):
                self._direct_write(offset, views, total)
                done = total
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
        """Make what was written durable: the data and what finding it needs (the size),
        not the timestamps (``fdatasync``, as QEMU flushes; ``fsync`` also commits the
        journal for the inode's times on every call)."""
        try:
            os.fdatasync(self.fd)
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
        if self.direct_fd >= 0:
            try:
                os.close(self.direct_fd)
            finally:
                self.direct_fd = -1
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1
