"""``convert``: copy a guest disk (an image and its chain, or one internal snapshot) into a new
raw or qcow2 image.

Raw output is sparse: runs that read as zero are never written, nor are 4 KiB blocks of zeros
inside data (qemu-img's default ``-S 4k``). qcow2 output goes through the sequential writer:
clusters of zeros stay unallocated, with ``-c`` data clusters are compressed, and with a backing
file only clusters that differ from it are written (a cluster that is zero where the backing file
is not becomes a zero cluster).
"""

from __future__ import annotations

import functools
import os
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from qcowfs.format.compression import compress_cluster
from qcowfs.format.zeros import is_zero
from qcowfs.image.create import QcowOptions, create_raw
from qcowfs.image.hostfile import HostFile
from qcowfs.image.writebehind import WriteBehind

from .blockstatus import ChainStatus
from .disk import Disk, SnapshotDisk
from .pipeline import ReadAhead, parallel_decompression

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from qcowfs.image.sequential import SequentialQcow2Writer

SPARSE_BLOCK = 4096
CHUNK = 4 * 1024 * 1024  # bytes read (and zero-scanned) per step
IN_FLIGHT = 3  # chunks being compressed at once, at most
Progress = Callable[[int], None]

Source = Disk | SnapshotDisk



@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> bytes:
    return bytes(n)


def _nonzero_runs(src: Source) -> Iterator[tuple[int, int]]:
    """(start, end) guest ranges that may hold non-zero bytes, in order."""
    if isinstance(src, SnapshotDisk):
        yield 0, src.size  # no block status for snapshot views: read it all
        return
    for e in ChainStatus(src.layers).merged():
        if e.zero and not e.data:
            continue
        yield e.start, e.start + e.length


