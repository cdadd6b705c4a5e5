"""A few plain threads that run the ``pwrite`` of an in-place write and answer the kernel
themselves, so that the request loop goes on to the next request meanwhile.

Why: in this kernel a buffered 4 KiB ``pwrite`` into a large page-cache folio (an image that was
read back into the cache) costs 50-130 µs, against 5-10 µs into fresh pages. Inline, one at a
time, those writes set the pace at queue depth 16; two of them run side by side on two cores.
A trio thread round trip costs more than it gains (60-77 µs, see docs/mount.md,
"Performance"), so no trio is involved: the loop puts ``(file, host offset, bytes, reply)`` on
a ``SimpleQueue``, a worker writes and calls the reply that pyfuse3's deferred-write patch gives
(``pyfuse3.defer_write_reply``), which sends the answer without the GIL.

Only data moves off the loop: the engine does every metadata decision on the loop
(``Disk.prepare_in_place``), the pool only writes bytes to clusters the active disk owns alone.
The barrier is :meth:`DataPool.drain`: the handlers call it before any other engine call that
writes (an allocating or copy-on-write write, a flush, truncate, discard, snapshots, the close),
so no cluster changes owner or is freed under a write in flight, and a flush covers every write
answered before it.

Adaptive: a write goes to the pool only when in-place writes have been slow lately (an EWMA of
their duration above :data:`SLOW_NS`) and the loop has other work (a write in the pool, or a
request already waiting), so a queue-depth-1 client and fast writes stay inline, as before.

Reads (with the third pyfuse3 patch, ``pyfuse3.defer_read_reply``): a read that is one run of
plain host data (``Disk.locate_read``) and would wait for the disk -- any read under
``cache=none``, or a buffered one that ``preadv(RWF_NOWAIT)`` finds missing from the page
cache -- goes to the same threads when the loop has other work, and the thread answers with
the bytes from its own buffer. Page-cache hits, and every read at queue depth 1, stay inline.
The barrier covers reads too: no cluster is freed or changes owner under a read in flight.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time

from qcowfs.image.hostfile import aligned_buffer

log = logging.getLogger("qcowfs.mount")

#: An in-place write slower than this on average (EWMA) is worth a thread.
SLOW_NS = 25_000
#: The weight of the newest duration in the EWMA.
EWMA_WEIGHT = 1 / 8


class DataPool:
    """``threads`` worker threads for in-place data writes; see the module docstring."""

    def __init__(self, threads: int, slow_ns: int = SLOW_NS, *, writes: bool = True,
                 reads: bool = False):
        self.threads = threads
        #: which requests may go to the threads (what the binding can answer later)
        self.writes = writes
        self.reads = reads
        #: the EWMA above which writes go to the threads; 0 sends every one
        self.slow_ns = slow_ns
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition(threading.Lock())
        self.in_flight = 0
        #: the EWMA of in-place write durations, in nanoseconds
        self.ewma_ns = 0.0
        self.offloaded = 0
        self.reads_offloaded = 0
        self.failed = 0
        self._workers = [threading.Thread(target=self._run, name=f"qcowfs-data-{k}",
                                          daemon=True) for k in range(threads)]
        for w in self._workers:
            w.start()

    def note(self, ns: int) -> None:
        """An in-place write took ``ns`` nanoseconds."""
        self.ewma_ns += (ns - self.ewma_ns) * EWMA_WEIGHT

    def wants(self, busy) -> bool:
        """Whether the next in-place write should go to a thread: writes are slow lately and
        the loop has other work (``busy()``: a request is waiting)."""
        if not self.slow_ns:
            return True
        return self.ewma_ns > self.slow_ns and (self.in_flight > 0 or busy())

    def submit(self, file, host: int, view: memoryview, reply, length: int) -> None:
        """Write ``view`` at ``host`` in ``file`` on a worker, which then answers ``reply``
        with ``length`` (or the error)."""
        with self._idle:
            self.in_flight += 1
        self.offloaded += 1
        self._queue.put((_write_job, file, host, view, reply, length))

    def busy(self, waiting) -> bool:
        """Whether a read that would wait for the disk should go to a thread: the loop has
        other work (a request in the pool, or ``waiting()``: one queued in the kernel)."""
        return self.in_flight > 0 or waiting()

    def submit_read(self, file, host: int, length: int, reply) -> None:
        """Read ``length`` bytes at ``host`` in ``file`` on a worker, which then answers
        ``reply`` with them (or the error)."""
        with self._idle:
            self.in_flight += 1
        self.reads_offloaded += 1
        self._queue.put((_read_job, file, host, None, reply, length))

    def drain(self) -> None:
        """Return once no write is in flight (the barrier; free when there is none)."""
        if not self.in_flight:
            return
        with self._idle:
            while self.in_flight:
                self._idle.wait()

    def close(self) -> None:
        """Drain and stop the workers (before the FUSE session goes away: every deferred
        reply must have been sent)."""
        self.drain()
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join()
        self._workers = []

    def _run(self) -> None:
        state = _ThreadState()
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            job, file, host, view, reply, length = item
            try:
                job(self, state, file, host, view, reply, length)
            except OSError as exc:
                self.failed += 1
                what = "read" if view is None else "write"
                log.error("%s of %d bytes at host offset %d of %s failed: %s (answered "
                          "%s)", what, length, host, file.path, exc.strerror,
                          errno.errorcode.get(exc.errno or errno.EIO, "EIO"))
                reply.fail(exc.errno or errno.EIO)
            except BaseException as exc:  # never leave a request unanswered
                self.failed += 1
                log.error("I/O at host offset %d failed, answered EIO", host, exc_info=exc)
                reply.fail(errno.EIO)
            finally:
                with self._idle:
                    self.in_flight -= 1
                    if not self.in_flight:
                        self._idle.notify_all()


class _ThreadState:
    """A worker's own page-aligned buffer (O_DIRECT takes it as it is)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf: memoryview | None = None

    def buffer(self, n: int) -> memoryview:
        if self.buf is None or len(self.buf) < n:
            self.buf = aligned_buffer(max(n, 1 << 20))
        return self.buf[:n]


