"""``qcowfs bitmap``: add, remove, clear, enable, disable and merge persistent dirty bitmaps,
as `qemu-img bitmap` does."""

from __future__ import annotations

import argparse

from qcowfs.chain.disk import open_image
from qcowfs.chain.locks import lock_chain
from qcowfs.chain.resolve import open_chain
from qcowfs.image import bitmaps as engine
from qcowfs.image.qcow2 import Qcow2Image

from .common import add_probed_format, parse_size
from .imageopts import add_image_source
from .main import CommandError


class _Op(argparse.Action):
    """Keep every action, with its argument, in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        ops = list(getattr(namespace, "ops", None) or [])
        ops.append((self.const, values))
        namespace.ops = ops


def register(sub) -> None:
    p = sub.add_parser("bitmap", help="change an image's persistent dirty bitmaps",
                       description="Change a persistent dirty bitmap of a qcow2 v3 image, as "
                                   "`qemu-img bitmap` does. Actions run in the order given.")
    for name in ("add", "remove", "clear", "enable", "disable"):
        p.add_argument(f"--{name}", action=_Op, const=name, nargs=0,
                       help=f"{name} the bitmap NAME")
    p.add_argument("--merge", action=_Op, const="merge", metavar="SOURCE",
                   help="set in NAME every bit set in the bitmap SOURCE")
    p.add_argument("-g", dest="granularity", help="granularity of a new bitmap (--add)")
    p.add_argument("-b", dest="source_file", help="image holding the --merge SOURCE")
    p.add_argument("-F", dest="source_format", choices=("qcow2", "raw"),
                   help="format of the -b image")
    add_probed_format(p)
    p.add_argument("args", nargs="*", metavar="FILE NAME")
    add_image_source(p, "args")
    p.set_defaults(func=run, ops=None)


def run(args: argparse.Namespace) -> int:
    ops = args.ops or []
    if not ops:
        raise CommandError("Need at least one of --add, --remove, --clear, --enable, "
                           "--disable, or --merge")
    granularity = None
    if args.granularity is not None:
        if not any(op == "add" for op, _ in ops):
            raise CommandError("granularity only supported with --add")
        try:
            granularity = parse_size(args.granularity)
        except ValueError:
            raise CommandError("Invalid granularity specified") from None
    if args.source_file and not any(op == "merge" for op, _ in ops):
        raise CommandError("Merge bitmap source file only supported with --merge")
    if args.source_format and not args.source_file:
        raise CommandError("-F only supported with -b")
    if len(args.args) != 2:
        raise CommandError("Expecting filename and bitmap name")
    path, name = args.args
    disk = open_image(path, writable=True, format=args.format, keys=args.keys.get("args"))
    try:
        top = disk.top
        if not isinstance(top, Qcow2Image):
            raise CommandError(f"Operation {ops[0][0]} on bitmap {name} failed: {path}: raw "
                               f"images cannot store persistent bitmaps")
        writer = disk.writer
        assert writer is not None
        old = engine.load(top, writer.bitmap_directory_at_open)
        current = [engine.Bitmap(b.name, b.granularity_bits, b.enabled, bytearray(b.bits),
                                 b.extra_data, b.in_use) for b in old]
        failure = None
        for op, value in ops:
            try:
                _apply(op, value, name, current, top, granularity, args)
            except CommandError as exc:
                failure = CommandError(f"Operation {op} on bitmap {name} failed: {exc}")
                break
        if top.header.version >= 3:
            engine.store(writer, current, old)
        if failure is not None:
            raise failure
    finally:
        disk.close()
    return 0


def _find(bitmaps: list[engine.Bitmap], name: str) -> engine.Bitmap:
    for bm in bitmaps:
        if bm.name == name:
            return bm
    raise CommandError(f"Dirty bitmap '{name}' not found")


def _usable(bm: engine.Bitmap) -> engine.Bitmap:
    if bm.in_use:
        raise CommandError(f"Bitmap '{bm.name}' is inconsistent and cannot be used")
    return bm


def _apply(op: str, value, name: str, bitmaps: list[engine.Bitmap], image: Qcow2Image,
           granularity: int | None, args: argparse.Namespace) -> None:
    if op == "add":
        if image.header.version < 3:
            raise CommandError(f"Can't make bitmap '{name}' persistent in '{image.path}': "
                               f"Cannot store dirty bitmaps in qcow2 v2 files")
        if any(bm.name == name for bm in bitmaps):
            raise CommandError(f"Bitmap already exists: {name}")
        g = granularity or engine.default_granularity(image.cluster_size)
        if g < 512 or g & (g - 1) or g > 1 << engine.MAX_GRANULARITY_BITS:
            raise CommandError("Granularity must be power of 2 and at least 512")
        bits = g.bit_length() - 1
        bitmaps.append(engine.Bitmap(name, bits, True,
                                     bytearray(engine.bitmap_bytes(image.active.size, bits))))
        return
    bm = _find(bitmaps, name)
    if op == "remove":
        bitmaps.remove(bm)
    elif op == "clear":
        _usable(bm).bits[:] = bytes(len(bm.bits))
    elif op == "enable":
        _usable(bm).enabled = True
    elif op == "disable":
        _usable(bm).enabled = False
    elif op == "merge":
        _usable(bm)
        engine.merge(bm, _usable(_source(value, bitmaps, args)))


def _source(source: str, bitmaps: list[engine.Bitmap], args) -> engine.Bitmap:
    if not args.source_file:
        return _find(bitmaps, source)
    layers = open_chain(args.source_file, fmt=args.source_format)
    try:
        lock_chain(layers[:1])
        top = layers[0]
        found = engine.load(top) if isinstance(top, Qcow2Image) else []
        return _find(found, source)
    finally:
        for layer in layers:
            layer.close()
