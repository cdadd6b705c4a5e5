"""Run one mutant through the library and the commands, each step with a wall-time and a
memory limit, and say what went wrong, if anything.

The steps run in a child forked from this (already importing) process, so a case costs a fork
instead of an interpreter start. The child announces each step on a pipe; the parent kills
it when a step overruns. A find is a hang, an exception other than ``ImageError`` out of the
library (or any traceback out of a command), a death by signal, an exit code outside the
documented set (docs/cli.md), or a ``MemoryError`` under the address-space limit."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fuzz.seeds import TOP

MiB = 1024 * 1024
MEMORY_BUDGET = int(os.environ.get("FUZZ_MEMORY_MIB", "512")) * MiB
OUTPUT_LIMIT = 256 * MiB
READ_SPAN = 4 * MiB

# Exit codes each command documents (docs/cli.md).
STEPS = {
    "info": ({0, 1}, ["info", "--output", "json", TOP]),
    "info-chain": ({0, 1}, ["info", "--backing-chain", TOP]),
    "map": ({0, 1}, ["map", "--output", "json", TOP]),
    "check": ({0, 1, 2, 3, 63}, ["check", "--output", "json", TOP]),
    "convert": ({0, 1}, ["convert", "-O", "raw", TOP, "out.raw"]),
    "check-r-all": ({0, 1, 2, 3, 63}, ["check", "-r", "all", "repaired.qcow2"]),
    "check-after": ({0, 1, 2, 3, 63}, ["check", "repaired.qcow2"]),
    "snapshot-list": ({0, 1}, ["snapshot", "-l", TOP]),
}
ORDER = ["read", "info", "info-chain", "map", "check", "convert", "snapshot-list", "write",
         "check-r-all", "check-after"]


@dataclass
class Find:
    step: str
    kind: str  # hang, traceback, signal, exit-code, memory, mount
    detail: str = ""

    def key(self) -> tuple[str, str, str]:
        """Two finds with the same key are taken as the same bug: the step, the kind and the
        innermost qcowfs function (file and name, no line number) that is not a lookup helper,
        so one hot loop is one find whichever line the limit caught it on."""
        frames = re.findall(r'File "[^"]*/(qcowfs/[^"]+)", line \d+,? in (\w+)', self.detail)
        if not frames:
            return (self.step, self.kind, self.detail[-120:])
        if self.kind == "hang":  # faulthandler prints the innermost frame first
            frames.reverse()
        owners = [f for f in frames if not f[0].endswith(HELPERS)] or frames
        return (self.step, self.kind, ":".join(owners[-1]))


HELPERS = ("refcount_read.py", "cache.py", "hostfile.py", "tables.py", "compression.py")


@dataclass
class Result:
    finds: list[Find] = field(default_factory=list)
    codes: dict[str, int | str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


WARM_MODULES = ("qcowfs.chain.disk", "qcowfs.cli.main", "qcowfs.cli.info", "qcowfs.cli.map",
                "qcowfs.cli.check", "qcowfs.cli.convert", "qcowfs.image.check",
                "qcowfs.image.info", "qcowfs.image.sequential", "qcowfs.chain.convert",
                "qcowfs.chain.blockstatus", "qcowfs.chain.info", "qcowfs.cli.snapshot",
                "qcowfs.image.write", "qcowfs.image.refcount", "zstandard")


def warm() -> None:
    """Import in the parent what every case needs, so each forked child starts with it (a
    child would otherwise import the engine and the commands again, every time)."""
    import importlib
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def library_reads(path: str, rng: random.Random) -> None:
    """Open the image as a library user would and read bounded pieces of the disk and of
    each snapshot: the start, the end, a few random spots."""
    import qcowfs

    def read_view(view) -> None:
        size = view.size
        spots = [(0, READ_SPAN), (max(size - 70000, 0), 70000)]
        spots += [(rng.randrange(max(size, 1)), rng.randrange(1, 300000)) for _ in range(4)]
        for off, n in spots:
            view.read(off, n)

    with qcowfs.open_image(path) as disk:
        read_view(disk)
        for snap in disk.snapshots[:4]:
            try:
                with disk.snapshot(snap.id) as view:
                    read_view(view)
            except qcowfs.ImageError:
                pass


def library_write(path: str) -> None:
    """Open a copy read/write (dirty repair, bitmap flags, allocation on hostile tables), write
    at the start and the middle, flush, close."""
    import qcowfs

    shutil.copyfile(path, "written.qcow2")
    with qcowfs.open_image("written.qcow2", writable=True) as disk:
        disk.write(0, b"\x5a" * 4096)
        disk.write(disk.size // 2, b"\xa5" * 70000)
        disk.flush()


def _child(case: Path, steps: list[str], limit: float, wfd: int) -> None:
    """In the forked child: run the steps, report on ``wfd``, never return."""
    os.chdir(case)
    out = os.open("stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
    sys.stderr = sys.stdout
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_BUDGET, vm + MEMORY_BUDGET))
    tb = open("hang.txt", "w")  # noqa: SIM115 (kept open for faulthandler)
    from qcowfs.cli.main import main
    from qcowfs.errors import ImageError

    def say(text: str) -> None:
        os.write(wfd, (text.replace("\n", "\\n") + "\n").encode())

    for step in steps:
        say(f"S {step}")
        faulthandler.dump_traceback_later(limit, exit=True, file=tb)
        try:
            if step in ("read", "write"):
                try:
                    if step == "read":
                        library_reads(TOP, random.Random(1))
                    else:
                        library_write(TOP)
                    code = 0
                except ImageError:
                    code = 1
            else:
                if step == "check-r-all":
                    shutil.copyfile(TOP, "repaired.qcow2")
                try:
                    code = main(STEPS[step][1])
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                if step == "convert":
                    with contextlib.suppress(OSError):
                        os.unlink("out.raw")
        except MemoryError:
            faulthandler.cancel_dump_traceback_later()
            say(f"M {step} {traceback.format_exc()}")
            os._exit(0)
        except BaseException:
            faulthandler.cancel_dump_traceback_later()
            say(f"X {step} {traceback.format_exc()}")
            continue
        faulthandler.cancel_dump_traceback_later()
        say(f"E {step} {code}")
    os._exit(0)


def run_case(case: Path, steps: list[str] | None = None, limit: float = 2.0) -> Result:
    """Run ``steps`` (default: all) on ``case``/top.qcow2 in a forked child."""
    steps = steps or ORDER
    warm()
    res = Result()
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            _child(case, steps, limit, wfd)
        finally:
            os._exit(99)
    os.close(wfd)
    buf = b""
    current, started = None, time.monotonic()
    done: set[str] = set()
    try:
        while True:
            wait = limit + 1.0 - (time.monotonic() - started) if current else limit + 1.0
            ready, _, _ = select.select([rfd], [], [], max(wait, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                res.finds.append(Find(current or "?", "hang", _read(case / "hang.txt")))
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                kind, step, *rest = line.decode(errors="replace").split(" ", 2)
                detail = (rest[0] if rest else "").replace("\\n", "\n")
                if kind == "S":
                    current, started = step, time.monotonic()
                    continue
                res.seconds[step] = time.monotonic() - started
                done.add(step)
                current = None
                if kind == "E":
                    code = int(detail)
                    res.codes[step] = code
                    allowed = {0, 1} if step in ("read", "write") else STEPS[step][0]
                    if code not in allowed:
                        res.finds.append(Find(step, "exit-code", f"exit {code}: "
                                              + _read(case / "stdout")[-600:]))
                elif kind == "X":
                    res.codes[step] = "traceback"
                    res.finds.append(Find(step, "traceback", detail))
                elif kind == "M":
                    res.codes[step] = "memory"
                    res.finds.append(Find(step, "memory", detail))
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if current and not res.finds:
        # The child died inside a step: a signal, or faulthandler's exit on an overrun.
        hang = _read(case / "hang.txt")
        if hang.strip():
            res.finds.append(Find(current, "hang", hang))
        else:
            sig = -os.waitstatus_to_exitcode(status)
            res.finds.append(Find(current, "signal", f"signal {sig}"))
    return res


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def mount_case(case: Path, limit: float) -> list[Find]:
    """Mount the mutant read-only, read ``disk``, ``snapshots/*/disk`` and ``layers/*/disk``
    in pieces in a child process, unmount. Finds: a mount that hangs or exits outside {0, 1}, a reader that
    hangs or sees the daemon die (ENOTCONN), an unmount that fails."""
    mnt = case / "mnt"
    mnt.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("NOTIFY_SOCKET", None)
    finds: list[Find] = []
    try:
        try:
            p = subprocess.run([sys.executable, "-m", "qcowfs", "mount", "-o", "ro", TOP, "mnt"],
                               cwd=case, capture_output=True, text=True, timeout=limit * 3,
                               env=env)
        except subprocess.TimeoutExpired:
            return [Find("mount", "hang", "qcowfs mount did not return")]
        if p.returncode not in (0, 1):
            return [Find("mount", "exit-code", f"exit {p.returncode}: {p.stderr[-600:]}")]
        if "Traceback" in p.stderr:
            return [Find("mount", "traceback", p.stderr[-2000:])]
        if p.returncode:
            return []
        try:
            r = subprocess.run([sys.executable, "-c", _MOUNT_READER, "mnt"], cwd=case,
                               capture_output=True, text=True, timeout=limit * 4)
            if r.returncode:
                finds.append(Find("mount-read", "mount", r.stderr[-2000:]))
        except subprocess.TimeoutExpired:
            finds.append(Find("mount-read", "hang", "reads through the mount did not finish"))
        u = subprocess.run([sys.executable, "-m", "qcowfs", "umount", "mnt"], cwd=case,
                           capture_output=True, text=True, timeout=60, env=env)
        if u.returncode and not finds:
            finds.append(Find("umount", "exit-code", f"exit {u.returncode}: {u.stderr[-600:]}"))
    finally:
        force_unmount(mnt)
    return finds


_MOUNT_READER = r"""
import errno, glob, os, sys
root = sys.argv[1]
names = [os.path.join(root, "disk")]
for sub in ("snapshots", "layers"):
    names += sorted(glob.glob(os.path.join(root, sub, "*", "disk")))[:4]
for name in names:
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            sys.exit(f"{name}: daemon gone at open: {exc}")
        continue
    size = os.fstat(fd).st_size
    for off in (0, 1 << 20, max(size - 65536, 0)):
        try:
            os.pread(fd, 1 << 20, off)
        except OSError as exc:
            if exc.errno != errno.EIO:
                sys.exit(f"{name}: read at {off}: {exc}")
    os.close(fd)
os.listdir(root)
"""


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(path: Path) -> None:
    for args in (["fusermount3", "-u", str(path)], ["fusermount3", "-u", "-z", str(path)],
                 ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(args, capture_output=True)
