"""A writer of an encrypted (LUKS) overlay killed with SIGKILL at random moments: QEMU, given
the key, finds no corruption and reads every flushed write back (see test_write_crash.py for
the method; the same operations run here through the encrypted write path)."""

from __future__ import annotations

import os
import random

import pytest
from crashtools import run_and_kill
from test_write_crash import CHILD, OPS_PER_RUN, assert_flushed_kept

import qcowfs
from tests import qemutools as q

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "crash key"



@pytest.mark.slow
def test_sigkill_during_encrypted_writes_loses_nothing_flushed(tmp_path):
    size = 8 * 1024 * 1024
    base = q.create(tmp_path / "base.raw", size, fmt="raw")
    q.qemu_io(base, f"write -P 0x5a 0 {size}", fmt="raw")
    path = q.create_encrypted(tmp_path / "top.qcow2", size, KEY, backing=base.name,
                              backing_fmt="raw", cluster_size=4096)
    keys = [KEY, None]
    rnd = random.Random(4321)
    model = bytearray(q.to_raw_encrypted(path, tmp_path / "m.raw", keys))
    for iteration in range(4):
        seed = rnd.randrange(1 << 30)
        flushed = run_and_kill(CHILD, [str(path), str(seed), os.path.join(REPO, "tests"),
                                       str(64 * 1024), KEY],
                               rnd.randrange(1, OPS_PER_RUN))
        code, report = q.check_encrypted(path, keys)
        assert code in (0, 3), f"iteration {iteration}: qemu-img check exit {code}: {report}"
        got = q.to_raw_encrypted(path, tmp_path / "got.raw", keys)
        assert_flushed_kept(got, model, seed, flushed, iteration)
        with qcowfs.open_image(str(path), writable=True, keys=[KEY.encode()]) as disk:
            disk.write(4096 * iteration + 3, b"\x77" * 5000)
        got = bytearray(got)
        got[4096 * iteration + 3:4096 * iteration + 5003] = b"\x77" * 5000
        model = bytearray(q.to_raw_encrypted(path, tmp_path / "m.raw", keys))
        assert model == got
        assert q.check_encrypted(path, keys)[0] in (0, 3)
