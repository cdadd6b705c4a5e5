"""Open an image and, below it, every backing file it names, the way QEMU resolves them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from qcowfs.errors import BackingChainError, HostIOError, ImageError, UnsupportedError
from qcowfs.image.hostfile import HostFile
from qcowfs.image.qcow2 import DEFAULT_L2_CACHE_BYTES, Qcow2Image, is_qcow2
from qcowfs.image.raw import RawImage

MAX_CHAIN_DEPTH = 64
FORMATS = ("qcow2", "raw")

Layer = Qcow2Image | RawImage
#: keys of encrypted layers by depth (0 is the top): a mapping, or a sequence top first
Keys = Mapping[int, bytes] | Sequence[bytes | None] | None


def keys_below(keys: Keys, depth: int) -> dict[int, bytes]:
    """The keys of the chain that starts ``depth`` layers down, renumbered from 0."""
    if keys is None:
        return {}
    if isinstance(keys, Mapping):
        return {d - depth: k for d, k in keys.items() if d >= depth and k is not None}
    return {i: k for i, k in enumerate(keys[depth:]) if k is not None}


def key_for(keys: Keys, depth: int) -> bytes | None:
    if keys is None:
        return None
    if isinstance(keys, Mapping):
        return keys.get(depth)
    return keys[depth] if depth < len(keys) else None


def backing_path(image_path: str, name: str) -> str:
    """Where a backing file name leads: absolute names as they are, relative ones against the
    folder of the image that names them (QEMU's rule)."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path) or ".", name)


def probe_format(path: str) -> str:
    """'qcow2' when the file starts with the qcow2 magic, else 'raw'."""
    f = HostFile(path)
    try:
        return "qcow2" if is_qcow2(f) else "raw"
    finally:
        f.close()


def open_layer(path: str, fmt: str | None = None, *, writable: bool = False,
               l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
               open_data_file: bool = True, key: bytes | None = None,
               direct: bool = False) -> Layer:
    """Open one image file as ``fmt`` (probed when None); ``key`` unlocks an encrypted
    qcow2; ``direct`` adds O_DIRECT for the aligned reads and writes (cache=none)."""
    probed = fmt is None
    if probed:
        fmt = probe_format(path)
    if fmt == "qcow2":
        return Qcow2Image.open(path, writable=writable, l2_cache_bytes=l2_cache_bytes,
                               open_data_file=open_data_file, key=key, direct=direct)
    if fmt == "raw":
        return RawImage.open(path, writable=writable, probed=probed, direct=direct)
    raise UnsupportedError(path, f"unsupported image format {fmt!r}")


def _file_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def open_chain(path: str, *, fmt: str | None = None, writable: bool = False,
               backing: bool = True, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
               keys: Keys = None, direct: bool = False) -> list[Layer]:
    """The image at ``path`` and its backing files, top first. Only the top may be writable;
    every backing file is opened read-only. ``keys`` unlock encrypted layers (by depth);
    an encrypted layer without one opens for its metadata only. ``direct`` opens every file
    of the chain for O_DIRECT too. Missing files, loops and chains deeper than
    MAX_CHAIN_DEPTH raise BackingChainError."""
    layers: list[Layer] = []
    seen: set[tuple[int, int]] = set()
    try:
        top = open_layer(path, fmt, writable=writable, l2_cache_bytes=l2_cache_bytes,
                         key=key_for(keys, 0), direct=direct)
        layers.append(top)
        seen.add(_file_identity(path))
        current = top
        while backing and isinstance(current, Qcow2Image) and current.header.backing_file:
            name = current.header.backing_file
            if len(layers) > MAX_CHAIN_DEPTH:
                raise BackingChainError(path, f"backing chain deeper than {MAX_CHAIN_DEPTH}")
            if _is_protocol(name):
                raise UnsupportedError(current.path, f"backing file {name!r} uses a protocol "
                                                     f"qcowfs does not support")
            bpath = backing_path(current.path, name)
            bfmt = current.header.backing_format
            if bfmt is not None and bfmt not in FORMATS:
                raise UnsupportedError(current.path, f"backing file {name!r} has unsupported "
                                                     f"format {bfmt!r}")
            try:
                ident = _file_identity(bpath)
            except OSError as exc:
                raise BackingChainError(current.path, f"cannot open backing file {bpath!r}: "
                                                      f"{exc.strerror}") from None
            if ident in seen:
                raise BackingChainError(current.path, f"backing file {bpath!r} makes a loop")
            seen.add(ident)
            try:
                current = open_layer(bpath, bfmt, l2_cache_bytes=l2_cache_bytes,
                                     key=key_for(keys, len(layers)), direct=direct)
            except HostIOError as exc:
                raise BackingChainError(current.path, f"cannot open backing file {bpath!r}: "
                                                      f"{exc.reason}") from None
            except ImageError as exc:
                raise type(exc)(exc.path, exc.reason, errno=exc.errno) from None
            layers.append(current)
        return layers
    except BaseException:
        for layer in layers:
            layer.close()
        raise


def _is_protocol(name: str) -> bool:
    head = name.split("/", 1)[0]
    return ":" in head and head.split(":", 1)[0] in {
        "nbd", "json", "http", "https", "ftp", "ftps", "ssh", "iscsi", "rbd", "gluster",
        "file", "host_device", "vvfat", "null-co", "blkdebug", "nfs"}
