"""``qcowfs dd``: copy part of an image into a new image, as `qemu-img dd` does."""

from __future__ import annotations

import argparse
import sys

from qcowfs.chain import dd as engine
from qcowfs.chain.disk import Disk
from qcowfs.chain.locks import lock_chain, refuse_if_in_use
from qcowfs.chain.resolve import open_chain

from .common import add_force_share, add_probed_format, parse_size
from .imageopts import add_image_source, parse_image_opts
from .main import CommandError

INT_MAX = (1 << 31) - 1
SECTOR = 512


def register(sub) -> None:
    p = sub.add_parser("dd", help="copy part of an image into a new image",
                       description="Copy COUNT blocks of BS bytes of an image's guest disk, "
                                   "after skipping SKIP blocks, into a new image, as `qemu-img "
                                   "dd` does (COUNT counts the skipped blocks too, as there). "
                                   "Operands: if=INPUT of=OUTPUT [bs=N] [count=N] [skip=N].")
    add_probed_format(p, "input format")
    p.add_argument("-O", dest="out_format", default="raw",
                   help="output format: raw (default) or qcow2")
    add_force_share(p, "read the input even when another process holds it")
    p.add_argument("operands", nargs="*", metavar="OPERAND")
    add_image_source(p)  # --image-opts: if= is an option string
    p.set_defaults(func=run)


def _number(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise CommandError(f"Invalid {name} specified. You may use k, M, G, T, P or E "
                           f"suffixes for kilobytes, megabytes, gigabytes, terabytes, "
                           f"petabytes and exabytes.") from None


def _operands(texts: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or key not in ("bs", "count", "if", "of", "skip"):
            raise CommandError(f"unrecognized operand {key}")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    ops = _operands(args.operands)
    bs = SECTOR
    if "bs" in ops:
        bs = _number("bs", ops["bs"])
        if not 1 <= bs <= INT_MAX:
            raise CommandError(f"Invalid bs specified. Must be between 1 and {INT_MAX}.")
    count = _number("count", ops["count"]) if "count" in ops else None
    skip = _number("skip", ops["skip"]) if "skip" in ops else 0
    if not ops.get("if") or not ops.get("of"):
        raise CommandError("Must specify both input and output files")
    if args.out_format not in ("raw", "qcow2"):
        raise CommandError("Unknown file format")
    source, fmt, keys = ops["if"], args.format, None
    if args.image_opts:
        source, driver, keys = parse_image_opts(source, args.secrets)
        fmt = driver or fmt
    src = Disk(open_chain(source, fmt=fmt, keys=keys), False)
    try:
        if not args.force_share:
            lock_chain(src.layers)
        size = -(-src.size // SECTOR) * SECTOR
        if count is not None and count * bs < size:
            size = count * bs
        start = skip * bs
        too_far = start > size
        refuse_if_in_use(ops["of"])
        out_size = 0 if too_far else size - start
        if too_far:
            # qemu-img warns, makes an empty output and succeeds, as dd(1) does
            print(f"qcowfs: dd: {ops['if']}: cannot skip to specified offset",
                  file=sys.stderr)
            start = size
        engine.copy_range(src, start, size, ops["of"], args.out_format, out_size)
    finally:
        src.close()
    return 0
