"""The ``qcowfs`` command: dispatches to one module per command.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func=run``; ``run(args)`` returns the exit code. Errors print one line,
``qcowfs: <what>: <why>``; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qcowfs import __version__
from qcowfs.errors import ImageError

COMMANDS = (
    "mount", "umount", "create", "info", "check", "commit", "rebase", "snapshot", "resize",
    "map", "convert", "compare",
)

EXIT_ERROR = 1


class CommandError(Exception):
    """A command failed for a reason other than the image itself (bad arguments, ...)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = EXIT_ERROR if code is None else code


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: with every command, or only the one ``argv`` runs (a command's
    module imports what the command needs, and that can be most of qcowfs: ``qcowfs mount``
    should not load the engine of ``qcowfs check``)."""
    parser = argparse.ArgumentParser(prog="qcowfs", description="qcow2 images as raw disks")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-V", "--version", action="version", version=f"qcowfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _commands_for(argv):
        try:
            module = importlib.import_module(f"qcowfs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qcowfs.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _commands_for(argv: list[str] | None) -> tuple[str, ...]:
    """The one command ``argv`` names, when nothing but ``--debug`` comes before it; else all
    of them (no command, ``-h``, a typo: the usage, help or error lists every command)."""
    if argv is None:
        return COMMANDS
    for arg in argv:
        if arg == "--debug":
            continue
        return (arg,) if arg in COMMANDS else COMMANDS
    return COMMANDS


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        if getattr(args, "image_args", None) is not None:
            from .imageopts import resolve
            resolve(args)
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`qcowfs info ... | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ImageError, CommandError, OSError) as exc:
        if args.debug:
            raise
        print(f"qcowfs: {args.command}: {_reason(exc)}", file=sys.stderr)
        if isinstance(exc, CommandError):
            return exc.code
        # commands whose success codes overlap 1 (check, compare) set their own error code
        return getattr(args, "error_code", EXIT_ERROR)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"qcowfs: {args.command}: interrupted", file=sys.stderr)
        return 130


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ImageError):
        name = f"{exc.filename}: " if exc.filename else ""
        return f"{name}{exc.strerror or exc}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
