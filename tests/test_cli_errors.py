"""Malformed images through every command: a short message, the documented exit code, no
traceback, no hang. The CLI runs as a real subprocess with a timeout."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import qcowfs_subprocess
from qemutools import create, poke, qemu_io


def good(d: Path, name: str = "img.qcow2") -> Path:
    p = create(d / name, "2M")
    qemu_io(p, "write -P 1 0 128k", "write -P 2 1M 64k")
    return p


def bad_magic(d: Path) -> Path:
    p = good(d)
    poke(p, 0, b"QFI\x00")
    return p


def huge_l1_size(d: Path) -> Path:
    p = good(d)
    poke(p, 36, struct.pack(">I", 0x7FFFFFFF))
    return p


def unaligned_l2(d: Path) -> Path:
    p = good(d)
    l1 = struct.unpack(">Q", p.read_bytes()[40:48])[0]
    entry = struct.unpack(">Q", p.read_bytes()[l1:l1 + 8])[0]
    poke(p, l1, struct.pack(">Q", entry + 512))
    return p


def truncated(d: Path) -> Path:
    p = good(d)
    os.truncate(p, 3 * 65536 + 100)  # header, reftable, refblock; the L1 is cut
    return p


def truncated_header(d: Path) -> Path:
    p = good(d)
    os.truncate(p, 50)
    return p


def missing_backing(d: Path) -> Path:
    base = good(d, "base.qcow2")
    top = create(d / "top.qcow2", "2M", backing=base.name, backing_fmt="qcow2")
    base.unlink()
    return top


def huge_snapshot_count(d: Path) -> Path:
    p = good(d)
    poke(p, 60, struct.pack(">IQ", 0x7FFFFFFF, 0x30000))
    return p


def garbage_compressed(d: Path) -> Path:
    p = good(d)
    l1 = struct.unpack(">Q", p.read_bytes()[40:48])[0]
    l2 = struct.unpack(">Q", p.read_bytes()[l1:l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    poke(p, l2, struct.pack(">Q", (1 << 62) | 0x50000))  # compressed, stream is plain data
    return p


CASES = {
    "bad_magic": bad_magic,
    "huge_l1_size": huge_l1_size,
    "unaligned_l2": unaligned_l2,
    "truncated": truncated,
    "truncated_header": truncated_header,
    "missing_backing": missing_backing,
    "huge_snapshot_count": huge_snapshot_count,
    "garbage_compressed": garbage_compressed,
}


def commands(img: Path, d: Path) -> dict[str, list[str]]:
    return {
        "info": ["info", "-f", "qcow2", str(img)],
        "info-chain": ["info", "--backing-chain", "-f", "qcow2", str(img)],
        "map": ["map", "-f", "qcow2", str(img)],
        "map-json": ["map", "--output=json", "-f", "qcow2", str(img)],
        "compare": ["compare", "-f", "qcow2", str(img), str(img)],
        "check": ["check", "-f", "qcow2", str(img)],
        "check-repair": ["check", "-r", "all", "-f", "qcow2", str(img)],
        "convert-raw": ["convert", "-f", "qcow2", str(img), str(d / "out.raw")],
        "convert-qcow2": ["convert", "-f", "qcow2", "-O", "qcow2", str(img),
                          str(d / "out.qcow2")],
        "create-on-top": ["create", "-f", "qcow2", "-b", img.name, "-F", "qcow2",
                          str(d / "new.qcow2")],
        "snapshot-list": ["snapshot", "-l", str(img)],
        "snapshot-create": ["snapshot", "-c", "x", str(img)],
        "resize": ["resize", str(img), "+1M"],
        "commit": ["commit", str(img)],
        "rebase": ["rebase", "-b", "", str(img)],
        "rebase-unsafe": ["rebase", "-u", "-b", "other.qcow2", "-F", "qcow2", str(img)],
    }


EXPECTED_CODES = {"compare": {0, 1, 2}, "check": {0, 1, 2, 3}, "check-repair": {0, 1, 2, 3}}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["info", "info-chain", "map", "map-json", "compare", "check",
                                     "check-repair", "convert-raw", "convert-qcow2",
                                     "create-on-top", "snapshot-list", "snapshot-create",
                                     "resize", "commit", "rebase", "rebase-unsafe"])
def test_malformed_image(tmp_path, case, command):
    img = CASES[case](tmp_path)
    args = commands(img, tmp_path)[command]
    p = qcowfs_subprocess(*args, timeout=60, cwd=tmp_path)
    assert "Traceback" not in p.stderr, p.stderr
    name = args[0]
    allowed = EXPECTED_CODES.get(command, {0, 1})
    if name == "compare" and p.returncode not in (0, 1):
        assert p.returncode == 2
    assert p.returncode in allowed, (p.returncode, p.stdout, p.stderr)
    if p.returncode and command not in ("check", "check-repair", "compare") or (
            name == "compare" and p.returncode == 2):
        lines = [ln for ln in p.stderr.strip().splitlines()
                 if not ln.startswith("qcowfs: warning: ")]  # qemu-img's probed-raw warning
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith(f"qcowfs: {name}: ")
        assert len(lines[0]) < 400


def test_debug_shows_the_traceback(tmp_path):
    img = huge_l1_size(tmp_path)
    p = qcowfs_subprocess("--debug", "info", "-f", "qcow2", str(img), timeout=60)
    assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    import qcowfs

    p = qcowfs_subprocess(flag)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"qcowfs {qcowfs.__version__}"


def test_missing_file(tmp_path):
    for cmd in (["info"], ["map"], ["check"], ["convert"]):
        extra = [str(tmp_path / "o.raw")] if cmd == ["convert"] else []
        p = qcowfs_subprocess(*cmd, str(tmp_path / "nope.qcow2"), *extra, timeout=60)
        assert p.returncode == 1
        assert p.stderr.startswith(f"qcowfs: {cmd[0]}: ") and "nope.qcow2" in p.stderr
        assert "Traceback" not in p.stderr


@pytest.fixture
def held_by_qemu(tmp_path):
    """An image qemu-io has open read/write (it holds QEMU's lock bytes)."""
    img = good(tmp_path)
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # wait until qemu-io holds its lock bytes, polling /proc/locks with a deadline
        ino = os.stat(img).st_ino
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"qemu-io exited: {proc.stdout.read().decode(errors='replace')}")
            with open("/proc/locks") as f:
                if any(f":{ino} " in line and "OFDLCK" in line for line in f):
                    break
            time.sleep(0.02)
        else:
            pytest.fail("qemu-io never took its lock")
        yield img
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()


