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


def test_the_unit_documents_a_key_credential_that_reaches_key_file():
    # The drop-in the unit's comments give, applied as systemd would: its Environment= sets
    # KEY_OPTIONS (with %d, the credentials directory), ExecStart appends it to OPTIONS, and
    # the mount options parse to key_file= inside that directory.
    from qcowfs.mount.options import parse_options

    text = (UNITS / "qcowfs@.service").read_text()
    comments = [ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("#")]
    assert "LoadCredential=key:/etc/qcowfs/<instance>.key" in comments
    env_line = next(c for c in comments if c.startswith("Environment=KEY_OPTIONS="))
    exec_line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert "-o ${OPTIONS}${KEY_OPTIONS} " in exec_line
    assert "Environment=KEY_OPTIONS=\n" in text  # empty unless the drop-in sets it
    creds = "/run/credentials/qcowfs@srv-vm.service"
    key_options = env_line.removeprefix("Environment=KEY_OPTIONS=").replace("%d", creds)
    opts = parse_options(["rw" + key_options])
    assert opts.key_file == f"{creds}/key"
