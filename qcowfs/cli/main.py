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
    "map", "convert", "compare", "measure", "dd", "bitmap", "amend",
)

EXIT_ERROR = 1
USAGE_ERROR = 1  # qemu-img's code for a bad command line


class CommandError(Exception):
    """A command failed for a reason other than the image itself (bad arguments, ...)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = EXIT_ERROR if code is None else code


class Parser(argparse.ArgumentParser):
    """argparse with qemu-img's usage errors: one line, ``qcowfs: <command>: <why>``, and exit
    code 1 (argparse's 2 means "corrupt" to check and "error" to compare)."""

    command: str | None = None

    def _get_formatter(self):
        # argparse makes a formatter for every add_argument, and HelpFormatter imports shutil
        # (with bz2 and lzma) for the terminal width: the same width, from os, costs nothing.
        return self.formatter_class(prog=self.prog, width=_columns() - 2)

    def parse_known_args(self, args=None, namespace=None):
        """A command's own parser takes options between its operands, as qemu-img's getopt
        does (``convert SRC -O raw DEST``); argparse alone would end a ``*`` operand list at
        the first option."""
        if " " not in self.prog or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    _intermixing = False

    def error(self, message: str):
        where = self.prog.replace(" ", ": ", 1) if " " in self.prog else self.prog
        if where == "qcowfs" and self.command:
            where = f"qcowfs: {self.command}"
        self.exit(USAGE_ERROR, f"{where}: {message} (see --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: with every command, or only the one ``argv`` runs (a command's
    module imports what the command needs, and that can be most of qcowfs: ``qcowfs mount``
    should not load the engine of ``qcowfs check``)."""
    parser = Parser(prog="qcowfs", description="qcow2 images as raw disks")
    commands = _commands_for(argv)
    parser.command = commands[0] if len(commands) == 1 else None
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-V", "--version", action="version", version=f"qcowfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands:
        try:
            module = importlib.import_module(f"qcowfs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qcowfs.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _columns() -> int:
    """The terminal width as ``shutil.get_terminal_size`` finds it: $COLUMNS, stdout, 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


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


def _split_argv(argv: list[str]) -> tuple[list[str], dict]:
    """Let the command take what argparse must not see (resize's trailing SIZE, which may
    start with a dash) through its module's ``split_argv``."""
    for i, arg in enumerate(argv):
        if arg == "--debug":
            continue
        if arg not in COMMANDS:
            break
        split = getattr(importlib.import_module(f"qcowfs.cli.{arg}"), "split_argv", None)
        if split is None:
            break
        rest, extras = split(argv[i + 1:])
        return argv[:i + 1] + rest, extras
    return argv, {}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        parser = build_parser(argv)
        argv, extras = _split_argv(argv)
    except ModuleNotFoundError as exc:
        if "--debug" in argv:
            raise
        print(f"qcowfs: {missing_module(exc.name or str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    args = parser.parse_args(argv)
    for key, value in extras.items():
        setattr(args, key, value)
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
    except ModuleNotFoundError as exc:
        if args.debug:
            raise
        print(f"qcowfs: {args.command}: {missing_module(exc.name or str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"qcowfs: {args.command}: interrupted", file=sys.stderr)
        return 130


#: Python packages qcowfs loads on demand, by module name: the pip name, and what else it needs.
PACKAGES = {
    "pyfuse3": ("pyfuse3", "it builds against libfuse3: apt-get install fuse3 libfuse3-dev "
                           "pkg-config"),
    "trio": ("trio", ""),
    "tqdm": ("tqdm", ""),
    "zstandard": ("zstandard", ""),
    "cryptography": ("cryptography", ""),
}


def missing_module(name: str) -> str:
    """One line for a module that is not installed: which package, and how to get it."""
    top = name.split(".", 1)[0]
    package, needs = PACKAGES.get(top, (top, ""))
    hint = f"pip install {package}" + (f"; {needs}" if needs else "")
    return f"the Python package {package} is not installed ({hint})"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ImageError):
        name = f"{exc.filename}: " if exc.filename else ""
        return f"{name}{exc.strerror or exc}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
