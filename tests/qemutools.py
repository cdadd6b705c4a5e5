"""QEMU's own tools as the oracle: make fixtures with qemu-img/qemu-io, judge with compare,
check and map. Nothing here uses qcowfs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"


def run(*args: str | os.PathLike, check: bool = True, input: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True,
                          input=input, timeout=timeout)


def qemu_img(*args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    return run(QEMU_IMG, *args, check=check)


def qemu_io(image: str | os.PathLike, *commands: str, fmt: str = "qcow2",
            extra: tuple[str, ...] = ()) -> str:
    """Run qemu-io commands on an image; raise if any of them reports an error."""
    args: list[str] = [QEMU_IO, "-f", fmt, *extra]
    for c in commands:
        args += ["-c", c]
    args.append(str(image))
    out = run(*args).stdout.decode()
    if "error" in out.lower() or "failed" in out.lower():
        raise AssertionError(f"qemu-io reported an error: {out}")
    return out


def create(path: str | os.PathLike, size: str | int, *, fmt: str = "qcow2",
           backing: str | os.PathLike | None = None, backing_fmt: str | None = None,
           **options: str | int | bool) -> Path:
    args: list[str] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    opts = ",".join(f"{k}={_opt(v)}" for k, v in options.items())
    if opts:
        args += ["-o", opts]
    args += [str(path), str(size)]
    qemu_img(*args)
    return Path(path)


def _opt(v: str | int | bool) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def to_raw(image: str | os.PathLike, out: str | os.PathLike, *, snapshot: str | None = None,
           fmt: str | None = None) -> bytes:
    """What QEMU says the guest sees: ``qemu-img convert -O raw``; returns the bytes."""
    args: list[str] = ["convert"]
    if fmt:
        args += ["-f", fmt]
    if snapshot is not None:
        args += ["-l", f"snapshot.id={snapshot}"]
    args += ["-O", "raw", str(image), str(out)]
    qemu_img(*args)
    return Path(out).read_bytes()


def info(image: str | os.PathLike, *extra: str) -> dict:
    return json.loads(qemu_img("info", "--output=json", *extra, str(image)).stdout)


def check(image: str | os.PathLike, *extra: str) -> tuple[int, dict]:
    """(exit code, JSON report) of ``qemu-img check``."""
    p = qemu_img("check", "--output=json", *extra, str(image), check=False)
    try:
        report = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {"raw": p.stdout.decode(), "stderr": p.stderr.decode()}
    report.setdefault("stderr", p.stderr.decode())
    return p.returncode, report


def assert_check_clean(image: str | os.PathLike) -> None:
    """No errors and no leaks, as ``qemu-img check`` judges."""
    code, report = check(image)
    assert code == 0, f"qemu-img check {image}: exit {code}: {report}"


def compare(a: str | os.PathLike, b: str | os.PathLike, *extra: str) -> int:
    """``qemu-img compare`` exit code: 0 identical, 1 different."""
    return qemu_img("compare", *extra, str(a), str(b), check=False).returncode


def map_json(image: str | os.PathLike, *extra: str) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", *extra, str(image)).stdout)


def poke(path: str | os.PathLike, offset: int, data: bytes) -> None:
    """Patch bytes in a file (the iotests' poke_file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
