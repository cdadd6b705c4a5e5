#!/usr/bin/env python3
"""The ceiling ``make bench`` measures qcowfs against: a pyfuse3 file system that exposes one
raw file as ``MOUNTPOINT/disk`` and serves each read and write with one inline ``preadv`` or
``pwrite``, through the same request loop and FUSE options as qcowfs (direct I/O on). What
qcowfs costs beyond it is the qcow2 translation.

Usage: passthrough.py FILE MOUNTPOINT   (foreground; stop it with ``fusermount3 -u``)
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcowfs.mount import requestloop  # noqa: E402
from qcowfs.mount.options import MountOptions  # noqa: E402

DISK_INO = 2


class Passthrough(pyfuse3.Operations):
    def __init__(self, path: str):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.buf = memoryview(bytearray(1 << 20))

    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.attr_timeout = e.entry_timeout = 1.0
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, self.size
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"disk":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(DISK_INO)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"disk", await self.getattr(DISK_INO), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=DISK_INO, direct_io=True)

    async def read(self, fh, off, size):
        buf = self.buf if size <= len(self.buf) else memoryview(bytearray(size))
        n = os.preadv(self.fd, [buf[:size]], off)
        return buf[:n]

    async def write(self, fh, off, buf):
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):
        os.fdatasync(self.fd)


def main() -> None:
    ops = Passthrough(sys.argv[1])
    pyfuse3.init(ops, sys.argv[2], {"fsname=passthrough", "default_permissions"})
    requestloop.install(MountOptions().poll_us)
    try:
        trio.run(pyfuse3.main, 1, 1)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
