"""``-o cache=none``: the chain's files opened with O_DIRECT, judged by QEMU after the unmount.

Every read and write that the file's alignment allows bypasses the host page cache; the rest
(sub-sector guest requests, header fields, refcount entries) goes through the buffered
descriptor, and the bytes must come out exactly as written either way.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import subprocess

import pytest
from mounttools import mounted, needs_fuse, read_all
from qemutools import assert_check_clean, compare, create, qemu_io, to_raw

from qcowfs.errors import HostIOError
from qcowfs.image import hostfile
from qcowfs.image.hostfile import HostFile
from qcowfs.mount.options import OptionError, parse_options

MiB = 1 << 20


def _cached_bytes(path) -> int:
    """How much of ``path`` the page cache holds (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def _drop_cache(path) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_fds(pid: int, path) -> int:
    """How many of the daemon's descriptors on ``path`` carry O_DIRECT."""
    real = os.path.realpath(path)
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != real:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
        except OSError:
            continue
        count += bool(flags & os.O_DIRECT)
    return count


def test_cache_option_parses():
    assert parse_options(["cache=none"]).cache == "none"
    assert parse_options(["cache=none,cache=writeback"]).cache == "writeback"
    assert parse_options([]).cache == "writeback"
    with pytest.raises(OptionError, match="cache"):
        parse_options(["cache=unsafe"])


def test_hostfile_direct_reads_and_writes_are_byte_exact(tmp_path):
    path = tmp_path / "f.raw"
    rng = random.Random(3)
    expected = bytearray(rng.randbytes(3 * MiB + 1234))  # a length that ends mid-sector
    path.write_bytes(expected)
    f = HostFile(str(path), writable=True, direct=True)
    try:
        assert f.direct and f.align in (512, 4096)
        for _ in range(300):
            off = rng.randrange(0, len(expected) + 5000)
            n = rng.choice([1, 511, 512, 4096, 4097, 65536, 70000])
            if rng.random() < 0.5:
                off -= off % f.align
                n = -(-n // f.align) * f.align
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                f.write(off, data)
                if off > len(expected):
                    expected.extend(bytes(off - len(expected)))
                expected[off:off + n] = data
            else:
                buf = memoryview(mmap.mmap(-1, n)) if rng.random() < 0.5 \
                    else memoryview(bytearray(n))
                got = f.readinto(buf, off)
                assert bytes(buf[:got]) == bytes(expected[off:off + n])
                assert f.read(off, n) == bytes(expected[off:off + n])
        assert f.size == len(expected)
    finally:
        f.close()
    assert path.read_bytes() == bytes(expected)


@needs_fuse
@pytest.mark.fuse
def test_cache_none_mount_writes_land_as_qemu_sees_them(tmp_path):
    base = create(tmp_path / "base.raw", "8M", fmt="raw")
    qemu_io(base, "write -P 0x11 0 8M", fmt="raw")
    top = create(tmp_path / "top.qcow2", "16M", backing=base, backing_fmt="raw")
    qemu_io(top, "write -P 0x22 1M 1M")
    expected = bytearray(to_raw(top, tmp_path / "before.raw"))
    rng = random.Random(11)
    with mounted(top, tmp_path / "mnt", "rw,cache=none") as mp:
        pid = int(os.getxattr(mp, "user.qcowfs.pid"))
        assert _direct_fds(pid, top) >= 1 and _direct_fds(pid, base) >= 1
        disk = mp / "disk"
        fd = os.open(disk, os.O_RDWR)
        dfd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 1 * MiB)
        try:
            for _ in range(80):
                if rng.random() < 0.5:
                    n = rng.choice([1, 511, 4096, 65537, 150_000])
                    off = rng.randrange(0, len(expected) - n)
                    data = rng.randbytes(n)
                    assert os.pwrite(fd, data, off) == n
                else:  # O_DIRECT in the guest: whole 4 KiB blocks
                    n = rng.choice([4096, 65536, MiB])
                    off = rng.randrange(0, (len(expected) - n) // 4096) * 4096
                    data = rng.randbytes(n)
                    buf[:n] = data
                    assert os.pwritev(dfd, [memoryview(buf)[:n]], off) == n
                expected[off:off + n] = data
            os.fsync(fd)
        finally:
            os.close(dfd)
            os.close(fd)
            buf.close()
        assert read_all(disk) == bytes(expected)
        assert read_all(disk, direct=True) == bytes(expected)
    want = tmp_path / "want.raw"
    want.write_bytes(expected)
    assert compare(top, want, "-F", "raw") == 0
    assert_check_clean(top)
    assert to_raw(base, tmp_path / "base-after.raw", fmt="raw") == b"\x11" * (8 * MiB)


@needs_fuse
@pytest.mark.fuse
def test_cache_none_keeps_the_data_out_of_the_page_cache(tmp_path):
    """Reads and writes of whole blocks through a cache=none mount leave the image's data out
    of the host page cache; without cache=none the same reads bring it in."""
    img = create(tmp_path / "img.qcow2", "64M")
    qemu_io(img, "write -P 0x5a 0 32M")
    for options, most in (("ro,cache=none", 2 * MiB), ("ro", None)):
        _drop_cache(img)
        with mounted(img, tmp_path / "mnt", options) as mp:
            assert read_all(mp / "disk", direct=True)[:32 * MiB] == b"\x5a" * (32 * MiB)
            cached = _cached_bytes(img)
        if most is not None:
            assert cached <= most, f"{cached} bytes of the image cached under cache=none"
        else:
            assert cached >= 32 * MiB, f"only {cached} bytes cached without cache=none"
    _drop_cache(img)
    with mounted(img, tmp_path / "mnt", "rw,cache=none") as mp:
        fd = os.open(mp / "disk", os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MiB)
        buf[:] = b"\x6b" * MiB
        try:
            for k in range(32, 48):
                os.pwritev(fd, [buf], k * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
            buf.close()
        assert _cached_bytes(img) <= 2 * MiB
    assert_check_clean(img)
    qemu_io(img, "read -P 0x5a 0 32M", "read -P 0x6b 32M 16M")


def test_direct_open_refused_is_one_clear_error(tmp_path, monkeypatch):
    """Where the file system refuses O_DIRECT, opening for cache=none fails naming it."""
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(4096))
    real_open = os.open

    def no_direct(p, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(hostfile.os, "open", no_direct)
    with pytest.raises(HostIOError, match="O_DIRECT") as exc:
        HostFile(str(path), direct=True)
    assert "cache=none" in str(exc.value)
    HostFile(str(path)).close()  # buffered still opens
