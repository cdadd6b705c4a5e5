"""``qcowfs create``: a new qcow2 or raw image, as `qemu-img create` makes it."""

from __future__ import annotations

import argparse

from qcowfs.chain.locks import refuse_if_in_use
from qcowfs.chain.resolve import backing_path, open_layer
from qcowfs.errors import BackingChainError, ImageError
from qcowfs.format import header as hdr
from qcowfs.image.create import QcowOptions, create_qcow2, create_raw, round_size
from qcowfs.image.qcow2 import Qcow2Image

from .common import SizeError, parse_bool, parse_options, parse_size, warn
from .imageopts import add_image_source
from .main import CommandError

QCOW2_OPTIONS = ("cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2",
                 "compression_type", "data_file", "data_file_raw", "preallocation",
                 "backing_file", "backing_fmt", "size", "encryption", "encrypt.format",
                 "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
                 "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
                 "encrypt.iter-time")
_LUKS_OPTIONS = {"encrypt.cipher-alg": "cipher_alg", "encrypt.cipher-mode": "cipher_mode",
                 "encrypt.ivgen-alg": "ivgen_alg", "encrypt.ivgen-hash-alg": "ivgen_hash_alg",
                 "encrypt.hash-alg": "hash_alg"}
RAW_OPTIONS = ("preallocation", "size")
#: What ``-o help`` lists, in qemu-img's words and order: name, value type, meaning.
OPTION_HELP = {
    "backing_file": ("str", "File name of a base image"),
    "backing_fmt": ("str", "Image format of the base image"),
    "cluster_size": ("size", "qcow2 cluster size"),
    "compat": ("str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    "compression_type": ("str", "Compression method used for image cluster compression"),
    "data_file": ("str", "File name of an external data file"),
    "data_file_raw": ("bool (on/off)", "The external data file must stay valid as a raw image"),
    "encrypt.cipher-alg": ("str", "Name of encryption cipher algorithm"),
    "encrypt.cipher-mode": ("str", "Name of encryption cipher mode"),
    "encrypt.format": ("str", "Encrypt the image, format choices: 'aes', 'luks'"),
    "encrypt.hash-alg": ("str", "Name of encryption hash algorithm"),
    "encrypt.iter-time": ("num", "Time to spend in PBKDF in milliseconds"),
    "encrypt.ivgen-alg": ("str", "Name of IV generator algorithm"),
    "encrypt.ivgen-hash-alg": ("str", "Name of IV generator hash algorithm"),
    "encrypt.key-secret": ("str", "ID of secret providing qcow AES key or LUKS passphrase"),
    "encryption": ("bool (on/off)", "Encrypt the image with format 'aes'. (Deprecated in "
                                    "favor of encrypt.format=aes)"),
    "extended_l2": ("bool (on/off)", "Extended L2 tables"),
    "lazy_refcounts": ("bool (on/off)", "Postpone refcount updates"),
    "preallocation": ("str", "Preallocation mode (allowed values: off, metadata, falloc, "
                             "full)"),
    "refcount_bits": ("num", "Width of a reference count entry in bits"),
    "size": ("size", "Virtual disk size"),
}


def register(sub) -> None:
    p = sub.add_parser("create", help="create a new image",
                       description="Create a new image, as `qemu-img create` does. Options "
                                   "(-o): cluster_size, compat (0.10|v2|1.1|v3), "
                                   "refcount_bits, lazy_refcounts, extended_l2, "
                                   "compression_type (zlib|zstd), data_file, data_file_raw, "
                                   "preallocation (off|metadata|falloc|full).")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), default="raw",
                   help="image format (default: raw, as qemu-img)")
    p.add_argument("-b", dest="backing", help="backing file (relative to the new image's "
                                              "folder)")
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"),
                   help="format of the backing file (required with -b)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="comma-separated options, e.g. cluster_size=64k,compat=1.1")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.add_argument("file", nargs="?")
    add_image_source(p, image_opts=False)
    p.add_argument("size", nargs="?", help="virtual size, with an optional k/M/G/T/P/E suffix")
    p.set_defaults(func=run)


