"""Mounting encrypted images: ``-o key_file=``, the no-echo prompt, and refusing without a
key; what the mount wrote is judged by QEMU with the same key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mounttools import env, force_unmount, is_mounted, mounted, needs_fuse, qcowfs, wait_until

from tests import qemutools as q

pytestmark = [needs_fuse, pytest.mark.fuse]

KEY = "mount key"
MiB = 1 << 20


@pytest.fixture
def luks(tmp_path: Path) -> Path:
    img = q.create_encrypted(tmp_path / "luks.qcow2", 8 * MiB, KEY, cluster_size=65536)
    q.qemu_io_encrypted(img, [KEY], "write -P 0x4d 0 2M")
    return img


def test_mount_with_key_file_reads_and_writes(luks: Path, tmp_path: Path):
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY.encode())
    want = bytearray(q.to_raw_encrypted(luks, tmp_path / "want.raw", [KEY]))
    with mounted(luks, tmp_path / "mnt", f"key_file={keyfile}") as mp:
        disk = mp / "disk"
        assert disk.read_bytes() == bytes(want)
        with open(disk, "r+b") as f:
            f.seek(1 * MiB + 100)
            f.write(b"\x99" * 70000)
            f.seek(6 * MiB)
            f.write(b"\x17" * 4096)
        want[MiB + 100:MiB + 70100] = b"\x99" * 70000
        want[6 * MiB:6 * MiB + 4096] = b"\x17" * 4096
        with open("/proc/mounts") as f:
            assert KEY not in f.read()
    assert q.to_raw_encrypted(luks, tmp_path / "got.raw", [KEY]) == bytes(want)
    assert q.check_encrypted(luks, [KEY])[0] == 0


def test_mount_without_a_key_and_no_terminal_names_key_file(luks: Path, tmp_path: Path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    p = subprocess.run([sys.executable, "-m", "qcowfs", "mount", str(luks), str(mp)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env(),
                       timeout=60)
    try:
        assert p.returncode == 1
        assert "key_file" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert not is_mounted(mp)
    finally:
        force_unmount(mp)


def test_mount_with_a_wrong_key_file_is_one_line(luks: Path, tmp_path: Path):
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"nope")
    mp = tmp_path / "mnt"
    mp.mkdir()
    p = qcowfs("mount", "-o", f"key_file={keyfile}", luks, mp)
    try:
        assert p.returncode == 1
        assert p.stderr.strip().endswith("invalid password") and p.stderr.count("\n") == 1
    finally:
        force_unmount(mp)


def _controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty on stdin (where
    getpass prompts, as it would for a user at a terminal)."""
    import fcntl
    import termios
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_mount_prompts_without_echo_on_a_terminal(luks: Path, tmp_path: Path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qcowfs", "mount", str(luks), str(mp)],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(), preexec_fn=_controlling_terminal)
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"Password" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 1024)
        assert b"Password for" in seen
        os.write(master, KEY.encode() + b"\n")
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        wait_until(lambda: is_mounted(mp), what="the mount")
        assert (mp / "disk").read_bytes()[:2 * MiB] == b"\x4d" * (2 * MiB)
        echoed = b""
        os.set_blocking(master, False)
        try:
            echoed = os.read(master, 4096)
        except (BlockingIOError, OSError):
            pass
        assert KEY.encode() not in echoed
    finally:
        if is_mounted(mp):
            qcowfs("umount", mp)
        force_unmount(mp)
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_encrypted_chain_with_snapshots_in_the_foreground_never_shows_the_key(tmp_path: Path):
    # A LUKS overlay (with an internal snapshot) on a LUKS base made with the same key, as a
    # mount's one key_file serves: the disk, the snapshot and the layers read as QEMU reads
    # them, and the key is in no argv, no log line (--debug traces every request), no
    # /proc/mounts entry and no info file.
    base = q.create_encrypted(tmp_path / "base.qcow2", 4 * MiB, KEY)
    q.qemu_io_encrypted(base, [KEY], "write -P 0x11 0 4M")
    top = q.create_encrypted(tmp_path / "top.qcow2", 4 * MiB, KEY, backing=base.name)
    q.qemu_io_encrypted(top, [KEY, KEY], "write -P 0x22 1M 1M")
    objects, opts = q.encrypted_opts(top, [KEY, KEY])
    q.qemu_img("snapshot", *objects, "--image-opts", "-c", "snap1", opts)
    q.qemu_io_encrypted(top, [KEY, KEY], "write -P 0x33 0 64k")
    want = q.to_raw_encrypted(top, tmp_path / "want.raw", [KEY, KEY])
    snap = tmp_path / "snap.raw"
    q.qemu_img("convert", *objects, "--image-opts", "-l", "snapshot.name=snap1", "-O", "raw",
               opts, str(snap))
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY.encode())
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "qcowfs", "mount", "-f", "--debug", "-o",
                             f"rw,key_file={keyfile}", str(top), str(mp)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: is_mounted(mp), what="the mount")
        assert (mp / "disk").read_bytes() == want
        assert (mp / "snapshots" / "snap1" / "disk").read_bytes() == snap.read_bytes()
        with open(mp / "disk", "r+b") as f:
            f.seek(2 * MiB)
            f.write(b"\x44" * 8192)
        infos = [p.read_bytes() for p in mp.glob("*/*/info")]
        assert len(infos) >= 3  # the snapshot's and both layers'
        for text in infos:
            assert KEY.encode() not in text
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read()
        with open("/proc/mounts", "rb") as f:
            assert KEY.encode() not in f.read()
        assert qcowfs("umount", mp).returncode == 0
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert b"read(" in err and KEY.encode() not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mp)
    got = q.to_raw_encrypted(top, tmp_path / "got.raw", [KEY, KEY])
    assert got[2 * MiB:2 * MiB + 8192] == b"\x44" * 8192
    assert got[:2 * MiB] == want[:2 * MiB]
    assert q.check_encrypted(top, [KEY, KEY])[0] == 0


