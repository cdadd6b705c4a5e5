"""SIGKILL at every file-changing call of ``amend -o refcount_bits=`` and ``amend -o
compat=0.10`` (the child of fuzz/crash.py announces each kill point): QEMU's check finds no
corruption (leaks allowed, and ``check -r all`` then leaves a clean image), the guest view
never changes, and the image is either the old format or the new one."""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest

from fuzz.crash import NEVER, judge, prepare, raw, run_child

CASES = [("amend-refcount", 2), ("amend-refcount", 5), ("amend-refcount", 0),
         ("amend-compat", 4), ("amend-compat", 7)]


def _format(d) -> tuple:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", "top.qcow2"], cwd=d,
                         capture_output=True, check=True).stdout
    data = json.loads(out)["format-specific"]["data"]
    return data["compat"], data["refcount-bits"]


@pytest.mark.slow
@pytest.mark.parametrize("op,seed", CASES)
def test_every_kill_point(tmp_path, op, seed):
    rnd = random.Random(seed)
    work = tmp_path / "prepared"
    work.mkdir()
    prepare(op, work, rnd)
    before = {"top": raw(work, "top.qcow2"), "base": raw(work, "base.qcow2", "base-view.raw")}
    old = _format(work)
    probe = tmp_path / "probe"
    shutil.copytree(work, probe)
    lines, _ = run_child(op, probe, NEVER, seed)
    total = int(lines[-1].split()[1])
    new = _format(probe)
    assert new != old and total >= 2, (total, new)
    for kill_at in range(1, total + 2):
        d = tmp_path / f"kill-{kill_at}"
        shutil.copytree(work, d)
        lines, _ = run_child(op, d, kill_at, seed)
        assert any(x.startswith("K ") for x in lines) == (kill_at <= total), lines
        judge(op, d, before, lines, seed)
        assert _format(d) in (old, new), kill_at
        if kill_at > total:
            assert _format(d) == new
        fixed = subprocess.run(["qemu-img", "check", "-r", "all", "top.qcow2"], cwd=d,
                               capture_output=True)
        assert fixed.returncode == 0, fixed.stdout.decode()
        assert raw(d, "top.qcow2") == before["top"]
        shutil.rmtree(d)
