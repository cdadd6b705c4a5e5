"""Read throughput of the library against plain ``os.pread`` of the same bytes.

Builds a 1 GiB fully allocated qcow2 image (64 KiB clusters) with qemu-img, and a raw file of
the same content, warms the page cache, then reads each whole disk in 1 MiB pieces several
times: ``disk.read``, ``disk.readinto`` into one reused buffer, ``os.pread`` and ``os.preadv``
into one reused buffer on the raw file. Prints the medians and the ratios.

    python bench/bench_read.py [--size-mib 1024] [--samples 5] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import qcowfs

MiB = 1024 * 1024
PIECE = MiB


def build(workdir: str, size: int) -> tuple[str, str]:
    """(qcow2, raw) of the same ``size`` bytes of incompressible data, made by qemu-img."""
    seed = os.path.join(workdir, "seed.raw")
    rng = random.Random(1)
    block = rng.randbytes(4 * MiB)
    with open(seed, "wb") as f:
        for i in range(size // len(block)):
            # A different prefix per block so no two MiB are alike.
            f.write(i.to_bytes(8, "little") + block[8:])
    qcow2 = os.path.join(workdir, "disk.qcow2")
    raw = os.path.join(workdir, "disk.raw")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k",
                    seed, qcow2], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, raw], check=True)
    os.unlink(seed)
    mapping = subprocess.run(["qemu-img", "map", "--output=json", qcow2], check=True,
                             capture_output=True, text=True).stdout
    if '"data": false' in mapping:
        sys.exit("the qcow2 image is not fully allocated")
    return qcow2, raw


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def time_disk_read(path: str, size: int) -> float:
    with qcowfs.open_image(path) as disk:
        t0 = time.perf_counter()
        for off in range(0, size, PIECE):
            disk.read(off, PIECE)
        return time.perf_counter() - t0


def time_disk_readinto(path: str, size: int) -> float:
    buf = bytearray(PIECE)
    with qcowfs.open_image(path) as disk:
        t0 = time.perf_counter()
        for off in range(0, size, PIECE):
            disk.readinto(buf, off)
        return time.perf_counter() - t0


def time_pread(path: str, size: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, PIECE):
            os.pread(fd, PIECE, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def time_preadv(path: str, size: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(PIECE)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, PIECE):
            os.preadv(fd, [buf], off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def check_same(qcow2: str, raw: str, size: int) -> None:
    rng = random.Random(2)
    with qcowfs.open_image(qcow2) as disk, open(raw, "rb") as f:
        for _ in range(32):
            off = rng.randrange(0, size - PIECE)
            f.seek(off)
            if disk.read(off, PIECE) != f.read(PIECE):
                sys.exit(f"qcowfs and the raw file differ at {off}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to build the images (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args()
    size = args.size_mib * MiB
    workdir = tempfile.mkdtemp(prefix="qcowfs-bench-", dir=args.dir)
    try:
        qcow2, raw = build(workdir, size)
        check_same(qcow2, raw, size)
        for p in (qcow2, raw):
            warm(p)
        runs = {"disk.read": (time_disk_read, qcow2), "disk.readinto": (time_disk_readinto, qcow2),
                "os.pread": (time_pread, raw), "os.preadv": (time_preadv, raw)}
        for fn, path in runs.values():
            fn(path, size)  # one warm-up pass each
        # Round robin, so that load from elsewhere on the machine hits every method alike.
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.samples):
            for name, (fn, path) in runs.items():
                samples[name].append(fn(path, size))
        medians = {name: statistics.median(s) for name, s in samples.items()}
        best = {name: min(s) for name, s in samples.items()}
        for name, s in samples.items():
            print(f"{name:14s} median {medians[name]:.3f} s  {size / MiB / medians[name]:6.0f} MiB/s"
                  f"   best {best[name]:.3f} s  {size / MiB / best[name]:6.0f} MiB/s"
                  f"   (samples: {', '.join(f'{x:.3f}' for x in s)})")
        for ours, theirs in (("disk.read", "os.pread"), ("disk.readinto", "os.preadv"),
                             ("disk.readinto", "os.pread")):
            print(f"{ours} / {theirs}: {medians[theirs] / medians[ours]:.2f} of its throughput "
                  f"(medians), {best[theirs] / best[ours]:.2f} (best runs)")
    finally:
        if args.keep:
            print(f"images kept in {workdir}")
        else:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
