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

from fuzz.seeds import KEY_FILE, TOP, image_opts

MiB = 1024 * 1024
MEMORY_BUDGET = int(os.environ.get("FUZZ_MEMORY_MIB", "512")) * MiB
OUTPUT_LIMIT = 256 * MiB
READ_SPAN = 4 * MiB

OTHER, OVERLAY = "other.qcow2", "overlay.qcow2"


@dataclass(frozen=True)
class Step:
    """One command run on a mutant: the exit codes docs/cli.md documents for it, its argv, and
    the folder it runs in. A step with ``folder`` runs in ``case/folder``, a copy of the
    case's files made by the first step that names it (``fresh``), so writing steps never
    change the mutant the other steps see; steps sharing a folder run one after another on
    the same copy (create, apply, delete a snapshot)."""
    codes: frozenset[int]
    argv: tuple[str, ...]
    folder: str | None = None
    fresh: bool = False
    factor: float = 1.0  # of the per-step time limit


def _step(codes, *argv, folder=None, fresh=False, factor=1.0) -> Step:
    return Step(frozenset(codes), argv, folder, fresh, factor)


OK, CHECK = {0, 1}, {0, 1, 2, 3, 63}
STEPS: dict[str, Step] = {
    "info": _step(OK, "info", "--output", "json", TOP),
    "info-chain": _step(OK, "info", "--backing-chain", TOP),
    "map": _step(OK, "map", "--output", "json", TOP),
    "check": _step(CHECK, "check", "--output", "json", TOP),
    "convert": _step(OK, "convert", "-O", "raw", TOP, "out.raw"),
    "compare": _step({0, 1, 2}, "compare", TOP, TOP),
    "snapshot-list": _step(OK, "snapshot", "-l", TOP),
    # a check, the repair, and a second check, as qemu-img -r all does: twice the time
    "check-r-all": _step(CHECK, "check", "-r", "all", TOP, folder="repair", fresh=True,
                         factor=2.0),
    "check-after": _step(CHECK, "check", TOP, folder="repair"),
    "commit": _step(OK, "commit", "-q", TOP, folder="commit", fresh=True),
    "commit-into": _step(OK, "commit", "-q", OVERLAY, folder="commit-into", fresh=True),
    "rebase": _step(OK, "rebase", "-q", "-b", OTHER, "-F", "qcow2", TOP, folder="rebase",
                    fresh=True),
    "rebase-over": _step(OK, "rebase", "-q", "-b", OTHER, "-F", "qcow2", OVERLAY,
                         folder="rebase-over", fresh=True),
    "rebase-u": _step(OK, "rebase", "-q", "-u", "-b", OTHER, "-F", "qcow2", TOP,
                      folder="rebase-u", fresh=True),
    "resize-grow": _step(OK, "resize", "-q", TOP, "+64M", folder="grow", fresh=True),
    "resize-shrink": _step(OK, "resize", "-q", "--shrink", TOP, "512K", folder="shrink",
                           fresh=True),
    "snapshot-create": _step(OK, "snapshot", "-q", "-c", "fz", TOP, folder="snap", fresh=True),
    "snapshot-apply": _step(OK, "snapshot", "-q", "-a", "1", TOP, folder="snap"),
    "snapshot-delete": _step(OK, "snapshot", "-q", "-d", "1", TOP, folder="snap"),
    "amend-lazy-on": _step(OK, "amend", "-q", "-o", "lazy_refcounts=on", TOP, folder="amend",
                           fresh=True),
    "amend-lazy-off": _step(OK, "amend", "-q", "-o", "lazy_refcounts=off", TOP,
                            folder="amend"),
    "amend-size": _step(OK, "amend", "-q", "-o", "size=200M", TOP, folder="amend-size",
                        fresh=True),
}
#: Steps run only on an encrypted seed's mutants, given a wrong key: the one-line error, exit
#: 1, on a LUKS mutant (exit 0 too where the mutant is no longer LUKS: qemu-img ignores a key
#: for a plain image, and legacy AES has no key check, a wrong key reads garbage).
KEYED_STEPS: dict[str, Step] = {
    "wrong-key": _step(OK, "map", "--output", "json", TOP),
}
WRONG_KEY = "not-the-key"
LIBRARY_STEPS = ("read", "write")
ORDER = ["read", "info", "info-chain", "map", "check", "convert", "compare", "snapshot-list",
         "write", "check-r-all", "check-after", "commit", "commit-into", "rebase",
         "rebase-over", "rebase-u", "resize-grow", "resize-shrink", "snapshot-create",
         "snapshot-apply", "snapshot-delete", "amend-lazy-on", "amend-lazy-off", "amend-size", "wrong-key"]
