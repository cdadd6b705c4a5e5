"""``make crash``: SIGKILL a qcowfs writer at a random point of one writing operation, many
times, and judge every run with QEMU's tools.

Each run builds fresh images with qemu-img/qemu-io, then runs one operation in a child
process: COW writes with flushes, discard, snapshot create/delete/apply, commit, rebase (safe
and ``-u``), resize grow and shrink, convert to qcow2, ``check -r all``, amend (lazy refcounts
on and off, size, another refcount width, down to compat=0.10); the table ``OPS`` lists them. The child counts the
calls that change files (pwrite, pwritev, write, fsync, fdatasync, ftruncate, replace, unlink) and, at
the call the parent picked at random (1 to the count of a run on a copy, plus one), announces the kill
point (``K n call``) and kills itself with SIGKILL, so every step of the operation is a
possible kill point. Judged afterwards: ``qemu-img check`` finds no corruption (leaks
allowed; an image left dirty is first repaired by a qcowfs read/write open, as QEMU would),
every write a completed flush covered reads back, and the guest sees what the operation
promises at every instant (see ``judge``).

    python -m fuzz.crash [--runs N] [--seed N] [--ops a,b] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB
NEVER = 1 << 40


@dataclass(frozen=True)
class Op:
    """One operation of the campaign.

    ``argv``: a qcowfs command the child runs (None: a library operation written out in
    ``CHILD``). ``opts``: creation options forced on top.qcow2 (over the random cluster layout);
    ``snapshot``/``other``/``dirty``: what ``prepare`` adds (a snapshot s1 then more writes; a
    second image other.qcow2; a killed qemu-io that leaves leaks and, with lazy refcounts, a
    dirty image). ``judge``: the name of the rule in ``judge`` that says what the guest may
    see after a kill at any point."""
    argv: tuple[str, ...] | None = None
    judge: str = "same-view"
    opts: tuple[tuple[str, str], ...] = ()
    snapshot: bool = False
    other: bool = False
    dirty: bool = False
    codes: tuple[int, ...] = (0,)


#: The operations, in the order runs are spread over them. A new one is a row here (and, for
#: a library operation, a branch in CHILD; for a new promise, a rule in ``judge``).
OPS: dict[str, Op] = {
    "cow": Op(judge="cow"),
    "discard": Op(judge="discard"),
    "snap-create": Op(judge="snap-create"),
    "snap-delete": Op(judge="snap-delete", snapshot=True),
    "snap-apply": Op(judge="snap-apply", snapshot=True),
    "commit": Op(("commit", "-q", "top.qcow2"), judge="commit"),
    "rebase": Op(("rebase", "-q", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"), other=True),
    "rebase-u": Op(("rebase", "-q", "-u", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"),
                   judge="rebase-u", other=True),
    "resize-grow": Op(("resize", "-q", "top.qcow2", "+3M"), judge="grow:3"),
    "resize-shrink": Op(("resize", "-q", "--shrink", "top.qcow2", "1M"), judge="shrink"),
    "convert": Op(("convert", "-q", "-O", "qcow2", "top.qcow2", "out.qcow2"), judge="convert"),
    "check-r-all": Op(("check", "-q", "-r", "all", "top.qcow2"), opts=(("lazy_refcounts", "on"),),
                      dirty=True, codes=(0, 3)),
    "amend-lazy-on": Op(("amend", "-q", "-o", "lazy_refcounts=on", "top.qcow2"),
                        opts=(("lazy_refcounts", "off"),)),
    "amend-lazy-off": Op(("amend", "-q", "-o", "lazy_refcounts=off", "top.qcow2"),
                         opts=(("lazy_refcounts", "on"),), dirty=True),
    "amend-size": Op(("amend", "-q", "-o", "size=6M", "top.qcow2"), judge="grow:2"),
    # {bits}: a width the child draws from its seed, so the probe run and the killed run agree
    "amend-refcount": Op(("amend", "-q", "-o", "refcount_bits={bits}", "top.qcow2")),
    # v2 holds neither extended L2 nor lazy refcounts (amend refuses), so the layout has neither
    "amend-compat": Op(("amend", "-q", "-o", "compat=0.10", "top.qcow2"),
                       opts=(("extended_l2", "off"), ("lazy_refcounts", "off"))),
}


def _run(*args, cwd: Path, ok=(0,)) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, timeout=120)
    if p.returncode not in ok:
        raise RuntimeError(f"{' '.join(map(str, args))}: exit {p.returncode}: "
                           f"{p.stderr.decode()}")
    return p


def _io(d: Path, name: str, *cmds: str, ok=(0,)) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    _run(*args, name, cwd=d, ok=ok)


def prepare(op: str, d: Path, rnd: random.Random) -> dict:
    """Images for one run of ``op`` in ``d``, made by QEMU; returns the run's options."""
    spec = OPS[op]
    opts = rnd.choice([{"cluster_size": "65536"}, {"cluster_size": "4096"},
                       {"cluster_size": "65536", "lazy_refcounts": "on"},
                       {"cluster_size": "32768", "extended_l2": "on"}])
    opts = {**opts, **dict(spec.opts)}
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "base.qcow2",
         str(SIZE), cwd=d)
    _io(d, "base.qcow2", f"write -P 0x11 0 {SIZE // 2}", f"write -P 0x12 {3 * MiB} 64k")
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", o,
         "top.qcow2", cwd=d)
    cmds = [f"write -P {0x20 + i} {rnd.randrange(0, SIZE - 200 * KiB)} "
            f"{rnd.randrange(1, 200 * KiB)}" for i in range(6)]
    cmds.append(f"write -z {rnd.randrange(0, SIZE // 2)} 70000")
    _io(d, "top.qcow2", *cmds)
    if spec.snapshot:
        _run("qemu-img", "snapshot", "-c", "s1", "top.qcow2", cwd=d)
        _io(d, "top.qcow2", f"write -P 0x77 {rnd.randrange(0, SIZE // 2)} 300000")
    if spec.other:
        _run("qemu-img", "create", "-q", "-f", "qcow2", "other.qcow2", str(SIZE), cwd=d)
        _io(d, "other.qcow2", f"write -P 0x99 {MiB} {MiB}")
    if spec.dirty:
        # leaks and, with lazy refcounts, a dirty image: what check -r all is for
        _io(d, "top.qcow2", "write -P 0x55 0 300k", "sigraise 9", ok=(-9, 137))
    return opts


