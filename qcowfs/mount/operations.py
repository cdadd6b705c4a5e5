"""The pyfuse3 request handlers: a thin adapter between the kernel and the tree and engine.

Why the request path needs no threads and no per-request locking: pyfuse3 runs each request as
a trio task, but every engine call below is synchronous and made *inline*, with no ``await``
between the engine calls of one request. Trio switches tasks only at an ``await``, so each engine
call (a read, an allocating write, a flush, a snapshot) runs from start to end before any other
request's engine call begins: two writes allocating in one L2 table, a flush during writes, a
snapshot during writes can never interleave. ``meta_lock`` (a ``trio.Lock``) keeps that true for
the requests that change metadata (write, fsync, truncate, mkdir, rmdir): each takes it without
waiting when it is free, and any future handler that awaits in the middle of engine work (say, to
move a long job into a thread) must hold it across the await, so the others wait for it (the
daemon runs a single pyfuse3 worker today, see ``daemon.FUSE_WORKERS``; the rule keeps the
handlers correct with more).

Errors: the tree's :class:`FsError` becomes its errno; an :class:`ImageError` becomes its
``errno`` (EIO unless the engine says ENOSPC, EROFS...), logged once with the offset; anything
else is logged with its traceback and answered EIO. No request can stop the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import pyfuse3
import trio

from qcowfs.errors import ImageError
from qcowfs.image.hostfile import aligned_buffer

from .datapool import SLOW_NS, DataPool, read_host
from .mounts import XATTR_IMAGE, XATTR_PID
from .requestloop import request_waiting
from .tree import Attr, FsError, Kind, Tree

log = logging.getLogger("qcowfs.mount")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: The fallocate modes a thin block device takes; anything else is EOPNOTSUPP.
FALLOCATE_MODES = frozenset({0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                             FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE})


def binding_defers_writes() -> bool:
    """Whether this pyfuse3 lets a write be answered later from a thread (qcowfs's second
    patch, pyfuse3.defer_write_reply)."""
    return bool(getattr(pyfuse3, "HANDLES_DEFERRED_WRITES", False))


def binding_defers_reads() -> bool:
    """Whether this pyfuse3 lets a read be answered later from a thread (qcowfs's third
    patch, pyfuse3.defer_read_reply)."""
    return bool(getattr(pyfuse3, "HANDLES_DEFERRED_READS", False))


def binding_has_thin_handlers() -> bool:
    """Whether this pyfuse3 passes fallocate and lseek requests on (qcowfs's patch to it,
    see docs/design.md, "The FUSE binding"); a stock pyfuse3 leaves them to the kernel."""
    return bool(getattr(pyfuse3, "HANDLES_FALLOCATE_LSEEK", False))


class Handle:
    """One open file: what to read (and write) and the node it came from."""

    __slots__ = ("node", "view", "writable", "data")

    def __init__(self, node, view, writable: bool, data: bytes | None = None):
        self.node = node
        self.view = view
        self.writable = writable
        self.data = data


class QcowfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, tree: Tree, *, direct_io: bool, allow_shrink: bool,
                 attr_timeout: float = 1.0, on_init=None, io_threads: int = 0,
                 io_slow_us: int = SLOW_NS // 1000):
        super().__init__()
        self.tree = tree
        self.disk = tree.disk
        self.read_only = tree.read_only
        self.direct_io = direct_io
        self.allow_shrink = allow_shrink
        self.attr_timeout = attr_timeout
        self.meta_lock = trio.Lock()
        self.handles: dict[int, Handle] = {}
        self.snapshot_opens: dict[str, int] = {}
        self._next_fh = 1
        self._on_init = on_init
        self.errors = 0
        self._read_buf = aligned_buffer(1 << 20)
        #: whether preadv(RWF_NOWAIT) works on the image's file system
        self._nowait = True
        #: plain threads for slow in-place writes and reads that wait for the disk
        #: (datapool.py); None: every request inline
        self.pool: DataPool | None = None
        writes = not self.read_only and binding_defers_writes()
        reads = binding_defers_reads()
        if io_threads and (writes or reads):
            self.pool = DataPool(io_threads, slow_ns=io_slow_us * 1000, writes=writes,
                                 reads=reads)

    # --- helpers --------------------------------------------------------------------------

    def init(self) -> None:
        log.debug("FUSE session initialised")
        if not binding_has_thin_handlers():
            log.warning("this pyfuse3 has no fallocate and lseek handlers: discard, "
                        "write-zeroes and SEEK_DATA/SEEK_HOLE are unavailable (see "
                        "docs/mount.md, \"Thin provisioning\")")
        if self._on_init is not None:
            try:
                self._on_init()
            except Exception:
                log.exception("readiness report failed")

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = self.attr_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = 65536
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _fail(self, exc: BaseException, what: str) -> pyfuse3.FUSEError:
        """Turn any exception into the FUSEError to answer, logging engine errors once."""
        if isinstance(exc, pyfuse3.FUSEError):
            return exc
        if isinstance(exc, FsError):
            return pyfuse3.FUSEError(exc.errno)
        self.errors += 1
        if isinstance(exc, ImageError):
            code = exc.errno or errno.EIO
            log.error("%s: %s (answered %s)", what, exc, errno.errorcode.get(code, code))
            return pyfuse3.FUSEError(code)
        log.error("%s: unexpected error, answered EIO", what, exc_info=exc)
        return pyfuse3.FUSEError(errno.EIO)

    async def _lock(self) -> None:
        """Take ``meta_lock`` for a metadata change, and wait for every data write in flight
        (the barrier: see datapool.py)."""
        try:
            self.meta_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.meta_lock.acquire()
        if self.pool is not None:
            self.pool.drain()

    def close_pool(self) -> None:
        """Wait for the writes in flight and stop the pool (before the session closes)."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
            if pool.offloaded or pool.reads_offloaded:
                log.info("%d writes and %d reads ran on the data threads (%d failed)",
                         pool.offloaded, pool.reads_offloaded, pool.failed)

    # --- names and attributes -------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._entry(self.tree.attr(self.tree.lookup(parent_inode, os.fsdecode(name))))
        except Exception as exc:
            raise self._fail(exc, f"lookup {os.fsdecode(name)!r}") from None

    async def getattr(self, inode, ctx=None):
        try:
            return self._entry(self.tree.attr(self.tree.node(inode)))
        except Exception as exc:
            raise self._fail(exc, f"getattr {inode}") from None

    async def setattr(self, inode, attr, fields, fh, ctx):
        try:
            node = self.tree.node(inode)
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise FsError(errno.EPERM)
            if fields.update_size:
                await self._truncate(node, attr.st_size)
            elif fields.update_mtime and node.kind is Kind.DISK:
                if self.read_only:
                    raise FsError(errno.EROFS)
                self.tree.disk_mtime_ns = attr.st_mtime_ns  # touch(1)
            return self._entry(self.tree.attr(node))
        except Exception as exc:
            raise self._fail(exc, f"setattr {inode}") from None

    async def _truncate(self, node, size: int) -> None:
        if node.kind is not Kind.DISK:
            raise FsError(errno.EROFS if node.kind in (Kind.SNAP_DISK, Kind.SNAP_INFO,
                                                       Kind.LAYER_DISK, Kind.LAYER_INFO)
                          else errno.EISDIR)
        if self.read_only:
            raise FsError(errno.EROFS)
        current = self.disk.size
        if size == current:
            return
        if size < current and not self.allow_shrink:
            log.info("refused to shrink the disk from %d to %d bytes (mount with allow_shrink)",
                     current, size)
            raise FsError(errno.EPERM)
        await self._lock()
        try:
            try:
                self.disk.resize(size, shrink=size < current)
            except ImageError as exc:
                raise self._fail(exc, f"resize to {size}") from None
            self.tree.touch_disk()
        finally:
            self.meta_lock.release()
        log.info("disk resized from %d to %d bytes", current, size)

    # --- files ----------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        try:
            node = self.tree.node(inode)
            writing = (flags & os.O_ACCMODE) != os.O_RDONLY
            kind = node.kind
            if kind is Kind.DISK:
                if writing and self.read_only:
                    raise FsError(errno.EROFS)
                if flags & os.O_TRUNC and writing:
                    await self._truncate(node, 0)  # atomic O_TRUNC arrives with open
                handle = Handle(node, self.disk, writing)
                info_direct = self.direct_io
            elif kind is Kind.SNAP_DISK:
                if writing:
                    raise FsError(errno.EROFS)
                view = self.disk.snapshot(node.snap_id)
                handle = Handle(node, view, False)
                self.snapshot_opens[node.snap_id] = self.snapshot_opens.get(node.snap_id, 0) + 1
                info_direct = self.direct_io
            elif kind is Kind.SNAP_INFO:
                if writing:
                    raise FsError(errno.EROFS)
                handle = Handle(node, None, False, self.tree.snaps[node.snap_id].meta_text)
                info_direct = False
            elif kind is Kind.LAYER_DISK:
                if writing:
                    raise FsError(errno.EROFS)
                handle = Handle(node, self.disk.layer(node.depth), False)
                # the top layer changes under writes to disk: never trust a cached copy of it
                info_direct = self.direct_io or node.depth == 0
            elif kind is Kind.LAYER_INFO:
                if writing:
                    raise FsError(errno.EROFS)
                handle = Handle(node, None, False, self.tree.layer_text(node.depth))
                info_direct = False
            else:
                raise FsError(errno.EISDIR)
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = handle
            return pyfuse3.FileInfo(fh=fh, direct_io=info_direct, keep_cache=not info_direct)
        except Exception as exc:
            raise self._fail(exc, f"open {inode}") from None

    async def read(self, fh, off, size):
        handle = self.handles[fh]
        view = handle.view
        if view is None:
            return handle.data[off:off + size]
        # pyfuse3 copies the reply to the kernel as soon as this returns, before any other
        # request runs, so one buffer serves every read (no 1 MiB allocation per request).
        buf = self._read_buf
        if size > len(buf):
            buf = self._read_buf = aligned_buffer(size)
        try:
            pool = self.pool
            if pool is not None and pool.reads and view is self.disk:
                n = max(0, min(size, view.size - off))
                at = view.locate_read(off, n) if n else None
                if at is not None:
                    return self._read_host(pool, at[0], at[1], buf[:n])
            n = view.readinto(buf[:size], off)
        except Exception as exc:
            raise self._fail(exc, f"read of {size} bytes at offset {off}") from None
        return buf[:n]

    def _read_host(self, pool: DataPool, file, host: int, buf: memoryview):
        """A read of one run of host data (``Disk.locate_read``): inline when the page cache
        has it (``RWF_NOWAIT``) or the loop has nothing else to do, else on a data thread
        that answers the kernel itself (datapool.py)."""
        n = len(buf)
        got = 0
        if self._nowait and (file.direct_fd < 0 or (host | n) & (file.align - 1)):
            try:
                got = os.preadv(file.fd, [buf], host, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # this file system cannot tell: every read waits
                log.debug("preadv(RWF_NOWAIT) refused (%s)", exc.strerror)
            if got == n:
                return buf
        if pool.busy(request_waiting):
            pool.submit_read(file, host, n, pyfuse3.defer_read_reply())
            return b""
        read_host(file, buf, host, got)
        return buf

    async def write(self, fh, off, buf):
        handle = self.handles[fh]
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF if not self.read_only else errno.EROFS)
        disk = self.disk
        end = disk.size
        n = len(buf)
        if not n:
            return 0
        if off >= end:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + n > end:
            buf = memoryview(buf)[:end - off]
            n = end - off
        # No await between taking the lock and the engine call: see the module docstring.
        try:
            self.meta_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.meta_lock.acquire()
        pool = self.pool
        try:
            if pool is None or not pool.writes:
                disk.write(off, buf)
            else:
                target = disk.prepare_in_place(off, buf)
                if target is None:
                    pool.drain()  # the barrier: this write may allocate or copy clusters
                    disk.write(off, buf)
                elif pool.wants(request_waiting):
                    file, host, view = target
                    pool.submit(file, host, view, pyfuse3.defer_write_reply(), n)
                else:
                    file, host, view = target
                    t0 = time.perf_counter_ns()
                    file.write(host, view)
                    pool.note(time.perf_counter_ns() - t0)
        except Exception as exc:
            raise self._fail(exc, f"write of {n} bytes at offset {off}") from None
        finally:
            self.meta_lock.release()
        self.tree.touch_disk()
        return n

    async def fallocate(self, fh, mode, off, length):
        """Punch-hole and zero-range as a block device takes them (docs/mount.md)."""
        handle = self.handles[fh]
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if mode not in FALLOCATE_MODES:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        disk = self.disk
        size = disk.size
        if off < 0 or length <= 0 or off >= size:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if off + length > size:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise pyfuse3.FUSEError(errno.EINVAL)
            length = size - off
        if not mode:
            return  # every byte of the disk is already there to write
        if getattr(disk, "writer", None) is None:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # a raw top image
        await self._lock()
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                disk.punch_hole(off, length)
            else:
                disk.write_zeroes(off, length)
        except Exception as exc:
            raise self._fail(exc, f"fallocate mode {mode:#x} of {length} bytes at offset "
                                  f"{off}") from None
        finally:
            self.meta_lock.release()
        self.tree.touch_disk()

    async def lseek(self, fh, off, whence):
        """SEEK_DATA and SEEK_HOLE: the allocation of the whole chain."""
        handle = self.handles[fh]
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        data = whence == os.SEEK_DATA
        view = handle.view
        if view is None:  # an info file: all data
            if off >= len(handle.data):
                raise pyfuse3.FUSEError(errno.ENXIO)
            return off if data else len(handle.data)
        try:
            return view.seek(off, data)
        except ImageError as exc:
            if exc.errno == errno.ENXIO:
                raise pyfuse3.FUSEError(errno.ENXIO) from None
            raise self._fail(exc, f"lseek to offset {off}") from None
        except Exception as exc:
            raise self._fail(exc, f"lseek to offset {off}") from None

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        handle = self.handles.get(fh)
        if handle is None or handle.node.kind is not Kind.DISK or self.read_only:
            return
        await self._lock()
        try:
            self.disk.flush()
        except Exception as exc:
            raise self._fail(exc, "flush") from None
        finally:
            self.meta_lock.release()

    async def release(self, fh):
        handle = self.handles.pop(fh, None)
        if handle is None or handle.node.kind is not Kind.SNAP_DISK:
            return
        sid = handle.node.snap_id
        left = self.snapshot_opens.get(sid, 1) - 1
        if left:
            self.snapshot_opens[sid] = left
        else:
            self.snapshot_opens.pop(sid, None)
        try:
            handle.view.close()
        except Exception as exc:
            self._fail(exc, f"close of snapshot {sid}")

    # --- directories ----------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        try:
            node = self.tree.node(inode)
            if node.kind not in (Kind.ROOT, Kind.SNAPSHOTS, Kind.SNAP_DIR, Kind.LAYERS,
                                 Kind.LAYER_DIR):
                raise FsError(errno.ENOTDIR)
            return inode
        except Exception as exc:
            raise self._fail(exc, f"opendir {inode}") from None

    async def readdir(self, fh, start_id, token):
        try:
            entries = self.tree.listdir(fh)
            for i in range(start_id, len(entries)):
                name, node = entries[i]
                if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                             self._entry(self.tree.attr(node)), i + 1):
                    break
        except Exception as exc:
            raise self._fail(exc, f"readdir {fh}") from None

    async def releasedir(self, fh):
        pass

    async def mkdir(self, parent_inode, name, mode, ctx):
        try:
            if parent_inode != self.tree.snapshots_node.ino:
                raise FsError(errno.EROFS if self.read_only else errno.EPERM)
            if self.read_only:
                raise FsError(errno.EROFS)
            text = os.fsdecode(name)
            if text in self.tree.snap_names or text in (".", ".."):
                raise FsError(errno.EEXIST)
            await self._lock()
            try:
                info = self.disk.create_snapshot(text)
            finally:
                self.meta_lock.release()
            self._snapshots_changed()
            log.info("took snapshot %s (id %s)", info.name, info.id)
            return self._entry(self.tree.attr(self.tree.snaps[info.id].dir))
        except Exception as exc:
            raise self._fail(exc, f"snapshot {os.fsdecode(name)!r}") from None

    async def rmdir(self, parent_inode, name, ctx):
        try:
            parent = self.tree.node(parent_inode)
            if parent.kind is not Kind.SNAPSHOTS:
                raise FsError(errno.EROFS if self.read_only else errno.EPERM)
            if self.read_only:
                raise FsError(errno.EROFS)
            nodes = self.tree.snapshot_by_dir_name(os.fsdecode(name))
            sid = nodes.info.id
            if self.snapshot_opens.get(sid):
                raise FsError(errno.EBUSY)
            await self._lock()
            try:
                self.disk.delete_snapshot(sid)
            finally:
                self.meta_lock.release()
            self._snapshots_changed(deleted=name)
            log.info("deleted snapshot %s (id %s)", nodes.info.name, sid)
        except Exception as exc:
            raise self._fail(exc, f"delete snapshot {os.fsdecode(name)!r}") from None

    def _snapshots_changed(self, deleted: bytes | None = None) -> None:
        for stale in self.tree.refresh_snapshots():
            raw = os.fsencode(stale)
            if raw == deleted:
                continue
            try:
                pyfuse3.invalidate_entry_async(self.tree.snapshots_node.ino, raw,
                                               ignore_enoent=True)
            except Exception:
                log.debug("invalidate %r failed", stale, exc_info=True)

    # --- everything else ------------------------------------------------------------------

    async def statfs(self, ctx):
        try:
            st = self.tree.host_statvfs()
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out

    async def getxattr(self, inode, name, ctx):
        if inode == self.tree.root.ino:
            if name == XATTR_PID:
                return str(os.getpid()).encode()
            if name == XATTR_IMAGE:
                return os.fsencode(self.tree.image_path)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return [XATTR_PID, XATTR_IMAGE] if inode == self.tree.root.ino else []

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def access(self, inode, mode, ctx):
        return True

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EROFS if self.read_only else errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EROFS if self.read_only else errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS if self.read_only else errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EROFS if self.read_only else errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EROFS if self.read_only else errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS if self.read_only else errno.EPERM)


__all__ = ["QcowfsOperations", "XATTR_PID", "XATTR_IMAGE"]
