"""Compare the guest contents of two images (each with its backing chain), as qemu-img compare
does: the first 512-byte sector that differs; when the sizes differ, the larger image's tail
must read as zeros (unless strict)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from qcowfs.format.record import record

from .blockstatus import ChainStatus
from .disk import Disk
from .pipeline import ReadAhead, parallel_decompression

SECTOR = 512
IO_BUF = 2 * 1024 * 1024


@record
class Comparison:
    identical: bool
    size_mismatch: bool = False
    mismatch_offset: int | None = None  # first differing sector
    strict_failure: str | None = None  # "size" or "status"
    status_offset: int | None = None


def _zero_ranges(status: ChainStatus, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, reads_as_zero_by_status) runs covering [start, end)."""
    for e in status.merged(start, end - start):
        yield e.start, e.start + e.length, e.zero and not e.data


def _flags(status: ChainStatus, start: int, end: int) -> Iterator[tuple[int, int, tuple]]:
    """Runs with the status bits QEMU compares in strict mode, including "this run reaches
    the end of the image"."""
    size = status.size
    for e in status.merged(start, end - start):
        stop = e.start + e.length
        yield e.start, stop, (e.present, e.zero, e.data, e.offset is not None, stop == size)


def _lockstep(a: Iterator, b: Iterator) -> Iterator[tuple[int, int, object, object]]:
    """Walk two run lists over the same range; yield the common pieces."""
    ra, rb = next(a, None), next(b, None)
    while ra is not None and rb is not None:
        start = max(ra[0], rb[0])
        end = min(ra[1], rb[1])
        if end > start:
            yield start, end, ra[2], rb[2]
        if ra[1] <= end:
            ra = next(a, None)
        if rb[1] <= end:
            rb = next(b, None)


def _first_diff_sector(x: bytes, y: bytes) -> int | None:
    if x == y:
        return None
    n = len(x)
    lo = 0
    # narrow down quickly, then scan sectors
    step = 64 * 1024
    while lo < n and x[lo:lo + step] == y[lo:lo + step]:
        lo += step
    pos = lo
    while pos < n:
        if x[pos:pos + SECTOR] != y[pos:pos + SECTOR]:
            return pos
        pos += SECTOR
    return None


def _first_nonzero_sector(buf: bytes) -> int | None:
    if buf.count(0) == len(buf):
        return None
    pos = 0
    n = len(buf)
    zero = bytes(SECTOR)
    while pos < n:
        part = buf[pos:pos + SECTOR]
        if part != zero[:len(part)]:
            return pos
        pos += SECTOR
    return None


def _pairs(a: Disk, b: Disk, runs: Iterator[tuple[int, int, bool, bool]]
           ) -> Iterator[tuple[int, int, bytes | None, bytes | None]]:
    """(offset, length, a's bytes, b's bytes) in guest order; None for both where block
    status says both read as zeros. Runs on the read-ahead thread."""
    for start, end, za, zb in runs:
        if za and zb:
            yield start, end - start, None, None
            continue
        pos = start
        while pos < end:
            n = min(IO_BUF, end - pos)
            yield pos, n, a.read(pos, n), b.read(pos, n)
            pos += n


def compare_disks(a: Disk, b: Disk, *, strict: bool = False,
                  progress: Callable[[int], None] | None = None) -> Comparison:
    """Compare ``a`` and ``b`` guest byte for guest byte. ``progress(n)`` is told how many
    bytes of the common range were settled."""
    size_a, size_b = a.size, b.size
    if strict and size_a != size_b:
        return Comparison(False, True, strict_failure="size")
    common = min(size_a, size_b)
    sa, sb = ChainStatus(a.layers), ChainStatus(b.layers)
    if strict:
        for start, _end, fa, fb in _lockstep(_flags(sa, 0, common), _flags(sb, 0, common)):
            if fa != fb:
                return Comparison(False, strict_failure="status", status_offset=start)
    runs = _lockstep(_zero_ranges(sa, 0, common), _zero_ranges(sb, 0, common))
    with parallel_decompression(a, b), ReadAhead(_pairs(a, b, runs)) as pairs:
        for pos, n, x, y in pairs:
            if x is not None:
                diff = _first_diff_sector(x, y)
                if diff is not None:
                    # found in the common part: qemu-img does not get to the size warning
                    return Comparison(False, False, mismatch_offset=pos + diff)
            if progress:
                progress(n)
    if size_a != size_b:
        over, status = (a, sa) if size_a > size_b else (b, sb)
        for start, end, zero in _zero_ranges(status, common, over.size):
            if zero:
                continue
            pos = start
            while pos < end:
                n = min(IO_BUF, end - pos)
                nz = _first_nonzero_sector(over.read(pos, n))
                if nz is not None:
                    return Comparison(False, True, mismatch_offset=pos + nz)
                pos += n
        return Comparison(True, True)
    return Comparison(True)
