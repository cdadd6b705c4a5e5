"""``qcowfs info``: what an image is, in qemu-img info's words and JSON."""

from __future__ import annotations

import argparse
import time

from qcowfs.chain.info import describe

from .common import (
    add_force_share,
    add_output,
    add_probed_format,
    dump_human,
    print_json,
    size_to_str,
)
from .imageopts import add_image_source


def register(sub) -> None:
    p = sub.add_parser("info", help="show an image's format, size, backing file and snapshots",
                       description="Show what an image is, as `qemu-img info` does.")
    add_probed_format(p)
    p.add_argument("--backing-chain", action="store_true",
                   help="describe every image of the backing chain, top first")
    add_output(p)
    add_force_share(p, "read even when another process holds the image")
    p.add_argument("file")
    add_image_source(p, "file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    infos = describe(args.file, args.format, backing_chain=args.backing_chain,
                     force_share=args.force_share)
    if args.output == "json":
        print_json(infos if args.backing_chain else infos[0])
        return 0
    for i, info in enumerate(infos):
        if i:
            print()
        print_human(info)
    return 0


def print_human(info: dict) -> None:
    print(f"image: {info['filename']}")
    print(f"file format: {info['format']}")
    size = info["virtual-size"]
    print(f"virtual size: {size_to_str(size)} ({size} bytes)")
    print(f"disk size: {size_to_str(info['actual-size'])}")
    if info.get("encrypted"):
        print("encrypted: yes")
    if "cluster-size" in info:
        print(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        print("cleanly shut down: no")
    if "backing-filename" in info:
        name, full = info["backing-filename"], info["full-backing-filename"]
        print(f"backing file: {name}" + (f" (actual path: {full})" if full != name else ""))
    if "backing-filename-format" in info:
        print(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        print("Snapshot list:")
        print(snapshot_header())
        for s in info["snapshots"]:
            print(snapshot_row(s))
    specific = info.get("format-specific")
    if specific:
        print("Format specific information:")
        dump_human(specific["data"], 4)


def snapshot_header() -> str:
    return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def snapshot_row(s: dict) -> str:
    """One line of qemu-img's snapshot list (dates in local time)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
    secs = s["vm-clock-sec"]
    ms = s["vm-clock-nsec"] // 1_000_000
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
    icount = str(s["icount"]) if "icount" in s else ""
    size = size_to_str(s["vm-state-size"])
    return f"{s['id']:<9} {s['name']:<16} {size:>8}{date:>20}{clock:>13}{icount:>11}"
