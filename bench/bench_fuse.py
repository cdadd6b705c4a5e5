#!/usr/bin/env python3
"""``make bench``: fio through qcowfs beside qemu-storage-daemon's FUSE export of the same kind
of image, in one run, interleaved (qcowfs, QEMU, qcowfs, QEMU ...), medians of several samples,
O_DIRECT. Prints the table with the qcowfs/QEMU ratio per job and writes docs/performance.md.
Also: mount time and daemon memory for a 4 TiB sparse image.

Environment: BENCH_SAMPLES (default 3), BENCH_RUNTIME seconds per sample (default 5),
BENCH_SIZE (default 1G), BENCH_DIR (default bench/out); BENCH_JOBS=TEXT runs only the jobs
whose name contains TEXT, prints their table and leaves docs/performance.md alone (several
TEXTs separated by commas select every job any of them matches; a TEXT that starts with ``^``
matches the start of the name only, so ``^rand write`` leaves out the LUKS rows).
BENCH_QCOWFS_OPTIONS adds mount options to the qcowfs side of the main tables (say
``io_threads=0`` to see the writes inline).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchhost import host_summary

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SAMPLES = int(os.environ.get("BENCH_SAMPLES", "3"))
RUNTIME = int(os.environ.get("BENCH_RUNTIME", "5"))
SIZE = os.environ.get("BENCH_SIZE", "1G")
OUT = Path(os.environ.get("BENCH_DIR", REPO / "bench" / "out"))

# name, rw, block size, ioengine, iodepth, copy-on-write into a fresh overlay
JOBS = [
    ("seq read 1M QD1", "read", "1M", "psync", 1, False),
    ("seq write 1M QD1", "write", "1M", "psync", 1, False),
    ("rand read 4k QD1", "randread", "4k", "psync", 1, False),
    ("rand write 4k QD1", "randwrite", "4k", "psync", 1, False),
    ("rand read 4k QD16", "randread", "4k", "libaio", 16, False),
    ("rand write 4k QD16", "randwrite", "4k", "libaio", 16, False),
    ("COW 4k QD1 (fresh overlay)", "randwrite", "4k", "psync", 1, True),
]
JOB_FILTER = os.environ.get("BENCH_JOBS", "")
QCOWFS_OPTIONS = os.environ.get("BENCH_QCOWFS_OPTIONS", "")


def wanted(name: str) -> bool:
    """Whether BENCH_JOBS selects the job ``name`` (every job when it is unset)."""
    if not JOB_FILTER:
        return True
    for text in JOB_FILTER.split(","):
        text = text.strip()
        if text.startswith("^") and name.startswith(text[1:]):
            return True
        if text and not text.startswith("^") and text in name:
            return True
    return False


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True,
                          **kw)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_until(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def qcowfs_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qcowfs", *map(str, args)],
                          capture_output=True, text=True, env=env)


@contextlib.contextmanager
def qcowfs_mount(image: Path, mp: Path, options: str):
    mp.mkdir(parents=True, exist_ok=True)
    p = qcowfs_cli("mount", "-o", options, image, mp)
    if p.returncode:
        raise RuntimeError(p.stderr.strip())
    try:
        yield mp / "disk"
    finally:
        if is_mounted(mp):
            qcowfs_cli("umount", mp)
        if is_mounted(mp):
            sh("fusermount3", "-u", "-z", mp, check=False)


@contextlib.contextmanager
def fuse_daemon(argv: list, mountpoint: Path, name: str, stop):
    """Run a FUSE daemon in the foreground until it has mounted ``mountpoint``; afterwards
    ``stop(proc)`` asks it to leave, and whatever is left is killed and lazily unmounted."""
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: is_mounted(mountpoint) or proc.poll() is not None, what=name)
        if proc.poll() is not None:
            raise RuntimeError(f"{name}: {proc.stderr.read().strip()}")
        yield
    finally:
        if proc.poll() is None:
            stop(proc)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mountpoint):
            sh("fusermount3", "-u", "-z", mountpoint, check=False)


@contextlib.contextmanager
def qemu_export(image: Path, target: Path, writable: bool, key_file: Path | None = None,
                direct: bool = False):
    target.touch()
    secret = ["--object", f"secret,id=key,file={key_file}"] if key_file else []
    encrypt = ",encrypt.format=luks,encrypt.key-secret=key" if key_file else ""
    argv = ["qemu-storage-daemon", *secret,
            "--blockdev", f"driver=file,node-name=file,filename={image},"
                          f"cache.direct={'on' if direct else 'off'}",
            "--blockdev", f"driver=qcow2,node-name=qcow2,file=file{encrypt}",
            "--export", f"type=fuse,id=exp,node-name=qcow2,mountpoint={target},"
                        f"writable={'on' if writable else 'off'}"]
    # It does not exit on fusermount3 -u: SIGTERM.
    with fuse_daemon(argv, target, "qemu-storage-daemon",
                     lambda proc: proc.send_signal(signal.SIGTERM)):
        yield target


def fio(target: Path, rw: str, bs: str, engine: str, depth: int, size: str,
        direct: bool = True) -> float:
    """IOPS of one fio run (O_DIRECT unless told otherwise, time based)."""
    p = sh("fio", "--name=job", f"--filename={target}", f"--rw={rw}", f"--bs={bs}",
           f"--ioengine={engine}", f"--iodepth={depth}", "--numjobs=1", f"--size={size}",
           f"--runtime={RUNTIME}", "--time_based", f"--direct={int(direct)}",
           "--randrepeat=0", "--output-format=json")
    job = json.loads(p.stdout)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return float(side["iops"])


def make_image(path: Path) -> None:
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", path, SIZE)


def make_overlay(d: Path, tag: str, base: Path) -> Path:
    top = d / f"cow-{tag}.qcow2"
    if top.exists():
        top.unlink()
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, SIZE)
    return top


@contextlib.contextmanager
def passthrough_mount(raw: Path, mp: Path):
    """bench/passthrough.py: the pyfuse3 ceiling, one raw file served by inline preadv/pwrite."""
    mp.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, REPO / "bench" / "passthrough.py", raw, mp]
    with fuse_daemon(argv, mp, "passthrough",
                     lambda proc: sh("fusermount3", "-u", mp, check=False)):
        yield mp / "disk"


def reset_cache(path: Path, read_back: bool) -> None:
    """Start a sample from a known page-cache state of ``path``: write back everything dirty
    (on the whole machine, so no side's sample competes with the writeback of what an earlier
    one wrote, or of the images just made), drop what is cached of ``path``, then
    (``read_back``) read it all in order. This VM's kernel reclaims pages nobody
    touched lately, and the folios the page cache holds (small ones made by 4 KiB writes, up
    to 2 MiB ones made by the 8 MiB readahead of a sequential read) change what a 4 KiB write
    costs in the kernel; so every side starts each sample from the same state."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(8 << 20)
        while read_back and os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


