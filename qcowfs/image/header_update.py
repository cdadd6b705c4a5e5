"""Rewrites of cluster 0, the way QEMU's header update makes them.

QEMU changes the header in two ways. Setting the dirty bit writes those 8 bytes alone. Every
other change -- clearing the dirty bit, setting or clearing the corrupt bit, a new backing
file, amend, a new refcount table -- serializes the whole header from memory (fixed fields,
its own extensions in its own order and feature name table, the unknown extensions kept, the
backing name) and writes all of cluster 0, zeros after the name. That matters on a damaged
image: whatever else cluster 0 held is gone after QEMU marks it corrupt, and a claimed table
that reads cluster 0 sees zeros there. qcowfs writes cluster 0 the same way.
"""

from __future__ import annotations

from qcowfs.errors import FormatError
from qcowfs.format import header as hdr
from qcowfs.image.qcow2 import Qcow2Image


def write_header(image: Qcow2Image, new: hdr.Header) -> None:
    """Replace all of cluster 0 with ``new`` serialized and zero-filled: one write, then
    synced. The image's header object takes the new values in place (a writer and its
    refcounts hold that object)."""
    old = image.header
    try:
        data = hdr.serialize_header(new)
    except FormatError as exc:
        raise FormatError(image.path, exc.reason) from None
    image.file.write(0, data.ljust(old.cluster_size, b"\0"))
    image.file.sync()
    vars(old).update(vars(new))


def set_incompatible(image: Qcow2Image, flags: int) -> None:
    """Give the header the incompatible feature bits ``flags`` by a header update (v2 has no
    such field; its cluster 0 is rewritten all the same, as QEMU does when it marks one
    corrupt). A header that cannot be serialized again -- a damaged one -- gets the 8 bytes
    alone, so the bit is never lost."""
    h = image.header
    try:
        write_header(image, h.replace(incompatible_features=flags))
    except FormatError:
        if h.version >= 3:
            image.file.write(hdr.OFF_INCOMPAT, hdr.pack_u64(flags))
            image.file.sync()
        h.incompatible_features = flags
