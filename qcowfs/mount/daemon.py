"""The daemon's life: check, detach, mount, serve, and close cleanly however it ends.

    qcowfs mount IMAGE MNT
      parent: open the image and its chain (locks taken), check MNT, fork, wait on a pipe
      child:  setsid, pyfuse3.init (the kernel mount), trio.run(pyfuse3.main)
              FUSE_INIT arrives -> "ok" down the pipe, READY=1 to systemd; the parent exits 0
              SIGTERM / SIGINT  -> STOPPING=1, pyfuse3.terminate()
              fusermount3 -u    -> the kernel ends the session, pyfuse3.main returns
              either way        -> unmount (lazy, if still mounted), flush and close the
                                   image (dirty bit clear, locks released), exit

Everything that can fail before serving fails in the parent, or in the child before the
readiness report, and comes back as one line on the parent's stderr. The parent never closes
the image it opened: the child owns it (and the locks on it) from the fork on, so the parent
leaves with ``os._exit``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass

import pyfuse3
import trio

from qcowfs.chain.disk import open_image
from qcowfs.errors import ImageError, KeyRequiredError
from qcowfs.format.probe import PROBE_SIZE, announced_format

from . import requestloop
from .operations import QcowfsOperations
from .options import MountOptions
from .tree import Tree

log = logging.getLogger("qcowfs.mount")

READY = b"ok\n"
#: pyfuse3 worker tasks. Every handler does its engine work inline without awaiting, so requests
#: are served one after the other whatever the count; more workers only add task hand-offs
#: (measured: 4k random reads 1.2x to 2x faster with one, at queue depth 1 and 16).
FUSE_WORKERS = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early_signals: list[int] = []
TRACED = ("lookup", "getattr", "setattr", "open", "read", "write", "fsync", "release",
          "opendir", "readdir", "mkdir", "rmdir", "statfs", "getxattr")


class MountError(Exception):
    """Mounting failed before the file system went live: ``what`` failed because ``why``."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")
        self.what = what
        self.why = why


@dataclass
class MountRequest:
    image: str
    mountpoint: str
    options: MountOptions
    foreground: bool = False
    debug: bool = False


# --- systemd notification ---------------------------------------------------------------------

def sd_notify(message: str) -> None:
    """Send ``message`` (e.g. READY=1) to systemd when NOTIFY_SOCKET is set; never fails."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)


# --- logging ----------------------------------------------------------------------------------

def setup_logging(foreground: bool, debug: bool) -> None:
    """stderr in the foreground; syslog (the journal on systemd machines) when detached."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qcowfs: %(levelname)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # only the detached daemon logs to syslog

        handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"qcowfs[{os.getpid()}]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.WARNING)


def enable_tracing(ops: QcowfsOperations) -> None:
    """--debug: log every request and its outcome."""
    for name in TRACED:
        method = getattr(ops, name)

        def traced(*args, _method=method, _name=name):
            return _trace(_name, _method, args)

        setattr(ops, name, traced)


async def _trace(name: str, method, args: tuple):
    shown = ", ".join(_short(a) for a in args if not _is_context(a))
    try:
        result = await method(*args)
    except pyfuse3.FUSEError as exc:
        log.debug("%s(%s) -> %s", name, shown, errno.errorcode.get(exc.errno, exc.errno))
        raise
    log.debug("%s(%s) -> %s", name, shown, _short(result))
    return result


def _is_context(a) -> bool:
    return isinstance(a, (pyfuse3.RequestContext, pyfuse3.ReaddirToken))


def _short(a) -> str:
    if isinstance(a, (bytes, bytearray, memoryview)):
        return f"<{len(a)} bytes>" if len(a) > 64 else repr(bytes(a))
    if isinstance(a, pyfuse3.EntryAttributes):
        return f"ino={a.st_ino} size={a.st_size}"
    if isinstance(a, pyfuse3.FileInfo):
        return f"fh={a.fh}"
    return repr(a)


# --- checks and opening -----------------------------------------------------------------------

