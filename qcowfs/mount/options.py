"""Mount options in fstab style (``-o ro,uid=1000,l2_cache_size=64M``), parsed into one value.

The parser is pure: it knows every option the mount accepts, rejects the others by name, and
quietly accepts the generic ones that mount(8), fstab and systemd pass to every helper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Options mount(8), fstab or systemd hand to every helper; they mean nothing to qcowfs.
IGNORED = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
    "_netdev", "async", "sync", "atime", "diratime", "nodiratime", "relatime", "norelatime",
    "strictatime", "lazytime", "loud", "silent", "comment",
})
#: Mount flags handed on to the kernel as they are.
KERNEL_FLAGS = frozenset({"nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime"})

#: ``-o cache=``: whether the image files go through the host's page cache (QEMU's names)
CACHE_MODES = ("writeback", "none")

#: ``-o io_threads=`` is capped here: more threads than this only contend for the GIL
MAX_IO_THREADS = 16

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OptionError(ValueError):
    """An option qcowfs does not know or a value it cannot use."""


@dataclass
class MountOptions:
    """What ``-o`` asked for. ``None`` for uid/gid means the mounting user's."""

    read_only: bool = False
    format: str | None = None  # the top image's format; None probes it
    allow_other: bool = False
    allow_root: bool = False
    uid: int | None = None
    gid: int | None = None
    umask: int = 0o022
    l2_cache_bytes: int | None = None
    zero_detect: bool = True
    direct_io: bool = True
    #: the host page cache under the image files: "writeback" (used) or "none" (O_DIRECT)
    cache: str = "writeback"
    fast_loop: bool = True
    poll_us: int = 50  # how long the request loop polls before it sleeps (requestloop)
    #: threads for slow in-place writes (datapool.py); 0 writes everything inline
    io_threads: int = 2
    #: in-place writes go to a thread once they average more than this (0: all of them)
    io_slow_us: int = 25
    allow_shrink: bool = False
    nonempty: bool = False  # mount over a folder that holds files (hiding them)
    attr_timeout: float = 1.0
    fsname: str | None = None
    #: a file whose bytes are the key of the chain's encrypted layers (QEMU's secret file=)
    key_file: str | None = None
    kernel_flags: list[str] = field(default_factory=list)

    def fuse_options(self, image: str) -> set[str]:
        """The option set for ``pyfuse3.init``: mount-level options only (see
        docs/mount.md: libfuse refuses the session-level ones)."""
        name = self.fsname or image
        opts = {"default_permissions", "subtype=qcowfs",
                "fsname=" + name.replace("\\", "\\\\").replace(",", "\\,")}
        if self.read_only:
            opts.add("ro")
        if self.allow_other:
            opts.add("allow_other")
        if self.allow_root:
            opts.add("allow_root")
        opts.update(self.kernel_flags)
        return opts

    def owner(self) -> tuple[int, int]:
        return (os.getuid() if self.uid is None else self.uid,
                os.getgid() if self.gid is None else self.gid)


def parse_size(text: str) -> int:
    """``64M``, ``1g``, ``4096`` -> bytes (binary suffixes, as qemu-img reads them)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _SUFFIXES and t[-1:] else ""
    number = t[:-1] if unit else t
    try:
        value = int(number) * _SUFFIXES[unit]
    except ValueError:
        raise OptionError(f"{text!r} is not a size") from None
    if value < 0:
        raise OptionError(f"{text!r} is not a size")
    return value


def _bool(name: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise OptionError(f"option {name}: {value!r} is not on or off")


def _int(name: str, value: str, base: int = 10) -> int:
    try:
        n = int(value, base)
    except ValueError:
        raise OptionError(f"option {name}: {value!r} is not a number") from None
    if n < 0:
        raise OptionError(f"option {name}: {value!r} is negative")
    return n


def split_options(text: str) -> list[str]:
    """Split ``a,b=c,d`` on commas; a backslash escapes a comma (as libfuse reads them)."""
    out: list[str] = []
    cur: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            cur.append(next(chars, "\\"))
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [o for o in (s.strip() for s in out) if o]


def parse_options(texts: list[str] | None) -> MountOptions:
    """Parse every ``-o`` argument, later options overriding earlier ones."""
    opts = MountOptions()
    for text in texts or []:
        for item in split_options(text):
            _apply(opts, item)
    return opts


def _apply(opts: MountOptions, item: str) -> None:
    name, eq, value = item.partition("=")
    name = name.strip()
    if not eq:
        flags = {
            "ro": ("read_only", True), "rw": ("read_only", False),
            "allow_other": ("allow_other", True), "allow_root": ("allow_root", True),
            "zero_detect": ("zero_detect", True), "nozero_detect": ("zero_detect", False),
            "direct_io": ("direct_io", True), "nodirect_io": ("direct_io", False),
            "fast_loop": ("fast_loop", True), "nofast_loop": ("fast_loop", False),
            "allow_shrink": ("allow_shrink", True),
            "nonempty": ("nonempty", True),
        }
        if name in flags:
            attr, val = flags[name]
            setattr(opts, attr, val)
            return
        if name in KERNEL_FLAGS:
            opts.kernel_flags = [f for f in opts.kernel_flags if f != name] + [name]
            return
        if name in IGNORED or name.startswith(("x-", "comment=")):
            return
        raise OptionError(f"unknown option {name!r}")
    if name == "uid":
        opts.uid = _int(name, value)
    elif name == "gid":
        opts.gid = _int(name, value)
    elif name == "umask":
        opts.umask = _int(name, value, 8) & 0o777
    elif name in ("l2_cache_size", "cache_size"):
        opts.l2_cache_bytes = parse_size(value)
    elif name == "zero_detect":
        opts.zero_detect = _bool(name, value)
    elif name == "direct_io":
        opts.direct_io = _bool(name, value)
    elif name == "cache":
        if value not in CACHE_MODES:
            raise OptionError(f"option cache: {value!r} is not none or writeback")
        opts.cache = value
    elif name == "fast_loop":
        opts.fast_loop = _bool(name, value)
    elif name == "io_threads":
        opts.io_threads = min(_int(name, value), MAX_IO_THREADS)
    elif name == "io_slow_us":
        opts.io_slow_us = min(_int(name, value), 1_000_000)
    elif name == "poll_us":
        opts.poll_us = min(_int(name, value), 10_000)
    elif name == "attr_timeout":
        try:
            opts.attr_timeout = max(0.0, float(value))
        except ValueError:
            raise OptionError(f"option {name}: {value!r} is not a number") from None
    elif name == "fsname":
        opts.fsname = value
    elif name == "key_file":
        opts.key_file = value
    elif name == "format":
        if value not in ("qcow2", "raw"):
            raise OptionError(f"option format: {value!r} is not qcow2 or raw")
        opts.format = value
    elif name.startswith("x-") or name in ("comment", "context", "fscontext", "rootcontext"):
        return
    else:
        raise OptionError(f"unknown option {name!r}")
