"""What info, check and map load: imports are most of their start-up time on a small image,
so a small image loads neither numpy (the whole-table passes), typing nor json (human
output); a large image does use the whole-table passes. Each run is a fresh interpreter."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
from qemutools import create, qemu_io
from test_mount_imports import REPO

HEAVY = {"numpy", "typing", "json", "qcowfs.image.tablescan"}


def loaded_by(*argv: str) -> set[str]:
    script = textwrap.dedent(f"""
        import os, sys
        before = set(sys.modules)
        from qcowfs.cli.main import main
        saved = os.dup(1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = main({list(argv)!r})
        sys.stdout.flush()
        os.dup2(saved, 1)
        loaded = sorted(set(sys.modules) - before)
        import json
        print(json.dumps([code, loaded]))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=60, check=True)
    code, mods = json.loads(p.stdout.splitlines()[-1])
    assert code == 0, p.stderr
    return set(mods)


@pytest.mark.parametrize("command", ["info", "check", "map"])
def test_small_image_commands_load_nothing_heavy(tmp_path, command):
    p = create(tmp_path / "small.qcow2", "1G")
    qemu_io(p, "write -P 1 0 1M")
    assert not loaded_by(command, str(p)) & HEAVY


def test_check_of_regular_tables_needs_no_numpy(tmp_path):
    """Preallocated tables are contiguous runs: check takes them whole without numpy too."""
    p = create(tmp_path / "large.qcow2", "4G", preallocation="metadata")
    loaded = loaded_by("check", str(p))
    assert "qcowfs.image.tableruns" in loaded and "numpy" not in loaded


def test_large_image_takes_whole_tables(tmp_path):
    """A large image with a table that is not one run (two entries swapped) takes that
    table with numpy."""
    p = create(tmp_path / "large.qcow2", "4G", preallocation="metadata")
    with open(p, "r+b") as f:
        f.seek(40)
        (l1,) = struct.unpack(">Q", f.read(8))
        f.seek(l1)
        (l2,) = struct.unpack(">Q", f.read(8))
        f.seek(l2 & 0x00FFFFFFFFFFFE00)
        two = f.read(16)
        f.seek(l2 & 0x00FFFFFFFFFFFE00)
        f.write(two[8:] + two[:8])
    assert subprocess.run(["qemu-img", "check", str(p)], capture_output=True).returncode == 0
    assert "qcowfs.image.tablescan" in loaded_by("check", str(p))
