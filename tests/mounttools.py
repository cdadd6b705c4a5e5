"""Real mounts for tests: run the qcowfs CLI as users do, and always clean up (unmount with
``qcowfs umount``, then ``fusermount3 -u``, then ``-uz``; detach loop devices) in ``finally``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HAVE_FUSE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None

needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and fusermount3")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("NOTIFY_SOCKET", None)
    return e


def qcowfs(*args: str | os.PathLike, check: bool = False, timeout: float = 120,
           extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m qcowfs ARGS`` from this tree."""
    e = env()
    if extra_env:
        e.update(extra_env)
    p = subprocess.run([sys.executable, "-m", "qcowfs", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, env=e)
    if check and p.returncode:
        raise AssertionError(f"qcowfs {' '.join(map(str, args))}: exit {p.returncode}: "
                             f"{p.stderr}")
    return p


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def force_unmount(mountpoint: str | os.PathLike) -> None:
    """Last-resort cleanup: whatever state the mount is in, leave nothing mounted."""
    mp = str(mountpoint)
    for args in (["fusermount3", "-u", mp], ["fusermount3", "-u", "-z", mp]):
        if not is_mounted(mp):
            return
        subprocess.run(args, capture_output=True)
    if is_mounted(mp):
        subprocess.run(["umount", "-l", mp], capture_output=True)


@contextlib.contextmanager
def mounted(image: str | os.PathLike, mountpoint: str | os.PathLike, *options: str):
    """``qcowfs mount -o OPTIONS IMAGE MOUNTPOINT`` ... ``qcowfs umount MOUNTPOINT``."""
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    for o in options:
        args += ["-o", o]
    p = qcowfs("mount", *args, image, mp)
    try:
        assert p.returncode == 0, f"mount failed: {p.stderr}"
        assert is_mounted(mp), "mount returned 0 but nothing is mounted"
        yield mp
    finally:
        try:
            if is_mounted(mp):
                u = qcowfs("umount", mp)
                assert u.returncode == 0 or not is_mounted(mp), f"umount failed: {u.stderr}"
        finally:
            force_unmount(mp)


@contextlib.contextmanager
def loop_device(path: str | os.PathLike, *, read_only: bool = False, direct: bool = False):
    args = ["losetup", "-f", "--show"]
    if read_only:
        args.append("-r")
    if direct:
        args.append("--direct-io=on")
    dev = subprocess.run([*args, str(path)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        wait_until(lambda: str(path) not in subprocess.run(
            ["losetup", "-j", str(path)], capture_output=True, text=True).stdout,
            timeout=10, what=f"{dev} to detach")


@contextlib.contextmanager
def fs_mounted(device: str, mountpoint: str | os.PathLike, *options: str):
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    args = ["mount"] + (["-o", ",".join(options)] if options else []) + [device, str(mp)]
    subprocess.run(args, check=True, capture_output=True)
    try:
        yield mp
    finally:
        if subprocess.run(["umount", str(mp)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)


def read_all(path: str | os.PathLike, *, direct: bool = False, chunk: int = 1 << 20) -> bytes:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        import mmap
        buf = mmap.mmap(-1, chunk)
        out = bytearray()
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            out += buf[:n]
        buf.close()
        return bytes(out)
    finally:
        os.close(fd)
