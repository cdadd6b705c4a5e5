"""``qcowfs commit``: write an image's changes into its backing file (qemu-img commit)."""

from __future__ import annotations

import argparse

from qcowfs.chain.commit import commit

from .common import add_cache_modes, add_rate_limit, warn_rate_limit
from .imageopts import add_image_source
from .progress import progress_bar


def register(sub) -> None:
    p = sub.add_parser("commit", help="write an image's data into its backing file",
                       description="Commit FILE into its backing file (or into BASE further "
                                   "down the chain), as `qemu-img commit` does; then empty FILE "
                                   "unless -d (-b implies -d).")
    p.add_argument("-f", dest="format", choices=("qcow2",), help="image format")
    p.add_argument("-b", dest="base", help="commit into this backing file (any path to it)")
    p.add_argument("-d", dest="drop", action="store_true",
                   help="do not empty FILE afterwards")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_cache_modes(p, target=True)
    add_rate_limit(p)
    p.add_argument("file")
    add_image_source(p, "file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    warn_rate_limit(args)
    empty = not (args.drop or args.base)
    with progress_bar(args.progress and not args.quiet, None, "commit") as step:
        commit(args.file, args.base, empty=empty, fmt=args.format, progress=step,
               keys=args.keys.get("file"))
    if not args.quiet:
        print("Image committed.")
    return 0
