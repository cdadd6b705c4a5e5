"""``qcowfs umount MOUNTPOINT``: unmount, and return only once the daemon has flushed and closed
the image and released its locks, so that the next command may open the image."""

from __future__ import annotations

import sys

from qcowfs.cli.main import CommandError
from qcowfs.mount.mounts import UnmountError, unmount


def register(subparsers) -> None:
    p = subparsers.add_parser("umount", help="unmount a qcowfs mount and wait for a clean close")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach even while files are in use (the close happens when they are "
                        "released)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for the daemon to close the image (default 600)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        pid = unmount(args.mountpoint, timeout=args.timeout, lazy=args.lazy)
    except UnmountError as exc:
        raise CommandError(str(exc)) from None
    if pid is None:
        print(f"qcowfs: umount: {args.mountpoint}: no daemon answered; unmounted, but the "
              f"image was not closed cleanly (run qemu-img check)", file=sys.stderr)
    return 0
