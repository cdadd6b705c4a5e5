"""Commit: write an image's data into a backing file further down its chain.

Every range that the image (or an image between it and the base) allocates is copied, as the
guest sees it, into the base, which grows first when it is smaller. The base is flushed before
anything else happens, so the data is durable there before the top is emptied. Emptying works
as QEMU's: a plain v3 top is replaced by a fresh one (same options, same backing file) made in a
temporary file next to it and renamed over it, so at any moment the file is either the old top
or the empty one; any other top (internal snapshots, bitmaps, an external data file, v2, an
encrypted one, whose key material a fresh image would not carry) has every cluster of its
active disk discarded by the writer, so its snapshots keep their data.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qcowfs.errors import ImageError, UnsupportedError
from qcowfs.image import locking
from qcowfs.image.create import QcowOptions, create_qcow2
from qcowfs.image.qcow2 import Qcow2Image

from .blockstatus import ChainStatus
from .disk import Disk, open_image
from .resolve import Keys, backing_path, keys_below, open_chain, probe_format

CHUNK = 2 * 1024 * 1024
Progress = Callable[[int], None]


def commit(path: str, base: str | None = None, *, empty: bool = True, fmt: str | None = None,
           progress: Progress | None = None, keys: Keys = None) -> str:
    """Commit ``path`` into its backing file, or into ``base`` (any path to a file of the
    chain below it); ``keys`` unlock encrypted layers by depth. Returns the base's path."""
    layers = open_chain(path, fmt=fmt, keys=keys)
    try:
        if len(layers) < 2:
            raise ImageError(path, "image does not have a backing file")
        depth = _base_depth(layers, base) if base else 1
        top = layers[0]
        if empty:
            _check_can_empty(top)
        for i, layer in enumerate(layers[:depth]):
            mode = locking.LockMode.WRITE if i == 0 else locking.LockMode.READ
            locking.acquire(layer.file.fd, layer.path, mode)
        view = Disk(layers, False)
        ranges = [(e.start, e.length) for e in ChainStatus(layers).merged()
                  if e.present and e.depth < depth]
        base_layer = layers[depth]
        target = open_image(base_layer.path, writable=True, format=base_layer.format,
                            keys=keys_below(keys, depth))
        try:
            if target.size < view.size:
                target.resize(view.size)
            for start, length in ranges:
                pos, end = start, start + length
                while pos < end:
                    n = min(CHUNK, end - pos)
                    target.write(pos, view.read(pos, n))
                    pos += n
                    if progress:
                        progress(n)
            target.flush()
        finally:
            target.close()
        base_path = base_layer.path
    finally:
        for layer in layers:
            layer.close()
    if empty:
        make_empty(path, keys=keys)
    return base_path


def _base_depth(layers, base: str) -> int:
    try:
        st = os.stat(base)
    except OSError as exc:
        raise ImageError(base, f"cannot open base image: {exc.strerror}") from None
    for i, layer in enumerate(layers[1:], start=1):
        lst = os.fstat(layer.file.fd)
        if (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino):
            return i
    raise ImageError(layers[0].path, f"'{base}' is not in the backing chain of this image")


def _check_can_empty(top) -> None:
    if not isinstance(top, Qcow2Image):
        raise UnsupportedError(top.path, "only a qcow2 image can be emptied after a commit")


def _rewrite_possible(img: Qcow2Image) -> bool:
    """QEMU's fast path: only a plain v3 image with nothing but the active disk is
    rewritten."""
    h = img.header
    return h.version >= 3 and not (img.snapshots or h.has_data_file or h.bitmaps
                                   or h.crypt_method)


def make_empty(path: str, *, keys: Keys = None) -> None:
    """Empty the active disk of ``path``: every range reads its backing file again
    (``keys`` as for :func:`commit`)."""
    img = Qcow2Image.open(path, open_data_file=False)
    try:
        locking.acquire(img.file.fd, path, locking.LockMode.READ)
        _check_can_empty(img)
        rewrite = _rewrite_possible(img)
    finally:
        img.close()
    if rewrite:
        _rewrite_empty(path)
    else:
        discard_all(path, keys=keys)


def discard_all(path: str, *, keys: Keys = None) -> None:
    """Discard every cluster of the active disk of ``path`` (its snapshots keep theirs).

    The guest view does not change (after a commit the backing file holds the same data), so
    persistent bitmaps stay valid: the writer marks them in use when it opens the image, and
    their flags are put back once the discard is durable. A crash before that leaves them
    marked inconsistent, never wrong."""
    disk = open_image(path, writable=True, format="qcow2", keys=keys)
    try:
        disk.discard(0, disk.size)
        disk.flush()
        assert disk.writer is not None
        disk.writer.restore_bitmaps()
    finally:
        disk.close()


def _rewrite_empty(path: str) -> None:
    """Replace ``path`` by an empty image with the same options and backing file."""
    img = Qcow2Image.open(path, open_data_file=False)
    try:
        locking.acquire(img.file.fd, path, locking.LockMode.READ)
        h = img.header
        backing_format = h.backing_format
        if h.backing_file and not backing_format:
            backing_format = probe_format(backing_path(path, h.backing_file))
        options = QcowOptions(size=h.size, cluster_size=h.cluster_size, version=h.version,
                              refcount_bits=h.refcount_bits, lazy_refcounts=h.lazy_refcounts,
                              extended_l2=h.extended_l2, compression_type=h.compression_type,
                              backing_file=h.backing_file, backing_format=backing_format)
    finally:
        img.close()
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.qcowfs-empty")
    try:
        create_qcow2(tmp, options)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
