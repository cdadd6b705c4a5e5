"""The mount's write path through a real kernel mount, over a stand-in engine (a raw file; see
tests/standin_engine.py). The qcow2 writes themselves are tested in test_mount_write.py."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mounttools import env, force_unmount, is_mounted, needs_fuse, read_all, wait_until

pytestmark = [needs_fuse, pytest.mark.fuse]

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


@contextlib.contextmanager
def standin_mount(image: Path, mp: Path, options: str = "rw"):
    mp.mkdir(exist_ok=True)
    e = env()
    e["PYTHONPATH"] += os.pathsep + str(HERE)
    proc = subprocess.Popen([sys.executable, str(HERE / "standin_engine.py"), str(image),
                             str(mp), options], env=e, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: is_mounted(mp) or proc.poll() is not None, what="the mount")
        assert proc.poll() is None, proc.stderr.read()
        os.listdir(mp)  # answered once FUSE_INIT is done
        yield mp, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_unmount(mp)


@pytest.fixture
def raw(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(random.Random(1).randbytes(8 * MiB))
    return image


def test_buffered_direct_fsync_and_the_end(tmp_path, raw):
    expected = bytearray(raw.read_bytes())
    rng = random.Random(2)
    with standin_mount(raw, tmp_path / "mnt") as (mp, proc):
        disk = mp / "disk"
        fd = os.open(disk, os.O_RDWR)
        try:
            for _ in range(50):
                off = rng.randrange(0, 6 * MiB)
                if off <= (3 << 20) < off + 200_000:
                    continue
                data = rng.randbytes(rng.choice([1, 513, 4096, 100_000, 2 * MiB + 3]))
                if off <= (3 << 20) < off + len(data):
                    continue
                assert os.pwrite(fd, data, off) == len(data)
                expected[off:off + len(data)] = data
            os.fsync(fd)
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"z", 8 * MiB)
            assert exc.value.errno == errno.ENOSPC
            assert os.pwrite(fd, b"e" * 100, 8 * MiB - 10) == 10
            expected[-10:] = b"e" * 10
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"n" * 4096, 3 << 20)
            assert exc.value.errno == errno.ENOSPC, "the engine's ENOSPC stays ENOSPC"
        finally:
            os.close(fd)
        buf = mmap.mmap(-1, 65536)
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            buf[:] = b"\xd1" * 65536
            assert os.pwritev(fd, [buf], 5 * MiB) == 65536
            expected[5 * MiB:5 * MiB + 65536] = bytes(buf)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        assert read_all(disk) == bytes(expected)
        assert read_all(disk, direct=True) == bytes(expected)
    assert proc.returncode == 0
    assert raw.read_bytes() == bytes(expected)


def test_truncate_mtime_and_snapshot_dirs(tmp_path, raw):
    with standin_mount(raw, tmp_path / "mnt") as (mp, proc):
        disk = mp / "disk"
        before = os.stat(disk)
        with open(disk, "r+b") as f:
            f.write(b"first")
        wait_until(lambda: os.stat(disk).st_mtime_ns > before.st_mtime_ns, what="mtime")
        os.truncate(disk, 16 * MiB)
        assert os.stat(disk).st_size == 16 * MiB
        with pytest.raises(OSError) as exc:
            os.truncate(disk, MiB)
        assert exc.value.errno == errno.EPERM
        with pytest.raises(OSError) as exc:
            os.open(disk, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC is a shrink to 0
        assert exc.value.errno == errno.EPERM
        with pytest.raises(OSError) as exc:
            os.chmod(disk, 0o600)
        assert exc.value.errno == errno.EPERM
        with pytest.raises(OSError) as exc:
            os.open(mp / "newfile", os.O_WRONLY | os.O_CREAT, 0o644)
        assert exc.value.errno == errno.EPERM

        os.mkdir(mp / "snapshots" / "one")
        with open(disk, "r+b") as f:
            f.write(b"later")
        with open(mp / "snapshots" / "one" / "disk", "rb") as f:
            assert f.read(5) == b"first"
            with pytest.raises(OSError) as exc:
                os.rmdir(mp / "snapshots" / "one")
            assert exc.value.errno == errno.EBUSY
        with pytest.raises(OSError) as exc:
            os.mkdir(mp / "snapshots" / "one")
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(OSError) as exc:
            os.mkdir(mp / "elsewhere")
        assert exc.value.errno == errno.EPERM
        assert "name: one\n" in (mp / "snapshots" / "one" / "info").read_text()
        os.rmdir(mp / "snapshots" / "one")
        assert os.listdir(mp / "snapshots") == []
        assert not os.path.exists(mp / "snapshots" / "one")
    assert proc.returncode == 0
    assert os.path.getsize(raw) == 16 * MiB


def test_allow_shrink(tmp_path, raw):
    with standin_mount(raw, tmp_path / "mnt", "rw,allow_shrink") as (mp, _):
        os.truncate(mp / "disk", MiB)
        assert os.stat(mp / "disk").st_size == MiB
    assert os.path.getsize(raw) == MiB
    assert not is_mounted(tmp_path / "mnt")


def test_touch_sets_the_disk_mtime(tmp_path, raw):
    with standin_mount(raw, tmp_path / "mnt") as (mp, _):
        os.utime(mp / "disk", ns=(1_000_000_000_000_000_000, 1_500_000_000_123_456_789))
        assert os.stat(mp / "disk").st_mtime_ns == 1_500_000_000_123_456_789