@pytest.mark.skipif(not getattr(__import__("pyfuse3"), "HANDLES_DEFERRED_WRITES", False),
                    reason="this pyfuse3 lacks qcowfs's deferred-write patch")
def test_encrypted_in_place_writes_through_the_data_threads(tmp_path: Path):
    """Whole-sector overwrites of an encrypted image are encrypted on the request thread and
    written by the data threads (io_slow_us=0 sends every one there), beside part-sector
    writes that take the general path: QEMU decrypts exactly what the clients wrote last."""
    import mmap
    import random
    import threading

    img = q.create_encrypted(tmp_path / "luks.qcow2", 16 * MiB, KEY, cluster_size=65536)
    q.qemu_io_encrypted(img, [KEY], "write -P 0x21 0 16M")
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY.encode())
    expected = bytearray(b"\x21" * (16 * MiB))
    errors: list[BaseException] = []
    with mounted(img, tmp_path / "mnt", f"rw,key_file={keyfile},io_threads=2,io_slow_us=0") \
            as mp:
        disk = mp / "disk"

        def writer(k: int) -> None:
            try:  # each writer owns one 8 MiB half
                rng = random.Random(k)
                fd = os.open(disk, os.O_RDWR | (os.O_DIRECT if k == 0 else 0))
                buf = mmap.mmap(-1, 65536)
                try:
                    for _ in range(200):
                        n = rng.choice([4096, 8192, 65536] if k == 0 else [100, 1000, 5000])
                        off = k * 8 * MiB + rng.randrange(0, (8 * MiB - n) // 512) * 512
                        if k:
                            off += rng.randrange(1, 511)  # parts of sectors
                        data = rng.randbytes(n)
                        buf[:n] = data
                        assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
                        expected[off:off + n] = data
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    buf.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert disk.read_bytes() == bytes(expected)
    assert q.to_raw_encrypted(img, tmp_path / "got.raw", [KEY]) == bytes(expected)
    assert q.check_encrypted(img, [KEY])[0] == 0