#: Steps that must come first in a run of one step alone (a hang's confirmation).
NEEDS = {"check-after": ["check-r-all"], "snapshot-apply": ["snapshot-create"],
         "snapshot-delete": ["snapshot-create", "snapshot-apply"],
         "amend-lazy-off": ["amend-lazy-on"]}


def alone(step: str) -> list[str]:
    """``step`` with the steps whose copy it works on."""
    return [*NEEDS.get(step, []), step]


ALL_STEPS = {**STEPS, **KEYED_STEPS}


@dataclass
class Find:
    step: str
    kind: str  # hang, traceback, signal, exit-code, memory, mount, repair
    detail: str = ""

    def key(self) -> tuple[str, str, str]:
        """Two finds with the same key are taken as the same bug: the step, the kind and the
        innermost qcowfs function (file and name, no line number) that is not a lookup helper,
        so one hot loop is one find whichever line the limit caught it on."""
        if self.kind == "repair":
            return (self.step, self.kind, self.detail.split(":")[0])
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
                "qcowfs.image.write", "qcowfs.image.refcount", "zstandard",
                "qcowfs.image.crypto")  # numpy and cryptography: the encrypted seeds


def warm() -> None:
    """Import in the parent what every case needs, so each forked child starts with it (a
    child would otherwise import the engine and the commands again, every time)."""
    import importlib
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def library_reads(path: str, rng: random.Random, key: bytes | None = None) -> None:
    """Open the image as a library user would and read bounded pieces of the disk and of
    each snapshot: the start, the end, a few random spots."""
    import qcowfs

    def read_view(view) -> None:
        size = view.size
        spots = [(0, READ_SPAN), (max(size - 70000, 0), 70000)]
        spots += [(rng.randrange(max(size, 1)), rng.randrange(1, 300000)) for _ in range(4)]
        for off, n in spots:
            view.read(off, n)

    with qcowfs.open_image(path, keys=None if key is None else {0: key}) as disk:
        read_view(disk)
        for snap in disk.snapshots[:4]:
            try:
                with disk.snapshot(snap.id) as view:
                    read_view(view)
            except qcowfs.ImageError:
                pass