SIDES = ("qcowfs", "qemu", "passthrough")


def run_jobs(d: Path, writes_read_back: bool = False) -> list[dict]:
    """Every job (or, with ``writes_read_back``, the write jobs only, over images read back
    into the page cache first). Read jobs always start from an image read back (hot); write
    jobs by default from an image with nothing cached (the pages they make are their own)."""
    img_q, img_e = d / "qcowfs.qcow2", d / "qemu.qcow2"
    for img in (img_q, img_e):
        if not img.exists():
            make_image(img)
    base = d / "base.raw"
    if not base.exists():
        sh("qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", base, SIZE)
    raw = d / "passthrough.raw"
    if not raw.exists():
        sh("qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", raw, SIZE)
    files = {"qcowfs": img_q, "qemu": img_e, "passthrough": raw}
    results = []
    with qcowfs_mount(img_q, d / "mnt-qcowfs", ",".join(filter(None, ["rw", QCOWFS_OPTIONS]))
                      ) as q_disk, \
            qemu_export(img_e, d / "qemu-export", True) as e_disk, \
            passthrough_mount(raw, d / "mnt-passthrough") as p_disk:
        targets = {"qcowfs": q_disk, "qemu": e_disk, "passthrough": p_disk}
        for name, rw, bs, engine, depth, cow in JOBS:
            if not wanted(name):
                continue
            writes = "write" in rw
            if writes_read_back and (cow or not writes):
                continue
            sides = SIDES[:2] if cow else SIDES
            samples: dict[str, list[float]] = {side: [] for side in sides}
            for i in range(SAMPLES):
                for side in sides:
                    if cow:
                        top = make_overlay(d, side, base)
                        reset_cache(base, True)
                        if side == "qcowfs":
                            with qcowfs_mount(top, d / "mnt-cow", "rw") as t:
                                iops = fio(t, rw, bs, engine, depth, SIZE)
                        else:
                            with qemu_export(top, d / "cow-export", True) as t:
                                iops = fio(t, rw, bs, engine, depth, SIZE)
                    else:
                        reset_cache(files[side], writes_read_back or not writes)
                        iops = fio(targets[side], rw, bs, engine, depth, SIZE)
                    samples[side].append(iops)
                print(f"{name:<28} sample {i + 1}: " + "  ".join(
                    f"{side} {samples[side][-1]:9.0f}" for side in sides) + " IOPS", flush=True)
            results.append({"job": name, "bs": bs,
                            **{side: statistics.median(samples.get(side) or [0]) or None
                               for side in SIDES}})
    return results


