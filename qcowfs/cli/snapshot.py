"""``qcowfs snapshot``: list, create, apply and delete internal snapshots (qemu-img snapshot)."""

from __future__ import annotations

import argparse

from qcowfs.chain.disk import open_image

from .common import add_force_share, warn_probed_raw
from .imageopts import add_image_source, verify_keys
from .info import snapshot_header, snapshot_row
from .main import CommandError


def register(sub) -> None:
    p = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots",
                       description="Internal snapshots of a qcow2 image, as `qemu-img "
                                   "snapshot` handles them. A snapshot is named by id or name.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    what.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    what.add_argument("-a", dest="apply", metavar="SNAPSHOT",
                      help="revert the disk to a snapshot (data written since is lost)")
    what.add_argument("-d", dest="delete", metavar="SNAPSHOT", help="delete a snapshot")
    p.add_argument("-f", dest="format", choices=("qcow2",), help="image format")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_force_share(p, "list even when another process holds the image")
    p.add_argument("file")
    add_image_source(p, "file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list(args)
    if args.force_share:
        raise CommandError("--force-share/-U can only be used with -l")
    disk = open_image(args.file, writable=True, format=args.format,
                      keys=args.keys.get("file"))
    warn_probed_raw(disk, args.file)
    try:
        if args.create is not None:
            if not args.create:
                raise CommandError(f"{args.file}: a snapshot needs a name")
            disk.create_snapshot(args.create)
        elif args.apply is not None:
            disk.apply_snapshot(args.apply)
        else:
            disk.delete_snapshot(args.delete)
    finally:
        disk.close()
    return 0


def _list(args: argparse.Namespace) -> int:
    from qcowfs.chain.info import describe

    verify_keys(args.file, args.format, args.keys.get("file"), backing=False)
    info = describe(args.file, args.format, force_share=args.force_share)[0]
    snaps = info.get("snapshots") or []
    if snaps and not args.quiet:
        print("Snapshot list:")
        print(snapshot_header())
        for s in snaps:
            print(snapshot_row(s))
    return 0
