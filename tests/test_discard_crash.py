"""A process that writes and discards, killed with SIGKILL at random moments: after every kill
``qemu-img check`` finds no corruption (leaks are allowed), everything a completed ``flush()``
covered reads as the model says (discarded clusters read the backing file), and the snapshot
taken by qemu-img before any of it is untouched. The image has a snapshot, so discards also
copy shared L2 tables and drop references to clusters the snapshot keeps."""

from __future__ import annotations

import os
import random

import pytest
from crashtools import run_and_kill
from qemutools import check, create, qemu_img, qemu_io, to_raw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16 * 1024 * 1024
OPS = 300

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
from test_discard_crash import ops
import qcowfs
path, seed, cs = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
disk = qcowfs.open_image(path, writable=True, l2_cache_bytes=64 * 1024)
for n, op in enumerate(ops(seed, cs)):
    if op is None:
        disk.flush()
        print(f"F {n}", flush=True)
    elif op[0] == "w":
        disk.write(op[1], op[2])
        print(f"W {n}", flush=True)
    else:
        disk.discard(op[1], op[2])
        print(f"D {n}", flush=True)
"""


def ops(seed: int, cs: int):
    """None for a flush, ("w", offset, data), or ("d", offset, length)."""
    rnd = random.Random(seed)
    for _ in range(OPS):
        r = rnd.random()
        if r < 0.15:
            yield None
        elif r < 0.5:
            length = rnd.choice([cs, 3 * cs + 100, rnd.randrange(1, 3 << 20)])
            yield "d", rnd.randrange(0, SIZE - length), length
        else:
            length = rnd.choice([512, 4096, cs + 1000, rnd.randrange(1, 300000)])
            yield "w", rnd.randrange(0, SIZE - length), rnd.randbytes(length)


def _span(op, cs: int) -> tuple[int, int]:
    """The guest bytes an op changes."""
    if op[0] == "w":
        return op[1], op[1] + len(op[2])
    first, last = -(-op[1] // cs), (op[1] + op[2]) // cs
    return first * cs, max(first, last) * cs


def expected_after(model: bytearray, backing: bytes, seed: int, cs: int, upto: int) -> None:
    for n, op in enumerate(ops(seed, cs)):
        if n > upto:
            break
        if op is None:
            continue
        a, b = _span(op, cs)
        model[a:b] = op[2] if op[0] == "w" else backing[a:b]


def touched_after(seed: int, cs: int, after: int) -> bytearray:
    mask = bytearray(SIZE)
    for n, op in enumerate(ops(seed, cs)):
        if n > after and op is not None:
            a, b = _span(op, cs)
            mask[a:b] = b"\1" * (b - a)
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"cluster_size": 4096}, {"extended_l2": True}],
                         ids=["c4k", "extl2"])
def test_sigkill_during_discards_loses_nothing_flushed(tmp_path, options):
    cs = options.get("cluster_size", 65536)
    base = create(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, f"write -P 0x5a 0 {SIZE}")
    path = create(tmp_path / "top.qcow2", SIZE, backing=base, **options)
    qemu_io(path, "write -P 0x21 0 6M", "write -P 0x22 10M 3M")
    qemu_img("snapshot", "-c", "kept", str(path))
    snap = to_raw(path, tmp_path / "snap.raw", snapshot="1")
    backing = to_raw(base, tmp_path / "base.raw")
    model = bytearray(to_raw(path, tmp_path / "m.raw"))
    rnd = random.Random(4321)
    for iteration in range(6):
        seed = rnd.randrange(1 << 30)
        flushed = run_and_kill(CHILD, [str(path), str(seed), os.path.join(REPO, "tests"), str(cs)],
                               rnd.randrange(1, OPS))
        code, report = check(path)
        assert code in (0, 3), f"iteration {iteration}: qemu-img check exit {code}: {report}"
        assert not report.get("corruptions"), report
        got = to_raw(path, tmp_path / "got.raw")
        expected = bytearray(model)
        expected_after(expected, backing, seed, cs, flushed)
        mask = touched_after(seed, cs, flushed)
        bad = [i for i in range(0, SIZE, 512)
               if not any(mask[i:i + 512]) and got[i:i + 512] != expected[i:i + 512]]
        assert not bad, f"iteration {iteration}: flushed data lost at offsets {bad[:5]}"
        assert to_raw(path, tmp_path / "snap-now.raw", snapshot="1") == snap
        model = bytearray(got)
    qemu_img("check", "-r", "leaks", str(path))
    code, report = check(path)
    assert code == 0, report
