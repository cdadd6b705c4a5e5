"""SIGKILL during internal snapshot create/delete: nothing flushed is lost, every completed
snapshot is there with its content, and an interrupted operation leaves an image that declares
itself dirty and is repaired by its next read/write open -- by QEMU or by qcowfs.

qcow2 cannot change refcounts and COPIED flags in one write, so a crash mid-operation can leave
them disagreeing (QEMU has the same window). qcowfs holds the dirty bit for the duration, so
the only states a kill may leave are: clean (leaks allowed), or dirty and repairable.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from qemutools import check, create, info, qemu_img, qemu_io, to_raw

import qcowfs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8 * 1024 * 1024
OPS_PER_RUN = 60

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
from test_snapshot_crash import ops
import qcowfs
path, seed = sys.argv[1], int(sys.argv[2])
disk = qcowfs.open_image(path, writable=True)
out = sys.stdout
for n, (kind, arg) in enumerate(ops(seed)):
    out.write(f"B {n} {kind}\n")
    out.flush()
    if kind == "W":
        disk.write(*arg)
        disk.flush()
    elif kind == "C":
        disk.create_snapshot(arg)
    elif kind == "D":
        names = [s.name for s in disk.snapshots if s.name.startswith("c")]
        if names:
            disk.delete_snapshot(names[0])
            arg = names[0]
    out.write(f"{kind} {n} {arg if kind != 'W' else ''}\n")
    out.flush()
"""


def ops(seed: int):
    """("W", (offset, data)) flushed writes, ("C", name) creates, ("D", None) deletes."""
    rnd = random.Random(seed)
    for n in range(OPS_PER_RUN):
        r = rnd.random()
        if r < 0.4:
            length = rnd.choice([4096, 70000, rnd.randrange(1, 200000)])
            yield "W", (rnd.randrange(0, SIZE - length), rnd.randbytes(length))
        elif r < 0.75:
            yield "C", f"c{seed}-{n}"
        else:
            yield "D", None


def run_and_kill(path: Path, seed: int, rnd: random.Random) -> list[tuple[str, int, str]]:
    """Run the child and kill it just after it begins a randomly chosen snapshot operation (a
    random busy spin spreads the kill across the operation); returns the reported ops."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(seed),
                             os.path.join(REPO, "tests")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": REPO})
    snapshot_ops = [n for n, (kind, _) in enumerate(ops(seed)) if kind in "CD"]
    target = rnd.choice(snapshot_ops) if snapshot_ops else OPS_PER_RUN
    spin = rnd.randrange(0, 300_000)
    done = []

    def record(line: bytes) -> None:
        kind, n, *rest = line.decode().split()
        if kind != "B":
            done.append((kind, int(n), rest[0] if rest else ""))

    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(f"B {target} ".encode()):
                for _ in range(spin):
                    pass
                break
            record(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # The child ran on while we read: what it reported before dying counts as done.
        for line in proc.stdout.read().splitlines():
            record(line)
        err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL or not err, err.decode()
    return done


def snapshot_raw(path: Path, name: str) -> bytes:
    out = path.with_name("snap.raw")
    qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def first_difference(a: bytes, b: bytes) -> int | None:
    """The first offset where two guest images differ (None when equal): a readable failure,
    where pytest would diff megabytes."""
    if a == b:
        return None
    if len(a) != len(b):
        return min(len(a), len(b))
    return next(i for i in range(0, len(a), 512) if a[i:i + 512] != b[i:i + 512])


def snapshot_names(path: Path) -> set[str]:
    return {s["name"] for s in info(path, "-U").get("snapshots", [])}


@pytest.mark.slow
@pytest.mark.parametrize("repair_by", ["qemu", "qcowfs"])
def test_sigkill_during_snapshot_operations(tmp_path, repair_by):
    path = create(tmp_path / "img.qcow2", SIZE, cluster_size=4096)
    qemu_io(path, f"write -P 0x11 0 {SIZE}")
    model = bytearray(to_raw(path, tmp_path / "m.raw"))
    contents: dict[str, bytes] = {}  # name -> guest view when its create completed
    rnd = random.Random(99 if repair_by == "qemu" else 7)
    dirty_seen = 0
    for iteration in range(10):
        seed = rnd.randrange(1 << 30)
        done = run_and_kill(path, seed, rnd)
        writes = [op for op in ops(seed)]
        for kind, n, arg in done:
            if kind == "W":
                offset, data = writes[n][1]
                model[offset:offset + len(data)] = data
            elif kind == "C":
                contents[arg] = bytes(model)
            elif kind == "D" and arg:
                contents.pop(arg, None)
        # The op the kill interrupted may or may not have happened; anything else must match.
        interrupted = writes[len(done)] if len(done) < len(writes) else None

        code, report = check(path)
        if code not in (0, 3):
            assert info(path)["dirty-flag"], \
                f"iteration {iteration}: corrupt (exit {code}) but not marked dirty: " \
                f"{report.get('stderr', '')[-600:]}"
            dirty_seen += 1
        if info(path)["dirty-flag"]:
            if repair_by == "qemu":
                qemu_io(path, "read 0 512")  # QEMU repairs a dirty image on a r/w open
            else:
                qcowfs.open_image(str(path), writable=True).close()
            assert not info(path)["dirty-flag"]
        code, report = check(path)
        assert code in (0, 3), \
            f"iteration {iteration} after repair: exit {code}: {report.get('stderr', '')[-600:]}"
        if code == 3:
            qemu_img("check", "-r", "leaks", str(path))

        got = to_raw(path, tmp_path / "got.raw")
        if interrupted is not None and interrupted[0] == "W":
            # A write the kill interrupted was never flushed: its range may hold old bytes,
            # new bytes, or a mix (clusters the image owns are written in place).
            offset, data = interrupted[1]
            model[offset:offset + len(data)] = got[offset:offset + len(data)]
        diff = first_difference(got, bytes(model))
        assert diff is None, f"iteration {iteration}: flushed data lost at offset {diff}"

        names = snapshot_names(path)
        if interrupted is not None and interrupted[0] == "D":
            gone = [n for n in contents if n not in names]
            assert len(gone) <= 1, f"iteration {iteration}: snapshots lost: {gone}"
            for n in gone:  # the interrupted delete completed
                del contents[n]
        for name, content in contents.items():
            assert name in names, f"iteration {iteration}: completed snapshot {name} lost"
            diff = first_difference(snapshot_raw(path, name), content)
            assert diff is None, f"iteration {iteration}: snapshot {name} differs at {diff}"
        extra = names - set(contents)
        if interrupted is not None and interrupted[0] == "C" and interrupted[1] in extra:
            contents[interrupted[1]] = bytes(model)  # the interrupted create completed
            extra.discard(interrupted[1])
        assert not extra, f"iteration {iteration}: unexpected snapshots {extra}"