LUKS_KEY = "bench key"


def make_luks_image(path: Path, key_file: Path) -> None:
    """A LUKS qcow2 (QEMU's defaults: aes-256-xts-plain64) with every cluster allocated."""
    for _attempt in range(12):  # qemu-img's "Unable to get accurate CPU usage" under load
        made = sh("qemu-img", "create", "-q", "-f", "qcow2", "--object",
                  f"secret,id=key,file={key_file}", "-o",
                  "encrypt.format=luks,encrypt.key-secret=key,encrypt.iter-time=10,"
                  "preallocation=full", path, SIZE, check=False)
        if made.returncode == 0 or "accurate CPU usage" not in made.stderr:
            break
    if made.returncode:
        raise RuntimeError(made.stderr.strip())


LUKS_SIDES = ("qcowfs", "qemu", "plain")


def luks_jobs(d: Path) -> list[dict]:
    """The non-COW jobs on a LUKS image: qcowfs (``-o key_file=``) beside QEMU's FUSE export
    of the same kind of image and beside qcowfs on an unencrypted image, all three mounted at
    once and interleaved; rows are named "LUKS <job>" (BENCH_JOBS=LUKS runs only them)."""
    if not any(wanted(f"LUKS {job[0]}") for job in JOBS if not job[5]):
        return []
    key_file = d / "luks.key"
    key_file.write_bytes(LUKS_KEY.encode())
    img_q, img_e, img_p = d / "luks-qcowfs.qcow2", d / "luks-qemu.qcow2", d / "luks-plain.qcow2"
    for img in (img_q, img_e):
        if not img.exists():
            make_luks_image(img, key_file)
    if not img_p.exists():
        make_image(img_p)
    results = []
    with qcowfs_mount(img_q, d / "mnt-luks", f"rw,key_file={key_file}") as q_disk, \
            qemu_export(img_e, d / "luks-export", True, key_file) as e_disk, \
            qcowfs_mount(img_p, d / "mnt-luks-plain", "rw") as p_disk:
        targets = {"qcowfs": q_disk, "qemu": e_disk, "plain": p_disk}
        files = {"qcowfs": img_q, "qemu": img_e, "plain": img_p}
        for name, rw, bs, engine, depth, cow in JOBS:
            label = f"LUKS {name}"
            if cow or not wanted(label):
                continue
            samples: dict[str, list[float]] = {side: [] for side in targets}
            for i in range(SAMPLES):
                for side, target in targets.items():
                    reset_cache(files[side], "write" not in rw)
                    samples[side].append(fio(target, rw, bs, engine, depth, SIZE))
                print(f"{label:<28} sample {i + 1}: " + "  ".join(
                    f"{side} {samples[side][-1]:9.0f}" for side in targets) + " IOPS",
                    flush=True)
            results.append({"job": label, "bs": bs,
                            **{side: statistics.median(samples[side]) for side in targets}})
    return results