def _read_chunks(src: Source, runs: Iterator[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    for start, end in runs:
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            yield pos, src.read(pos, n)
            pos += n


def data_spans(data: bytes, pos: int, block: int = SPARSE_BLOCK) -> list[tuple[int, int]]:
    """The [start, end) offsets into ``data`` (guest bytes from ``pos``) left when every
    all-zero block of the guest's ``block`` grid is cut out (the chunk's own edges count as
    block edges). The scanning is done by ``bytes.find`` and memory compares, never a loop
    over bytes: a zero block is found by searching for ``block`` zero bytes, and a zero run is
    followed in doubling steps."""
    n = len(data)
    if is_zero(data, 0, n):
        return []
    zero_block = _zeros(block)
    spans = []
    start = 0  # of the data span being built
    head = (-pos) % block  # a partial first block: shorter than the search string
    if 0 < head < n and is_zero(data, 0, head):
        start = head
    i = start
    while True:
        j = data.find(zero_block, i)
        if j < 0:
            break
        a = j if j == 0 else j + (-(pos + j)) % block  # the first block edge at or after j
        if a >= n:
            break
        be = min(n, a + block - (pos + a) % block)
        if not is_zero(data, a, be):
            i = be
            continue
        e, step = be, block
        while e < n:
            m = min(step, n - e)
            if is_zero(data, e, e + m):
                e += m
                step *= 2
            elif step == block:
                break
            else:
                step //= 2
        if a > start:
            spans.append((start, a))
        start = i = e
    if start < n:
        tail = n - (pos + n) % block  # where a partial last block starts
        end = tail if start < tail < n and is_zero(data, tail, n) else n
        spans.append((start, end))
    return spans


def sparse_spans(data: bytes, pos: int, sparse: int = SPARSE_BLOCK) -> list[tuple[int, int]]:
    """``-S sparse``: the [start, end) offsets into ``data`` (guest bytes from ``pos``) that are
    written, as qemu-img picks them. Zeros are cut out in blocks of the guest's grid of the
    largest power of two not above ``sparse`` (at least 4 KiB); a run of zero blocks between
    data that is shorter than ``sparse`` is written anyway (it would only fragment the output),
    while one at either edge of the chunk is always cut."""
    block = max(SPARSE_BLOCK, 1 << (sparse.bit_length() - 1))
    spans = data_spans(data, pos, block)
    if sparse <= block or len(spans) < 2:
        return spans
    out = [spans[0]]
    for start, end in spans[1:]:
        if start - out[-1][1] < sparse:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def to_raw(src: Source, dst: str, progress: Progress | None = None,
           sparse: int = SPARSE_BLOCK, *, durable: bool = True) -> None:
    """Write the guest disk of ``src`` to a new sparse raw file ``dst`` (``sparse``: the
    ``-S`` size, see :func:`sparse_spans`; fsync it when ``durable``)."""
    create_raw(dst, src.size)
    out = HostFile(dst, writable=True)
    io = WriteBehind()
    try:
        out.truncate(src.size)
        with parallel_decompression(src), \
                ReadAhead(_read_chunks(src, _nonzero_runs(src))) as chunks:
            for pos, data in chunks:
                spans = sparse_spans(data, pos, sparse)
                if spans:
                    io.submit(_write_spans, out, pos, data, spans)
                if progress:
                    progress(len(data))
        io.drain()
        if durable:
            out.sync()
    finally:
        io.close()
        out.close()


def _write_spans(out: HostFile, pos: int, data: bytes, spans: list[tuple[int, int]]) -> None:
    view = memoryview(data)
    for s, e in spans:
        out.write(pos + s, view[s:e])


def to_qcow2(src: Source, dst: str, options: QcowOptions, *, compress: bool = False,
             backing: Disk | None = None, progress: Progress | None = None,
             sparse: int = SPARSE_BLOCK, durable: bool = True) -> None:
    """Write the guest disk of ``src`` to a new qcow2 image ``dst`` (``options.size`` is
    ignored: the source's size is used). With ``backing`` (which ``options`` must name),
    only what differs from it is stored. ``durable``: fsync the image as it is completed.

    The source is read a chunk of clusters at a time; a run of data clusters goes out in one
    write. With ``compress``, the clusters of a chunk are compressed by a pool of threads (one
    per core: zlib and zstandard release the GIL) while the next chunks are read, and are
    written in guest order as they come back."""
    # the qcow2 writer (with check and the walk) loads only for qcow2 output
    from qcowfs.image.sequential import SequentialQcow2Writer
    options = QcowOptions(**{**options.__dict__, "size": src.size})
    writer = SequentialQcow2Writer(dst, options, compress=compress, durable=durable)
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1) if compress else None
    try:
        cs = writer.cs
        size = src.size
        depth = _backing_depth(src, backing) if backing is not None else None
        if depth is not None:
            ranges = list(_cluster_ranges(_above_backing(src, depth), cs))
        else:
            ranges = list(_cluster_ranges(_nonzero_runs(src), cs))
            if backing is not None:
                ranges = _union(ranges, _cluster_ranges(
                    ((s, min(e, size)) for s, e in _nonzero_runs(backing) if s < size), cs))
        pending: deque = deque()  # (first cluster, data, actions, compressed streams)
        with parallel_decompression(src, backing), \
                ReadAhead(_cluster_chunks(src, backing, ranges, cs)) as chunks:
            for c, data, below in chunks:
                actions = _cluster_actions(data, below, cs, c * cs, sparse)
                packed = None
                if pool is not None:
                    t = writer.compression_type
                    view = memoryview(data)
                    packed = [pool.submit(compress_cluster, view[i * cs:(i + 1) * cs], t)
                              if act == "data" else None for i, act in actions]
                pending.append((c, data, actions, packed))
                while len(pending) > (IN_FLIGHT if pool is not None else 0):
                    _store(writer, *pending.popleft())
                if progress:
                    progress(min(len(data), size - c * cs))
        while pending:
            _store(writer, *pending.popleft())
        writer.finish()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        writer.abandon()


def _same_layer(a, b) -> bool:
    """Whether two opened layers are the same file opened the same way."""
    if a.format != b.format:
        return False
    x, y = os.fstat(a.file.fd), os.fstat(b.file.fd)
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def _backing_depth(src: Source, backing: Disk) -> int | None:
    """The layer of ``src``'s chain from which down it is ``backing``'s chain, file for file
    (``convert -B`` naming the source's own backing file, or one further down); None when
    the backing file is not in the chain (or the source is a snapshot view)."""
    if isinstance(src, SnapshotDisk):
        return None
    k = len(src.layers) - len(backing.layers)
    if k < 1:
        return None
    if all(_same_layer(a, b) for a, b in zip(src.layers[k:], backing.layers, strict=True)):
        return k
    return None


def _above_backing(src: Disk, depth: int) -> Iterator[tuple[int, int]]:
    """The guest ranges that layers above ``depth`` allocate (as data or zeros), or where
    they cut the view short: everywhere else the guest reads what the backing chain from
    ``depth`` reads, so only these ranges can differ from it."""
    upper = src.layers[:depth]
    for e in ChainStatus(upper).merged():
        if e.depth == depth - 1 and not e.present:
            continue  # falls through to the backing chain: its own bytes
        yield e.start, e.start + e.length


def _cluster_chunks(src: Source, backing: Disk | None, ranges: list[tuple[int, int]], cs: int
                    ) -> Iterator[tuple[int, bytes, bytes | None]]:
    """(first cluster, its chunk of guest bytes, the backing file's bytes there or None)."""
    per_chunk = max(1, CHUNK // cs)
    for first, last in ranges:
        c = first
        while c < last:
            k = min(per_chunk, last - c)
            data = _read_clusters(src, c * cs, k * cs)
            below = _read_clusters(backing, c * cs, k * cs) if backing is not None else None
            yield c, data, below
            c += k


def _read_clusters(src: Source, offset: int, n: int) -> bytes:
    """``n`` guest bytes at ``offset``, zeros past the end of the disk."""
    data = src.read(offset, n) if offset < src.size else b""
    return data if len(data) == n else data + bytes(n - len(data))


def _cluster_actions(data: bytes, below: bytes | None, cs: int, pos: int = 0,
                     sparse: int = SPARSE_BLOCK) -> list[tuple[int, str]]:
    """What each cluster of a chunk needs: ("data", i) or ("zero", i) (zero where the
    backing file is not); clusters with nothing to store are left out. A zero cluster that
    ``-S`` would write (a short zero run between data) is data."""
    out = []
    written = None
    if sparse > max(cs, SPARSE_BLOCK):
        written = array("b", bytes(len(data) // cs))
        for s, e in sparse_spans(data, pos, sparse):
            for k in range(s // cs, -(-e // cs)):
                written[k] = 1
    for i in range(len(data) // cs):
        start, end = i * cs, (i + 1) * cs
        zero = is_zero(data, start, end) and not (written and written[i])
        if below is not None:
            if data.startswith(below[start:end], start, end):
                continue
            if zero:
                out.append((i, "zero"))
                continue
        elif zero:
            continue
        out.append((i, "data"))
    return out


def _store(writer: SequentialQcow2Writer, first: int, data: bytes,
           actions: list[tuple[int, str]], packed: list | None) -> None:
    """Write one chunk's clusters in guest order: runs of data clusters in one write each,
    or each cluster's compressed stream."""
    cs = writer.cs
    view = memoryview(data)
    run: list[int] = []  # consecutive data clusters not written yet
    streams: list[tuple[int, bytes]] = []  # compressed clusters not written yet

    def flush() -> None:
        if run:
            writer.write_clusters(first + run[0], view[run[0] * cs:(run[-1] + 1) * cs])
            run.clear()
        if streams:
            writer.write_streams(streams)
            streams.clear()

    for n, (i, act) in enumerate(actions):
        if act == "zero":
            flush()
            writer.zero_cluster(first + i)
        elif packed is not None:
            stream = packed[n].result()
            if stream is None:  # does not compress: stored as it is
                flush()
                writer.write_clusters(first + i, view[i * cs:(i + 1) * cs])
            else:
                streams.append((first + i, stream))
        else:
            if run and run[-1] != i - 1:
                flush()
            run.append(i)
    flush()


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


def to_qcow2_in_place(src: Source, dst: str, options: QcowOptions,
                      progress: Progress | None = None, sparse: int = SPARSE_BLOCK) -> None:
    """qcow2 output created as ``create`` makes it -- encrypted, preallocated, or with an
    external data file -- then filled through the ordinary write path: the 4 KiB blocks of
    zeros (``-S 4k``) are not written, since a new image reads zeros there already, so
    preallocated clusters keep their holes where the source is zero, as with qemu-img. Built
    under a temporary name next to ``dst`` and renamed over it once closed and durable, as
    the sequential writer does."""
    from qcowfs.image.create import create_qcow2
    from qcowfs.image.sequential import partial_name, publish

    from .disk import open_image

    partial = partial_name(dst)
    create_qcow2(partial, QcowOptions(**{**options.__dict__, "size": src.size}))
    keys = [options.encrypt_key] if options.encrypt_format else None
    done = False
    try:
        out = open_image(partial, writable=True, format="qcow2", keys=keys, zero_detect=False)
        try:
            sent = 0
            with ReadAhead(_read_chunks(src, _nonzero_runs(src))) as chunks:
                for pos, data in chunks:
                    view = memoryview(data)
                    for s, e in sparse_spans(data, pos, sparse):
                        out.write(pos + s, view[s:e])
                    if progress:
                        progress(pos + len(data) - sent)
                        sent = pos + len(data)
        finally:
            out.close()
        publish(partial, dst)
        done = True
    finally:
        if not done:
            try:
                os.unlink(partial)
            except OSError:
                pass
