"""``qcowfs check``: consistency check and repair, with qemu-img check's output and exit
codes (0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 no checks for the
format)."""

from __future__ import annotations

import argparse
import sys

from qcowfs.chain.locks import lock_chain
from qcowfs.chain.resolve import probe_format
from qcowfs.image.check import FIX_ALL, FIX_LEAKS, CheckResult, check_image
from qcowfs.image.qcow2 import Qcow2Image

from .common import add_cache_modes, add_force_share, add_output, add_probed_format, print_json
from .imageopts import add_image_source
from .main import CommandError

EXIT_NOT_COMPLETED = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63


def register(sub) -> None:
    p = sub.add_parser("check", help="check an image for consistency (and repair it)",
                       description="Check a qcow2 image, as `qemu-img check` does. Exit 0: "
                                   "consistent, 1: check not completed, 2: corrupted, 3: leaked "
                                   "clusters only, 63: the format has no checks.")
    add_probed_format(p)
    p.add_argument("-r", dest="repair", choices=("leaks", "all"),
                   help="repair leaks only, or all errors (refcounts, COPIED flags)")
    add_output(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_cache_modes(p, target=False, source=True)
    add_force_share(p, "check even when another process holds the image (no repair)")
    p.add_argument("file")
    add_image_source(p, "file")
    p.set_defaults(func=run, error_code=EXIT_NOT_COMPLETED)


def run(args: argparse.Namespace) -> int:
    fmt = args.format or probe_format(args.file)
    if fmt != "qcow2":
        raise CommandError("This image format does not support checks", EXIT_UNSUPPORTED)
    if args.repair and args.force_share:
        raise CommandError("--force-share/-U cannot be used with -r")
    fix = {None: 0, "leaks": FIX_LEAKS, "all": FIX_ALL}[args.repair]
    res, fixed = _check(args, fix)
    if fix and not res.check_errors and not res.aborted and res.fixed_anything:
        fixed = res
        if args.output == "human" and not args.quiet:
            print("The following inconsistencies were found and repaired:\n\n"
                  f"    {res.leaks_fixed} leaked clusters\n"
                  f"    {res.corruptions_fixed} corruptions\n\n"
                  "Double checking the fixed image now...")
        res, _ = _check(args, 0)
        res.leaks_fixed, res.corruptions_fixed = fixed.leaks_fixed, fixed.corruptions_fixed
    if res.aborted:
        raise CommandError(f"{args.file}: Check failed: {res.aborted}", EXIT_NOT_COMPLETED)
    if not args.quiet:
        if args.output == "json":
            print_json(_json(res, args.file))
        else:
            _human(res)
    if res.check_errors:
        raise CommandError(f"{args.file}: Check failed", EXIT_NOT_COMPLETED)
    if res.corruptions:
        return EXIT_CORRUPT
    if res.leaks:
        return EXIT_LEAKS
    return 0


def _check(args: argparse.Namespace, fix: int) -> tuple[CheckResult, CheckResult | None]:
    layer = Qcow2Image.open(args.file, writable=bool(fix), open_data_file=False,
                            scan_snapshots=True, key=args.keys.get("file", {}).get(0))
    try:
        layer.require_key()  # as qemu-img check: an encrypted image opens only with its key
        if not args.force_share:
            lock_chain([layer], write_top=bool(fix))
        res = check_image(layer, fix)
    finally:
        layer.close()
    for line in res.messages:
        print(line, file=sys.stderr)
    return res, None


def _json(res: CheckResult, filename: str) -> dict:
    out: dict = {"image-end-offset": res.image_end_offset}
    if res.compressed_clusters:
        out["compressed-clusters"] = res.compressed_clusters
    if res.total_clusters:
        out["total-clusters"] = res.total_clusters
    if res.corruptions:
        out["corruptions"] = res.corruptions
    if res.corruptions_fixed:
        out["corruptions-fixed"] = res.corruptions_fixed
    out["check-errors"] = res.check_errors
    if res.leaks:
        out["leaks"] = res.leaks
    if res.leaks_fixed:
        out["leaks-fixed"] = res.leaks_fixed
    if res.allocated_clusters:
        out["allocated-clusters"] = res.allocated_clusters
    out["filename"] = filename
    out["format"] = "qcow2"
    if res.fragmented_clusters:
        out["fragmented-clusters"] = res.fragmented_clusters
    if not res.image_end_offset:
        del out["image-end-offset"]
    return out


def _human(res: CheckResult) -> None:
    if not (res.corruptions or res.leaks or res.check_errors):
        print("No errors were found on the image.")
    else:
        if res.corruptions:
            print(f"\n{res.corruptions} errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.")
        if res.leaks:
            print(f"\n{res.leaks} leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.")
        if res.check_errors:
            print(f"\n{res.check_errors} internal errors have occurred during the check.")
    if res.total_clusters and res.allocated_clusters:
        a, t = res.allocated_clusters, res.total_clusters
        print(f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
              f"{res.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
              f"{res.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
    if res.image_end_offset:
        print(f"Image end offset: {res.image_end_offset}")
