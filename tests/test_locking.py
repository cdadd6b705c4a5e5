"""qcowfs takes QEMU's own lock bytes: QEMU refuses what qcowfs holds, and the reverse."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from qemutools import create, locked_bytes, qemu_img

import qcowfs
from qcowfs.errors import LockedError
from qcowfs.image.locking import LockMode, acquire, lock_bytes


@pytest.fixture
def image(tmp_path):
    return create(tmp_path / "img.qcow2", "1M")


def test_write_mode_holds_qemus_writer_bytes(image):
    fd = os.open(image, os.O_RDWR)
    try:
        acquire(fd, str(image), LockMode.WRITE)
        assert locked_bytes(image) == {100, 101, 103, 201, 203} == set(lock_bytes(LockMode.WRITE))
    finally:
        os.close(fd)
    assert locked_bytes(image) == set()


def test_qemu_refuses_image_held_for_writing(image):
    fd = os.open(image, os.O_RDWR)
    try:
        acquire(fd, str(image), LockMode.WRITE)
        info = qemu_img("info", str(image), check=False)
        assert info.returncode != 0 and b'shared "write" lock' in info.stderr
        assert qemu_img("info", "-U", str(image), check=False).returncode == 0
    finally:
        os.close(fd)
    assert qemu_img("info", str(image), check=False).returncode == 0


def test_read_mode_lets_qemu_read_but_not_write(image):
    fd = os.open(image, os.O_RDONLY)
    try:
        acquire(fd, str(image), LockMode.READ)
        assert qemu_img("info", str(image), check=False).returncode == 0
        w = subprocess.run(["qemu-io", "-c", "write 0 512", str(image)], capture_output=True)
        assert w.returncode != 0 and b'"write" lock' in w.stderr
    finally:
        os.close(fd)


def wait_for_locks(path, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if locked_bytes(path):
            return
        time.sleep(0.02)
    raise AssertionError("qemu-io never took its locks")


@pytest.mark.parametrize(("qemu_args", "write_refused", "read_refused"), [
    ((), True, True),            # qemu-io read/write
    (("-r",), True, False),      # qemu-io read-only
    (("-r", "-U"), False, False),  # force-share takes no locks that block
])
def test_qcowfs_refuses_what_qemu_holds(image, qemu_args, write_refused, read_refused):
    proc = subprocess.Popen(["qemu-io", *qemu_args, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if qemu_args != ("-r", "-U"):
            wait_for_locks(image)
        else:
            time.sleep(0)  # -U takes nothing to wait for; qemu-io is running either way
        for mode, refused in ((LockMode.WRITE, write_refused), (LockMode.READ, read_refused)):
            fd = os.open(image, os.O_RDWR if mode is LockMode.WRITE else os.O_RDONLY)
            try:
                if refused:
                    with pytest.raises(LockedError, match="another process"):
                        acquire(fd, str(image), mode)
                else:
                    acquire(fd, str(image), mode)
            finally:
                os.close(fd)
    finally:
        proc.communicate(b"quit\n", timeout=30)


def test_locks_vanish_when_holder_dies(image):
    root = os.path.dirname(os.path.dirname(qcowfs.__file__))
    code = (f"import os,sys,time;sys.path.insert(0,{root!r});"
            "from qcowfs.image.locking import acquire,LockMode;"
            f"fd=os.open({str(image)!r},os.O_RDWR);acquire(fd,'x',LockMode.WRITE);"
            "print('held',flush=True);time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        assert qemu_img("info", str(image), check=False).returncode != 0
    finally:
        proc.kill()
        proc.wait()
    assert qemu_img("info", str(image), check=False).returncode == 0
