"""``convert``: copy a guest disk (an image and its chain, or one internal snapshot) into a new
raw or qcow2 image.

Raw output is sparse: runs that read as zero are never written, nor are 4 KiB blocks of zeros
inside data (qemu-img's default ``-S 4k``). qcow2 output goes through the sequential writer:
clusters of zeros stay unallocated, with ``-c`` data clusters are compressed, and with a backing
file only clusters that differ from it are written (a cluster that is zero where the backing file
is not becomes a zero cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from qcowfs.image.create import QcowOptions, create_raw
from qcowfs.image.hostfile import HostFile
from qcowfs.image.sequential import SequentialQcow2Writer

from .blockstatus import ChainStatus
from .disk import Disk, SnapshotDisk

SPARSE_BLOCK = 4096
CHUNK = 2 * 1024 * 1024
Progress = Callable[[int], None]

Source = Disk | SnapshotDisk


def _nonzero_runs(src: Source) -> Iterator[tuple[int, int]]:
    """(start, end) guest ranges that may hold non-zero bytes, in order."""
    if isinstance(src, SnapshotDisk):
        yield 0, src.size  # no block status for snapshot views: read it all
        return
    for e in ChainStatus(src.layers).merged():
        if e.zero and not e.data:
            continue
        yield e.start, e.start + e.length


def to_raw(src: Source, dst: str, progress: Progress | None = None) -> None:
    """Write the guest disk of ``src`` to a new sparse raw file ``dst``."""
    create_raw(dst, src.size)
    out = HostFile(dst, writable=True)
    try:
        out.truncate(src.size)
        zero = bytes(SPARSE_BLOCK)
        for start, end in _nonzero_runs(src):
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                data = src.read(pos, n)
                view = memoryview(data)
                i = 0
                while i < len(data):
                    # blocks aligned to the guest's 4 KiB grid
                    step = min(SPARSE_BLOCK - (pos + i) % SPARSE_BLOCK, len(data) - i)
                    block = view[i:i + step]
                    if block != zero[:step]:
                        out.write(pos + i, block)
                    i += step
                pos += n
                if progress:
                    progress(n)
        out.sync()
    finally:
        out.close()


def to_qcow2(src: Source, dst: str, options: QcowOptions, *, compress: bool = False,
             backing: Disk | None = None, progress: Progress | None = None) -> None:
    """Write the guest disk of ``src`` to a new qcow2 image ``dst`` (``options.size`` is
    ignored: the source's size is used). With ``backing`` (which ``options`` must name),
    only what differs from it is stored."""
    options = QcowOptions(**{**options.__dict__, "size": src.size})
    writer = SequentialQcow2Writer(dst, options, compress=compress)
    try:
        cs = writer.cs
        size = src.size
        ranges = list(_cluster_ranges(_nonzero_runs(src), cs))
        if backing is not None:
            ranges = _union(ranges, _cluster_ranges(
                ((s, min(e, size)) for s, e in _nonzero_runs(backing) if s < size), cs))
        for first, last in ranges:
            for c in range(first, last):
                off = c * cs
                data = src.read(off, cs).ljust(cs, b"\0")
                zero = data.count(0) == cs
                if backing is not None:
                    below = backing.read(off, cs).ljust(cs, b"\0") if off < backing.size \
                        else bytes(cs)
                    if below == data:
                        pass
                    elif zero:
                        writer.zero_cluster(c)
                    else:
                        writer.write_cluster(c, data)
                elif not zero:
                    writer.write_cluster(c, data)
                if progress:
                    progress(min(cs, size - off))
        writer.finish()
    finally:
        writer.close()


def _cluster_ranges(runs, cs: int) -> Iterator[tuple[int, int]]:
    """Byte runs -> merged cluster index ranges [first, last)."""
    cur: list[int] | None = None
    for start, end in runs:
        if end <= start:
            continue
        first, last = start // cs, -(-end // cs)
        if cur is not None and first <= cur[1]:
            cur[1] = max(cur[1], last)
            continue
        if cur is not None:
            yield cur[0], cur[1]
        cur = [first, last]
    if cur is not None:
        yield cur[0], cur[1]


def _union(a: list[tuple[int, int]], b) -> list[tuple[int, int]]:
    merged = sorted([*a, *b])
    out: list[list[int]] = []
    for first, last in merged:
        if out and first <= out[-1][1]:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return [(x, y) for x, y in out]


def to_encrypted_qcow2(src: Source, dst: str, options: QcowOptions,
                       progress: Progress | None = None) -> None:
    """qcow2 output with ``encrypt.format``: the image is created with its LUKS (or AES)
    header, then written through the ordinary encrypted write path, skipping runs that read as
    zeros (a new image reads zeros there already)."""
    from qcowfs.image.create import create_qcow2

    from .disk import open_image

    create_qcow2(dst, options)
    out = open_image(dst, writable=True, format="qcow2", keys=[options.encrypt_key])
    try:
        done = 0
        for start, end in _nonzero_runs(src):
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                data = src.read(pos, n)
                if data.count(0) != len(data):
                    out.write(pos, data)
                pos += n
                if progress:
                    progress(pos - done)
                    done = pos
    finally:
        out.close()
