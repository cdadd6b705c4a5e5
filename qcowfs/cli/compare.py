"""``qcowfs compare``: whether two images show the guest the same bytes (qemu-img compare)."""

from __future__ import annotations

import argparse

from qcowfs.chain.compare import compare_disks
from qcowfs.chain.disk import Disk
from qcowfs.chain.locks import lock_chain
from qcowfs.chain.resolve import open_chain

from .common import add_cache_modes, add_force_share
from .imageopts import add_image_source
from .progress import progress_bar

EXIT_DIFFERENT = 1
EXIT_ERROR = 2


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare the guest contents of two images",
                       description="Compare two images as `qemu-img compare` does. Exit 0: "
                                   "identical, 1: different, 2: error.")
    p.add_argument("-f", dest="format_a", choices=("qcow2", "raw"),
                   help="format of the first image (probed)")
    p.add_argument("-F", dest="format_b", choices=("qcow2", "raw"),
                   help="format of the second image (probed)")
    p.add_argument("-s", "--strict", action="store_true",
                   help="also fail on different sizes or allocation")
    p.add_argument("-p", "--progress", action="store_true", help="show a progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_force_share(p, "read even when another process holds the images")
    add_cache_modes(p, target=False, source=True)
    p.add_argument("file_a")
    p.add_argument("file_b")
    add_image_source(p, "file_a", "file_b")
    p.set_defaults(func=run, error_code=EXIT_ERROR)


def run(args: argparse.Namespace) -> int:
    a = Disk(open_chain(args.file_a, fmt=args.format_a,
                          keys=args.keys.get("file_a")), False)
    try:
        b = Disk(open_chain(args.file_b, fmt=args.format_b,
                              keys=args.keys.get("file_b")), False)
        try:
            if not args.force_share:
                lock_chain(a.layers)
                lock_chain(b.layers)
            with progress_bar(args.progress and not args.quiet, min(a.size, b.size)) as step:
                result = compare_disks(a, b, strict=args.strict, progress=step)
        finally:
            b.close()
    finally:
        a.close()

    def say(text: str) -> None:
        if not args.quiet:
            print(text)

    if result.strict_failure == "size":
        say("Strict mode: Image size mismatch!")
        return EXIT_DIFFERENT
    if result.strict_failure == "status":
        say(f"Strict mode: Offset {result.status_offset} block status mismatch!")
        return EXIT_DIFFERENT
    if result.size_mismatch:
        say("Warning: Image size mismatch!")
    if not result.identical:
        say(f"Content mismatch at offset {result.mismatch_offset}!")
        return EXIT_DIFFERENT
    say("Images are identical.")
    return 0
