"""Changing the backing file an image names: a header rewrite inside cluster 0."""

from __future__ import annotations

from qcowfs.errors import ImageError
from qcowfs.image.header_update import write_header
from qcowfs.image.qcow2 import Qcow2Image


def set_backing_file(image: Qcow2Image, name: str | None, fmt: str | None) -> None:
    """Make ``image`` name ``name`` (format ``fmt``) as its backing file, or none.

    The new header, its extensions and the name are built in memory and written as all of
    cluster 0, then synced (QEMU's header update). Unknown header fields and extensions are
    kept.
    """
    if not image.file.writable:
        raise ImageError(image.path, "image is open read-only")
    old = image.header
    write_header(image, old.replace(backing_file=name or None,
                                    backing_format=fmt if name else None))