def wants_help(texts: list[str] | None) -> bool:
    """``-o help`` or ``-o ?`` among the options (qemu-img lists them and does nothing)."""
    return any(key in ("help", "?") for key in parse_options(texts))


def print_option_help(fmt: str, filename: str | None) -> None:
    """The option list qemu-img prints for ``-o help``: the format's options, and without a
    target file its note about protocol options."""
    names = QCOW2_OPTIONS if fmt == "qcow2" else RAW_OPTIONS
    print(f"Supported {fmt} options:" if filename is None else "Supported options:")
    for name in sorted(n for n in names if n != "preallocation" or fmt == "qcow2"):
        kind, meaning = OPTION_HELP[name]
        print(f"  {f'{name}=<{kind}>':<22} - {meaning}")
    if filename is None:
        print("\nThe protocol level may support further options.\n"
              "Specify the target filename to include those options.")


def parse_size_option(text: str) -> int:
    """A size argument or ``size=`` option, with qemu-img's message when it is bad."""
    try:
        return parse_size(text, warn)
    except SizeError as exc:
        raise CommandError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    if wants_help(args.options):
        print_option_help(args.format, args.file)
        return 0
    if args.file is None:
        raise CommandError("Expecting image file name")
    opts = parse_options(args.options)
    allowed = QCOW2_OPTIONS if args.format == "qcow2" else RAW_OPTIONS
    for key in opts:
        if key not in allowed:
            raise CommandError(f"{args.file}: Invalid parameter '{key}'")
    backing = args.backing or opts.get("backing_file")
    backing_fmt = args.backing_format or opts.get("backing_fmt")
    size_text = args.size or opts.get("size")
    size = None
    if size_text is not None:
        size = parse_size_option(size_text)
    if backing and args.format == "raw":
        raise CommandError(f"{args.file}: Backing file not supported for file format 'raw'")
    if backing and not backing_fmt:
        raise CommandError(f"{args.file}: Backing file specified without backing format")
    if backing and not args.unsafe:
        backing_size = _backing_size(args.file, backing, backing_fmt)
        if size is None:
            size = backing_size
    if size is None:
        raise CommandError(f"{args.file}: Image creation needs a size parameter")
    refuse_if_in_use(args.file)

    if args.format == "raw":
        prealloc = opts.get("preallocation", "off")
        if prealloc != "off":
            raise CommandError(f"{args.file}: preallocation mode '{prealloc}' is not supported "
                               f"for raw images")
        _say(args, f"Formatting '{args.file}', fmt=raw size={round_size(size)}")
        create_raw(args.file, size)
        return 0

    o = qcow_options(opts, args.file, size, args.secrets)
    o.backing_file, o.backing_format = backing, backing_fmt
    ctype = opts.get("compression_type", "zlib")

    line = [f"Formatting '{args.file}', fmt=qcow2"]
    line += [f"{k}={opts[k]}" for k in QCOW2_OPTIONS if k.startswith("encrypt") and k in opts]
    line += [f"cluster_size={o.cluster_size}",
            f"extended_l2={opts.get('extended_l2', 'off')}"]
    if "preallocation" in opts:
        line.append(f"preallocation={o.preallocation}")
    line += [f"compression_type={ctype}", f"size={round_size(size)}"]
    if backing:
        line += [f"backing_file={backing}", f"backing_fmt={backing_fmt}"]
    for key in ("compat", "data_file", "data_file_raw"):
        if key in opts:
            line.append(f"{key}={opts[key]}")
    line += [f"lazy_refcounts={opts.get('lazy_refcounts', 'off')}",
             f"refcount_bits={o.refcount_bits}"]
    _say(args, " ".join(line))
    create_qcow2(args.file, o)
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


def _backing_size(image: str, backing: str, fmt: str) -> int:
    path = backing_path(image, backing)
    try:
        layer = open_layer(path, fmt, open_data_file=False)
    except ImageError as exc:
        raise BackingChainError(image, f"could not open backing image {backing!r}: "
                                       f"{exc.reason}") from None
    try:
        return layer.active.size if isinstance(layer, Qcow2Image) else layer.size
    finally:
        layer.close()