def library_write(path: str, key: bytes | None = None) -> None:
    """Open a copy read/write (dirty repair, bitmap flags, allocation on hostile tables), write
    at the start and the middle, flush, close."""
    import qcowfs

    shutil.copyfile(path, "written.qcow2")
    with qcowfs.open_image("written.qcow2", writable=True,
                           keys=None if key is None else {0: key}) as disk:
        disk.write(0, b"\x5a" * 4096)
        disk.write(disk.size // 2, b"\xa5" * 70000)
        disk.flush()


SCRATCH = ("stdout", "hang.txt", "out.raw", "written.qcow2")


def keyed_argv(argv: tuple[str, ...], key: str) -> list[str]:
    """``argv`` in qemu-img's forms for an encrypted mutant: secret s0 holds ``key``, the mutant
    opens with ``--image-opts`` and the overlay over it names its key one level down."""
    depth = {TOP: 0, OVERLAY: 1}
    rest = [image_opts(a, depth[a]) if a in depth else a for a in argv[1:]]
    return [argv[0], "--object", f"secret,id=s0,data={key}", "--image-opts", *rest]


def _inputs() -> list[str]:
    """The case's own files (the mutant and what it names): what a step's copy holds."""
    return [n for n in os.listdir(".") if os.path.isfile(n) and n not in SCRATCH
            and not n.endswith(".out")]


def _copy_into(folder: str, names: list[str]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.mkdir(folder)
    for name in names:
        shutil.copyfile(name, os.path.join(folder, name))


def _redirect(name: str) -> None:
    """fds 1 and 2 (and sys.stdout/stderr) to ``name``: each step's output on its own."""
    sys.stdout.flush()
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def _child(case: Path, steps: list[str], limit: float, wfd: int) -> None:
    """In the forked child: run the steps, report on ``wfd``, never return."""
    os.chdir(case)
    names = _inputs()
    _redirect("stdout")
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

    key = None
    if os.path.exists(KEY_FILE):
        with open(KEY_FILE) as f:
            key = f.read()
    for step in steps:
        spec = STEPS.get(step) or KEYED_STEPS.get(step)
        if step in KEYED_STEPS and key is None:
            continue
        if spec and spec.fresh:
            _copy_into(spec.folder, names)
        _redirect(f"{step}.out")
        if spec and spec.folder:
            os.chdir(spec.folder)
        say(f"S {step}")
        faulthandler.dump_traceback_later(limit * (spec.factor if spec else 1), exit=True,
                                          file=tb)
        try:
            if step in LIBRARY_STEPS:
                try:
                    secret = None if key is None else key.encode()
                    if step == "read":
                        library_reads(TOP, random.Random(1), secret)
                    else:
                        library_write(TOP, secret)
                    code = 0
                except ImageError:
                    code = 1
            else:
                argv = list(spec.argv)
                if key is not None:
                    argv = keyed_argv(spec.argv, WRONG_KEY if step in KEYED_STEPS else key)
                try:
                    code = main(argv)
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
        finally:
            sys.stdout.flush()
            os.chdir(case)
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
    current, started, step_limit = None, time.monotonic(), limit
    done: set[str] = set()
    try:
        while True:
            wait = (step_limit + 1.0 - (time.monotonic() - started) if current
                    else limit + 1.0)
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
                    step_limit = limit * (ALL_STEPS[step].factor if step in ALL_STEPS else 1)
                    continue
                res.seconds[step] = time.monotonic() - started
                done.add(step)
                current = None
                if kind == "E":
                    code = int(detail)
                    res.codes[step] = code
                    allowed = OK if step in LIBRARY_STEPS else ALL_STEPS[step].codes
                    out = _read(case / f"{step}.out")
                    if code not in allowed:
                        res.finds.append(Find(step, "exit-code", f"exit {code}: " + out[-600:]))
                    elif step in KEYED_STEPS and code and not _one_line_error(out,
                                                                            ALL_STEPS[step]):
                        res.finds.append(Find(step, "message", out[-600:]))
                    elif step in KEYED_STEPS and not code and _crypt_method(case / TOP) == 2:
                        res.finds.append(Find(step, "wrong-key", "a wrong key opened a LUKS "
                                              "image: " + out[-300:]))
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


def _one_line_error(out: str, spec: Step) -> bool:
    """The CLI's documented failure: one line, ``qcowfs: <command>: <what>: <why>``, at the end
    (the step's output file holds stdout too: map may have begun its answer with "[")."""
    tail = out[out.rfind("qcowfs: "):]
    return out.count("qcowfs: ") == 1 and tail.startswith(f"qcowfs: {spec.argv[0]}: ") \
        and tail.count("\n") == 1 and tail.endswith("\n")


def _crypt_method(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(36)
    return int.from_bytes(head[32:36], "big") if len(head) == 36 else 0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


MOUNTED = "mounted.qcow2"


def mount_case(case: Path, limit: float) -> list[Find]:
    """Mount a copy of the mutant read/write, and in a child process read ``disk``,
    ``snapshots/*/disk`` and ``layers/*/disk`` in pieces, write and fsync ``disk``, take a
    snapshot with mkdir and delete it and an older one with rmdir; unmount. Finds: a mount
    that hangs or exits outside {0, 1}, a reader that hangs or sees the daemon die (ENOTCONN)
    or an errno other than EIO (EEXIST/ENOENT/EBUSY/EROFS/ENOSPC where the call documents
    them), an unmount that fails or hangs. Whatever happens, nothing is left behind: the mount
    is detached and every process holding the mutant's copy open (the daemon) is killed."""
    mnt = case / "mnt"
    with contextlib.suppress(FileExistsError):
        os.mkdir(mnt)  # not Path.mkdir(exist_ok=True): its is_dir() would stat a hung mount
    shutil.copyfile(case / TOP, case / MOUNTED)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("NOTIFY_SOCKET", None)
    key = ["-o", f"key_file={KEY_FILE}"] if (case / KEY_FILE).exists() else []
    finds: list[Find] = []
    try:
        # stdin from /dev/null: an encrypted mutant without a key would prompt on a terminal
        p = _bounded([sys.executable, "-m", "qcowfs", "mount", *key, MOUNTED, "mnt"], case,
                     limit * 3, env)
        if p is None:
            return [Find("mount", "hang", "qcowfs mount did not return")]
        if p.returncode not in (0, 1):
            return [Find("mount", "exit-code", f"exit {p.returncode}: {p.stderr[-600:]}")]
        if "Traceback" in p.stderr:
            return [Find("mount", "traceback", p.stderr[-2000:])]
        if p.returncode:
            return []
        r = _bounded([sys.executable, "-c", _MOUNT_READER, "mnt"], case, limit * 6, None,
                     on_timeout=lambda: release(case))
        if r is None:
            finds.append(Find("mount-io", "hang", "I/O through the mount did not finish"))
            return finds
        if r.returncode:
            finds.append(Find("mount-io", "mount", r.stderr[-2000:]))
        u = _bounded([sys.executable, "-m", "qcowfs", "umount", "mnt"], case, 60, env,
                     on_timeout=lambda: release(case))
        if u is None:
            finds.append(Find("umount", "hang", "qcowfs umount did not return"))
        elif u.returncode and not finds:
            finds.append(Find("umount", "exit-code", f"exit {u.returncode}: {u.stderr[-600:]}"))
    finally:
        release(case)
        (case / MOUNTED).unlink(missing_ok=True)
    return finds


def _bounded(argv: list[str], cwd: Path, seconds: float, env: dict | None,
             on_timeout=None) -> subprocess.CompletedProcess | None:
    """``argv`` run to its end, or None when it overran ``seconds``: then ``on_timeout`` runs
    first (a process blocked in a FUSE request the daemon never answers cannot die before the
    daemon does), and the process is killed and reaped."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        if on_timeout:
            on_timeout()
        proc.kill()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            release(cwd)
            proc.communicate()
        return None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def release(case: Path) -> None:
    """Leave nothing of a case's mount behind: detach ``case/mnt`` (lazily if need be), kill
    every process of ours that holds ``case/mounted.qcow2`` open (the daemon, also one that
    hangs before or after the mount went live), wait for them to go, detach again."""
    mnt = case / "mnt"
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    pids = holders(case / MOUNTED)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        if pids:
            time.sleep(0.05)
    force_unmount(mnt)


def holders(path: Path) -> list[int]:
    """Our processes (other than this one) with an open file descriptor on ``path``."""
    target = os.path.realpath(path)
    uid, me = os.getuid(), os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        fds = f"/proc/{name}/fd"
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            if any(os.readlink(f"{fds}/{fd}") == target for fd in os.listdir(fds)):
                out.append(int(name))
        except OSError:
            continue
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


_MOUNT_READER = r"""
import errno, glob, os, sys
root = sys.argv[1]
ALLOWED = {errno.EIO}
def fail(what, exc):
    if exc.errno == errno.ENOTCONN:
        sys.exit(f"{what}: the daemon is gone: {exc}")
    sys.exit(f"{what}: {exc}")
def tolerate(what, exc, *more):
    if exc.errno not in ALLOWED | set(more):
        fail(what, exc)
names = [os.path.join(root, "disk")]
for sub in ("snapshots", "layers"):
    names += sorted(glob.glob(os.path.join(root, sub, "*", "disk")))[:4]
for name in names:
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            fail(f"{name}: open", exc)
        continue
    size = os.fstat(fd).st_size
    for off in (0, 1 << 20, max(size - 65536, 0)):
        try:
            os.pread(fd, 1 << 20, off)
        except OSError as exc:
            tolerate(f"{name}: read at {off}", exc)
    os.close(fd)
disk = os.path.join(root, "disk")
try:
    fd = os.open(disk, os.O_RDWR)
except OSError as exc:
    tolerate("disk: open for writing", exc, errno.EROFS, errno.EACCES, errno.EPERM)
    fd = None
if fd is not None:
    size = os.fstat(fd).st_size
    for off, n in ((0, 4096), (size // 2, 70000), (max(size - 5000, 0), 5000)):
        try:
            os.pwrite(fd, b"Z" * min(n, max(size - off, 0)), off)
        except OSError as exc:
            tolerate(f"disk: write at {off}", exc, errno.ENOSPC, errno.EFBIG)
    try:
        os.fsync(fd)
    except OSError as exc:
        tolerate("disk: fsync", exc, errno.ENOSPC)
    os.close(fd)
snaps = os.path.join(root, "snapshots")
try:
    os.mkdir(os.path.join(snaps, "fz"))
except OSError as exc:
    tolerate("mkdir snapshots/fz", exc, errno.EEXIST, errno.EROFS, errno.EPERM, errno.ENOSPC,
             errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT)
for name in sorted(os.listdir(snaps))[:2]:
    try:
        os.rmdir(os.path.join(snaps, name))
    except OSError as exc:
        tolerate(f"rmdir snapshots/{name}", exc, errno.ENOENT, errno.EBUSY, errno.EROFS,
                 errno.EPERM, errno.ENOSPC)
os.listdir(root)
"""


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, read from /proc/self/mountinfo. Only the parent is
    resolved: resolving ``path`` itself would stat the root of a mount whose daemon has stopped
    answering, and block for ever."""
    path = os.path.abspath(path)
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(path: Path) -> None:
    for args in (["fusermount3", "-u", str(path)], ["fusermount3", "-u", "-z", str(path)],
                 ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(args, capture_output=True)
