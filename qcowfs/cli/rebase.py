"""``qcowfs rebase``: change an image's backing file (qemu-img rebase)."""

from __future__ import annotations

import argparse

from qcowfs.chain.rebase import rebase

from .common import add_cache_modes, add_force_share
from .imageopts import add_image_source, verify_keys
from .progress import progress_bar


def register(sub) -> None:
    p = sub.add_parser("rebase", help="change an image's backing file",
                       description="Make FILE name NEW as its backing file, as `qemu-img "
                                   "rebase` does. Safe mode (default) copies into FILE whatever "
                                   "differs between the old and the new backing chain, so the "
                                   "guest sees the same disk; -u only rewrites the header. "
                                   "-b \"\" detaches FILE. NEW is relative to FILE's folder.")
    p.add_argument("-f", dest="format", choices=("qcow2",), help="image format")
    p.add_argument("-b", dest="backing", required=True, metavar="NEW", help="new backing file")
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"),
                   help="format of the new backing file (probed in safe mode)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: only change the name in the header")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_cache_modes(p, target=True, source=True)
    add_force_share(p, "read the new backing file even when another process holds it")
    p.add_argument("file")
    add_image_source(p, "file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.unsafe:
        verify_keys(args.file, args.format, args.keys.get("file"), backing=False)
    with progress_bar(args.progress and not args.quiet, None, "rebase") as step:
        rebase(args.file, args.backing, args.backing_format, unsafe=args.unsafe,
               fmt=args.format, progress=step, force_share=args.force_share,
               keys=args.keys.get("file"))
    return 0