def qcow_options(opts: dict[str, str], filename: str, size: int,
                 secrets: dict[str, bytes] | None = None) -> QcowOptions:
    """The qcow2 creation options of ``-o`` (also used by convert); ``secrets`` are the
    ``--object secret`` keys that ``encrypt.key-secret`` names."""
    o = QcowOptions(size=size)
    _encrypt_options(o, opts, filename, secrets or {})
    if "cluster_size" in opts:
        try:
            o.cluster_size = parse_size(opts["cluster_size"])
        except ValueError:
            raise CommandError(f"{filename}: Cluster size must be a power of two between 512 "
                               f"and 2048k") from None
    compat = opts.get("compat", "1.1")
    if compat in ("0.10", "v2"):
        o.version = 2
    elif compat in ("1.1", "v3"):
        o.version = 3
    else:
        raise CommandError(f"{filename}: Invalid compatibility level: '{compat}'")
    if "refcount_bits" in opts:
        try:
            o.refcount_bits = int(opts["refcount_bits"])
        except ValueError:
            raise CommandError(f"{filename}: Invalid refcount_bits") from None
    o.lazy_refcounts = parse_bool("lazy_refcounts", opts.get("lazy_refcounts", "off"))
    o.extended_l2 = parse_bool("extended_l2", opts.get("extended_l2", "off"))
    ctype = opts.get("compression_type", "zlib")
    if ctype not in ("zlib", "zstd"):
        raise CommandError(f"{filename}: Invalid parameter value for 'compression_type': "
                           f"'{ctype}'")
    o.compression_type = hdr.COMPRESSION_ZSTD if ctype == "zstd" else hdr.COMPRESSION_ZLIB
    o.data_file = opts.get("data_file") or None
    o.data_file_raw = parse_bool("data_file_raw", opts.get("data_file_raw", "off"))
    o.preallocation = opts.get("preallocation", "off")

    return o


def _encrypt_options(o: QcowOptions, opts: dict[str, str], filename: str,
                     secrets: dict[str, bytes]) -> None:
    """encrypt.* with QEMU's defaults (luks: aes-256, xts, plain64, sha256, 2000 ms); the
    legacy ``encryption=on`` means AES, which is made only when asked for by name."""
    fmt = opts.get("encrypt.format")
    if parse_bool("encryption", opts.get("encryption", "off")):
        if fmt not in (None, "aes"):
            raise CommandError(f"{filename}: encrypt.format and encryption are in conflict")
        fmt = "aes"
    if fmt is None:
        given = [k for k in opts if k.startswith("encrypt.")]
        if given:
            raise CommandError(f"{filename}: Parameter 'encrypt.format' is required with "
                               f"'{given[0]}'")
        return
    if fmt not in ("luks", "aes"):
        raise CommandError(f"{filename}: Invalid parameter value for 'encrypt.format': "
                           f"'{fmt}'")
    sid = opts.get("encrypt.key-secret")
    if not sid:
        raise CommandError(f"{filename}: Parameter 'encrypt.key-secret' is required for "
                           f"cipher")
    if sid not in secrets:
        raise CommandError(f"{filename}: No secret with id '{sid}'")
    o.encrypt_format = fmt
    o.encrypt_key = secrets[sid]
    if fmt == "luks":
        o.encrypt_luks = {name: opts[k] for k, name in _LUKS_OPTIONS.items() if k in opts}
        if "encrypt.iter-time" in opts:
            try:
                o.encrypt_luks["iter_time_ms"] = int(opts["encrypt.iter-time"])
            except ValueError:
                raise CommandError(f"{filename}: Parameter 'encrypt.iter-time' expects a "
                                   f"number") from None
    elif any(k in opts for k in (*_LUKS_OPTIONS, "encrypt.iter-time")):
        raise CommandError(f"{filename}: legacy AES takes no cipher options")
