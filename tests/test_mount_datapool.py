"""The data threads (qcowfs/mount/datapool.py): in-place writes answered from a thread, and the
barrier that makes every metadata change wait for them."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import threading
import time

import pyfuse3
import pytest
from mounttools import mounted, needs_fuse
from qemutools import QEMU_IMG, assert_check_clean, compare, create, qemu_io, run, to_raw

from qcowfs.mount.datapool import DataPool
from qcowfs.mount.options import parse_options

MiB = 1 << 20
PUNCH_HOLE, KEEP_SIZE = 0x02, 0x01
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

needs_deferred_reads = pytest.mark.skipif(
    not getattr(pyfuse3, "HANDLES_DEFERRED_READS", False),
    reason="this pyfuse3 lacks qcowfs's deferred-read patch (make venv installs it)")
needs_deferred_writes = pytest.mark.skipif(
    not getattr(pyfuse3, "HANDLES_DEFERRED_WRITES", False),
    reason="this pyfuse3 lacks qcowfs's deferred-write patch (make venv installs it)")


class _Reply:
    def __init__(self):
        self.answer = None
        self.answered = threading.Event()

    def done(self, n):
        self.answer = n
        self.answered.set()

    def fail(self, err):
        self.answer = -err
        self.answered.set()

    def data(self, buf):
        self.answer = bytes(buf)  # the pool reuses its buffer once this returns
        self.answered.set()


class _PlainFile:
    """What the pool needs of a HostFile: a buffered descriptor, no O_DIRECT one."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "gated")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.direct_fd = -1
        self.align = 0
        self._size = 0


def test_io_options_parse():
    assert parse_options([]).io_threads == 2
    assert parse_options(["io_threads=0"]).io_threads == 0
    assert parse_options(["io_threads=99"]).io_threads == 16
    assert parse_options(["io_slow_us=0"]).io_slow_us == 0


def test_pool_writes_answer_and_drain_waits_for_them(tmp_path, monkeypatch):
    """A write in the pool is answered only once written; drain() returns only after it."""
    gate = threading.Event()
    real_pwrite = os.pwrite

    def slow_pwrite(fd, data, offset):
        gate.wait(10)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    f = _PlainFile(tmp_path)
    pool = DataPool(2, slow_ns=0)
    try:
        reply = _Reply()
        pool.submit(f, 4096, memoryview(b"x" * 100), reply, 100)
        assert pool.wants(lambda: False)
        drained = threading.Event()
        t = threading.Thread(target=lambda: (pool.drain(), drained.set()))
        t.start()
        time.sleep(0.05)
        assert not drained.is_set() and not reply.answered.is_set()
        gate.set()
        t.join(10)
        assert drained.is_set() and reply.answer == 100
        assert os.pread(f.fd, 100, 4096) == b"x" * 100
        assert f._size == 4196
    finally:
        gate.set()
        pool.close()
        os.close(f.fd)


def test_pool_failed_write_is_answered_with_its_errno(tmp_path, caplog):
    f = _PlainFile(tmp_path)
    os.close(f.fd)
    f.fd = os.open(f.path, os.O_RDONLY)  # EBADF on write
    pool = DataPool(1, slow_ns=0)
    try:
        reply = _Reply()
        pool.submit(f, 0, memoryview(b"y" * 10), reply, 10)
        pool.drain()
        assert reply.answer == -errno.EBADF and pool.failed == 1
        assert "failed" in caplog.text
    finally:
        pool.close()
        os.close(f.fd)