CHILD = r"""
import json, os, random, signal, sys
op, kill_at, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
argv, codes = json.loads(sys.argv[5])
count = 0
def say(s):
    sys.stdout.write(s + "\n"); sys.stdout.flush()
def hook(name, real):
    def call(*a, **k):
        global count
        if name == "write" and a and a[0] in (1, 2):
            return real(*a, **k)
        count += 1
        if count == kill_at:
            say(f"K {count} {name}")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return call
import qcowfs
from qcowfs.cli.main import main
for name in ("pwrite", "pwritev", "write", "fsync", "fdatasync", "ftruncate", "replace", "unlink"):
    setattr(os, name, hook(name, getattr(os, name)))
rnd = random.Random(seed)
SIZE = int(sys.argv[4])
say("B")
if op == "cow":
    disk = qcowfs.open_image("top.qcow2", writable=True, l2_cache_bytes=64 * 1024)
    for n in range(40):
        if rnd.random() < 0.2:
            disk.flush(); say(f"F {n}")
            continue
        length = rnd.choice([512, 4096, 65536 + 1000, rnd.randrange(1, 300000)])
        off = rnd.randrange(0, SIZE - length)
        data = bytes(length) if rnd.random() < 0.2 else rnd.randbytes(length)
        disk.write(off, data); say(f"W {n} {off} {length} {data[:1].hex() if data else ''}")
    disk.close()
elif op == "discard":
    disk = qcowfs.open_image("top.qcow2", writable=True)
    disk.discard(1024 * 1024, 2 * 1024 * 1024); disk.flush(); say("F discard"); disk.close()
elif op.startswith("snap-"):
    disk = qcowfs.open_image("top.qcow2", writable=True)
    {"snap-create": lambda: disk.create_snapshot("new"),
     "snap-delete": lambda: disk.delete_snapshot("s1"),
     "snap-apply": lambda: disk.apply_snapshot("s1")}[op]()
    disk.close()
elif argv is not None:
    bits = str(rnd.choice([1, 2, 4, 8, 32, 64]))
    code = main([a.replace("{bits}", bits) for a in argv])
    if code not in codes:
        sys.exit(f"{op}: exit {code}")
else:
    sys.exit(f"{op}: no library operation of that name in CHILD")
say(f"E {count}")
"""


