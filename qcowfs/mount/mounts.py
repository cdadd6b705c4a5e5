"""Finding qcowfs mounts and their daemons, and unmounting them so that the caller may use the
image the moment this returns."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

FSTYPE = "fuse.qcowfs"
#: Extended attributes of the mount root: the daemon's pid and the image it serves.
XATTR_PID = b"user.qcowfs.pid"
XATTR_IMAGE = b"user.qcowfs.image"


class UnmountError(Exception):
    """Unmounting failed: ``what`` failed because ``why``."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


@dataclass
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """Every mount this process sees, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            out.append(MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return out


def find_mount(mountpoint: str) -> MountEntry | None:
    """The qcowfs mount at ``mountpoint`` (the topmost one), or None."""
    full = os.path.realpath(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == full:
            found = m
    return found if found is not None and found.fstype == FSTYPE else None


def daemon_pid(mountpoint: str) -> int | None:
    """The pid the daemon serving ``mountpoint`` reports, or None when it does not answer."""
    try:
        return int(os.getxattr(mountpoint, XATTR_PID.decode()))
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time (to tell it from a later process with the same pid), or None
    when it is gone or a zombie (its files, and so its image locks, are closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def wait_for_exit(pid: int, started: str | None, timeout: float) -> bool:
    """Poll until the process is gone (or became a different process); False at the
    deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        now_started = _start_time(pid)
        if now_started is None or now_started != started:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def fusermount(mountpoint: str, *, lazy: bool = False) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise UnmountError(mountpoint, "fusermount3 not found (install fuse3)")
    args = [tool, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode:
        said = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        said = said.split(": ", 1)[-1] if said.startswith(os.path.basename(tool)) else said
        raise UnmountError(mountpoint, said.removeprefix(mountpoint + ": "))


def unmount(mountpoint: str, *, timeout: float = 600.0, lazy: bool = False) -> int | None:
    """Unmount a qcowfs mount and wait until its daemon has closed the image and exited.

    Returns the daemon's pid, or None when no daemon answered (it had died: the kernel mount
    is removed, but the image was not closed cleanly)."""
    entry = find_mount(mountpoint)
    if entry is None:
        raise UnmountError(mountpoint, "not a qcowfs mount point")
    full = entry.mountpoint
    pid = daemon_pid(full)
    started = _start_time(pid) if pid else None
    fusermount(full, lazy=lazy)
    if pid is None or started is None:
        return None
    if not wait_for_exit(pid, started, timeout):
        raise UnmountError(full, f"unmounted, but daemon {pid} has not closed the image "
                                 f"after {timeout:g} s")
    return pid
