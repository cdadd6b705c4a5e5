"""Running the qcowfs command for tests: in-process (fast) or as a subprocess (for the
no-traceback/no-hang checks)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    code: int
    out: str
    err: str


def qcowfs(*args: str | os.PathLike) -> Result:
    """Run ``qcowfs ARGS`` in this process and capture what it prints."""
    from qcowfs.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return Result(code, out.getvalue(), err.getvalue())


def qcowfs_subprocess(*args: str | os.PathLike, timeout: float = 60,
                      cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qcowfs", *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def two_copies(src: Path, d: Path) -> tuple[Path, Path]:
    """(theirs.qcow2, ours.qcow2) in ``d``: the same image, one for qemu-img, one for qcowfs."""
    import shutil

    theirs, ours = d / "theirs.qcow2", d / "ours.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    return theirs, ours
