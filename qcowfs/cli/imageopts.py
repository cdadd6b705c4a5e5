"""qemu-img's ``--object secret,...`` and ``--image-opts`` argument forms.

A command registers them with :func:`add_image_source` and names the positional arguments
that are images (``image_args``); ``main`` then calls :func:`resolve` once after parsing, which
turns each ``--image-opts`` string into the plain file name, its format (``driver=``) and the
keys of its encrypted layers (``encrypt.key-secret=``, ``backing.encrypt.key-secret=``...),
stored as ``args.keys[name]``. Commands open images as before, passing those keys.
"""

from __future__ import annotations

import argparse
import re

from .main import CommandError

# patterns as strings, compiled (and cached by ``re``) at their first use, not at every start
_DEPTH_KEY = r"((?:backing\.)*)encrypt\.key-secret"
_IGNORED = (r"((?:backing\.)*)(encrypt\.format|file\.driver|file\.locking|"
            r"file\.aio|cache\.direct|cache\.no-flush|discard|detect-zeroes)")


def add_image_source(parser: argparse.ArgumentParser, *image_args: str,
                     image_opts: bool = True) -> None:
    """``--object`` (any number) and, unless ``image_opts`` is False, ``--image-opts``: the
    positionals named in ``image_args`` are then option strings, not file names."""
    parser.add_argument("--object", action="append", default=[], metavar="OBJECTDEF",
                        help="secret,id=ID,data=STRING or file=PATH[,format=raw|base64]: a "
                             "key for encrypt.key-secret=ID")
    if image_opts:
        parser.add_argument("--image-opts", action="store_true",
                            help="image arguments are option strings: driver=qcow2,"
                                 "file.filename=PATH,encrypt.key-secret=ID,"
                                 "backing.encrypt.key-secret=ID2")
    parser.set_defaults(image_args=image_args)


def split_options(text: str) -> list[tuple[str, str]]:
    """``a=1,b=2`` as pairs in order; ``,,`` is a literal comma (QEMU's rule)."""
    out = []
    for part in re.split(r"(?<!,),(?!,)", text):
        part = part.replace(",,", ",")
        if part:
            key, sep, value = part.partition("=")
            out.append((key.strip(), value if sep else "on"))
    return out


def parse_secrets(objects: list[str]) -> dict[str, bytes]:
    """The secrets the ``--object`` arguments define, by id."""
    secrets: dict[str, bytes] = {}
    for text in objects:
        pairs = split_options(text)
        if pairs and pairs[0][1] == "on" and "=" not in text.split(",", 1)[0]:
            kind, pairs = pairs[0][0], pairs[1:]
        else:
            opts = dict(pairs)
            kind = opts.pop("qom-type", "")
            pairs = list(opts.items())
        if kind != "secret":
            raise CommandError(f"--object {kind or text}: only secret objects are supported")
        opts = dict(pairs)
        sid = opts.pop("id", None)
        if not sid:
            raise CommandError("--object secret: Parameter 'id' is missing")
        fmt = opts.pop("format", "raw")
        if "keyid" in opts or "iv" in opts:
            raise CommandError(f"--object secret,id={sid}: encrypted secrets (keyid=) are not "
                               f"supported")
        data, path = opts.pop("data", None), opts.pop("file", None)
        if opts:
            raise CommandError(f"--object secret,id={sid}: Invalid parameter "
                               f"'{next(iter(opts))}'")
        if (data is None) == (path is None):
            raise CommandError(f"--object secret,id={sid}: give exactly one of data= and file=")
        raw = data.encode() if data is not None else read_secret_file(path)
        if fmt == "base64":
            import base64  # only for a secret given in base64: not at every CLI start
            try:
                raw = base64.b64decode(raw, validate=True)
            except ValueError:
                raise CommandError(f"--object secret,id={sid}: data is not valid base64") \
                    from None
        elif fmt != "raw":
            raise CommandError(f"--object secret,id={sid}: invalid format {fmt!r}")
        if sid in secrets:
            raise CommandError(f"--object secret: attempt to add duplicate id '{sid}'")
        secrets[sid] = password_bytes(raw)
    return secrets


def read_secret_file(path: str) -> bytes:
    """A secret file's bytes exactly as QEMU reads them (no newline stripped)."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as exc:
        raise CommandError(f"{path}: cannot read secret file: {exc.strerror}") from None


def password_bytes(raw: bytes) -> bytes:
    """QEMU uses a secret as a C string: it ends at the first NUL byte."""
    return raw.split(b"\0", 1)[0]


def parse_image_opts(text: str, secrets: dict[str, bytes]) -> tuple[str, str | None,
                                                                    dict[int, bytes]]:
    """(file name, format or None to probe, keys by depth) of an ``--image-opts`` string."""
    path = None
    fmt = None
    keys: dict[int, bytes] = {}
    for key, value in split_options(text):
        depth_key = re.fullmatch(_DEPTH_KEY, key)
        if key == "driver":
            if value not in ("qcow2", "raw", "file"):
                raise CommandError(f"{text}: unsupported driver {value!r}")
            fmt = None if value == "file" else value
        elif key in ("file.filename", "filename"):
            path = value
        elif depth_key:
            depth = len(depth_key.group(1)) // len("backing.")
            if value not in secrets:
                raise CommandError(f"No secret with id '{value}'")
            keys[depth] = secrets[value]
        elif re.fullmatch(_IGNORED, key):
            continue
        else:
            raise CommandError(f"{text}: Invalid parameter '{key}'")
    if not path:
        raise CommandError(f"{text}: Parameter 'file.filename' is missing")
    return path, fmt, keys


def resolve(args: argparse.Namespace) -> None:
    """Rewrite the image positionals of a parsed command line: file names, formats, keys."""
    names = getattr(args, "image_args", ())
    secrets = parse_secrets(getattr(args, "object", []) or [])
    args.secrets = secrets
    args.keys = {}
    if not getattr(args, "image_opts", False):
        return
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        fmt_attr = {"file": "format", "file_a": "format_a", "file_b": "format_b",
                    "files": "format"}.get(name)
        if isinstance(value, list):
            # convert's FILE list: the sources are option strings, the output is a name
            # (qemu-img's --target-image-opts is not supported)
            if len(value) < 2:
                continue
            path, fmt, keys = parse_image_opts(value[0], secrets)
            value = [path, *value[1:]]
        else:
            path, fmt, keys = parse_image_opts(value, secrets)
            value = path
        setattr(args, name, value)
        args.keys[name] = keys
        if fmt_attr and fmt is not None:
            setattr(args, fmt_attr, fmt)


def verify_keys(path: str, fmt: str | None, keys: dict[int, bytes] | None, *,
                backing: bool = True) -> None:
    """Refuse a wrong key in a command that touches no data (snapshot -l, rebase -u): qemu-img
    unlocks every encrypted image it opens. Nothing to do when no key was given."""
    if not keys:
        return
    from qcowfs.chain.resolve import open_chain

    for layer in open_chain(path, fmt=fmt, backing=backing, keys=keys):
        layer.close()
