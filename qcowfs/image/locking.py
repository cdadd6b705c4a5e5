"""QEMU's image locks: one-byte OFD locks at offsets 100+i and 200+i of the image file.

Byte 100+i is held while the opener *has* permission i; byte 200+i while it does *not share*
permission i (i: 0 consistent read, 1 write, 2 write-unchanged, 3 resize). Holding the same bytes
QEMU holds means QEMU refuses to open an image qcowfs writes (unless forced to share with -U),
and qcowfs refuses images QEMU writes. OFD locks belong to the open file description: they last
as long as the image's own file descriptor and vanish when the holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import struct
from enum import Enum

from qcowfs.errors import HostIOError, LockedError

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86-64/aarch64: 32 bytes

PERM_BASE = 100
SHARED_BASE = 200
PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 0, 1, 2, 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
_READ = frozenset({PERM_CONSISTENT_READ})
_READ_WRITE_RESIZE = frozenset({PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE})
_NO_WRITERS = frozenset({PERM_WRITE, PERM_RESIZE})


class LockMode(Enum):
    """(permissions taken, permissions not shared) for each way qcowfs opens a file."""

    WRITE = (_READ_WRITE_RESIZE, _NO_WRITERS)
    READ = (_READ, _NO_WRITERS)  # a read-only open, and every backing file

    @property
    def perms(self) -> frozenset[int]:
        return self.value[0]

    @property
    def unshared(self) -> frozenset[int]:
        return self.value[1]


def _flock(fd: int, cmd: int, kind: int, start: int) -> int:
    packed = _FLOCK.pack(kind, 0, start, 1, 0)
    result = fcntl.fcntl(fd, cmd, packed)
    return _FLOCK.unpack(result)[0]


def lock_bytes(mode: LockMode) -> list[int]:
    return sorted([PERM_BASE + i for i in mode.perms] + [SHARED_BASE + i for i in mode.unshared])


def acquire(fd: int, path: str, mode: LockMode) -> None:
    """Take ``mode``'s bytes on ``fd``, then check nobody else conflicts (QEMU's order).
    Raises LockedError naming what another process holds; then the bytes are released."""
    try:
        for byte in lock_bytes(mode):
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
        for i in sorted(mode.perms):
            if _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + i) != fcntl.F_UNLCK:
                raise LockedError(path, f'failed to get "{PERM_NAMES[i]}" lock: is another '
                                        f"process (QEMU or qcowfs) using the image?")
        for i in sorted(mode.unshared):
            if _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + i) != fcntl.F_UNLCK:
                raise LockedError(path, f'failed to get shared "{PERM_NAMES[i]}" lock: is '
                                        f"another process (QEMU or qcowfs) using the image?")
    except LockedError:
        release(fd)
        raise
    except OSError as exc:
        release(fd)
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            return  # the file system has no OFD locks: QEMU's locking=auto goes without too
        raise HostIOError.from_oserror(path, exc, "cannot take the image lock") from None


def release(fd: int) -> None:
    """Drop every lock byte qcowfs may hold on ``fd`` (closing the fd does the same)."""
    for byte in [PERM_BASE + i for i in PERM_NAMES] + [SHARED_BASE + i for i in PERM_NAMES]:
        try:
            _flock(fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
        except OSError:
            pass


def holders(fd: int) -> dict[int, bool]:
    """Which lock bytes someone other than ``fd``'s own description holds (for diagnostics)."""
    out = {}
    for byte in [PERM_BASE + i for i in PERM_NAMES] + [SHARED_BASE + i for i in PERM_NAMES]:
        out[byte] = _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK
    return out
