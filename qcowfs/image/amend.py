"""``amend``: changing an open qcow2 image's creation options in place."""

from __future__ import annotations

from qcowfs.format import header as hdr

from .header_update import write_header
from .write import Qcow2Writer


def set_data_file(w: Qcow2Writer, name: str | None, raw: bool | None) -> None:
    """Name another external data file (``""``: none, the image then needs one given at open,
    as QEMU leaves it), and clear the raw-data-file bit (``raw=False``; setting it is refused
    earlier, as QEMU refuses it). One header write when anything changes."""
    h = w.header
    changes: dict = {}
    if name is not None and (name or None) != h.data_file:
        changes["data_file"] = name or None
    if raw is False and h.data_file_raw:
        changes["autoclear_features"] = h.autoclear_features & ~hdr.AUTOCLEAR_DATA_FILE_RAW
    if changes:
        w.full_flush()
        write_header(w.img, h.replace(**changes))
        w.raw_data_file = w.header.data_file_raw


def set_lazy_refcounts(w: Qcow2Writer, on: bool) -> None:
    """Turn lazy refcounts on or off. Off: every refcount block is written and durable, the
    dirty bit is cleared, then the compatible bit; on: the bit alone (the dirty bit comes with
    the next metadata change)."""
    h = w.header
    if h.lazy_refcounts == on:
        return
    if not on:
        w.full_flush()
        w._stage_refcounts(force=True)
        if h.dirty:
            w._set_incompat(h.incompatible_features & ~hdr.INCOMPAT_DIRTY)
    write_header(w.img, h.replace(
        compatible_features=(h.compatible_features | hdr.COMPAT_LAZY_REFCOUNTS if on
                             else h.compatible_features & ~hdr.COMPAT_LAZY_REFCOUNTS)))
    w.lazy = on
