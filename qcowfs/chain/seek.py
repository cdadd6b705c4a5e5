"""SEEK_DATA and SEEK_HOLE over a whole backing chain, as a block device with holes would
answer them: data in any layer is data; zero clusters and ranges no layer allocates are
holes. The allocation comes from :mod:`qcowfs.chain.blockstatus` (what ``map`` prints), so the
answers are cluster-granular and agree with ``qemu-img map``."""

from __future__ import annotations

import errno

from qcowfs.errors import ImageError

from .blockstatus import ChainStatus


def next_boundary(status: ChainStatus, offset: int, data: bool, path: str) -> int:
    """The first offset at or after ``offset`` that is data (``data``) or a hole (not
    ``data``). The end of the disk counts as a hole; past it, or when no data follows,
    ENXIO, as lseek(2) answers."""
    size = status.size
    if offset < 0 or offset >= size:
        raise ImageError(path, f"seek to offset {offset} of a {size}-byte disk",
                         errno=errno.ENXIO)
    for e in status.entries(offset, size - offset):
        if e.data == data:
            return max(e.start, offset)
    if data:
        raise ImageError(path, f"no data at or after offset {offset}", errno=errno.ENXIO)
    return size
