"""Helpers every command shares: qemu-img's size strings, its human rendering of JSON
objects, option strings, and the arguments several commands take."""

from __future__ import annotations

import argparse
import math
import re
import sys

from .main import CommandError

_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
          "e": 1 << 60}


def size_to_str(value: int) -> str:
    """A byte count the way qemu-img prints it: three significant digits, binary units,
    switching up at 1000 of a unit ("996 KiB", "0.977 MiB")."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(0, (exp - 1) // 10)
    i = min(i, len(_SUFFIXES) - 1)
    return f"{value / (1 << (10 * i)):0.3g} {_SUFFIXES[i]}B"


SIZE_ERROR = ("Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
              "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
SIZE_RANGE_ERROR = "Invalid image size specified. Must be between 0 and 9223372036854775807."
# patterns as strings, compiled (and cached by ``re``) at their first use, not at every start
_SIZE = r"\s*(?:(0[xX][0-9a-fA-F]+)|(\d+)(?:\.(\d*))?)([bBkKmMgGtTpPeE]?)"


class SizeError(ValueError):
    """A size string qemu-img would refuse; the message is qemu-img's."""


def parse_size(text: str, warn=None) -> int:
    """A size as qemu-img reads it: decimal or 0x hex, then an optional binary suffix
    (b, k, M, G, T, P, E, any case). Leading blanks are skipped, trailing ones refused; a
    fraction needs a digit before the point, and a suffix above bytes unless it is zero ("1.5G", "5.k", "1.0"); hex
    with a suffix is taken with ``warn``'s deprecation warning, as qemu-img 7.2 does.
    Raises SizeError with qemu-img's message."""
    m = re.fullmatch(_SIZE, text)
    if not m:
        raise SizeError(SIZE_ERROR)
    hexa, whole, fraction, unit = m.groups()
    mult = _UNITS[unit.lower()]
    if hexa is not None:
        value = int(hexa, 16)
        if unit and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        value *= mult
    else:
        value = int(whole) * mult
        if fraction is not None:
            if mult == 1 and fraction.strip("0"):
                raise SizeError(SIZE_ERROR)
            if fraction:
                value += int(fraction) * mult // 10 ** len(fraction)
    if value >= 1 << 63:
        raise SizeError(SIZE_RANGE_ERROR)
    return value


def parse_relative_size(text: str, warn=None) -> tuple[str, int]:
    """``[+|-]SIZE`` (resize's form): the sign ('' for absolute) and the amount."""
    sign = text[:1] if text[:1] in ("+", "-") else ""
    return sign, parse_size(text[len(sign):], warn)


def warn(message: str) -> None:
    """A warning on stderr, where qemu-img prints its own: ``qcowfs: warning: ...``."""
    print(f"qcowfs: warning: {message}", file=sys.stderr)


def warn_probed_raw(disk, shown: str) -> None:
    """qemu-img's warning for an image opened for writing whose format was guessed as raw."""
    if getattr(disk.top, "probed", False):
        warn(f"Image format was not specified for '{shown}' and probing guessed raw. "
             f"Automatically detecting the format is dangerous for raw images, write "
             f"operations on block 0 will be restricted. Specify the 'raw' format explicitly "
             f"to remove the restrictions.")


def parse_options(texts: list[str] | None) -> dict[str, str]:
    """``-o a=1,b=2`` (given any number of times) as a dict; ``,,`` escapes a comma."""
    out: dict[str, str] = {}
    for text in texts or []:
        parts = re.split(r"(?<!,),(?!,)", text)
        for part in parts:
            part = part.replace(",,", ",")
            if not part:
                continue
            key, sep, value = part.partition("=")
            out[key.strip()] = value if sep else "on"
    return out


def parse_bool(name: str, value: str) -> bool:
    """An on/off option value, with the spellings QEMU accepts."""
    v = value.lower()
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise CommandError(f"Parameter '{name}' expects 'on' or 'off'")


def add_probed_format(parser: argparse.ArgumentParser, what: str = "image format") -> None:
    """``-f qcow2|raw``; without it the format is probed."""
    parser.add_argument("-f", dest="format", choices=("qcow2", "raw"), help=f"{what} (probed)")


def add_force_share(parser: argparse.ArgumentParser, help: str) -> None:
    """``-U``/``--force-share``, qemu-img's: go on although another process holds the image."""
    parser.add_argument("-U", "--force-share", action="store_true", help=help)


CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def _cache_mode(what: str):
    def check(text: str) -> str:
        if text not in CACHE_MODES:
            raise argparse.ArgumentTypeError(f"Invalid {what}cache option: {text}")
        return text
    return check


def add_cache_modes(parser: argparse.ArgumentParser, target: bool = True,
                    source: bool = False) -> None:
    """qemu-img's ``-t CACHE`` (the image written) and ``-T SRC_CACHE`` (images read). qcowfs
    always goes through the host page cache and flushes what it wrote before it exits, so
    every mode gives the same result and is at least as safe as QEMU's writeback."""
    if target:
        parser.add_argument("-t", dest="cache", metavar="CACHE", type=_cache_mode(""),
                            help="cache mode of the image written (accepted; see docs/cli.md)")
    if source:
        parser.add_argument("-T", dest="src_cache", metavar="SRC_CACHE",
                            type=_cache_mode("source "),
                            help="cache mode of the images read (accepted; see docs/cli.md)")


def _rate_limit(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError:
        raise argparse.ArgumentTypeError(
            "Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None


def add_rate_limit(parser: argparse.ArgumentParser) -> None:
    """qemu-img's ``-r RATE_LIMIT`` (bytes per second)."""
    parser.add_argument("-r", dest="rate_limit", metavar="RATE_LIMIT", type=_rate_limit,
                        help="bytes per second (accepted, not enforced: a warning says so)")


def warn_rate_limit(args: argparse.Namespace) -> None:
    if getattr(args, "rate_limit", None):
        warn("-r: qcowfs does not limit its rate; copying at full speed")


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=("human", "json"), default="human",
                        help="output format (default: human)")


def print_json(value) -> None:
    """Pretty JSON laid out as qemu-img lays it out (4 spaces; empty lists open and close
    on their own lines)."""
    print(_json(value, 0))


def _json(value, level: int) -> str:
    import json  # only --output=json pays for it (start-up time)

    pad = "    " * (level + 1)
    end = "    " * level
    if isinstance(value, dict):
        if not value:
            return "{\n" + end + "}"
        items = [f"{pad}{json.dumps(k)}: {_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(value, list):
        if not value:
            return "[\n" + end + "]"
        items = [pad + _json(v, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return json.dumps(value)


def dump_human(value, indent: int = 0, out=None) -> None:
    """qemu-img's rendering of a JSON object as indented "key: value" lines."""
    out = out or sys.stdout
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            label = key.replace("-", " ")
            if isinstance(item, dict | list):
                print(f"{pad}{label}:", file=out)
                dump_human(item, indent + 4, out)
            else:
                print(f"{pad}{label}: {_scalar(item)}", file=out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                print(f"{pad}[{i}]:", file=out)
                dump_human(item, indent + 4, out)
            else:
                print(f"{pad}[{i}]: {_scalar(item)}", file=out)


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
