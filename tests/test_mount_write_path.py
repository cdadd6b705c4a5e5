"""The mount's write path through a real kernel mount over the real qcow2 engine: buffered and
O_DIRECT writes, fsync, writes at the end of the disk, truncate, mtime, snapshot directories,
allow_shrink and touch. Images are made with qemu-img and judged with qemu-img compare, check
and info after ``qcowfs umount``. (The host file system's ENOSPC reaching the caller as ENOSPC
is tested over a real full tmpfs in test_mount_write.py.)"""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest
from mounttools import is_mounted, mounted, needs_fuse, read_all, wait_until
from qemutools import assert_check_clean, compare, create, info, qemu_img, qemu_io, to_raw

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    """An 8 MiB qcow2 image over a raw backing file: half of it backing data, some of it the
    image's own clusters, the rest unallocated."""
    base = create(tmp_path / "base.raw", "4M", fmt="raw")
    qemu_io(base, "write -P 0x5a 0 4M", fmt="raw")
    top = create(tmp_path / "disk.qcow2", "8M", backing=base, backing_fmt="raw")
    qemu_io(top, "write -P 0x3c 2M 1M", "write -P 0x7e 6M 512k")
    return top


def _snapshot_names(img) -> list[str]:
    lines = qemu_img("snapshot", "-l", img).stdout.decode().splitlines()[2:]
    return [ln.split()[1] for ln in lines if ln.strip()]


def test_buffered_direct_fsync_and_the_end(tmp_path, image):
    expected = bytearray(to_raw(image, tmp_path / "before.raw"))
    size = len(expected)
    rng = random.Random(2)
    with mounted(image, tmp_path / "mnt", "rw") as mp:
        disk = mp / "disk"
        fd = os.open(disk, os.O_RDWR)
        try:
            for _ in range(50):
                off = rng.randrange(0, 6 * MiB)
                data = rng.randbytes(rng.choice([1, 513, 4096, 100_000, 2 * MiB + 3]))
                assert os.pwrite(fd, data, off) == len(data)
                expected[off:off + len(data)] = data
            os.fsync(fd)
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"z", size)
            assert exc.value.errno == errno.ENOSPC, "a write past the end of the disk"
            assert os.pwrite(fd, b"e" * 100, size - 10) == 10, "a write across the end is cut"
            expected[-10:] = b"e" * 10
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
    assert not is_mounted(tmp_path / "mnt")
    assert info(image)["dirty-flag"] is False
    assert_check_clean(image)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert compare(tmp_path / "expected.raw", image) == 0


def test_truncate_mtime_and_snapshot_dirs(tmp_path, image):
    with mounted(image, tmp_path / "mnt", "rw") as mp:
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
        disk_now = read_all(disk)
    assert not is_mounted(tmp_path / "mnt")
    assert info(image)["virtual-size"] == 16 * MiB
    assert _snapshot_names(image) == []
    assert_check_clean(image)
    assert disk_now[:5] == b"later"
    assert to_raw(image, tmp_path / "after.raw") == disk_now


def test_allow_shrink(tmp_path, image):
    with mounted(image, tmp_path / "mnt", "rw") as mp:
        with pytest.raises(OSError) as exc:
            os.truncate(mp / "disk", MiB)
        assert exc.value.errno == errno.EPERM, "no shrink without allow_shrink"
    with mounted(image, tmp_path / "mnt", "rw,allow_shrink") as mp:
        head = read_all(mp / "disk")[:MiB]
        os.truncate(mp / "disk", MiB)
        assert os.stat(mp / "disk").st_size == MiB
    assert not is_mounted(tmp_path / "mnt")
    assert info(image)["virtual-size"] == MiB
    assert_check_clean(image)
    assert to_raw(image, tmp_path / "after.raw") == head


def test_touch_sets_the_disk_mtime(tmp_path, image):
    with mounted(image, tmp_path / "mnt", "rw") as mp:
        os.utime(mp / "disk", ns=(1_000_000_000_000_000_000, 1_500_000_000_123_456_789))
        assert os.stat(mp / "disk").st_mtime_ns == 1_500_000_000_123_456_789
    assert_check_clean(image)
