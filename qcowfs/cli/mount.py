"""``qcowfs mount [-o OPTIONS] [-f] [--debug] IMAGE MOUNTPOINT``: serve the image's guest disk
and its snapshots as files. Returns 0 once the mount is live; see docs/mount.md."""

from __future__ import annotations

import argparse

from qcowfs.cli.main import CommandError
from qcowfs.mount.options import OptionError, parse_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mount", help="mount an image's guest disk and snapshots as files",
        description="Mount IMAGE (and its backing chain) on MOUNTPOINT: MOUNTPOINT/disk is the "
                    "guest disk, MOUNTPOINT/snapshots/<name>/disk each internal snapshot.")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="comma-separated mount options: ro, rw, format=qcow2|raw, key_file=PATH, "
                        "allow_other, "
                        "allow_root, uid=, gid=, umask=, l2_cache_size=, zero_detect=on|off, "
                        "direct_io=on|off, cache=writeback|none, io_threads=, io_slow_us=, "
                        "fast_loop=on|off, poll_us=, allow_shrink, attr_timeout=, fsname= "
                        "(see docs/mount.md)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (for systemd and debugging)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="log every request (implies nothing else)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        options = parse_options(args.options)
    except OptionError as exc:
        raise CommandError(str(exc)) from None
    # pyfuse3 and trio take a while to import: only `qcowfs mount` pays for them.
    from qcowfs.mount.daemon import MountError, MountRequest, mount

    req = MountRequest(image=args.image, mountpoint=args.mountpoint, options=options,
                       foreground=args.foreground, debug=bool(getattr(args, "debug", False)))
    try:
        return mount(req)
    except MountError as exc:
        raise CommandError(str(exc)) from None
