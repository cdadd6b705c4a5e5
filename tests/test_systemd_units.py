"""The units in systemd/ pass ``systemd-analyze verify`` with no complaint at all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED = "/usr/local/bin/qcowfs"


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing (make test installs the systemd package)")
    probe = subprocess.run([tool, "--version"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"systemd-analyze cannot run here: {probe.stderr.strip()}")
    return tool


def test_units_verify_clean(tmp_path):
    tool = _analyze()
    qcowfs_bin = Path(sys.executable).parent / "qcowfs"
    paths = []
    for unit in sorted(UNITS.iterdir()):
        text = unit.read_text()
        # verify checks that ExecStart exists: point it at this venv's qcowfs when qcowfs is
        # not installed system-wide (the only change made to the unit).
        if not Path(INSTALLED).exists() and qcowfs_bin.exists():
            text = text.replace(INSTALLED, str(qcowfs_bin))
        name = unit.name.replace("@.", "@srv-vm.")
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    assert any("@" in p for p in paths) and any(p.endswith(".mount") for p in paths)
    p = subprocess.run([tool, "verify", *paths], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == "", p.stderr
