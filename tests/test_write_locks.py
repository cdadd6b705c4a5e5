"""open_image takes QEMU's lock bytes: QEMU (qemu-img, qemu-io, qemu-nbd) cannot write or
consistently read an image qcowfs writes, and qcowfs refuses an image QEMU or another qcowfs
writes. Locks vanish when the holder closes or dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from qemutools import create, locked_bytes, qemu_img

import qcowfs
from qcowfs.errors import LockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def chain(tmp_path):
    base = create(tmp_path / "base.qcow2", "4M")
    top = create(tmp_path / "top.qcow2", "4M", backing=base, backing_fmt="qcow2")
    return top, base


def test_qemu_cannot_open_an_image_qcowfs_writes(chain):
    top, base = chain
    with qcowfs.open_image(str(top), writable=True) as disk:
        disk.write(0, b"x" * 4096)
        assert {100, 101, 103, 201, 203} <= locked_bytes(top)
        p = subprocess.run(["qemu-io", "-c", "write 0 512", str(top)], capture_output=True)
        assert p.returncode != 0 and b'"write" lock' in p.stderr
        p = qemu_img("info", str(top), check=False)
        assert p.returncode != 0 and b'shared "write" lock' in p.stderr
        assert qemu_img("info", "-U", str(top), check=False).returncode == 0
        # The backing file is held as a reader: QEMU may read it but not write it.
        assert qemu_img("info", str(base), check=False).returncode == 0
        p = subprocess.run(["qemu-io", "-c", "write 0 512", str(base)], capture_output=True)
        assert p.returncode != 0 and b'"write" lock' in p.stderr
    assert locked_bytes(top) == set()
    assert qemu_img("check", str(top), check=False).returncode == 0


def test_qcowfs_refuses_an_image_qemu_io_holds(chain):
    top, _ = chain
    proc = subprocess.Popen(["qemu-io", str(top)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: 101 in locked_bytes(top), "qemu-io to lock the image")
        with pytest.raises(LockedError):
            qcowfs.open_image(str(top), writable=True)
        with pytest.raises(LockedError):
            qcowfs.open_image(str(top))
    finally:
        proc.communicate(b"quit\n", timeout=30)
    with qcowfs.open_image(str(top), writable=True) as disk:
        disk.write(0, b"y")


def test_qcowfs_refuses_an_image_qemu_nbd_serves_and_locks_die_with_it(chain, tmp_path):
    top, _ = chain
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(top)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: 101 in locked_bytes(top), "qemu-nbd to lock the image")
        with pytest.raises(LockedError, match="write"):
            qcowfs.open_image(str(top), writable=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with qcowfs.open_image(str(top), writable=True) as disk:
        disk.write(0, b"z")


def test_second_qcowfs_writer_is_refused_and_a_killed_holder_releases(chain):
    top, _ = chain
    code = ("import sys, qcowfs\n"
            "d = qcowfs.open_image(sys.argv[1], writable=True)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(top)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert proc.stdout.readline().strip() == b"ready"
        with pytest.raises(LockedError):
            qcowfs.open_image(str(top), writable=True)
        with pytest.raises(LockedError):
            qcowfs.open_image(str(top))
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with qcowfs.open_image(str(top), writable=True) as disk:
        disk.write(0, b"w")


def test_two_writers_in_one_process_conflict(chain):
    top, _ = chain
    with qcowfs.open_image(str(top), writable=True), pytest.raises(LockedError):
        qcowfs.open_image(str(top), writable=True)


def test_readers_share(chain):
    top, _ = chain
    with qcowfs.open_image(str(top)) as a, qcowfs.open_image(str(top)) as b:
        assert a.read(0, 16) == b.read(0, 16)
        assert qemu_img("info", str(top), check=False).returncode == 0
