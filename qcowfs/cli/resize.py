"""``qcowfs resize``: change an image's virtual size (qemu-img resize)."""

from __future__ import annotations

import argparse

from qcowfs.chain.disk import open_image

from .common import add_probed_format, parse_size
from .imageopts import add_image_source
from .main import CommandError


def register(sub) -> None:
    p = sub.add_parser("resize", help="grow (or, with --shrink, shrink) an image",
                       description="Change an image's virtual size, as `qemu-img resize` does. "
                                   "SIZE may be relative (+SIZE, -SIZE); write `--` before a "
                                   "negative size.")
    add_probed_format(p)
    p.add_argument("--shrink", action="store_true",
                   help="allow shrinking (what lies past the new end is lost)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.add_argument("file")
    add_image_source(p, "file")
    p.add_argument("size", help="new size, or +SIZE / -SIZE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = args.size
    sign = text[0] if text[:1] in ("+", "-") else ""
    try:
        amount = parse_size(text[1:] if sign else text)
    except ValueError:
        raise CommandError("Invalid image size specified. You may use k, M, G, T, P or E "
                           "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes "
                           "and exabytes.") from None
    disk = open_image(args.file, writable=True, format=args.format,
                      keys=args.keys.get("file"))
    try:
        current = disk.size
        new = current + amount if sign == "+" else current - amount if sign == "-" else amount
        if new < 0:
            raise CommandError(f"{args.file}: New image size must be positive")
        new = (new + 511) // 512 * 512
        if new < current and not args.shrink:
            raise CommandError(f"{args.file}: Use the --shrink option to perform a shrink "
                               f"operation.")
        disk.resize(new, shrink=args.shrink)
    finally:
        disk.close()
    if not args.quiet:
        print("Image resized.")
    return 0
