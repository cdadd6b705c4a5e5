"""The offline commands beside qemu-img on the same files: ``make bench-cli``.

Every image is made by qemu-img (and qemu-io, mkfs.ext4) itself. Each row runs the same command
through ``qemu-img`` and through ``qcowfs`` as a user would (a new process each time), sides
interleaved and their order swapped every round, and reports the median wall times and the
ratio qcowfs / qemu-img (above 1.0 means qcowfs is slower). Commands that change their image
(commit, rebase, resize, check -r all) get a fresh copy before every run, outside the timing.
The table is printed and written into docs/performance.md with the machine it ran on.
qcowfs runs from its bytecode, as an installed qcowfs does (``compile_bytecode``).

Knobs (environment):
    BENCH_SAMPLES=3        runs per row and side (the median is reported)
    BENCH_ROWS=a,b         only the rows whose name contains one of these (no doc update)
    BENCH_DISK=3G          the ext4 disk image the convert rows start from
    BENCH_FILES_MIB=700    real file data inside it
    BENCH_BIG=64G          the metadata-preallocated image of the check/map rows
    BENCH_COMMIT_MIB=1024  data in the overlay that commit writes down
    BENCH_DIR=bench/out    where the images go (removed afterwards)
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchhost import host_summary

REPO = Path(__file__).resolve().parent.parent
SAMPLES = int(os.environ.get("BENCH_SAMPLES", "3"))
ROWS = [r for r in os.environ.get("BENCH_ROWS", "").split(",") if r]
DISK = os.environ.get("BENCH_DISK", "3G")
FILES_MIB = int(os.environ.get("BENCH_FILES_MIB", "700"))
BIG = os.environ.get("BENCH_BIG", "64G")
COMMIT_MIB = int(os.environ.get("BENCH_COMMIT_MIB", "1024"))
OUT = Path(os.environ.get("BENCH_DIR", REPO / "bench" / "out"))
QCOWFS = str(Path(sys.executable).parent / "qcowfs")
MiB = 1 << 20
DOC_HEADING = "## Offline commands: `make bench-cli`"


def sh(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    sh(*argv, image)


@dataclass
class Row:
    name: str
    qemu: list[str]
    qcowfs: list[str]
    #: runs before every sample (outside the timing): fresh copies, removed outputs
    prepare: Callable[[], None] | None = None
    #: the target: "ratio" (qcowfs/qemu-img at most this) or "ms" (qcowfs wall under this)
    target: tuple[str, float] = ("ratio", 1.0)


# --- images ---------------------------------------------------------------------------------


def _write_files(folder: Path, total_mib: int) -> None:
    """Files of real-looking content: half incompressible, half text-like (base64)."""
    rng = random.Random(11)
    folder.mkdir()
    written, n = 0, 0
    while written < total_mib * MiB:
        size = min(rng.choice((64 * 1024, 1 * MiB, 8 * MiB, 32 * MiB)), total_mib * MiB - written)
        raw = rng.randbytes(size if n % 2 else size * 3 // 4)
        data = raw if n % 2 else base64.b64encode(raw)[:size]
        (folder / f"f{n:05d}").write_bytes(data)
        written += len(data)
        n += 1


def build(d: Path) -> dict[str, Path]:
    p = {name: d / name for name in (
        "small.qcow2", "big.qcow2", "disk.raw", "disk.qcow2", "zlib.qcow2", "huge.qcow2",
        "four.qcow2", "cbase.qcow2", "cover.qcow2", "rbase.qcow2", "rbase2.qcow2",
        "rover.qcow2")}
    print("bench-cli: building images with qemu-img ...", flush=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", p["small.qcow2"], "1G")
    qemu_io(p["small.qcow2"], "write -P 1 0 1M", "write -P 2 100M 64k", "write -z 200M 1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
       p["big.qcow2"], BIG)
    files = d / "files"
    _write_files(files, FILES_MIB)
    sh("mkfs.ext4", "-q", "-F", "-d", files, p["disk.raw"], DISK)
    shutil.rmtree(files)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", p["disk.raw"], p["disk.qcow2"])
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", p["disk.raw"], p["zlib.qcow2"])
    # the same 1 GiB of data in a 4 TiB and in a 4 GiB image: cost follows the data
    for name, size in (("huge.qcow2", "4T"), ("four.qcow2", "4G")):
        sh("qemu-img", "create", "-q", "-f", "qcow2", p[name], size)
        qemu_io(p[name], "write -P 7 0 512M", "write -P 8 3G 512M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", p["cbase.qcow2"], "4G")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "cbase.qcow2", "-F", "qcow2",
       p["cover.qcow2"])
    qemu_io(p["cover.qcow2"], f"write -P 9 0 {COMMIT_MIB}M")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", p["disk.raw"], p["rbase.qcow2"])
    shutil.copyfile(p["rbase.qcow2"], p["rbase2.qcow2"])
    qemu_io(p["rbase2.qcow2"], "write -P 3 0 16M", "write -P 4 128M 16M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "rbase.qcow2", "-F", "qcow2",
       p["rover.qcow2"])
    qemu_io(p["rover.qcow2"], "write -P 5 8M 16M")
    for name in ("cover.qcow2", "rover.qcow2", "big.qcow2", "disk.qcow2"):
        sh("cp", "--sparse=always", p[name], d / ("orig-" + name))
    return p


def rows(d: Path, p: dict[str, Path]) -> list[Row]:
    out = d / "out.img"

    def fresh(*names: str) -> Callable[[], None]:
        def run() -> None:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
            for name in names:
                sh("cp", "--sparse=always", d / ("orig-" + name), d / name)
        return run

    def both(name: str, args: list[str], prepare=None, target=("ratio", 1.0),
             qemu_args: list[str] | None = None) -> Row:
        return Row(name, ["qemu-img", *(qemu_args or args)], [QCOWFS, *args],
                   prepare or fresh(), target)

    big, small, disk, raw = (str(p[n]) for n in ("big.qcow2", "small.qcow2", "disk.qcow2",
                                                 "disk.raw"))
    zlib, o = str(p["zlib.qcow2"]), str(out)
    return [
        both("info, small image (ms)", ["info", small], target=("ms", 60)),
        both("check, small image (ms)", ["check", small], target=("ms", 60)),
        both("map, small image (ms)", ["map", small], target=("ms", 60)),
        both(f"info, {BIG} preallocated metadata", ["info", big]),
        both(f"check, {BIG} preallocated metadata", ["check", big]),
        both(f"check -r all, {BIG} preallocated metadata", ["check", "-r", "all", big],
             prepare=fresh("big.qcow2")),
        both(f"map, {BIG} preallocated metadata", ["map", big]),
        both(f"map --output=json, {BIG} preallocated metadata",
             ["map", "--output=json", big]),
        both("check, 4T sparse, 1 GiB data", ["check", str(p["huge.qcow2"])]),
        both("check, 4G, the same 1 GiB data", ["check", str(p["four.qcow2"])]),
        both("map --output=json, 4T sparse, 1 GiB data",
             ["map", "--output=json", str(p["huge.qcow2"])]),
        both("convert -O qcow2, 4T sparse, 1 GiB data",
             ["convert", "-O", "qcow2", str(p["huge.qcow2"]), o]),
        both("convert -O qcow2, 4G, the same 1 GiB data",
             ["convert", "-O", "qcow2", str(p["four.qcow2"]), o]),
        both(f"convert raw -> qcow2, {DISK} ext4", ["convert", "-f", "raw", "-O", "qcow2",
                                                    raw, o]),
        both(f"convert qcow2 -> raw, {DISK} ext4", ["convert", "-O", "raw", disk, o]),
        both(f"convert qcow2 -> qcow2, {DISK} ext4", ["convert", "-O", "qcow2", disk, o]),
        both("convert -O raw from the zlib copy", ["convert", "-O", "raw", zlib, o]),
        both("convert -O qcow2 -B (against the zlib copy)",
             ["convert", "-O", "qcow2", "-B", zlib, "-F", "qcow2", disk, o]),
        both("convert -c -O qcow2 (zlib)", ["convert", "-c", "-O", "qcow2", disk, o],
             target=("ratio", 0.6)),
        both("convert -c -O qcow2 (zstd)", ["convert", "-c", "-O", "qcow2", "-o",
                                            "compression_type=zstd", disk, o],
             target=("ratio", 0.6)),
        both("compare, image and its zlib copy", ["compare", disk, zlib]),
        both(f"commit, {COMMIT_MIB} MiB overlay", ["commit", str(p["cover.qcow2"])],
             prepare=fresh("cover.qcow2")),
        both("rebase (safe), over a changed backing file",
             ["rebase", "-b", "rbase2.qcow2", "-F", "qcow2", str(p["rover.qcow2"])],
             prepare=fresh("rover.qcow2")),
        both("resize +8G", ["resize", disk, "+8G"], prepare=fresh("disk.qcow2")),
    ]


# --- running --------------------------------------------------------------------------------


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"bench-cli: {' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return elapsed


def measure(row: Row) -> tuple[float, float]:
    times: dict[str, list[float]] = {"qemu": [], "qcowfs": []}
    for i in range(SAMPLES + 1):  # round 0 warms the page cache and is not counted
        order = ("qemu", "qcowfs") if i % 2 else ("qcowfs", "qemu")
        for side in order:
            if row.prepare:
                row.prepare()
            t = timed(row.qemu if side == "qemu" else row.qcowfs)
            if i:
                times[side].append(t)
    return statistics.median(times["qemu"]), statistics.median(times["qcowfs"])


def verdict(row: Row, qemu: float, ours: float) -> str:
    kind, limit = row.target
    if kind == "ms":
        return "yes" if ours * 1000 < limit else "no"
    return "yes" if ours / qemu <= limit else "no"


def machine(d: Path) -> str:
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    return f"{host_summary(d)}; {qemu}"


def table(results: list[tuple[Row, float, float]]) -> str:
    lines = ["| job | qemu-img | qcowfs | qcowfs / qemu-img | target | met |",
             "|---|---:|---:|---:|---:|---|"]
    for row, qemu, ours in results:
        kind, limit = row.target
        goal = f"< {limit:.0f} ms" if kind == "ms" else f"<= {limit}"
        lines.append(f"| {row.name} | {qemu * 1000:,.0f} ms | {ours * 1000:,.0f} ms | "
                     f"{ours / qemu:.2f} | {goal} | {verdict(row, qemu, ours)} |")
    return "\n".join(lines)


def write_doc(text: str, mach: str, load: str) -> Path:
    doc = REPO / "docs" / "performance.md"
    old = doc.read_text()
    head = old.split(DOC_HEADING)[0].rstrip("\n")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"{DOC_HEADING}\n\n"
        "Written by `make bench-cli` (`bench/bench_cli.py`): every offline command run by "
        "`qemu-img` and by `qcowfs` on the same files, each a new process as a user runs it, "
        f"sides interleaved (their order swapped every round), a warm-up round and then {SAMPLES} "
        "rounds, medians of wall time. Every image is made by qemu-img, qemu-io and mkfs.ext4 "
        f"(`-d`, a {DISK} ext4 disk holding {FILES_MIB} MiB of files, half of them text-like); "
        "commands that change their image get a fresh copy before each run, outside the "
        "timing. A ratio above 1.0 means qcowfs is slower.\n\n"
        f"Run {when} on: {mach}; {load}.\n\n{text}\n\n"
        "Where the time goes: docs/design.md, \"Whole-table passes\" and \"The convert data "
        "path\".\n")
    doc.write_text(f"{head}\n\n{section}")
    return doc


def compile_bytecode() -> None:
    """Give qcowfs its bytecode, as an installed qcowfs has it (pip compiles at install). Where
    PYTHONDONTWRITEBYTECODE is set a checkout has none, and every start compiles each module
    it imports again: about 25 ms of the small-image rows."""
    import compileall
    compileall.compile_dir(REPO / "qcowfs", quiet=1)


def main() -> int:
    compile_bytecode()
    for tool in ("qemu-img", "qemu-io", "mkfs.ext4"):
        if shutil.which(tool) is None:
            print(f"bench-cli: {tool} is missing", file=sys.stderr)
            return 1
    OUT.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="cli-", dir=OUT))
    try:
        load_start = os.getloadavg()[0]
        p = build(d)
        chosen = [r for r in rows(d, p) if not ROWS or any(w in r.name for w in ROWS)]
        results = []
        for row in chosen:
            qemu, ours = measure(row)
            results.append((row, qemu, ours))
            print(f"  {row.name}: qemu-img {qemu * 1000:.0f} ms, qcowfs {ours * 1000:.0f} ms, "
                  f"ratio {ours / qemu:.2f}", flush=True)
        mach = machine(d)
        load = f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    finally:
        shutil.rmtree(d, ignore_errors=True)
    text = table(results)
    print()
    print(text)
    if not ROWS:
        print(f"\nwrote {write_doc(text, mach, load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
