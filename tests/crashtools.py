"""Kill a child writer with SIGKILL at a chosen moment and learn what it had made durable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_and_kill(child_code: str, args: list[str], reports: int) -> int:
    """Run ``child_code`` (with ``args``) and SIGKILL it after ``reports`` lines of its output.

    The child prints ``W n`` after each write and ``F n`` after each completed flush; returns
    the index of the last op a completed flush covered (-1 for none)."""
    proc = subprocess.Popen([sys.executable, "-c", child_code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": REPO})
    flushed = -1
    try:
        for _ in range(reports):
            line = proc.stdout.readline()
            if not line:
                break
            kind, n = line.split()[:2]
            if kind == b"F":
                flushed = int(n)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL or not err, err.decode()
    return flushed