def run_child(op: str, d: Path, kill_at: int, seed: int) -> tuple[list[str], int]:
    """(the child's report lines, its exit status)."""
    spec = OPS[op]
    p = subprocess.run([sys.executable, "-c", CHILD, op, str(kill_at), str(seed), str(SIZE),
                        json.dumps([spec.argv, spec.codes])],
                       cwd=d, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{op}: child failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return p.stdout.splitlines(), p.returncode


def raw(d: Path, image: str, out: str = "view.raw", *extra: str) -> bytes:
    _run("qemu-img", "convert", "-U", *extra, "-O", "raw", image, out, cwd=d)
    return (d / out).read_bytes()


def qemu_check(d: Path, image: str) -> tuple[int, dict]:
    p = _run("qemu-img", "check", "--output=json", image, cwd=d, ok=(0, 1, 2, 3))
    try:
        return p.returncode, json.loads(p.stdout or b"{}")
    except json.JSONDecodeError:
        return p.returncode, {"stdout": p.stdout.decode(), "stderr": p.stderr.decode()}


def consistent(d: Path, image: str) -> None:
    """No corruption (leaks allowed); a dirty image is repaired by a qcowfs r/w open first."""
    info = json.loads(_run("qemu-img", "info", "-U", "--output=json", image, cwd=d).stdout)
    if info.get("dirty-flag"):
        _run(sys.executable, "-c", "import qcowfs,sys; qcowfs.open_image(sys.argv[1], "
             "writable=True).close()", image, cwd=d)
    code, report = qemu_check(d, image)
    if code not in (0, 3):
        raise AssertionError(f"qemu-img check {image}: exit {code}: {report}")


def judge(op: str, d: Path, before: dict[str, bytes], lines: list[str], seed: int) -> None:
    """Raise AssertionError when the killed run left something QEMU or the guest would see
    as wrong."""
    top = before["top"]
    rule = OPS[op].judge
    if rule == "convert":
        p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", "out.qcow2",
                            "top.qcow2"], cwd=d, capture_output=True)
        if p.returncode == 0:
            consistent(d, "out.qcow2")  # it looks whole: then it must be whole
        elif p.returncode == 1:
            raise AssertionError(f"an interrupted convert left a wrong image that opens: "
                                 f"{p.stdout.decode()}")
        consistent(d, "top.qcow2")
        return
    consistent(d, "top.qcow2")
    if rule == "commit":
        consistent(d, "base.qcow2")
    now = raw(d, "top.qcow2")
    if rule == "cow":
        expected, touched = bytearray(top), bytearray(len(top))
        flushed = [int(x.split()[1]) for x in lines if x.startswith("F ")]
        last = flushed[-1] if flushed else -1
        for x in lines:
            if x.startswith("W "):
                n, off, length = map(int, x.split()[1:4])
                if n > last:
                    touched[off:off + length] = b"\1" * length
        _replay(expected, seed, last)
        bad = [i for i in range(0, len(top), 512)
               if not any(touched[i:i + 512]) and now[i:i + 512] != expected[i:i + 512]]
        # writes the child had not reported yet may also have landed anywhere unreported
        pending = _unreported(seed, lines)
        bad = [i for i in bad if not any(i < b and a < i + 512 for a, b in pending)]
        assert not bad, f"flushed data lost at {bad[:5]}"
    elif rule == "discard":
        base = before["base"]
        lo, hi = MiB, 3 * MiB
        if any(x.startswith("F ") for x in lines):
            want = top[:lo] + base[lo:hi] + top[hi:]
            assert now == want, "a flushed discard did not read from the backing file"
        else:
            assert now[:lo] == top[:lo] and now[hi:] == top[hi:], "discard touched other data"
            for i in range(lo, hi, 64 * KiB):
                assert now[i:i + 64 * KiB] in (top[i:i + 64 * KiB], base[i:i + 64 * KiB]), i
    elif rule in ("same-view", "snap-create", "snap-delete", "commit", "rebase-u"):
        if rule == "rebase-u":
            backing = json.loads(_run("qemu-img", "info", "-U", "--output=json", "top.qcow2",
                                      cwd=d).stdout).get("backing-filename")
            assert backing in ("base.qcow2", "other.qcow2"), backing
            if backing == "base.qcow2":
                assert now == top, "guest view changed while the header still names base"
            return
        assert now == top, f"{op}: the guest view changed"
        snaps = _snapshots(d)
        if rule == "snap-create" and "new" in snaps:
            assert raw(d, "top.qcow2", "snap.raw", "-l", "snapshot.name=new") == top
        if rule == "snap-delete" and "s1" in snaps:
            assert raw(d, "top.qcow2", "snap.raw", "-l", "snapshot.name=s1") == before["s1"]
    elif rule == "snap-apply":
        assert now in (top, before["s1"]), "apply left a disk that is neither old nor snapshot"
        assert raw(d, "top.qcow2", "snap.raw", "-l", "snapshot.name=s1") == before["s1"]
    elif rule.startswith("grow:"):
        assert now[:SIZE] == top and not any(now[SIZE:]), "grow changed data or exposed junk"
        assert len(now) in (SIZE, SIZE + int(rule[5:]) * MiB), len(now)
    elif rule == "shrink":
        # Clusters past the new end are dropped before the size is written (as QEMU does):
        # until then they may read from the backing file. The kept part never changes.
        assert len(now) in (SIZE, MiB), len(now)
        assert now[:MiB] == top[:MiB], "shrink changed the data it keeps"
    else:
        raise AssertionError(f"{op}: no rule {rule!r} in judge")


