"""A writer process killed with SIGKILL at random moments, many times over the same image.

After every kill: ``qemu-img check`` finds no corruption (leaked clusters are allowed; an image
with lazy refcounts is first repaired by qcowfs opening it read/write, as QEMU does), every
write a completed ``flush()`` covered is there, and qcowfs reopens the image read/write and
keeps it consistent. The child reports each completed write and flush on its stdout; the
parent kills it after a random number of reports, so the kill lands anywhere in the child's
write, COW, allocation, eviction or flush code.
"""

from __future__ import annotations

import os
import random

import pytest
from crashtools import run_and_kill
from qemutools import check, create, qemu_io, to_raw

import qcowfs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
from test_write_crash import ops
import qcowfs
path, seed = sys.argv[1], int(sys.argv[2])
keys = [sys.argv[5].encode()] if len(sys.argv) > 5 else None  # test_crypto_crash's key
disk = qcowfs.open_image(path, writable=True, l2_cache_bytes=int(sys.argv[4]), keys=keys)
out = sys.stdout
for n, op in enumerate(ops(seed, disk.size)):
    if op is None:
        disk.flush()
        out.write(f"F {n}\n")
    else:
        offset, data = op
        disk.write(offset, data)
        out.write(f"W {n}\n")
    out.flush()
"""

OPS_PER_RUN = 400


def ops(seed: int, size: int):
    """The child's operations: (offset, data) writes and None for a flush."""
    rnd = random.Random(seed)
    for _ in range(OPS_PER_RUN):
        if rnd.random() < 0.15:
            yield None
            continue
        length = rnd.choice([512, 4096, 65536 + 1000, rnd.randrange(1, 300000)])
        offset = rnd.randrange(0, size - length)
        kind = rnd.random()
        if kind < 0.2:
            data = bytes(length)
        else:
            data = rnd.randbytes(length)
        yield offset, data


def apply_ops(model: bytearray, seed: int, upto: int) -> None:
    for n, op in enumerate(ops(seed, len(model))):
        if n > upto:
            break
        if op is not None:
            offset, data = op
            model[offset:offset + len(data)] = data


def touched_after(seed: int, size: int, after: int) -> bytearray:
    """1 for every byte a write after op ``after`` may have changed."""
    mask = bytearray(size)
    for n, op in enumerate(ops(seed, size)):
        if n > after and op is not None:
            offset, data = op
            mask[offset:offset + len(data)] = b"\1" * len(data)
    return mask


def assert_flushed_kept(got: bytes, model: bytes, seed: int, flushed: int, iteration: int
                        ) -> None:
    """Every 512-byte sector no op after the last completed flush touched reads as the ops up
    to that flush made it."""
    size = len(model)
    expected = bytearray(model)
    apply_ops(expected, seed, flushed)
    mask = touched_after(seed, size, flushed)
    bad = [i for i in range(0, size, 512)
           if not any(mask[i:i + 512]) and got[i:i + 512] != expected[i:i + 512]]
    assert not bad, f"iteration {iteration}: flushed data lost at offsets {bad[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize(("options", "cache"), [
    ({}, 32 * 1024 * 1024),
    ({"cluster_size": 4096}, 64 * 1024),  # a tiny L2 cache: evictions mid-write
    ({"lazy_refcounts": True}, 32 * 1024 * 1024),
    ({"extended_l2": True, "cluster_size": 32768}, 256 * 1024),
], ids=["c64k", "c4k-small-cache", "lazy", "extl2"])
def test_sigkill_loses_nothing_flushed(tmp_path, options, cache):
    size = 16 * 1024 * 1024
    base = create(tmp_path / "base.raw", size, fmt="raw")
    qemu_io(base, f"write -P 0x5a 0 {size}", fmt="raw")
    path = create(tmp_path / "top.qcow2", size, backing=base, backing_fmt="raw", **options)
    rnd = random.Random(1234)
    model = bytearray(to_raw(path, tmp_path / "m.raw"))
    for iteration in range(8):
        seed = rnd.randrange(1 << 30)
        flushed = run_and_kill(CHILD, [str(path), str(seed), os.path.join(REPO, "tests"), str(cache)],
                               rnd.randrange(1, OPS_PER_RUN))
        if options.get("lazy_refcounts"):
            # A dirty image is repaired by a read/write open, as QEMU does.
            qcowfs.open_image(str(path), writable=True).close()
        code, report = check(path)
        assert code in (0, 3), f"iteration {iteration}: qemu-img check exit {code}: {report}"
        got = to_raw(path, tmp_path / "got.raw")
        assert_flushed_kept(got, model, seed, flushed, iteration)
        # qcowfs reopens the crashed image read/write and keeps it consistent.
        with qcowfs.open_image(str(path), writable=True) as disk:
            disk.write(4096 * iteration, b"\x77" * 5000)
            got = bytearray(got)
            got[4096 * iteration:4096 * iteration + 5000] = b"\x77" * 5000
        code, report = check(path)
        assert code in (0, 3), f"iteration {iteration} after reopen: exit {code}: {report}"
        model = bytearray(to_raw(path, tmp_path / "m.raw"))
        assert model == got
