"""``qcowfs measure``: how big a new image would be, as `qemu-img measure` says."""

from __future__ import annotations

import argparse

from qcowfs.chain import measure as engine
from qcowfs.chain.blockstatus import ChainStatus
from qcowfs.chain.locks import lock_chain
from qcowfs.chain.resolve import open_chain
from qcowfs.errors import ImageError
from qcowfs.image.info import read_bitmaps
from qcowfs.image.mapping import Mapping
from qcowfs.image.qcow2 import Qcow2Image

from .common import (
    add_force_share,
    add_output,
    add_probed_format,
    dump_human,
    parse_bool,
    parse_options,
    parse_size,
    print_json,
)
from .imageopts import add_image_source, parse_image_opts
from .main import CommandError

# the output format's creation options plus those of the file protocol under it
QCOW2_KEYS = ("size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
              "encryption", "encrypt.format", "cluster_size", "preallocation", "lazy_refcounts",
              "refcount_bits", "extended_l2", "compression_type", "nocow", "extent_size_hint")
RAW_KEYS = ("size", "preallocation", "nocow", "extent_size_hint")
PREALLOCATION = ("off", "metadata", "falloc", "full")
# formats QEMU knows but cannot measure
UNMEASURABLE = ("vmdk", "vdi", "vpc", "vhdx", "qed", "qcow", "parallels", "bochs", "cloop",
                "dmg", "vvfat")
