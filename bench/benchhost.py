"""What the bench machine is, for the figures the benches write into docs/performance.md."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess


def host_summary(folder: str | os.PathLike) -> str:
    """CPU, cores, memory, kernel, the file system of ``folder`` and the Python version."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(folder)], capture_output=True,
                        text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Linux {platform.release()}; "
            f"bench files on {fs}; Python {platform.python_version()}")
