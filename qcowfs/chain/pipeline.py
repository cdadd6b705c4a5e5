"""The threads of a front-to-back copy or comparison (convert, compare): the source read ahead
on a thread of its own, and its compressed clusters decompressed on every core."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from qcowfs.image.qcow2 import Qcow2Image

from .disk import Disk, SnapshotDisk


class ReadAhead:
    """The items of ``items`` produced on a thread of their own, up to ``depth`` ahead of the
    consumer, in order: the source is read (and decompressed) while the output is written.
    Only that thread touches the source while it runs (the image's caches are not made for
    threads); an error there is raised in the consumer."""

    def __init__(self, items: Iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True,
                                        name="read-ahead")
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer
            self._put((False, exc))
            return
        self._put((False, None))

    def _put(self, message: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            ok, value = self._queue.get()
            if ok:
                yield value
            elif value is None:
                return
            else:
                raise value

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def parallel_decompression(*disks: Disk | SnapshotDisk | None) -> Iterator[None]:
    """While the body runs, the compressed clusters that one read of ``disks`` meets are
    decompressed by a pool of threads, one per core (``Qcow2Image.decompress_ahead``)."""
    images = [layer for d in disks if d is not None for layer in _layers(d)
              if isinstance(layer, Qcow2Image)]
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                              thread_name_prefix="decompress")
    for img in images:
        img.decompressor = pool
    try:
        yield
    finally:
        for img in images:
            img.decompressor = None
        pool.shutdown(cancel_futures=True)


def _layers(d: Disk | SnapshotDisk) -> list:
    return d.layers if isinstance(d, Disk) else d.chain_layers