def test_locked_image_refused_unless_shared(held_by_qemu, tmp_path):
    img = held_by_qemu
    for args in (["info", str(img)], ["map", str(img)], ["check", str(img)],
                 ["compare", str(img), str(img)], ["convert", str(img), str(tmp_path / "o.raw")],
                 ["check", "-r", "leaks", str(img)], ["measure", str(img)],
                 ["dd", f"if={img}", f"of={tmp_path / 'dd.raw'}"]):
        p = qcowfs_subprocess(*args, timeout=60)
        assert p.returncode in (1, 2), (args, p.stderr)
        assert "lock" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    for args in (["info", "-U", str(img)], ["map", "-U", str(img)], ["check", "-U", str(img)],
                 ["compare", "-U", str(img), str(img)], ["measure", "-U", str(img)],
                 ["dd", "-U", f"if={img}", f"of={tmp_path / 'dd.raw'}"]):
        p = qcowfs_subprocess(*args, timeout=60)
        assert p.returncode == 0, (args, p.stderr)
    other = good(tmp_path, "other.qcow2")
    for args in (["create", "-f", "qcow2", str(img), "1M"], ["snapshot", "-c", "s", str(img)],
                 ["convert", "-O", "qcow2", str(other), str(img)],
                 ["resize", str(img), "+1M"], ["rebase", "-u", "-b", "x.qcow2", "-F", "qcow2",
                                                str(img)], ["snapshot", "-l", str(img)],
                 ["bitmap", "--add", str(img), "b"],
                 ["dd", f"if={other}", f"of={img}"]):
        p = qcowfs_subprocess(*args, timeout=60)
        assert p.returncode == 1 and "lock" in p.stderr, (args, p.stderr)
        assert p.stderr.count("\n") == 1


def test_progress_bar_only_when_asked(tmp_path):
    img = good(tmp_path)
    quiet = qcowfs_subprocess("convert", str(img), str(tmp_path / "a.raw"), timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
    shown = qcowfs_subprocess("convert", "-p", str(img), str(tmp_path / "b.raw"), timeout=60)
    assert shown.returncode == 0 and "convert" in shown.stderr
    amended = qcowfs_subprocess("amend", "-p", "-o", "lazy_refcounts=on", str(img), timeout=60)
    assert amended.returncode == 0 and "amend" in amended.stderr


def test_closed_pipe_is_quiet(tmp_path):
    """`qcowfs info IMAGE | head -1`: no error line when the reader goes away."""
    import subprocess
    import sys

    from qemutools import create

    img = create(tmp_path / "img.qcow2", "1M")
    p = subprocess.run(f"{sys.executable} -m qcowfs info --backing-chain {img} | head -c 1",
                       shell=True, capture_output=True, timeout=60)
    assert p.stdout == b"i" and p.stderr == b""


@pytest.mark.parametrize("argv", [
    ["convert", "{src}", "-O", "raw", "{out}"],
    ["convert", "--image-opts", "driver=qcow2,file.filename={src}", "-O", "raw", "{out}"],
    ["convert", "{src}", "{out}", "-O", "raw"],
])
def test_options_between_operands(tmp_path, argv):
    """qemu-img's getopt takes options anywhere on the line; so does qcowfs."""
    src, out = good(tmp_path), tmp_path / "out.raw"
    p = qcowfs_subprocess(*[a.format(src=src, out=out) for a in argv])
    assert p.returncode == 0, p.stderr
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, out],
                          capture_output=True).returncode == 0
