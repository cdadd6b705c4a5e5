"""``qcowfs amend``: change a qcow2 image's options in place, as `qemu-img amend` does."""

from __future__ import annotations

import argparse

from qcowfs.chain.disk import open_image
from qcowfs.image.qcow2 import Qcow2Image

from .amend_keyslots import key_slot_change
from .common import parse_bool, parse_options, parse_size
from .imageopts import add_image_source
from .main import CommandError

#: what ``-o help`` lists, in qemu-img 7.2's order and words
AMEND_HELP = (
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    ("encrypt.new-secret", "str", "New secret to set in the matching keyslots. Empty string "
                                  "to erase"),
    ("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    ("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
)
CREATE_ONLY = ("cluster_size", "preallocation", "extended_l2", "compression_type",
               "encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
               "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
               "encrypt.hash-alg")


def register(sub) -> None:
    p = sub.add_parser("amend", help="change a qcow2 image's options in place",
                       description="Change options of an existing qcow2 image, as `qemu-img "
                                   "amend` does. Done so far: lazy_refcounts=on|off, size= "
                                   "(grow), and options that keep their current value; -o "
                                   "help lists qemu-img's.")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), help="image format (probed)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.add_argument("--force", action="store_true", help="allow unsafe changes")
    p.add_argument("file", nargs="?")
    add_image_source(p, "file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.options:
        raise CommandError("Must specify options (-o)")
    opts = parse_options(args.options)
    if "help" in opts or "?" in opts:
        print("Amend options for 'qcow2':")
        for name, kind, meaning in AMEND_HELP:
            print(f"  {f'{name}=<{kind}>':<22} - {meaning}")
        return 0
    if args.file is None:
        raise CommandError("Expecting one image file name")
    known = {name for name, _, _ in AMEND_HELP}
    for key in opts:
        if key in CREATE_ONLY:
            raise CommandError(f"Invalid parameter '{key}'")
        if key not in known:
            raise CommandError(f"Invalid parameter '{key}'")
    if "lazy_refcounts" in opts:
        lazy = parse_bool("lazy_refcounts", opts["lazy_refcounts"])
    slots = key_slot_change(opts, args.secrets)
    disk = open_image(args.file, writable=True, format=args.format, keys=args.keys.get("file"))
    try:
        top = disk.top
        if not isinstance(top, Qcow2Image):
            raise CommandError("Format driver 'raw' does not support option amendment")
        h = top.header
        _refuse_changes(opts, h)
        if slots is not None:
            from qcowfs.image.luks_slots import amend_key_slots

            amend_key_slots(top, slots, args.force)
        if "lazy_refcounts" in opts:
            if lazy and h.version < 3:
                raise CommandError("Lazy refcounts only supported with compatibility level "
                                   "1.1 and above (use compat=1.1 or greater)")
            from qcowfs.image.amend import set_lazy_refcounts

            assert disk.writer is not None
            set_lazy_refcounts(disk.writer, lazy)
        if "size" in opts:
            try:
                size = parse_size(opts["size"])
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            if size < disk.size:
                raise CommandError("shrinking with amend is not supported yet (use resize "
                                   "--shrink)")
            if size > disk.size:
                disk.resize(size)
    finally:
        disk.close()
    return 0


def _refuse_changes(opts: dict[str, str], h) -> None:
    """Options qcowfs cannot change yet: accepted when they keep the current value."""
    same = {
        "compat": ("0.10", "v2") if h.version == 2 else ("1.1", "v3"),
        "refcount_bits": (str(h.refcount_bits),),
        "backing_file": (h.backing_file or "",),
        "backing_fmt": (h.backing_format or "",),
        "data_file": (h.data_file or "",),
        "data_file_raw": ("on",) if h.data_file_raw else ("off",),
    }
    for key, keep in same.items():
        if key in opts and opts[key] not in keep:
            raise CommandError(f"changing {key} is not supported yet")
    for key in opts:
        if key.startswith("encrypt."):
            raise CommandError(f"{key}: amending encryption is not supported yet")
