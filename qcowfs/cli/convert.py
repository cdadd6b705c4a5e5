"""``qcowfs convert``: copy an image's guest disk into a new raw or qcow2 image."""

from __future__ import annotations

import argparse
import os

from qcowfs.chain import convert as engine
from qcowfs.chain.disk import Disk
from qcowfs.chain.locks import lock_chain, refuse_if_in_use
from qcowfs.chain.resolve import backing_path, open_chain, probe_format
from qcowfs.image.create import validate

from .common import add_force_share, add_probed_format, parse_options
from .create import QCOW2_OPTIONS, qcow_options
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
    p.add_argument("source")
    add_image_source(p, "source")
    p.add_argument("dest")
    p.set_defaults(func=run)


def _snapshot_name(text: str) -> str:
    for prefix in ("snapshot.id=", "snapshot.name="):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def run(args: argparse.Namespace) -> int:
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
                          keys=args.keys.get("source")), False)
    backing = None
    try:
        if not args.force_share:
            lock_chain(src.layers)
        view = src.snapshot(_snapshot_name(args.snapshot)) if args.snapshot else src
        options = None
        if args.out_format == "qcow2":
            options = qcow_options(opts, args.dest, view.size, args.secrets)
            if options.data_file or options.preallocation != "off":
                raise CommandError(f"{args.dest}: data_file and preallocation are not "
                                   f"supported for convert output")
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
        refuse_if_in_use(args.dest)
        show = args.progress and not args.quiet
        with progress_bar(show, view.size, "convert") as step:
            if options is None:
                engine.to_raw(view, args.dest, step)
            elif options.encrypt_format:
                engine.to_encrypted_qcow2(view, args.dest, options, step)
            else:
                engine.to_qcow2(view, args.dest, options, compress=args.compress,
                                backing=backing, progress=step)
    finally:
        if backing is not None:
            backing.close()
        src.close()
    return 0
