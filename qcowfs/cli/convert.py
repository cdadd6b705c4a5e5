"""``qcowfs convert``: copy an image's guest disk into a new raw or qcow2 image."""

from __future__ import annotations

import argparse
import os

from qcowfs.chain import convert as engine
from qcowfs.chain.disk import Disk, open_image
from qcowfs.chain.locks import lock_chain, refuse_if_in_use
from qcowfs.chain.resolve import backing_path, open_chain, probe_format
from qcowfs.image.create import validate
from qcowfs.image.qcow2 import Qcow2Image

from .common import (
    SizeError,
    add_cache_modes,
    add_force_share,
    add_probed_format,
    add_rate_limit,
    parse_options,
    parse_size,
    warn_rate_limit,
)
from .create import QCOW2_OPTIONS, print_option_help, qcow_options, wants_help
from .imageopts import add_image_source
from .main import CommandError
from .progress import progress_bar


def register(sub) -> None:
    p = sub.add_parser("convert", help="copy an image into a new raw or qcow2 image",
                       description="Convert an image, as `qemu-img convert` does: raw output "
                                   "is sparse; qcow2 output may be compressed (-c) or stored "
                                   "as the difference from a backing file (-B).")
    add_probed_format(p, "source format")
    p.add_argument("-O", dest="out_format", choices=("qcow2", "raw"), default="raw",
                   help="output format (default: raw)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the data clusters (qcow2 output)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="qcow2 creation options, as for create")
    p.add_argument("-B", dest="backing", help="backing file of the output (relative to the "
                                              "output's folder); only differences are written")
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"),
                   help="format of the -B backing file (probed)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="convert an internal snapshot (id or name, or snapshot.id=ID / "
                        "snapshot.name=NAME)")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_force_share(p, "read the source even when another process holds it")
    add_cache_modes(p, target=True, source=True)
    add_rate_limit(p)
    p.add_argument("-m", dest="coroutines", type=_coroutines, metavar="NUM_COROUTINES",
                   help="parallel requests, 1 to 16 (qcowfs sizes its own pool; accepted)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="allow out-of-order writes (accepted)")
    p.add_argument("-C", dest="copy_offload", action="store_true",
                   help="copy offloading (accepted: qcowfs copies itself)")
    p.add_argument("-S", dest="sparse_size", type=_sparse_size, metavar="SPARSE_SIZE",
                   help="zero-run size that becomes a hole (multiple of 512 up to 16M)")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="write into an existing target (not supported yet)")
    p.add_argument("--target-is-zero", action="store_true",
                   help="the -n target reads as zeros")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the source's persistent bitmaps (qcow2 v3 to qcow2 v3)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps, leave out bitmaps in use instead of failing")
    p.add_argument("--salvage", action="store_true",
                   help="go on past read errors (not supported yet)")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="the source image, then the output image")
    add_image_source(p, "files")
    p.set_defaults(func=run)


def _coroutines(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError("Invalid number of coroutines. Allowed number of "
                                         "coroutines is between 1 and 16")
    return int(text)


def _sparse_size(text: str) -> int:
    try:
        value = parse_size(text)
    except SizeError:
        value = -1
    if value < 0 or value % 512 or value > 16 << 20:
        raise argparse.ArgumentTypeError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
            "up to 16777216. Select 0 to disable sparse detection (fully allocates output).")
    return value


def _refuse_unsupported(args: argparse.Namespace) -> None:
    """qemu-img forms that parse but would change what convert does in ways qcowfs does not
    do yet: refused by name rather than ignored."""
    if args.target_is_zero and not args.no_create:
        raise CommandError("--target-is-zero requires use of -n flag")
    if args.no_create:
        raise CommandError(f"{args.dest}: -n (write into an existing target) is not supported")
    if args.salvage:
        raise CommandError("--salvage is not supported")
    if args.sparse_size == 0:
        raise CommandError("-S 0 (fully allocated output) is not supported")
    if len(args.files) > 2:
        raise CommandError("converting several source images into one is not supported")


