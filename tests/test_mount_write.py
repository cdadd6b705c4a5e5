"""Writes through a read/write mount, judged by QEMU after ``qcowfs umount``.

These need the write engine (``open_image(writable=True)``); until it has landed on this branch
they are skipped with that reason.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import signal
import subprocess
import sys

import pytest
from mounttools import (
    force_unmount,
    fs_mounted,
    is_mounted,
    loop_device,
    mounted,
    needs_fuse,
    qcowfs,
    read_all,
    wait_until,
)
from qemutools import (
    assert_check_clean,
    check,
    compare,
    create,
    info,
    qemu_img,
    qemu_io,
    to_raw,
)
from test_mount_loop import assert_same_tree, make_tree

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


def _gone(pid: int) -> bool:
    """The process has exited (a zombie has closed its files, and so its locks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def chain(tmp_path):
    base = create(tmp_path / "base.raw", "8M", fmt="raw")
    qemu_io(base, "write -P 0x11 0 8M", fmt="raw")
    top = create(tmp_path / "top.qcow2", "16M", backing=base, backing_fmt="raw")
    qemu_io(top, "write -P 0x22 1M 1M")
    return base, top


def test_buffered_and_direct_writes_land_as_qemu_sees_them(tmp_path, chain):
    base, top = chain
    before = _digest(base)
    expected = bytearray(to_raw(top, tmp_path / "before.raw"))
    rng = random.Random(7)
    with mounted(top, tmp_path / "mnt", "rw") as mp:
        fd = os.open(mp / "disk", os.O_RDWR)
        try:
            for _ in range(60):
                off = rng.randrange(0, len(expected) - 200_000)
                data = rng.randbytes(rng.choice([1, 511, 4096, 65537, 150_000]))
                assert os.pwrite(fd, data, off) == len(data)
                expected[off:off + len(data)] = data
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        fd = os.open(mp / "disk", os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 64 * 1024)
        try:
            for off in (0, 4096 * 3, 7 * MiB + 4096, 15 * MiB):
                data = rng.randbytes(len(buf))
                buf[:] = data
                assert os.pwritev(fd, [buf], off) == len(buf)
                expected[off:off + len(buf)] = data
            os.fsync(fd)
        finally:
            os.close(fd)
        assert read_all(mp / "disk") == bytes(expected)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_check_clean(top)
    assert compare(tmp_path / "expected.raw", top) == 0
    assert _digest(base) == before, "the backing file must not change"


def test_times_blocks_and_the_end_of_the_disk(tmp_path, chain):
    _, top = chain
    with mounted(top, tmp_path / "mnt", "rw") as mp:
        st0 = os.stat(mp / "disk")
        fd = os.open(mp / "disk", os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(4 * MiB), 8 * MiB)
            os.fsync(fd)
            wait_until(lambda: os.stat(mp / "disk").st_mtime_ns > st0.st_mtime_ns,
                       what="mtime to move")
            wait_until(lambda: os.stat(mp / "disk").st_blocks >= st0.st_blocks + 8192,
                       what="st_blocks to count the new clusters")
            size = os.fstat(fd).st_size
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x" * 4096, size)
            assert exc.value.errno == errno.ENOSPC
            assert os.pwrite(fd, b"y" * 8192, size - 4096) == 4096
        finally:
            os.close(fd)
        assert os.stat(mp / "disk").st_size == size


def test_truncate_grows_and_refuses_to_shrink(tmp_path, chain):
    _, top = chain
    with mounted(top, tmp_path / "mnt", "rw") as mp:
        os.truncate(mp / "disk", 32 * MiB)
        assert os.stat(mp / "disk").st_size == 32 * MiB
        with pytest.raises(OSError) as exc:
            os.truncate(mp / "disk", 4 * MiB)
        assert exc.value.errno == errno.EPERM
    assert info(top)["virtual-size"] == 32 * MiB
    assert_check_clean(top)
    with mounted(top, tmp_path / "mnt", "rw,allow_shrink") as mp:
        os.truncate(mp / "disk", 16 * MiB)
        assert os.stat(mp / "disk").st_size == 16 * MiB
    assert info(top)["virtual-size"] == 16 * MiB
    assert_check_clean(top)


def test_ext4_on_loop_survives_a_remount(tmp_path):
    img = create(tmp_path / "fs.qcow2", "128M")
    tree = make_tree(tmp_path / "tree", seed=3)
    with mounted(img, tmp_path / "mnt", "rw") as mp, loop_device(mp / "disk") as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        with fs_mounted(dev, tmp_path / "fs") as fs:
            subprocess.run(["cp", "-a", f"{tree}/.", str(fs)], check=True)
        p = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    assert_check_clean(img)
    with mounted(img, tmp_path / "mnt", "ro") as mp, \
            loop_device(mp / "disk", read_only=True) as dev, \
            fs_mounted(dev, tmp_path / "fs", "ro", "noload") as fs:
        assert_same_tree(tree, fs)


def _snapshot_ids(img) -> dict[str, str]:
    """name -> id, as ``qemu-img snapshot -l`` lists them."""
    lines = qemu_img("snapshot", "-l", img).stdout.decode().splitlines()[2:]
    return {ln.split()[1]: ln.split()[0] for ln in lines if ln.strip()}


def _snapshot_names(img) -> list[str]:
    return list(_snapshot_ids(img))


def test_mkdir_and_rmdir_snapshots(tmp_path, chain):
    _, top = chain
    with mounted(top, tmp_path / "mnt", "rw") as mp:
        with open(mp / "disk", "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"\xa1" * MiB)
            f.flush()
            os.fsync(f.fileno())
        os.mkdir(mp / "snapshots" / "first")
        with open(mp / "disk", "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"\xb2" * MiB)
        with open(mp / "snapshots" / "first" / "disk", "rb") as f:
            f.seek(3 * MiB)
            assert f.read(MiB) == b"\xa1" * MiB, "the snapshot holds the writes before mkdir"
        os.mkdir(mp / "snapshots" / "second")
        with pytest.raises(OSError) as exc:
            os.mkdir(mp / "snapshots" / "second")
        assert exc.value.errno == errno.EEXIST
        assert sorted(os.listdir(mp / "snapshots")) == ["first", "second"]
        disk_now = read_all(mp / "disk")
    assert_check_clean(top)
    assert _snapshot_names(top) == ["first", "second"]
    ids = _snapshot_ids(top)
    first = to_raw(top, tmp_path / "first.raw", snapshot=ids["first"])
    assert first[3 * MiB:4 * MiB] == b"\xa1" * MiB
    assert to_raw(top, tmp_path / "second.raw", snapshot=ids["second"]) == disk_now
    with mounted(top, tmp_path / "mnt", "rw") as mp:
        os.rmdir(mp / "snapshots" / "first")
        assert os.listdir(mp / "snapshots") == ["second"]
    assert _snapshot_names(top) == ["second"]
    assert_check_clean(top)


def test_locks_while_mounted_and_released_by_umount(tmp_path, chain):
    _, top = chain
    mp = tmp_path / "mnt"
    with mounted(top, mp, "rw"):
        p = qemu_img("info", top, check=False)
        assert p.returncode != 0 and b"lock" in p.stderr
        assert qemu_img("info", "-U", top, check=False).returncode == 0
        (tmp_path / "mnt2").mkdir()
        second = qcowfs("mount", top, tmp_path / "mnt2")
        try:
            assert second.returncode != 0
            assert len(second.stderr.strip().splitlines()) == 1, second.stderr
            assert not is_mounted(tmp_path / "mnt2")
        finally:
            force_unmount(tmp_path / "mnt2")
        u = qcowfs("umount", mp)
        assert u.returncode == 0, u.stderr
        # the very next command may open the image for writing
        qemu_io(top, "write -P 0x99 0 4k")
    assert_check_clean(top)


def test_sigkill_during_writes_leaves_no_corruption(tmp_path, chain):
    _, top = chain
    mp = tmp_path / "mnt"
    with mounted(top, mp, "rw"):
        pid = int(os.getxattr(mp, "user.qcowfs.pid"))
        writer = subprocess.Popen(["dd", "if=/dev/urandom", f"of={mp / 'disk'}", "bs=64k",
                                   "oflag=direct", "conv=notrunc"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: os.stat(top).st_size > 4 * MiB, what="writes to land")
            os.kill(pid, signal.SIGKILL)
            writer.wait(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        wait_until(lambda: not is_mounted(mp), what="the lazy unmount")
    wait_until(lambda: _gone(pid), what="the killed daemon to be gone")
    code, report = check(top)
    assert code in (0, 3), report  # 3: leaked clusters only, never corruption
    assert not report.get("corruptions"), report
    with mounted(top, mp, "rw") as again:
        assert os.stat(again / "disk").st_size == 16 * MiB


def test_snapshots_taken_while_another_process_writes(tmp_path, chain):
    _, top = chain
    mp = tmp_path / "mnt"
    with mounted(top, mp, "rw"):
        stop = tmp_path / "stop"
        script = ("import os, random, sys\n"
                  "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
                  "r = random.Random(5)\n"
                  "n = 0\n"
                  "while not os.path.exists(sys.argv[2]):\n"
                  "    os.pwrite(fd, r.randbytes(4096), r.randrange(4096) * 4096)\n"
                  "    n += 1\n"
                  "    if n == 1:\n"
                  "        print('writing', flush=True)\n"
                  "os.fsync(fd)\n")
        writer = subprocess.Popen([sys.executable, "-c", script, str(mp / "disk"), str(stop)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline() == "writing\n"  # writes are under way
            for i in range(6):
                os.mkdir(mp / "snapshots" / f"busy{i}")
            os.rmdir(mp / "snapshots" / "busy2")
        finally:
            stop.touch()
            _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        listed = sorted(os.listdir(mp / "snapshots"))
        views = {n: read_all(mp / "snapshots" / n / "disk") for n in listed}
    assert listed == ["busy0", "busy1", "busy3", "busy4", "busy5"]
    assert_check_clean(top)
    ids = _snapshot_ids(top)
    assert sorted(ids) == listed
    for name, data in views.items():
        assert to_raw(top, tmp_path / f"{name}.raw", snapshot=ids[name]) == data


def test_host_enospc_reaches_the_writer_and_the_daemon_survives(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    mp = tmp_path / "mnt"
    try:
        img = create(small / "img.qcow2", "64M")
        with mounted(img, mp, "rw"):
            fd = os.open(mp / "disk", os.O_RDWR)
            try:
                chunk = os.urandom(MiB)
                with pytest.raises(OSError) as exc:
                    for i in range(32):
                        os.pwrite(fd, chunk, i * MiB)
                    os.fsync(fd)
                assert exc.value.errno == errno.ENOSPC
                assert os.pread(fd, 4096, 0) == chunk[:4096], "the daemon still serves"
            finally:
                os.close(fd)
        code, report = check(img)
        assert not report.get("corruptions"), report
        assert code in (0, 3), report
    finally:
        force_unmount(mp)
        subprocess.run(["umount", str(small)], capture_output=True)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount3 -u"])
def test_every_way_out_closes_a_written_image_cleanly(tmp_path, chain, how):
    _, top = chain
    mp = tmp_path / "mnt"
    with mounted(top, mp, "rw"):
        pid = int(os.getxattr(mp, "user.qcowfs.pid"))
        with open(mp / "disk", "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"\xee" * (3 * MiB))  # no fsync: the close must flush
        if how == "fusermount3 -u":
            subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        else:
            os.kill(pid, getattr(signal, how))
        wait_until(lambda: _gone(pid), what="the daemon to exit")
        assert not is_mounted(mp)
    assert_check_clean(top)
    specific = info(top).get("format-specific", {}).get("data", {})
    assert not specific.get("corrupt"), specific
    qemu_io(top, "read -P 0xee 5M 3M")