def luks_table(rows: list[dict]) -> str:
    lines = ["| job | qcowfs LUKS IOPS | QEMU LUKS IOPS | qcowfs/QEMU (target >= 1.0) "
             "| qcowfs unencrypted IOPS | LUKS/unencrypted (target >= 0.8) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        q, e, p = r["qcowfs"], r["qemu"], r["plain"]
        lines.append(f"| {r['job']} | {q:,.0f} | {e:,.0f} | {q / e:.2f} | {p:,.0f} "
                     f"| {q / p:.2f} |")
    return "\n".join(lines)


LUKS_HEADING = "## Encrypted images (LUKS)"


def luks_section(rows: list[dict], when: str, mach: str, load: str) -> str:
    return (f"{LUKS_HEADING}\n\n"
            "The same fio jobs (O_DIRECT, same samples and medians) on a LUKS qcow2 "
            "(qemu-img's defaults: aes-256-xts-plain64, `preallocation=full`): qcowfs mounted "
            "with `-o key_file=`, QEMU's FUSE export of the same kind of image with "
            "`--object secret`, and qcowfs on an unencrypted image of the same size, the three "
            "mounted at once and interleaved, so the last column is what encryption costs "
            "qcowfs. `BENCH_JOBS=LUKS make bench` measures only these rows and rewrites only "
            f"this section.\n\nRun {when} on: {mach}; {load}.\n\n{luks_table(rows)}\n\n"
            "Where the time goes: qcowfs decrypts and encrypts on its one request thread, "
            "through the system's libcrypto (`image/evp.py`): the loop over a request's "
            "512-byte sectors runs in C (`image/_sectors.c`, one `EVP_Cipher` per sector, the "
            "GIL released once per request), about 2 µs per 4 KiB and 0.4-0.5 ms per 1 MiB "
            "(see docs/design.md, \"Encrypted images\"). The 4 KiB rows are bound by the "
            "request path, as unencrypted. The 1 MiB rows are bound by one core's AES-XTS: "
            "the unencrypted request takes about 0.3 ms of CPU (fio, the kernel's copy, the "
            "daemon), the cipher adds 0.25-0.5 ms to it, and even a perfect split of the "
            "cipher over both cores would leave the request near 0.6 of the unencrypted "
            "figure, below the 0.8 target. The split itself does not pay on this machine: "
            "half of a run on a second thread started by the C loop took 1 MiB from 260 µs to "
            "260-400 µs (a Python hand-off, 50-60 µs, was no better). "
            "QEMU encrypts in C on its worker threads.\n")


def write_luks_section(doc: Path, section: str) -> None:
    """Replace (or add, before the offline commands) this section of docs/performance.md."""
    text = doc.read_text()
    head, found, rest = text.partition(LUKS_HEADING)
    if found:
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        head, found, rest = text.partition("## Offline commands")
        text = head + section + "\n" + found + rest if found else text + "\n" + section
    doc.write_text(text)


CACHE_NONE_JOBS = [job for job in JOBS if not job[5]]


def cache_none_jobs(d: Path) -> list[dict]:
    """The non-COW jobs with the image files opened O_DIRECT on both sides: qcowfs ``-o
    cache=none`` beside QEMU's export with ``cache.direct=on``; rows named "cache=none <job>"
    (BENCH_JOBS=cache=none runs only them). Nothing of the images is in the page cache."""
    if not any(wanted(f"cache=none {job[0]}") for job in CACHE_NONE_JOBS):
        return []
    img_q, img_e = d / "cn-qcowfs.qcow2", d / "cn-qemu.qcow2"
    for img in (img_q, img_e):
        if not img.exists():
            make_image(img)
    results = []
    with qcowfs_mount(img_q, d / "mnt-cn", "rw,cache=none") as q_disk, \
            qemu_export(img_e, d / "cn-export", True, direct=True) as e_disk:
        targets = {"qcowfs": q_disk, "qemu": e_disk}
        files = {"qcowfs": img_q, "qemu": img_e}
        for name, rw, bs, engine, depth, _cow in CACHE_NONE_JOBS:
            label = f"cache=none {name}"
            if not wanted(label):
                continue
            samples: dict[str, list[float]] = {side: [] for side in targets}
            for i in range(SAMPLES):
                for side, target in targets.items():
                    reset_cache(files[side], False)
                    samples[side].append(fio(target, rw, bs, engine, depth, SIZE))
                print(f"{label:<28} sample {i + 1}: " + "  ".join(
                    f"{side} {samples[side][-1]:9.0f}" for side in targets) + " IOPS",
                    flush=True)
            results.append({"job": label, "bs": bs,
                            **{side: statistics.median(samples.get(side) or [0]) or None
                               for side in SIDES}})
    return results


BUFFERED_JOBS = [
    ("buffered seq read 1M", "read", "1M"),
    ("buffered seq write 1M", "write", "1M"),
    ("buffered rand read 4k", "randread", "4k"),
    ("buffered rand write 4k", "randwrite", "4k"),
]


def direct_io_comparison(d: Path) -> list[dict]:
    """qcowfs with FUSE direct_io on (the default) against off, for buffered I/O (no O_DIRECT
    in fio), interleaved, medians."""
    imgs = [d / "dio-on.qcow2", d / "dio-off.qcow2"]
    for img in imgs:
        if not img.exists():
            make_image(img)
    out = []
    with qcowfs_mount(imgs[0], d / "mnt-dio-on", "rw,direct_io=on") as on, \
            qcowfs_mount(imgs[1], d / "mnt-dio-off", "rw,direct_io=off") as off:
        for name, rw, bs in BUFFERED_JOBS:
            samples: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(SAMPLES):
                for side, target, img in (("on", on, imgs[0]), ("off", off, imgs[1])):
                    reset_cache(img, "read" in rw)
                    samples[side].append(fio(target, rw, bs, "psync", 1, SIZE, direct=False))
            out.append({"job": name, "on": statistics.median(samples["on"]),
                        "off": statistics.median(samples["off"])})
            print(f"{name:<28} direct_io on {out[-1]['on']:9.0f}  off {out[-1]['off']:9.0f} "
                  f"IOPS", flush=True)
    return out


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def big_image(d: Path) -> dict:
    """Mount time (the CLI returns once the mount is live) and daemon RSS after reads spread
    over a 4 TiB sparse image."""
    big = d / "big.qcow2"
    if not big.exists():
        sh("qemu-img", "create", "-q", "-f", "qcow2", big, "4T")
        sh("qemu-io", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5b 3T 1M", big)
    mp = d / "mnt-big"
    mp.mkdir(exist_ok=True)
    times = []
    rss_after_mount = rss_after_reads = 0
    for i in range(5):
        t0 = time.monotonic()
        p = qcowfs_cli("mount", "-o", "ro", big, mp)
        elapsed = time.monotonic() - t0
        if p.returncode:
            raise RuntimeError(p.stderr.strip())
        try:
            times.append(elapsed)
            if i == 0:
                pid = int(os.getxattr(mp, "user.qcowfs.pid"))
                rss_after_mount = _rss_kib(pid)
                fd = os.open(mp / "disk", os.O_RDONLY)
                try:
                    step = (4 << 40) // 4096
                    for k in range(4096):
                        os.pread(fd, 4096, k * step)
                finally:
                    os.close(fd)
                rss_after_reads = _rss_kib(pid)
        finally:
            qcowfs_cli("umount", mp)
            if is_mounted(mp):
                sh("fusermount3", "-u", "-z", mp, check=False)
    return {"mount_s": statistics.median(times), "rss_mount_mib": rss_after_mount / 1024,
            "rss_reads_mib": rss_after_reads / 1024}


THIN_JOBS = ("convert -f raw of a mostly empty disk", "fstrim through loop + ext4")
SPARSE_SIZE = "16G"
SPARSE_DATA = 16  # MiB of data in the mostly empty image, 1 MiB every 1 GiB


@contextlib.contextmanager
def loop_over(path: Path):
    dev = sh("losetup", "-f", "--show", path).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if sh("losetup", "-d", dev, check=False).returncode == 0:
                break
            time.sleep(0.1)


def _thin_side(side: str, image: Path, d: Path, writable: bool):
    if side == "qcowfs":
        return qcowfs_mount(image, d / "mnt-thin", "rw" if writable else "ro")
    return qemu_export(image, d / "thin-export", writable)


def _convert_seconds(disk: Path, out: Path) -> float:
    t0 = time.monotonic()
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, out)
    elapsed = time.monotonic() - t0
    out.unlink()
    return elapsed


def _fstrim_rate(disk: Path, d: Path) -> float:
    """MiB/s that fstrim gives back after a file of half the disk was written and removed."""
    fs = d / "thin-fs"
    fs.mkdir(exist_ok=True)
    with loop_over(disk) as dev:
        sh("mkfs.ext4", "-q", "-E", "nodiscard", dev)
        sh("mount", dev, fs)
        try:
            size_mib = os.stat(disk).st_size >> 21
            sh("dd", "if=/dev/urandom", f"of={fs}/fill", "bs=1M", f"count={size_mib}",
               "conv=fsync")
            os.unlink(fs / "fill")
            os.sync()
            t0 = time.monotonic()
            out = sh("fstrim", "-v", fs).stdout  # "/path: 229.9 MiB (241065984 bytes) trimmed"
            elapsed = time.monotonic() - t0
        finally:
            sh("umount", fs, check=False)
    trimmed = int(re.search(r"\((\d+) bytes\)", out).group(1))
    return trimmed / elapsed / (1 << 20)


def thin_rows(d: Path) -> list[dict]:
    """The thin-provisioning jobs (BENCH_JOBS matches their names too), qcowfs beside QEMU's
    export, interleaved, medians: ``qemu-img convert -f raw`` of a 16 GiB disk holding 16 MiB
    (time; SEEK_DATA/SEEK_HOLE let it skip the holes), and fstrim of a freshly emptied ext4
    on a loop device over the disk (MiB/s given back)."""
    rows = []
    if wanted(THIN_JOBS[0]):
        sparse = d / "sparse.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", sparse, SPARSE_SIZE)
        sh("qemu-io", *[a for k in range(SPARSE_DATA) for a in ("-c", f"write -P 0x5a {k}G 1M")],
           sparse)
        times: dict[str, list[float]] = {"qcowfs": [], "qemu": []}
        for i in range(SAMPLES):
            for side in times:
                with _thin_side(side, sparse, d, False) as disk:
                    times[side].append(_convert_seconds(disk, d / "converted.qcow2"))
            print(f"{THIN_JOBS[0]} sample {i + 1}: " + "  ".join(
                f"{side} {times[side][-1]:.2f} s" for side in times), flush=True)
        rows.append({"job": THIN_JOBS[0], "unit": "s",
                     **{side: statistics.median(v) for side, v in times.items()}})
    if wanted(THIN_JOBS[1]):
        rates: dict[str, list[float]] = {"qcowfs": [], "qemu": []}
        for i in range(SAMPLES):
            for side in rates:
                img = d / f"trim-{side}.qcow2"
                sh("qemu-img", "create", "-q", "-f", "qcow2", img, SIZE)
                with _thin_side(side, img, d, True) as disk:
                    rates[side].append(_fstrim_rate(disk, d))
                img.unlink()
            print(f"{THIN_JOBS[1]} sample {i + 1}: " + "  ".join(
                f"{side} {rates[side][-1]:.0f} MiB/s" for side in rates), flush=True)
        rows.append({"job": THIN_JOBS[1], "unit": "MiB/s",
                     **{side: statistics.median(v) for side, v in rates.items()}})
    return rows


