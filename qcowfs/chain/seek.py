"""SEEK_DATA and SEEK_HOLE over a whole backing chain, as a block device with holes would
answer them: data in any layer is data; zero clusters and ranges no layer allocates are
holes. The allocation comes from :mod:`qcowfs.chain.blockstatus` (what ``map`` prints), so the
answers are cluster-granular and agree with ``qemu-img map``."""

from __future__ import annotations

import errno

from qcowfs.errors import ImageError

from .blockstatus import ChainStatus

FIRST_WINDOW = 4 << 20
LAST_WINDOW = 1 << 30


def next_boundary(status: ChainStatus, offset: int, data: bool, path: str) -> int:
    """The first offset at or after ``offset`` that is data (``data``) or a hole (not
    ``data``). The end of the disk counts as a hole; past it, or when no data follows,
    ENXIO, as lseek(2) answers."""
    size = status.size
    if offset < 0 or offset >= size:
        raise ImageError(path, f"seek to offset {offset} of a {size}-byte disk",
                         errno=errno.ENXIO)
    # Windows that start small and double: the answer is usually near, and asking for the
    # whole rest of the disk at once would walk every L2 entry up to its end.
    pos, window = offset, FIRST_WINDOW
    while pos < size:
        n = min(window, size - pos)
        for e in status.entries(pos, n):
            if e.data == data:
                return max(e.start, offset)
        pos += n
        window = min(window * 2, LAST_WINDOW)
    if data:
        raise ImageError(path, f"no data at or after offset {offset}", errno=errno.ENXIO)
    return size