def _snapshot_name(text: str) -> str:
    for prefix in ("snapshot.id=", "snapshot.name="):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _bitmaps_to_copy(args: argparse.Namespace, src: Disk, options) -> list:
    """The source's bitmaps ``--bitmaps`` copies, with qemu-img's refusals."""
    from qcowfs.image import bitmaps

    if options is None:
        raise CommandError("Format driver 'raw' does not support bitmaps")
    if options.version < 3:
        raise CommandError("Format driver 'qcow2' does not support bitmaps")
    top = src.top
    if not isinstance(top, Qcow2Image) or top.header.version < 3:
        raise CommandError("Source lacks bitmap support")
    found = bitmaps.load(top)
    for bm in reversed(found):  # QEMU names the last one first
        if bm.in_use and not args.skip_broken_bitmaps:
            raise CommandError(f"Cannot copy inconsistent bitmap '{bm.name}'")
    return [bm for bm in found if not bm.in_use]


def _store_bitmaps(dest: str, copied: list) -> None:
    from qcowfs.image import bitmaps

    out = open_image(dest, writable=True, format="qcow2")
    try:
        assert out.writer is not None
        bitmaps.store(out.writer, bitmaps.resized(copied, out.size), [])
    finally:
        out.close()


def run(args: argparse.Namespace) -> int:
    args.source = args.files[0] if len(args.files) > 1 else None
    args.dest = args.files[-1] if args.files else None
    if wants_help(args.options):
        print_option_help(args.out_format, args.dest)
        return 0
    if args.source is None:
        raise CommandError("Must specify image file name")
    _refuse_unsupported(args)
    warn_rate_limit(args)
    opts = parse_options(args.options)
    if args.out_format == "raw":
        if opts:
            raise CommandError(f"{args.dest}: raw output takes no -o options")
        if args.compress or args.backing:
            raise CommandError(f"{args.dest}: -c and -B need qcow2 output (-O qcow2)")
    for key in opts:
        if key not in QCOW2_OPTIONS or key in ("size", "backing_file", "backing_fmt"):
            raise CommandError(f"{args.dest}: Invalid parameter '{key}'")
    if os.path.abspath(args.source) == os.path.abspath(args.dest):
        raise CommandError(f"{args.dest}: the output would overwrite the source")
    src = Disk(open_chain(args.source, fmt=args.format,
                          keys=args.keys.get("files")), False)
    backing = None
    try:
        if not args.force_share:
            lock_chain(src.layers)
        view = src.snapshot(_snapshot_name(args.snapshot)) if args.snapshot else src
        options = None
        if args.out_format == "qcow2":
            options = qcow_options(opts, args.dest, view.size, args.secrets)
            if args.compress and options.preallocation != "off":
                raise CommandError("Compression and preallocation not supported at the same "
                                   "time")
            if args.compress and options.data_file:
                raise CommandError(f"{args.dest}: compression needs the data inside the "
                                   f"image (qemu-img fails with 'Operation not supported')")
            if args.backing and (options.data_file or options.preallocation != "off"):
                raise CommandError(f"{args.dest}: a backing file (-B) with data_file or "
                                   f"preallocation is not supported")
            if args.backing:
                bpath = backing_path(args.dest, args.backing)
                bfmt = args.backing_format or probe_format(bpath)
                backing = Disk(open_chain(bpath, fmt=bfmt), False)
                options.backing_file, options.backing_format = args.backing, bfmt
                if not args.force_share:
                    lock_chain(backing.layers)
            if options.encrypt_format and (args.compress or args.backing):
                raise CommandError(f"{args.dest}: compression and a backing file are not "
                                   f"supported with encryption")
            validate(args.dest, options)
        copied = _bitmaps_to_copy(args, src, options) if args.bitmaps else None
        refuse_if_in_use(args.dest)
        durable = (args.cache or "unsafe") != "unsafe"  # qemu-img's convert default: unsafe
        show = args.progress and not args.quiet
        sparse = args.sparse_size or engine.SPARSE_BLOCK
        with progress_bar(show, view.size, "convert") as step:
            if options is None:
                engine.to_raw(view, args.dest, step, sparse=sparse, durable=durable)
            elif (options.encrypt_format or options.data_file
                  or options.preallocation != "off"):
                engine.to_qcow2_in_place(view, args.dest, options, step, sparse=sparse)
            else:
                engine.to_qcow2(view, args.dest, options, compress=args.compress,
                                backing=backing, progress=step, sparse=sparse,
                                durable=durable)
        if copied:
            _store_bitmaps(args.dest, copied)
    finally:
        if backing is not None:
            backing.close()
        src.close()
    return 0