def thin_table(rows: list[dict]) -> str:
    lines = ["| thin-provisioning job | qcowfs | QEMU | unit |", "|---|---:|---:|---|"]
    lines += [f"| {r['job']} | {r['qcowfs']:,.2f} | {r['qemu']:,.2f} | {r['unit']} |"
              for r in rows]
    return "\n".join(lines)


def machine() -> str:
    import pyfuse3
    import trio
    qemu = sh("qemu-storage-daemon", "--version").stdout.splitlines()[0]
    fio_v = sh("fio", "--version").stdout.strip()
    return (f"{host_summary(OUT)}, pyfuse3 {pyfuse3.__version__}, trio {trio.__version__}; "
            f"{qemu}; {fio_v}")


def table(results: list[dict]) -> str:
    lines = ["| job | qcowfs IOPS | QEMU IOPS | qcowfs/QEMU | pyfuse3 passthrough IOPS "
             "| qcowfs/passthrough |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        q, e, p = r["qcowfs"], r["qemu"], r["passthrough"]
        pt = f"{p:,.0f} | {q / p:.2f}" if p else "n/a | n/a"
        lines.append(f"| {r['job']} | {q:,.0f} | {e:,.0f} | {q / e:.2f} | {pt} |")
    return "\n".join(lines)


def main() -> int:
    for tool in ("fio", "qemu-storage-daemon", "qemu-img", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing (make bench installs it)", file=sys.stderr)
            return 1
    OUT.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="run-", dir=OUT))
    try:
        load_start = os.getloadavg()[0]
        print(f"bench: {SAMPLES} samples x {RUNTIME} s per job and side, images of {SIZE}, "
              f"O_DIRECT, interleaved qcowfs/QEMU/passthrough", flush=True)
        fio_wanted = any(wanted(job[0]) for job in JOBS)
        results = run_jobs(d) if fio_wanted else []
        read_back = run_jobs(d, writes_read_back=True) if fio_wanted else []
        thin = thin_rows(d)
        luks = luks_jobs(d)
        cache_none = cache_none_jobs(d)
        if JOB_FILTER:
            for rows, show in ((results, table), (read_back, table), (cache_none, table),
                               (thin, thin_table), (luks, luks_table)):
                if rows:
                    print()
                    print(show(rows))
            if luks and "LUKS" in JOB_FILTER:
                when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
                load = (f"load average {load_start:.1f} at the start, "
                        f"{os.getloadavg()[0]:.1f} at the end")
                doc = REPO / "docs" / "performance.md"
                write_luks_section(doc, luks_section(luks, when, machine(), load))
                print(f"\nwrote the LUKS section of {doc}")
            return 0
        dio = direct_io_comparison(d)
        big = big_image(d)
        mach = machine()
        load = f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    finally:
        for mp in d.glob("mnt-*"):
            if is_mounted(mp):
                sh("fusermount3", "-u", "-z", mp, check=False)
        shutil.rmtree(d, ignore_errors=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = table(results)
    extra = (f"| 4 TiB sparse qcow2: mount time (CLI start to live mount, median of 5) | "
             f"{big['mount_s']:.3f} s |\n"
             f"| daemon RSS right after mount | {big['rss_mount_mib']:.1f} MiB |\n"
             f"| daemon RSS after 4096 reads spread over the 4 TiB | "
             f"{big['rss_reads_mib']:.1f} MiB |")
    print()
    print(text)
    dio_text = "\n".join(
        ["| buffered job (no O_DIRECT) | direct_io=on IOPS | direct_io=off IOPS | on/off |",
         "|---|---:|---:|---:|"]
        + [f"| {r['job']} | {r['on']:,.0f} | {r['off']:,.0f} | {r['on'] / r['off']:.2f} |"
           for r in dio])
    print()
    print(table(read_back))
    print()
    print(table(cache_none))
    print()
    print(extra)
    print()
    print(thin_table(thin))
    print()
    print(dio_text)
    print()
    print(luks_table(luks))
    doc = REPO / "docs" / "performance.md"
    # make bench-cli's section stays as it is
    kept = doc.read_text().partition("## Offline commands: `make bench-cli`")
    cli_section = "\n" + kept[1] + kept[2] if kept[1] else ""
    doc.write_text(
        "# qcowfs performance\n\n"
        "Written by `make bench` (`bench/bench_fuse.py`): fio through qcowfs beside "
        "qemu-storage-daemon's FUSE export of the same kind of image (qcow2, "
        "`preallocation=full`), all mounted at once, jobs interleaved qcowfs/QEMU/passthrough, "
        f"{SAMPLES} samples of {RUNTIME} s each, medians; O_DIRECT; images of {SIZE}. "
        "The copy-on-write job writes 4 KiB blocks into a fresh qcow2 overlay over a raw "
        "backing file, a new overlay per sample. Ratios above 1.0 mean qcowfs is faster. "
        "The third side, `bench/passthrough.py`, is a pyfuse3 file system that serves a raw "
        "file with bare `preadv`/`pwrite` through the same request loop: the ceiling of the "
        "binding, so `qcowfs/passthrough` is what the qcow2 translation costs. Every sample "
        "starts from the same page-cache state on every side: the image file is written back "
        "and dropped from the cache, then, for the read jobs (and the COW job's backing file), "
        "read back in order, so reads are page-cache hot; the write jobs start uncached. "
        "Machines like this one are noisy: compare ratios from one run, not absolute figures "
        "across runs.\n\n"
        f"Run {when} on: {mach}; {load} (other work on the machine skews the figures: "
        "compare ratios).\n\n"
        f"{text}\n\n"
        "The write jobs again, each sample over an image read back into the page cache "
        "first. The sequential read fills the cache with large folios (the virtio disk's "
        "readahead is 8 MiB), and a 4 KiB buffered write into a large folio costs tens of "
        "microseconds in this kernel (`ext4_block_write_begin` walks every block of the "
        "folio), on every side. QEMU runs those writes in its thread pool, overlapped; qcowfs "
        "runs them inline, one at a time:\n\n"
        f"{table(read_back)}\n\n"
        "`-o cache=none`: the same jobs with the image file opened O_DIRECT on both sides "
        "(qcowfs `-o cache=none`, QEMU `cache.direct=on`), so the host page cache holds "
        "nothing of it and every request reaches the virtio disk:\n\n"
        f"{table(cache_none)}\n\n| measure | value |\n|---|---:|\n{extra}\n\n"
        "Thin provisioning, same samples and medians, qcowfs beside QEMU's export: "
        f"`qemu-img convert -f raw -O qcow2` of a {SPARSE_SIZE} disk holding "
        f"{SPARSE_DATA} MiB (seconds, lower is better; both sides answer SEEK_DATA/SEEK_HOLE), "
        "and `fstrim` of an ext4 on a loop device over the disk, just emptied of a file of "
        "half its size (MiB/s given back, higher is better):\n\n"
        f"{thin_table(thin)}\n\n"
        "qcowfs's own FUSE direct I/O switch (`-o direct_io=on`, the default, against "
        "`direct_io=off`) for buffered I/O, same samples and medians; with `off` the kernel "
        "page cache serves repeated reads:\n\n"
        f"{dio_text}\n\nWhere the time goes: see docs/mount.md, \"Performance\".\n\n"
        f"{luks_section(luks, when, mach, load)}"
        f"{cli_section}")
    print(f"\nwrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
