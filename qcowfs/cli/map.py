"""``qcowfs map``: where each guest range of an image comes from, as `qemu-img map` says."""

from __future__ import annotations

import argparse
import sys

from qcowfs.chain.blockstatus import ChainStatus, MapEntry
from qcowfs.chain.locks import lock_chain
from qcowfs.chain.resolve import open_chain
from qcowfs.image.info import full_backing_filename
from qcowfs.image.qcow2 import Qcow2Image

from .common import SizeError, add_force_share, add_output, add_probed_format, parse_size, warn
from .imageopts import add_image_source
from .main import CommandError


def register(sub) -> None:
    p = sub.add_parser("map", help="show which layer holds each guest range, and where",
                       description="Show the image's allocation map, as `qemu-img map` does.")
    add_probed_format(p)
    add_output(p)
    add_force_share(p, "read even when another process holds the image")
    p.add_argument("--start-offset", metavar="OFFSET", default="0",
                   help="map from this guest offset (default 0)")
    p.add_argument("--max-length", metavar="LEN", help="map at most this many bytes")
    p.add_argument("file")
    add_image_source(p, "file")
    p.set_defaults(func=run)


def _window_arg(text: str, what: str) -> int:
    try:
        return parse_size(text, warn)
    except SizeError:
        raise CommandError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes "
                           f"for kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                           f"exabytes.") from None


def run(args: argparse.Namespace) -> int:
    start = _window_arg(args.start_offset, "start offset")
    length = None if args.max_length is None else _window_arg(args.max_length, "max length")
    layers = open_chain(args.file, fmt=args.format, keys=args.keys.get("file"))
    try:
        for layer in layers:
            if isinstance(layer, Qcow2Image):
                layer.require_key()  # qemu-img map opens an encrypted image only with its key
        if not args.force_share:
            lock_chain(layers)
        names = [args.file]
        for layer in layers[:-1]:
            if isinstance(layer, Qcow2Image) and layer.header.backing_file:
                names.append(full_backing_filename(names[-1], layer.header.backing_file))
        status = ChainStatus(layers, names)
        if args.output == "json":
            _print_json(status, start, length)
        else:
            _print_human(status, start, length)
    finally:
        for layer in layers:
            layer.close()
    return 0


def _print_json(status: ChainStatus, start: int, length: int | None) -> None:
    out = sys.stdout
    out.write("[")
    first = True
    entries = status.merged(start, length)
    if start >= status.size or length == 0:  # an empty window: qemu-img's one empty entry
        entries = iter([MapEntry(start, 0, 0, False, False, False)])
    for e in entries:
        if not first:
            out.write(",\n")
        first = False
        j = e.as_json()
        line = (f'{{ "start": {j["start"]}, "length": {j["length"]}, "depth": {j["depth"]},'
                f' "present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
        if e.offset is not None:
            line += f', "offset": {e.offset}'
        out.write(line + "}")
    out.write("]\n")


def _b(value: bool) -> str:
    return "true" if value else "false"


def _print_human(status: ChainStatus, start: int, length: int | None) -> None:
    """qemu-img's table of data ranges; zeros and holes are not listed, and a run with no host
    offset (compressed) cannot be shown."""
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    cur: MapEntry | None = None
    for nxt in status.entries(start, length):
        if cur is not None and cur.mergeable(nxt):
            cur.length += nxt.length
            continue
        if cur is not None:
            _human_line(cur, nxt)
        cur = nxt
    if cur is not None:
        _human_line(cur, None)


def _human_line(e: MapEntry, nxt: MapEntry | None) -> None:
    if e.data and e.offset is None:
        raise CommandError("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        print(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}"
              f"{e.filename or ''}", flush=False)
    if nxt is not None and (not nxt.data or nxt.zero):
        nxt.data = False
        nxt.zero = True


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"
