"""A stand-in for the write engine: the ``Disk`` interface over a plain raw file, with snapshots
kept in memory, and ENOSPC on demand. It lets the mount's write path (handlers, kernel, locks,
mkdir/rmdir, truncate) be tested through a real mount before the qcow2 writer exists. It proves
nothing about qcow2 writes: tests/test_mount_write.py does that, judged by QEMU.

Run as a script it serves ``IMAGE MOUNTPOINT OPTIONS`` in the foreground with the real daemon.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from qcowfs.chain.disk import SnapshotInfo
from qcowfs.errors import HostIOError, ImageError

#: Writes touching this byte fail with ENOSPC.
ENOSPC_OFFSET = 3 << 20


class _Snap:
    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def readinto(self, buf, off):
        n = max(0, min(len(buf), self.size - off))
        memoryview(buf)[:n] = self.data[off:off + n]
        return n

    def close(self):
        pass


class RawDisk:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.snapshots: list[SnapshotInfo] = []
        self._data: dict[str, bytes] = {}
        self._next_id = 1

    def readinto(self, buf, off):
        n = max(0, min(len(buf), self.size - off))
        view = memoryview(buf)[:n]
        got = os.preadv(self.fd, [view], off)
        view[got:] = bytes(n - got)
        return n

    def write(self, off, data):
        if off <= ENOSPC_OFFSET < off + len(data):
            raise HostIOError(self.path, f"write at offset {off} failed: No space left",
                              errno=errno.ENOSPC)
        os.pwrite(self.fd, data, off)

    def flush(self):
        os.fsync(self.fd)

    def resize(self, size, shrink=False):
        os.ftruncate(self.fd, size)
        self.size = size

    def create_snapshot(self, name):
        sid = str(self._next_id)
        self._next_id += 1
        now = time.time_ns()
        info = SnapshotInfo(id=sid, name=name, size=self.size, date_sec=now // 10**9,
                            date_nsec=now % 10**9, vm_clock=0, vm_state_size=0, icount=None)
        self._data[sid] = os.pread(self.fd, self.size, 0)
        self.snapshots = self.snapshots + [info]
        return info

    def delete_snapshot(self, sid):
        if sid not in self._data:
            raise ImageError(self.path, f"no snapshot {sid}")
        del self._data[sid]
        self.snapshots = [s for s in self.snapshots if s.id != sid]

    def snapshot(self, sid):
        return _Snap(self._data[sid])

    def close(self):
        os.close(self.fd)


if __name__ == "__main__":
    from qcowfs.mount.daemon import MountRequest, serve, setup_logging
    from qcowfs.mount.options import parse_options

    image, mountpoint, options = sys.argv[1:4]
    req = MountRequest(image, mountpoint, parse_options([options]), foreground=True)
    setup_logging(True, False)
    sys.exit(serve(RawDisk(image), os.path.abspath(image), os.path.abspath(mountpoint), req,
                   ready_fd=None))