def test_pool_reads_answer_with_the_bytes_and_drain_waits_for_them(tmp_path, monkeypatch):
    """A read in the pool answers with the file's bytes (zeros where the file ended early)
    and counts as in flight for the barrier; a failed one answers its errno."""
    f = _PlainFile(tmp_path)
    os.pwrite(f.fd, bytes(range(256)) * 64, 0)  # 16 KiB
    gate = threading.Event()
    real_preadv = os.preadv

    def slow_preadv(fd, bufs, offset, *flags):
        gate.wait(10)
        return real_preadv(fd, bufs, offset, *flags)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    pool = DataPool(2, writes=False, reads=True)
    try:
        reply, tail = _Reply(), _Reply()
        pool.submit_read(f, 4096, 8192, reply)
        pool.submit_read(f, 12288, 8192, tail)  # half of it past the end
        assert pool.busy(lambda: False)
        drained = threading.Event()
        t = threading.Thread(target=lambda: (pool.drain(), drained.set()))
        t.start()
        time.sleep(0.05)
        assert not drained.is_set() and not reply.answered.is_set()
        gate.set()
        t.join(10)
        assert drained.is_set()
        assert reply.answer == (bytes(range(256)) * 64)[4096:12288]
        assert tail.answer == (bytes(range(256)) * 16) + bytes(4096)
        os.close(f.fd)
        f.fd = os.open(os.devnull, os.O_WRONLY)  # EBADF on read
        bad = _Reply()
        pool.submit_read(f, 0, 4096, bad)
        pool.drain()
        assert bad.answer == -errno.EBADF and pool.failed == 1
        assert not pool.busy(lambda: False) and pool.busy(lambda: True)
    finally:
        gate.set()
        pool.close()
        os.close(f.fd)


def test_the_adaptive_choice_keeps_fast_or_lonely_writes_inline():
    pool = DataPool(1)
    try:
        assert not pool.wants(lambda: True)  # no slow writes seen yet
        for _ in range(64):
            pool.note(200_000)
        assert not pool.wants(lambda: False)  # slow, but nothing else to do meanwhile
        assert pool.wants(lambda: True)
        for _ in range(64):
            pool.note(3_000)
        assert not pool.wants(lambda: True)  # fast again
    finally:
        pool.close()


