"""Writes of a front-to-back copy done on a thread of their own, so that the copying thread
scans (and reads) the next chunk while ``pwrite`` copies this one into the page cache
(``os.pwrite`` releases the GIL). Used by convert's outputs, which nothing reads while they
are being written; the mount never uses it.

At most ``depth`` writes are queued (each holds its buffer); a failure is raised by a later
``submit`` or by ``drain``, so the copy stops with the error as it would have inline (its
partial output is then removed or left as partial, as before).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class WriteBehind:
    def __init__(self, depth: int = 3):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def submit(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the writer thread after everything submitted before."""
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        """Wait until every submitted write is done (raising the first failure)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Stop: writes not started yet are dropped (the caller is failing or has drained)."""
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
