"""pyfuse3's request loop without its two scheduler round trips per request.

For every request, pyfuse3's worker takes an uncontended ``trio.Lock`` (trio checkpoints on
every acquire: one full pass through the scheduler, with an ``epoll_wait``) and then parks in
``trio.lowlevel.wait_readable`` (an ``epoll_ctl`` re-arm and a second pass), even when the next
request is already waiting in /dev/fuse. On a 2-core VM those two passes cost more than the
request itself: a pyfuse3 passthrough of a raw file served 28k 4 KiB random reads per second at
queue depth 16, and 70k to 90k with both passes skipped (docs/performance.md).

pyfuse3 reaches trio only through its module attribute ``pyfuse3.trio`` (the hook its own
``pyfuse3.asyncio`` uses to swap in asyncio), and only for a handful of names. :func:`install`
points that attribute at :class:`FastTrio`: trio itself except for

* ``Lock``: an uncontended acquire takes the lock without a checkpoint;
* ``lowlevel.wait_readable``: returns at once when a zero-timeout ``poll`` finds the fd
  readable, except every :data:`YIELD_EVERY`-th call, which waits through trio so that the
  other tasks (signal handling, unmount) run at least that often under sustained load;
  when nothing is waiting it keeps polling for a short while (``poll_us``, as QEMU's event
  loop does with ``poll-max-ns``) before it sleeps in epoll. A request that arrives within
  that window skips the sleep and the wake-up: 4 KiB random reads at queue depth 1 went from
  12k to 30k per second. The cost is bounded: at most ``poll_us`` of CPU per request served.

Nothing else changes: handlers still run inline in one trio task, in arrival order.
"""

from __future__ import annotations

import os
import select
import time

import pyfuse3
import trio

#: Under sustained load, one request in this many goes through trio's scheduler.
YIELD_EVERY = 32


class FastLock:
    """A trio lock whose uncontended acquire does not yield; contended, it waits as usual."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info) -> None:
        self.release()


class _FastLowlevel:
    """``trio.lowlevel`` with a ``wait_readable`` that skips the scheduler when it can."""

    def __init__(self, poll_ns: int = 0) -> None:
        self._polls: dict[int, select.poll] = {}
        self._calls = 0
        self.poll_ns = poll_ns

    def __getattr__(self, name: str):
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd) -> None:
        self._calls += 1
        if self._calls % YIELD_EVERY:
            poller = self._polls.get(fd)
            if poller is None:
                poller = self._polls[fd] = select.poll()
                poller.register(fd, select.POLLIN)
            if poller.poll(0):
                return
            if self.poll_ns:
                deadline = time.perf_counter_ns() + self.poll_ns
                while time.perf_counter_ns() < deadline:
                    if poller.poll(0):
                        return
        await trio.lowlevel.wait_readable(fd)

    def pending(self) -> bool:
        """Whether a request is waiting to be read (a zero-timeout poll)."""
        return any(p.poll(0) for p in self._polls.values())

    def notify_closing(self, fd) -> None:
        self._polls.pop(fd, None)
        trio.lowlevel.notify_closing(fd)


class FastTrio:
    """The namespace pyfuse3 sees as ``trio``: trio, with :class:`FastLock` as ``Lock`` and
    the fast ``lowlevel.wait_readable``."""

    Lock = FastLock

    def __init__(self, poll_ns: int = 0) -> None:
        self.lowlevel = _FastLowlevel(poll_ns)

    def __getattr__(self, name: str):
        return getattr(trio, name)


def install(poll_us: int) -> None:
    """Make pyfuse3's request loop use :class:`FastTrio` (before ``pyfuse3.main``), polling
    for up to ``poll_us`` microseconds before sleeping (never on a single CPU, where the
    poll would hold back the very process that sends the next request)."""
    if len(os.sched_getaffinity(0)) < 2:
        poll_us = 0
    pyfuse3.trio = FastTrio(poll_us * 1000)


def uninstall() -> None:
    """Give pyfuse3 plain trio again."""
    pyfuse3.trio = trio


def request_waiting() -> bool:
    """Whether the kernel has a request queued that the loop has not read yet (always False
    without the fast loop, which owns the poller)."""
    fast = getattr(pyfuse3, "trio", None)
    return isinstance(fast, FastTrio) and fast.lowlevel.pending()


def installed() -> bool:
    return isinstance(getattr(pyfuse3, "trio", None), FastTrio)


__all__ = ["FastLock", "FastTrio", "YIELD_EVERY", "install", "uninstall", "installed",
           "request_waiting"]