def _snapshots(d: Path) -> set[str]:
    info = json.loads(_run("qemu-img", "info", "-U", "--output=json", "top.qcow2", cwd=d).stdout)
    return {s["name"] for s in info.get("snapshots", [])}


def _cow_ops(seed: int):
    """The child's COW writes again (same generator, same order): (n, offset, data) or
    (n, None, None) for a flush."""
    rnd = random.Random(seed)
    for n in range(40):
        if rnd.random() < 0.2:
            yield n, None, None
            continue
        length = rnd.choice([512, 4096, 65536 + 1000, rnd.randrange(1, 300000)])
        off = rnd.randrange(0, SIZE - length)
        data = bytes(length) if rnd.random() < 0.2 else rnd.randbytes(length)
        yield n, off, data


def _replay(model: bytearray, seed: int, upto: int) -> None:
    for n, off, data in _cow_ops(seed):
        if n > upto:
            break
        if off is not None:
            model[off:off + len(data)] = data


def _unreported(seed: int, lines: list[str]) -> list[tuple[int, int]]:
    """The range of the write the child was in when it died (reported ones are in ``lines``)."""
    reported = {int(x.split()[1]) for x in lines if x[:1] in "WF" and x[1:2] == " "}
    for n, off, data in _cow_ops(seed):
        if n not in reported:
            return [] if off is None else [(off, off + len(data))]
    return []


def one_run(op: str, d: Path, rnd: random.Random, calls: dict[str, int]) -> str:
    """Prepare, count the operation's calls on a copy, kill at a random one of them, judge;
    returns the kill point."""
    seed = rnd.randrange(1 << 30)
    prepare(op, d, rnd)
    before = {"top": raw(d, "top.qcow2"), "base": raw(d, "base.qcow2", "base-view.raw")}
    if OPS[op].snapshot:
        before["s1"] = raw(d, "top.qcow2", "snap.raw", "-l", "snapshot.name=s1")
    probe = d.parent / f"calibrate-{d.name}"
    shutil.rmtree(probe, ignore_errors=True)
    shutil.copytree(d, probe)
    lines, _ = run_child(op, probe, NEVER, seed)
    shutil.rmtree(probe, ignore_errors=True)
    total = max(int(lines[-1].split()[1]), 1)
    calls[op] = max(calls.get(op, 0), total)
    kill_at = rnd.randrange(1, total + 2)  # total + 1: the operation completes
    (d / "run.json").write_text(json.dumps({"op": op, "seed": seed, "kill_at": kill_at,
                                            "calls": total}))
    shutil.copytree(d, d / "before", ignore=shutil.ignore_patterns("before", "*.raw"))
    lines, status = run_child(op, d, kill_at, seed)
    killed = next((x for x in lines if x.startswith("K ")), "not killed (finished)")
    judge(op, d, before, lines, seed)
    return killed


def crash_campaign(runs: int, seed: int, ops: list[str], out: Path, log=print) -> dict:
    """``runs`` runs spread evenly over ``ops``; returns counts and failures by op."""
    rnd = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    calls: dict[str, int] = {}
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    start = time.monotonic()
    for i in range(runs):
        op = ops[i % len(ops)]
        d = out / f"run-{i}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        try:
            point = one_run(op, d, rnd, calls)
            by_op[op]["ok"] += 1
            shutil.rmtree(d, ignore_errors=True)
            if point.startswith("K "):
                by_op[op]["killed"] += 1
        except (AssertionError, RuntimeError) as exc:
            by_op[op]["failed"] += 1
            failures.append({"run": i, "op": op, "error": str(exc)[-2000:]})
            log(f"FAIL run {i} {op}: {str(exc)[-400:]} (kept in {d})")
    elapsed = time.monotonic() - start
    table = {op: dict(c) for op, c in by_op.items()}
    log(f"crash: {runs} runs in {elapsed:.0f} s, {len(failures)} failed; by op: "
        + ", ".join(f"{op} {c.get('ok', 0)}/{sum(v for k, v in c.items() if k != 'killed')}"
                    f" ({c.get('killed', 0)} killed mid-way, up to {calls.get(op, 0)} calls)"
                    for op, c in by_op.items()))
    return {"runs": runs, "failures": failures, "by_op": table, "calls": calls,
            "seconds": round(elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crash")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("CRASH_RUNS", 200)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CRASH_SEED", 1)))
    ap.add_argument("--ops", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o] or list(OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"unknown operations {unknown}; known: {', '.join(OPS)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="qcowfs-crash-"))
    summary = crash_campaign(args.runs, args.seed, ops, out, log=lambda s: print(s, flush=True))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