BAD_SIZE = ("Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


def register(sub) -> None:
    p = sub.add_parser("measure", help="how big a new image would be",
                       description="Print the file size a new image needs, as `qemu-img "
                                   "measure` does: for a virtual size (--size) or for the "
                                   "contents of IMAGE converted to the output format.")
    add_output(p)
    p.add_argument("-O", dest="out_format", default="raw",
                   help="output format: qcow2 or raw (default: raw)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="creation options of the output, as for create")
    p.add_argument("--size", help="virtual size to measure, instead of an image")
    add_probed_format(p)
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="measure an internal snapshot (id or name, or snapshot.id=ID / "
                        "snapshot.name=NAME)")
    add_force_share(p, "read even when another process holds the image")
    p.add_argument("files", nargs="*", metavar="IMAGE")
    add_image_source(p)  # --image-opts: IMAGE is an option string
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if len(args.files) > 1:
        raise CommandError("At most one filename argument is allowed.")
    filename = args.files[0] if args.files else None
    if filename is None and (args.format or args.snapshot):
        raise CommandError("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and args.size is not None:
        raise CommandError("--size N cannot be used together with a filename.")
    if filename is None and args.size is None:
        raise CommandError("Either --size N or one filename must be specified.")
    size = None
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except ValueError:
            raise CommandError(BAD_SIZE) from None
    if filename is None:
        result = _measure(args, size, None, None)
    else:
        fmt, keys = args.format, None
        if args.image_opts:
            filename, driver, keys = parse_image_opts(filename, args.secrets)
            fmt = driver or fmt
        layers = open_chain(filename, fmt=fmt, keys=keys)
        try:
            if not args.force_share:
                lock_chain(layers)
            top = _snapshot(layers[0], args.snapshot) if args.snapshot else None
            result = _measure(args, size, layers, top)
        finally:
            for layer in layers:
                layer.close()
    if args.output == "json":
        print_json(result.as_json())
    else:
        human = {"required size": result.required,
                 "fully allocated size": result.fully_allocated}
        if result.bitmaps is not None:
            human["bitmaps size"] = result.bitmaps
        dump_human(human)
    return 0


def _snapshot(layer, text: str) -> Mapping:
    """The snapshot ``-l`` names: ``snapshot.id=``, ``snapshot.name=`` or either."""
    if not isinstance(layer, Qcow2Image):
        raise CommandError("Failed to load snapshot: Block format 'raw' used by device '' "
                           "does not support temporarily loading internal snapshots")
    key, sep, value = text.partition("=")
    if sep and key in ("snapshot.id", "snapshot.name"):
        field = "id" if key == "snapshot.id" else "name"
        found = [s for s in layer.snapshots if getattr(s, field) == value]
    elif "=" in text:
        raise CommandError(f"Invalid parameter '{key}'")
    else:
        found = [s for s in layer.snapshots if s.id == text] or [
            s for s in layer.snapshots if s.name == text]
    if not found:
        raise CommandError("Failed to load snapshot: Can't find snapshot")
    return layer.snapshot_mapping(found[0])


def _measure(args: argparse.Namespace, size: int | None, layers, top: Mapping | None):
    fmt = args.out_format
    if fmt in UNMEASURABLE:
        raise CommandError(f"Block driver '{fmt}' does not support size measurement")
    if fmt not in ("qcow2", "raw"):
        raise CommandError(f"Unknown file format '{fmt}'")
    opts = parse_options(args.options)
    for key in opts:
        if key not in (QCOW2_KEYS if fmt == "qcow2" else RAW_KEYS):
            raise CommandError(f"Invalid parameter '{key}'")
    if size is None and "size" in opts:
        try:
            size = parse_size(opts["size"])
        except ValueError:
            raise CommandError(BAD_SIZE) from None
    requested = size or 0
    status = ChainStatus(layers, top=top) if layers else None
    if status is not None:
        # the image's current size, also for a snapshot (QEMU loads only its tables)
        size = -(-ChainStatus(layers).size // 512) * 512
    size = size or 0
    if fmt == "raw":
        return engine.measure_raw(-(-size // 512) * 512)
    return _measure_qcow2(opts, requested, size, status)


def _measure_qcow2(opts: dict[str, str], requested: int, size: int,
                   status: ChainStatus | None):
    """``requested`` is the size the options ask for (QEMU checks the L1 limit on it, not
    on the source's size)."""
    extended_l2 = parse_bool("extended_l2", opts.get("extended_l2", "off"))
    for key in ("lazy_refcounts", "data_file_raw", "nocow"):
        if key in opts:
            parse_bool(key, opts[key])
    try:
        cluster_size = parse_size(opts.get("cluster_size", "64k"))
    except ValueError:
        cluster_size = 0
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise CommandError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise CommandError("Extended L2 entries are only supported with cluster sizes of at "
                           "least 16384 bytes")
    compat = opts.get("compat", "1.1")
    if compat not in ("0.10", "1.1"):
        raise CommandError(f"Invalid compatibility level: '{compat}'")
    version = 2 if compat == "0.10" else 3
    try:
        refcount_bits = int(opts.get("refcount_bits", "16"))
    except ValueError:
        refcount_bits = 0
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise CommandError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise CommandError("Different refcount widths than 16 bits require compatibility "
                           "level 1.1 or above (use compat=1.1 or greater)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in PREALLOCATION:
        raise CommandError(f"invalid parameter value: {prealloc}")
    if opts.get("encrypt.format") or opts.get("encryption"):
        raise CommandError("encrypted output cannot be measured yet")
    if engine.l1_too_large(requested, cluster_size, extended_l2):
        raise CommandError("The image size is too large (try using a larger cluster size)")
    bitmaps = None
    image = status.layers[0] if status is not None else None
    # both the source and the output must be able to hold bitmaps
    if version >= 3 and isinstance(image, Qcow2Image) and image.header.version >= 3:
        try:
            entries = read_bitmaps(image)
        except ImageError as exc:
            raise CommandError(f"{image.path}: {exc.reason}") from None
        bitmaps = engine.bitmaps_size(entries, image.active.size, cluster_size)
    return engine.measure_qcow2(
        size=size, cluster_size=cluster_size, refcount_order=refcount_bits.bit_length() - 1,
        extended_l2=extended_l2, status=status, bitmaps=bitmaps,
        all_clusters=(status is not None and "backing_file" in opts)
        or prealloc in ("falloc", "full"))