@needs_fuse
@pytest.mark.fuse
@needs_deferred_writes
def test_concurrent_writes_and_punches_through_the_threads(tmp_path):
    """Every in-place write goes to the threads (io_slow_us=0) while other clients punch holes
    and take snapshots: each metadata change waits for the writes in flight, and QEMU reads
    back exactly what the clients wrote last."""
    img = create(tmp_path / "img.qcow2", "32M", preallocation="metadata")
    qemu_io(img, "write -P 0x33 0 32M")
    expected = bytearray(b"\x33" * (32 * MiB))
    lock = threading.Lock()
    errors: list[BaseException] = []
    with mounted(img, tmp_path / "mnt", "rw,io_threads=4,io_slow_us=0") as mp:
        disk = mp / "disk"

        def writer(k: int) -> None:
            # each writer owns one 8 MiB quarter: its last write there is what must show
            try:
                rng = random.Random(k)
                fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
                buf = mmap.mmap(-1, 65536)
                try:
                    for _ in range(300):
                        n = rng.choice([4096, 8192, 65536])
                        off = k * 8 * MiB + rng.randrange(0, (8 * MiB - n) // 4096) * 4096
                        data = rng.randbytes(n)
                        buf[:n] = data
                        if rng.random() < 0.1:
                            with lock:  # punch, then rewrite: the hole must not eat it
                                if _libc.fallocate(fd, PUNCH_HOLE | KEEP_SIZE, off, n):
                                    raise OSError(ctypes.get_errno(), "fallocate")
                                expected[off:off + n] = bytes(n)
                        assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
                        with lock:
                            expected[off:off + n] = data
                finally:
                    os.close(fd)
                    buf.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for i in range(3):
            os.mkdir(mp / "snapshots" / f"s{i}")
        for t in threads:
            t.join(120)
        assert not errors, errors
        fd = os.open(disk, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    want = tmp_path / "want.raw"
    want.write_bytes(expected)
    assert compare(img, want, "-F", "raw") == 0
    assert_check_clean(img)
    assert len(to_raw(img, tmp_path / "s0.raw", snapshot="1")) == 32 * MiB


@needs_fuse
@pytest.mark.fuse
@needs_deferred_reads
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_reads_through_the_threads_beside_writes_and_snapshots(tmp_path, cache):
    """Readers at a queue depth over a cold image (page-cache misses: the reads go to the
    threads) while a writer overwrites and punches holes and snapshots are taken: every read
    returns the bytes of the last write answered before it to a range nobody writes to
    meanwhile, and QEMU then reads back what was written."""
    img = create(tmp_path / "img.qcow2", "32M", preallocation="metadata")
    data = bytearray(b"\x5a" * (32 * MiB))
    for k in range(0, 16 * MiB, 4096):  # readers' half: a pattern that names each block
        data[k:k + 8] = k.to_bytes(8, "little")
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    run(QEMU_IMG, "convert", "-n", "-f", "raw", "-O", "qcow2", src, img)
    os.posix_fadvise(fd := os.open(img, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    errors: list[BaseException] = []
    expected = bytearray(data)
    with mounted(img, tmp_path / "mnt", f"rw,cache={cache},io_threads=4") as mp:
        disk = mp / "disk"

        def reader(k: int) -> None:
            try:
                rng = random.Random(k)
                fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
                buf = mmap.mmap(-1, 65536)
                try:
                    for _ in range(400):
                        n = rng.choice([4096, 16384, 65536])
                        off = rng.randrange(0, (16 * MiB - n) // 4096) * 4096
                        assert os.preadv(fd, [memoryview(buf)[:n]], off) == n
                        assert buf[:n] == data[off:off + n], (off, n)
                finally:
                    os.close(fd)
                    buf.close()
            except BaseException as exc:
                errors.append(exc)

        def writer() -> None:
            try:
                rng = random.Random(99)
                fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
                buf = mmap.mmap(-1, 65536)
                try:
                    for _ in range(200):
                        n = rng.choice([4096, 65536])
                        off = 16 * MiB + rng.randrange(0, (16 * MiB - n) // 4096) * 4096
                        if rng.random() < 0.1:
                            if _libc.fallocate(fd, PUNCH_HOLE | KEEP_SIZE, off, n):
                                raise OSError(ctypes.get_errno(), "fallocate")
                            expected[off:off + n] = bytes(n)
                        else:
                            chunk = rng.randbytes(n)
                            buf[:n] = chunk
                            assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
                            expected[off:off + n] = chunk
                finally:
                    os.close(fd)
                    buf.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for i in range(2):
            os.mkdir(mp / "snapshots" / f"s{i}")
        for t in threads:
            t.join(120)
        assert not errors, errors
    want = tmp_path / "want.raw"
    want.write_bytes(expected)
    assert compare(img, want, "-F", "raw") == 0
    assert_check_clean(img)



@pytest.mark.parametrize("writes, reads, read_only, pool, pool_writes, pool_reads", [
    (False, False, False, False, False, False),  # a stock pyfuse3: everything inline
    (True, False, False, True, True, False),
    (True, True, False, True, True, True),
    (True, True, True, True, False, True),  # read-only: reads only
    (False, False, True, False, False, False),
])
async def test_the_pool_takes_what_the_binding_can_answer_later(
        tmp_path, monkeypatch, writes, reads, read_only, pool, pool_writes, pool_reads):
    """Without the patches (``pip install`` alone gives a stock pyfuse3) no request leaves the
    loop, and reads and writes still answer with the disk's bytes."""
    from qcowfs.chain.disk import open_image
    from qcowfs.mount.operations import QcowfsOperations
    from qcowfs.mount.tree import Tree

    monkeypatch.setattr(pyfuse3, "HANDLES_DEFERRED_WRITES", writes, raising=False)
    monkeypatch.setattr(pyfuse3, "HANDLES_DEFERRED_READS", reads, raising=False)
    img = create(tmp_path / "img.qcow2", "4M", preallocation="metadata")
    qemu_io(img, "write -P 0x61 0 4M")
    disk = open_image(str(img), writable=not read_only)
    ops = QcowfsOperations(Tree(disk, str(img), read_only=read_only, uid=0, gid=0,
                                umask=0o022), direct_io=True, allow_shrink=False, io_threads=2)
    try:
        assert (ops.pool is not None) == pool
        if pool:
            assert (ops.pool.writes, ops.pool.reads) == (pool_writes, pool_reads)
        fi = await ops.open(ops.tree.disk_node.ino, os.O_RDONLY if read_only else os.O_RDWR,
                            None)
        if not read_only:
            assert await ops.write(fi.fh, 8192, b"b" * 4096) == 4096
        got = bytes(await ops.read(fi.fh, 4096, 8192))
        assert got == b"a" * 4096 + (b"a" if read_only else b"b") * 4096
    finally:
        ops.close_pool()
        disk.close()
