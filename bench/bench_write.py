#!/usr/bin/env python3
"""Write speed of qcowfs against os.pwrite on a raw file of the same size.

    PYTHONPATH=. python bench/bench_write.py [--dir /tmp] [--size-mib 256]

Three workloads, each timed from the first write to the end of a final flush (fsync for raw):
  alloc-4k   4 KiB random writes into clusters already allocated (in place)
  cow-4k     4 KiB random writes into a fresh overlay over a raw backing file (copy-on-write)
  seq-1m     1 MiB sequential writes into a new, empty image
Prints seconds, MiB/s and the ratio qcowfs time / raw time (1.0 = as fast as raw pwrite).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import time

import qcowfs

KiB, MiB = 1024, 1024 * 1024


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def raw_run(path: str, size: int, offsets: list[int], length: int, prealloc: bool) -> float:
    with open(path, "wb") as f:
        f.truncate(size)
    if prealloc:
        subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={size // MiB}",
                        "conv=notrunc"], check=True, capture_output=True)
    fd = os.open(path, os.O_RDWR)
    data = os.urandom(length)
    os.sync()  # start from a quiet page cache, as the qcowfs run does
    try:
        t0 = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, data, off)
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def qcowfs_run(path: str, offsets: list[int], length: int) -> float:
    data = os.urandom(length)
    with qcowfs.open_image(path, writable=True) as disk:
        os.sync()
        t0 = time.perf_counter()
        for off in offsets:
            disk.write(off, data)
        disk.flush()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--count", type=int, default=20000, help="random 4 KiB writes per run")
    args = ap.parse_args()
    size = args.size_mib * MiB
    rnd = random.Random(42)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        raw = os.path.join(d, "raw.img")
        img = os.path.join(d, "img.qcow2")
        results = []

        offsets = [rnd.randrange(size // (4 * KiB)) * 4 * KiB for _ in range(args.count)]
        qemu_img("create", "-q", "-f", "qcow2", img, str(size))
        subprocess.run(["qemu-io", "-c", f"write -P 7 0 {size}", img], check=True,
                       capture_output=True)
        results.append(("alloc-4k", qcowfs_run(img, offsets, 4 * KiB),
                        raw_run(raw, size, offsets, 4 * KiB, prealloc=True), len(offsets) * 4 * KiB))

        base = os.path.join(d, "base.raw")
        subprocess.run(["dd", "if=/dev/urandom", f"of={base}", "bs=1M", f"count={size // MiB}"],
                       check=True, capture_output=True)
        os.unlink(img)
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img, str(size))
        cow = offsets[: args.count // 4]
        results.append(("cow-4k", qcowfs_run(img, cow, 4 * KiB),
                        raw_run(raw, size, cow, 4 * KiB, prealloc=True), len(cow) * 4 * KiB))

        os.unlink(img)
        qemu_img("create", "-q", "-f", "qcow2", img, str(size))
        seq = list(range(0, size, MiB))
        results.append(("seq-1m", qcowfs_run(img, seq, MiB),
                        raw_run(raw, size, seq, MiB, prealloc=False), size))

    print(f"{'workload':10} {'qcowfs s':>9} {'raw s':>8} {'qcowfs MiB/s':>13} {'raw MiB/s':>10} "
          f"{'ratio':>6}")
    for name, q, r, nbytes in results:
        print(f"{name:10} {q:9.3f} {r:8.3f} {nbytes / MiB / q:13.1f} {nbytes / MiB / r:10.1f} "
              f"{q / r:6.2f}")


if __name__ == "__main__":
    main()
