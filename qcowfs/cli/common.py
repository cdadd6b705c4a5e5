"""Helpers every command shares: qemu-img's size strings, its human rendering of JSON
objects, option strings, and the arguments several commands take."""

from __future__ import annotations

import argparse
import json
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


def parse_size(text: str) -> int:
    """A size with an optional k/M/G/T/P/E suffix (binary), as qemu-img reads it; a fraction
    is allowed with a suffix ("1.5G")."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtpeBKMGTPE]?)\s*", text)
    if not m:
        raise ValueError(f"invalid size {text!r}")
    number, unit = m.groups()
    mult = _UNITS[unit.lower()]
    if "." in number:
        if unit == "":
            raise ValueError(f"invalid size {text!r}")
        value = int(float(number) * mult)
    else:
        value = int(number) * mult
    if value >= 1 << 63:
        raise ValueError(f"size {text!r} is too large")
    return value


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


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=("human", "json"), default="human",
                        help="output format (default: human)")


def print_json(value) -> None:
    """Pretty JSON laid out as qemu-img lays it out (4 spaces; empty lists open and close
    on their own lines)."""
    print(_json(value, 0))


def _json(value, level: int) -> str:
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