def _write_job(pool: DataPool, state: _ThreadState, file, host: int, view: memoryview, reply,
               length: int) -> None:
    t0 = time.perf_counter_ns()
    if file.direct_fd >= 0 and not (host | len(view)) & (file.align - 1):
        _write_direct(file, state.buffer(len(view)), view, host)
    else:
        _write_all(file.fd, view, host)
    pool.note(time.perf_counter_ns() - t0)
    end = host + len(view)
    if end > file._size:
        file._size = end
    reply.done(length)


def _read_job(pool: DataPool, state: _ThreadState, file, host: int, _view, reply,
              length: int) -> None:
    buf = state.buffer(length)
    reply.data(buf[:read_host(file, buf, host)])


def read_host(file, buf: memoryview, host: int, got: int = 0) -> int:
    """Fill ``buf[got:]`` from ``host + got`` in ``file`` (a HostFile), O_DIRECT when it has
    a direct descriptor and the range is aligned (``buf`` must then be page-aligned); zeros
    where the file ends early (it was measured long enough when the read was located).
    Returns ``len(buf)``."""
    n = len(buf)
    if not got and file.direct_fd >= 0 and not (host | n) & (file.align - 1):
        try:
            got = os.preadv(file.direct_fd, [buf], host)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    while got < n:
        k = os.preadv(file.fd, [buf[got:]], host + got)
        if not k:
            buf[got:] = bytes(n - got)
            break
        got += k
    return n


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _write_direct(file, bounce: memoryview, view: memoryview, offset: int) -> None:
    """``view`` at aligned ``offset`` with O_DIRECT from the thread's own aligned ``bounce``
    buffer; a short write ends through the buffered descriptor."""
    n = len(view)
    bounce[:n] = view
    done = os.pwrite(file.direct_fd, bounce[:n], offset)
    if done < n:
        _write_all(file.fd, bounce[done:n], offset + done)


__all__ = ["DataPool", "SLOW_NS", "read_host"]
