"""``qcowfs amend``: change a qcow2 image's options in place, as `qemu-img amend` does."""

from __future__ import annotations

import argparse

from qcowfs.chain.disk import open_image
from qcowfs.format.record import record
from qcowfs.image.qcow2 import Qcow2Image

from .amend_keyslots import key_slot_change
from .common import parse_bool, parse_options, parse_size
from .imageopts import add_image_source
from .main import CommandError
from .progress import progress_bar

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
                                   "amend` does: compat=, refcount_bits=, lazy_refcounts=, "
                                   "size=, data_file=, data_file_raw=off, LUKS key slots "
                                   "(encrypt.*); -o help "
                                   "lists qemu-img's.")
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
        if key in CREATE_ONLY or key not in known:
            raise CommandError(f"Invalid parameter '{key}'")
    slots = key_slot_change(opts, args.secrets)
    disk = open_image(args.file, writable=True, format=args.format, keys=args.keys.get("file"))
    try:
        if not isinstance(disk.top, Qcow2Image):
            raise CommandError("Format driver 'raw' does not support option amendment")
        assert disk.writer is not None
        plan = _parse(opts, disk.writer)
        plan.slots = slots
        _refuse(plan, disk)
        with progress_bar(args.progress and not args.quiet, len(STEPS), "amend",
                          unit="step") as advance:
            for step in STEPS:
                step(plan, disk, args.force)
                advance(1)
    finally:
        disk.close()
    return 0


@record
class Plan:
    """What the options ask for, resolved against the image (None: leave as it is)."""

    version: int
    refcount_order: int
    lazy: bool
    size: int | None = None
    backing: tuple[str | None, str | None] | None = None
    data_file: str | None = None
    data_file_raw: bool | None = None
    slots: object = None  # a key-slot change (cli/amend_keyslots.py), or None


def _parse(opts: dict[str, str], w) -> Plan:
    """Each option's value checked as QEMU checks it while it reads the options (before it
    changes anything)."""
    h = w.header
    plan = Plan(version=h.version, refcount_order=h.refcount_order, lazy=h.lazy_refcounts)
    for key, value in opts.items():
        if key == "compat":
            if value in ("0.10", "v2"):
                plan.version = 2
            elif value in ("1.1", "v3"):
                plan.version = 3
            else:
                raise CommandError(f"Unknown compatibility level {value}")
        elif key == "size":
            try:
                plan.size = parse_size(value)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        elif key == "lazy_refcounts":
            plan.lazy = parse_bool(key, value)
        elif key == "refcount_bits":
            try:
                bits = int(value, 0)
            except ValueError:
                raise CommandError(f"Parameter '{key}' expects a number") from None
            if not 0 < bits <= 64 or bits & (bits - 1):
                raise CommandError("Refcount width must be a power of two and may not exceed "
                                   "64 bits")
            plan.refcount_order = bits.bit_length() - 1
        elif key == "data_file":
            if not h.has_data_file:
                raise CommandError("data-file can only be set for images that use an external "
                                   "data file")
            plan.data_file = value
        elif key == "data_file_raw":
            plan.data_file_raw = parse_bool(key, value)
            if plan.data_file_raw and not h.data_file_raw:
                raise CommandError("data-file-raw cannot be set on existing images")
    if "backing_file" in opts or "backing_fmt" in opts:
        plan.backing = (opts.get("backing_file"), opts.get("backing_fmt"))
    return plan


def _refuse(plan: Plan, disk) -> None:
    """qemu-img's refusals that come after some changes in QEMU (it would leave the image half
    amended): all of them are found here, before anything changes."""
    w = disk.writer
    h = w.header
    if plan.refcount_order != h.refcount_order:
        if plan.version < 3 and plan.refcount_order != 4:
            raise CommandError("Refcount widths other than 16 bits require compatibility "
                               "level 1.1 or above (use compat=1.1 or greater)")
        from qcowfs.image.refcount_order import refusal
        why = refusal(w, plan.refcount_order)
        if why:
            raise CommandError(why)
    if plan.backing is not None and plan.backing != (h.backing_file, h.backing_format):
        raise CommandError("Cannot amend the backing file (you can use 'qcowfs rebase' "
                           "instead)")
    if plan.lazy and not h.lazy_refcounts and plan.version < 3:
        raise CommandError("Lazy refcounts only supported with compatibility level 1.1 and "
                           "above (use compat=1.1 or greater)")
    if plan.version < h.version:
        from qcowfs.image.compat import downgrade_refusal
        why = downgrade_refusal(w, refcount_order=plan.refcount_order,
                                size=plan.size if plan.size is not None else disk.size)
        if why:
            raise CommandError(why)


# --- the changes, one function per option, in QEMU's order --------------------------------


def _upgrade(plan: Plan, disk, force: bool) -> None:
    if plan.version > disk.writer.header.version:
        from qcowfs.image.compat import upgrade
        upgrade(disk.writer)


def _key_slots(plan: Plan, disk, force: bool) -> None:
    if plan.slots is not None:
        from qcowfs.image.luks_slots import amend_key_slots
        amend_key_slots(disk.top, plan.slots, force)


def _refcount_bits(plan: Plan, disk, force: bool) -> None:
    if plan.refcount_order != disk.writer.header.refcount_order:
        from qcowfs.image.refcount_order import change_refcount_order
        change_refcount_order(disk.writer, plan.refcount_order)


def _data_file(plan: Plan, disk, force: bool) -> None:
    from qcowfs.image.amend import set_data_file
    set_data_file(disk.writer, plan.data_file, plan.data_file_raw)


def _lazy_refcounts(plan: Plan, disk, force: bool) -> None:
    if plan.lazy != disk.writer.header.lazy_refcounts:
        from qcowfs.image.amend import set_lazy_refcounts
        set_lazy_refcounts(disk.writer, plan.lazy)


def _size(plan: Plan, disk, force: bool) -> None:
    if plan.size is not None and plan.size != disk.size:
        disk.resize(plan.size, shrink=plan.size < disk.size)


def _downgrade(plan: Plan, disk, force: bool) -> None:
    if plan.version < disk.writer.header.version:
        from qcowfs.image.compat import downgrade
        downgrade(disk.writer)


#: upgrade first (later options may need v3), downgrade last (after what v2 cannot hold is
#: gone); the backing file is only ever checked (``_refuse``)
STEPS = (_upgrade, _key_slots, _refcount_bits, _data_file, _lazy_refcounts, _size, _downgrade)
