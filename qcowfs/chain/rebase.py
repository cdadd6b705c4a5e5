"""Rebase: make an image name another backing file.

Safe mode keeps the guest view: every range the image does not hold itself, and where the old
and the new backing chain differ, gets the old data copied into the image (written and flushed)
before the header names the new backing file; where the old chain's block status says zeros,
only the new chain's data ranges are read (the work follows the metadata present, not the
disk size the image claims). Unsafe mode only rewrites the header. An empty
new name detaches the image (safe mode then copies in everything the old chain provided).
"""

from __future__ import annotations

from collections.abc import Callable

from qcowfs.errors import ImageError, UnsupportedError
from qcowfs.image import locking
from qcowfs.image.backing import set_backing_file
from qcowfs.image.qcow2 import Qcow2Image

from .blockstatus import ChainStatus
from .disk import Disk, open_image
from .locks import lock_chain
from .resolve import Keys, backing_path, keys_below, open_chain, probe_format

CHUNK = 2 * 1024 * 1024
Progress = Callable[[int], None]


def rebase(path: str, new_backing: str, new_format: str | None, *, unsafe: bool = False,
           fmt: str | None = None, progress: Progress | None = None,
           force_share: bool = False, keys: Keys = None) -> None:
    """Rebase ``path`` onto ``new_backing`` (relative to ``path``'s folder; "" detaches).
    ``force_share`` reads the new backing chain even when another process writes it. ``keys``
    unlock encrypted layers by depth; the new backing chain takes those from depth 1 on."""
    if new_backing and new_format is None:
        if unsafe:
            raise ImageError(path, "backing format must be specified (-F) with -u")
        new_format = probe_format(backing_path(path, new_backing))
    if not unsafe:
        _copy_differences(path, new_backing, new_format, fmt, progress, force_share, keys)
    img = Qcow2Image.open(path, writable=True, open_data_file=False)
    try:
        locking.acquire(img.file.fd, path, locking.LockMode.WRITE)
        set_backing_file(img, new_backing or None, new_format)
    finally:
        img.close()


def _copy_differences(path: str, new_backing: str, new_format: str | None, fmt: str | None,
                      progress: Progress | None, force_share: bool, keys: Keys = None
                      ) -> None:
    disk = open_image(path, writable=True, format=fmt, keys=keys)
    new: Disk | None = None
    try:
        if not isinstance(disk.top, Qcow2Image):
            raise UnsupportedError(path, "only qcow2 images have a backing file")
        if new_backing:
            new = Disk(open_chain(backing_path(path, new_backing), fmt=new_format,
                                  keys=keys_below(keys, 1)), False)
            if not force_share:
                lock_chain(new.layers)
        cs = disk.top.cluster_size
        new_status = ChainStatus(new.layers) if new is not None else None
        for e in ChainStatus(disk.layers).merged():
            if e.depth == 0 and e.present:
                if progress:
                    progress(e.length)
                continue  # the image holds it itself
            if e.zero and not e.data:
                # zeros in the old chain: only where the new chain has data can they differ
                # (the work follows the new chain's metadata, not the claimed disk size)
                done = 0
                for start, length in _data_ranges(new_status, e.start, e.length):
                    _copy_range(disk, new, start, start + length, cs, progress)
                    done += length
                if progress:
                    progress(e.length - done)
                continue
            _copy_range(disk, new, e.start, e.start + e.length, cs, progress)
        disk.flush()
    finally:
        if new is not None:
            new.close()
        disk.close()


def _data_ranges(status: ChainStatus | None, start: int, length: int
                 ) -> list[tuple[int, int]]:
    """The parts of [start, start + length) the new chain's block status does not say read
    as zeros (no chain, or past its end, reads as zeros)."""
    if status is None:
        return []
    return [(e.start, e.length) for e in status.merged(start, length)
            if not (e.zero and not e.data)]


def _copy_range(disk: Disk, new: Disk | None, pos: int, end: int, cs: int,
                progress: Progress | None) -> None:
    """Copy into the image each piece of [pos, end) where the old and the new chain differ.
    Both chains are read into two buffers kept for the whole range (no bytes made per chunk)
    and compared in place."""
    old_buf, new_buf = bytearray(CHUNK), bytearray(CHUNK)
    old_view, new_view = memoryview(old_buf), memoryview(new_buf)
    while pos < end:
        n = min(CHUNK - pos % cs, end - pos)
        got = disk.readinto(old_view[:n], pos)
        if got < n:
            old_view[got:n] = bytes(n - got)
        got = new.readinto(new_view[:n], pos) if new is not None else 0
        if got < n:
            new_view[got:n] = bytes(n - got)
        if not old_buf.startswith(new_view[:n], 0, n):
            _write_differing(disk, pos, old_buf, new_view, n, cs)
        pos += n
        if progress:
            progress(n)


def _write_differing(disk: Disk, pos: int, old: bytearray, below: memoryview, n: int,
                     cs: int) -> None:
    """Write the old data over each cluster-sized piece of the first ``n`` bytes where the
    two differ."""
    i = 0
    while i < n:
        step = min(cs - (pos + i) % cs, n - i)
        if not old.startswith(below[i:i + step], i, i + step):
            disk.write(pos + i, bytes(old[i:i + step]))
        i += step