def check_mountpoint(path: str, nonempty: bool = False) -> str:
    """The mount point as an absolute path: an existing directory, and an empty one unless
    ``nonempty`` (libfuse 2's rule, which fuse3 dropped: a mount over files hides them)."""
    full = os.path.abspath(path)
    try:
        st = os.stat(full)
    except OSError as exc:
        raise MountError(path, exc.strerror or str(exc)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(path, "not a directory")
    if not nonempty:
        try:
            with os.scandir(full) as entries:
                busy = next(entries, None) is not None
        except OSError as exc:
            raise MountError(path, exc.strerror or str(exc)) from None
        if busy:
            raise MountError(path, "mount point is not empty (give -o nonempty to mount over "
                                   "its files and hide them)")
    return full


def check_format(image: str, opts: MountOptions, shown: str) -> None:
    """Without ``-o format=``, serve only what probes as qcow2: a text file or a partition
    dump mounted read/write by mistake would be written into."""
    if opts.format is not None:
        return
    try:
        with open(image, "rb") as f:
            head = f.read(PROBE_SIZE)
    except OSError as exc:
        raise MountError(shown, exc.strerror or str(exc)) from None
    probed = announced_format(head) or "raw"
    if probed != "qcow2":
        raise MountError(shown, f"not a qcow2 image (probed {probed}); give -o format=raw to "
                                f"serve it as a raw disk")


def open_disk(image: str, opts: MountOptions):
    """Open the image and its whole chain as the mount will serve it (locks taken here).

    An encrypted layer takes its key from ``-o key_file=`` (the file's bytes, as QEMU reads a
    secret ``file=``) or, with a terminal on stdin, from a prompt without echo; either key
    opens every encrypted layer of the chain. This runs before the daemon detaches."""
    kwargs = {}
    if opts.l2_cache_bytes is not None:
        kwargs["l2_cache_bytes"] = opts.l2_cache_bytes
    key = _read_key_file(opts.key_file) if opts.key_file else None

    def attempt(key: bytes | None):
        keys = _SameKey(key) if key is not None else None
        return open_image(image, writable=not opts.read_only, format=opts.format,
                          zero_detect=opts.zero_detect, keys=keys,
                          direct=opts.cache == "none", **kwargs)

    try:
        return attempt(key)
    except KeyRequiredError as exc:
        if key is not None or not sys.stdin.isatty():
            raise MountError(exc.path or image, "the image is encrypted: give its key with "
                                                "-o key_file=PATH") from None
    import getpass
    typed = getpass.getpass(f"Password for {image}: ").encode()
    return attempt(typed.split(b"\0", 1)[0])


class _SameKey(dict):
    """One key for every depth of the chain."""

    def __init__(self, key: bytes):
        super().__init__()
        self.key = key

    def get(self, depth, default=None):
        return self.key


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as exc:
        raise MountError(path, f"cannot read key file: {exc.strerror}") from None
    return raw.split(b"\0", 1)[0]


# --- the daemon -------------------------------------------------------------------------------

def mount(req: MountRequest) -> int:
    """Run ``qcowfs mount``. In the foreground: serve, return the exit code after unmount.
    Detached: return (via ``os._exit`` in the parent) once the mount is live or has failed."""
    image = os.path.abspath(req.image)
    check_format(image, req.options, req.image)
    mountpoint = check_mountpoint(req.mountpoint, req.options.nonempty)
    disk = open_disk(image, req.options)
    if req.foreground:
        setup_logging(True, req.debug)
        return serve(disk, image, mountpoint, req, ready_fd=None)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        _parent_wait(read_end, pid, mountpoint)  # never returns
    os.close(read_end)
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        _close_inherited_fds()
        setup_logging(False, req.debug)
        code = serve(disk, image, mountpoint, req, ready_fd=write_end)
    except BaseException:
        log.exception("daemon failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _parent_wait(read_end: int, pid: int, mountpoint: str) -> None:
    """The detaching parent: exit 0 once the child reports the mount live, else print the
    child's one-line reason and exit 1. The parent's copy of the image is left to the child."""
    chunks = []
    while True:
        try:
            data = os.read(read_end, 4096)
        except InterruptedError:
            continue
        if not data:
            break
        chunks.append(data)
    message = b"".join(chunks)
    if message.startswith(READY):
        sys.stdout.flush()
        os._exit(0)
    text = message.decode(errors="replace").strip()
    if not text:
        try:
            _, status = os.waitpid(pid, 0)
            text = f"{mountpoint}: the daemon exited before the mount was ready " \
                   f"(status {status})"
        except ChildProcessError:
            text = f"{mountpoint}: the daemon exited before the mount was ready"
    print(f"qcowfs: mount: {text}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def _fuse_init(ops: QcowfsOperations, mountpoint: str, fuse_opts: set[str]) -> None:
    """pyfuse3.init, with libfuse's own complaint (printed on fd 2) caught for the message."""
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, fuse_opts)
        except RuntimeError as exc:
            os.dup2(saved, 2)
            capture.seek(0)
            said = [ln.strip() for ln in capture.read().decode(errors="replace").splitlines()
                    if ln.strip()]
            why = said[-1] if said else str(exc)
            for prefix in ("fuse: ", "fusermount3: "):
                why = why.removeprefix(prefix)
            raise MountError(mountpoint, why) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _reuse_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next request: blocks below 4 MiB come
    from the heap, not from a fresh mmap, and up to 32 MiB of free heap is kept. A 1 MiB
    request allocates a few 1 MiB buffers (pyfuse3's write buffer, the cipher's arrays);
    fresh mappings fault in their 256 pages every time (page faults and clearing were 15%
    of the daemon's samples on 1 MiB LUKS writes). Nothing where the C library is not glibc."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 32 << 20)


def serve(disk, image: str, mountpoint: str, req: MountRequest, ready_fd: int | None) -> int:
    """Mount, serve until unmounted or signalled, then close the image. Returns the exit
    code; failures before the mount is live go to ``ready_fd`` (detached) or raise."""
    opts = req.options
    _reuse_freed_memory()
    uid, gid = opts.owner()
    tree = Tree(disk, image, read_only=opts.read_only, uid=uid, gid=gid, umask=opts.umask)
    state = {"ready": False}

    def report_ready() -> None:
        state["ready"] = True
        log.info("mounted %s on %s (%s)", image, mountpoint,
                 "read-only" if opts.read_only else "read/write")
        if ready_fd is not None:
            try:
                os.write(ready_fd, READY)
                os.close(ready_fd)
            except OSError:
                pass
        sd_notify("READY=1\nSTATUS=serving " + mountpoint)

    ops = QcowfsOperations(tree, direct_io=opts.direct_io, allow_shrink=opts.allow_shrink,
                           attr_timeout=opts.attr_timeout, on_init=report_ready,
                           io_threads=opts.io_threads, io_slow_us=opts.io_slow_us)
    if req.debug:
        enable_tracing(ops)
    for signum in STOP_SIGNALS:  # until trio takes over: remember, do not die mid-mount
        signal.signal(signum, lambda n, _frame: _early_signals.append(n))
    try:
        _fuse_init(ops, mountpoint, opts.fuse_options(image))
    except MountError as exc:
        ops.close_pool()
        tree.close()
        _close_disk(disk, opts, quiet=True)
        if ready_fd is None:
            raise
        os.write(ready_fd, str(exc).encode() + b"\n")
        return 1
    if ready_fd is not None:
        _detach_stdio()
    code = 0
    if opts.fast_loop:
        requestloop.install(opts.poll_us)
    try:
        trio.run(_serve_until_done, mountpoint)
    except BaseException as exc:
        code = 1
        log.error("the FUSE loop failed: %s", exc, exc_info=exc)
    finally:
        sd_notify("STOPPING=1")
        ops.close_pool()  # every deferred write answered before the session goes
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:
            log.error("unmount failed: %s", exc)
        tree.close()
        if not _close_disk(disk, opts):
            code = 1
        if ops.errors:
            log.info("%d requests failed while mounted", ops.errors)
    if not state["ready"] and ready_fd is not None:
        try:
            os.write(ready_fd, f"{mountpoint}: the FUSE session ended before it "
                               f"started".encode())
        except OSError:
            pass
    return code


async def _serve_until_done(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals, mountpoint)
        await pyfuse3.main(min_tasks=1, max_tasks=FUSE_WORKERS)
        log.info("%s unmounted", mountpoint)
        nursery.cancel_scope.cancel()


async def _on_signals(mountpoint: str) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if _early_signals:
            log.info("%s before the mount was live: unmounting %s",
                     signal.Signals(_early_signals[0]).name, mountpoint)
            pyfuse3.terminate()
            return
        async for signum in signals:
            log.info("%s: unmounting %s", signal.Signals(signum).name, mountpoint)
            sd_notify("STOPPING=1")
            pyfuse3.terminate()
            return


def _close_disk(disk, opts: MountOptions, quiet: bool = False) -> bool:
    """Flush and close the image; False (logged) when that failed."""
    try:
        if not opts.read_only:
            disk.flush()
        disk.close()
        if not quiet:
            log.info("image closed cleanly")
        return True
    except ImageError as exc:
        log.error("closing the image failed: %s", exc)
    except Exception as exc:
        log.error("closing the image failed: %s", exc, exc_info=exc)
    try:
        disk.close()
    except Exception:
        pass
    return False


def _close_inherited_fds() -> None:
    """Close what the detached daemon inherited from whoever ran ``qcowfs mount`` (descriptors
    above 2 without close-on-exec), so a caller waiting for end-of-file on a pipe it passed
    down is not kept waiting until the unmount. Everything qcowfs opens is close-on-exec."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd <= 2:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                os.close(fd)
        except OSError:
            pass


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
