"""Changing the backing file an image names: a header rewrite inside cluster 0."""

from __future__ import annotations

from qcowfs.errors import FormatError, ImageError
from qcowfs.format import header as hdr
from qcowfs.image.qcow2 import Qcow2Image


def set_backing_file(image: Qcow2Image, name: str | None, fmt: str | None) -> None:
    """Make ``image`` name ``name`` (format ``fmt``) as its backing file, or none.

    The new header, its extensions and the name are built in memory and written with one
    write inside cluster 0, then synced: a reader sees the old header or the new one. Unknown
    header fields and extensions are kept.
    """
    if not image.file.writable:
        raise ImageError(image.path, "image is open read-only")
    old = image.header
    write_header(image, old.replace(backing_file=name or None,
                                    backing_format=fmt if name else None))


def write_header(image: Qcow2Image, new: hdr.Header) -> None:
    """Replace the header, its extensions and the backing name with ``new``: one write inside
    cluster 0, then synced, so a reader sees the old header or the new one. The image's header
    object takes the new values in place (a writer and its refcounts hold that object)."""
    old = image.header
    try:
        data = hdr.serialize_header(new)
    except FormatError as exc:
        raise FormatError(image.path, exc.reason) from None
    old_end = old.header_length
    if old.backing_file_offset:  # a size with no offset names nothing (QEMU ignores it)
        old_end = max(old_end, old.backing_file_offset + old.backing_file_size)
    old_end = min(old_end, old.cluster_size)  # the header lives in cluster 0
    image.file.write(0, data.ljust(old_end, b"\0"))
    image.file.sync()
    vars(old).update(vars(new))
