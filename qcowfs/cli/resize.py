"""``qcowfs resize``: change an image's virtual size (qemu-img resize)."""

from __future__ import annotations

import argparse
import sys

from qcowfs.chain.disk import open_image

from .common import SizeError, add_probed_format, parse_relative_size, warn, warn_probed_raw
from .imageopts import add_image_source
from .main import CommandError

SIZE_ERROR = ("Parameter 'size' expects a non-negative number below 2^64; optional suffix k, "
              "M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, "
              "respectively.")
SHRINK_WARNING = ("Shrinking an image will delete all data beyond the shrunken image's end. "
                  "Before performing such an operation, make sure there is no important data "
                  "there.")


def register(sub) -> None:
    p = sub.add_parser("resize", help="grow (or, with --shrink, shrink) an image",
                       description="Change an image's virtual size, as `qemu-img resize` does. "
                                   "SIZE is the last argument, always (so -40M is a size, "
                                   "not an option); +SIZE and -SIZE are relative.")
    add_probed_format(p)
    p.add_argument("--shrink", action="store_true",
                   help="allow shrinking (what lies past the new end is lost)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.add_argument("--preallocation", choices=("off", "metadata", "falloc", "full"),
                   default="off", help="how to allocate the new space (only off)")
    p.add_argument("file")
    add_image_source(p, "file")
    p.add_argument("size", nargs="?", help="new size, or +SIZE / -SIZE")
    p.set_defaults(trailing_size=None)
    p.set_defaults(func=run)


def split_argv(argv: list[str]) -> tuple[list[str], dict]:
    """Take SIZE off the end before the options are parsed, as qemu-img does, so a negative
    size is never read as an option."""
    if len(argv) < 2 or any(a in ("-h", "--help") for a in argv):
        return argv, {}
    return argv[:-1], {"trailing_size": argv[-1]}


def run(args: argparse.Namespace) -> int:
    if args.trailing_size is None or args.size is not None:
        raise CommandError("Expecting image file name and size")
    if args.preallocation != "off":
        raise CommandError(f"{args.file}: --preallocation={args.preallocation} is not "
                           f"supported")
    try:
        sign, amount = parse_relative_size(args.trailing_size, warn)
    except SizeError:
        raise CommandError(SIZE_ERROR) from None
    disk = open_image(args.file, writable=True, format=args.format,
                      keys=args.keys.get("file"))
    warn_probed_raw(disk, args.file)
    try:
        current = disk.size
        new = current + amount if sign == "+" else current - amount if sign == "-" else amount
        if new < 0:
            raise CommandError(f"{args.file}: New image size must be positive")
        new = (new + 511) // 512 * 512
        if new < current and not args.shrink:
            warn(SHRINK_WARNING)
            raise CommandError(f"{args.file}: Use the --shrink option to perform a shrink "
                               f"operation.")
        disk.resize(new, shrink=args.shrink)
    finally:
        disk.close()
    if not args.quiet:
        print("Image resized.")
        sys.stdout.flush()
    return 0
