"""``mount.fuse.qcowfs``: the helper mount(8) runs for ``mount -t fuse.qcowfs IMAGE DIR -o ...``
and for /etc/fstab lines of type ``fuse.qcowfs``.

mount(8) calls it as ``mount.fuse.qcowfs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]``;
it runs ``qcowfs mount -o OPTIONS SPEC DIR``. Exit codes follow mount(8): 0 mounted,
1 bad invocation, 32 the mount failed.
"""

from __future__ import annotations

import sys

from qcowfs.cli.main import main as qcowfs_main

EXIT_USAGE = 1
EXIT_FAILURE = 32


def parse(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(positional args, -o values, fake) from the helper's command line."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" or a == "-t" or a == "-N":
            if i + 1 >= len(argv):
                raise ValueError(f"{a} needs a value")
            if a == "-o":
                options.append(argv[i + 1])
            elif a == "-N":
                raise ValueError("-N (mount namespaces) is not supported")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.append(a[2:])
        elif a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("sfnvr"):
            fake = fake or "f" in a
            if "r" in a:
                options.append("ro")
        elif a.startswith("-") and len(a) > 1:
            raise ValueError(f"unknown flag {a}")
        else:
            positional.append(a)
        i += 1
    return positional, options, fake


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        positional, options, fake = parse(argv)
        if len(positional) != 2:
            raise ValueError("usage: mount.fuse.qcowfs IMAGE MOUNTPOINT [-o OPTIONS]")
    except ValueError as exc:
        print(f"qcowfs: mount: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if fake:
        return 0
    args = ["mount"]
    for o in options:
        args += ["-o", o]
    args += positional
    return EXIT_FAILURE if qcowfs_main(args) else 0


if __name__ == "__main__":
    sys.exit(main())
