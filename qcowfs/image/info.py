"""What ``info`` reports about one image file, with qemu-img's JSON field names and meanings.

Only this one file is described: its backing file is named, never opened.
"""

from __future__ import annotations

import os

from qcowfs.errors import FormatError, HostIOError
from qcowfs.format import header as hdr
from qcowfs.format.bitmaps import BitmapEntry, parse_bitmap_directory
from qcowfs.image.qcow2 import Qcow2Image
from qcowfs.image.raw import RawImage

COMPRESSION_NAMES = {hdr.COMPRESSION_ZLIB: "zlib", hdr.COMPRESSION_ZSTD: "zstd"}
NO_ICOUNT = (1 << 64) - 1


def read_bitmaps(image: Qcow2Image) -> list[BitmapEntry]:
    """The persistent bitmaps, or [] when the image has none or QEMU would ignore them (the
    autoclear bit that vouches for them is clear)."""
    h = image.header
    ext = h.bitmaps
    if ext is None or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS or not ext.nb_bitmaps:
        return []
    if ext.directory_offset % image.cluster_size or not ext.directory_offset:
        raise FormatError(image.path, "bitmap directory at an invalid offset")
    if ext.directory_size > 1024 * 65535:
        raise FormatError(image.path, "bitmap directory too large")
    buf = image.file.read_exact(ext.directory_offset, ext.directory_size, "bitmap directory")
    try:
        return parse_bitmap_directory(buf, ext.nb_bitmaps)
    except FormatError as exc:
        raise FormatError(image.path, exc.reason) from None


def full_backing_filename(image_name: str, backing: str) -> str:
    """QEMU's combination of the image's name and a relative backing name: the image's
    directory part (as given, with its slash) glued to the backing name."""
    if os.path.isabs(backing) or "/" not in image_name:
        return backing
    return image_name[:image_name.rindex("/") + 1] + backing


def allocated_bytes(fd: int, path: str) -> int:
    try:
        return os.fstat(fd).st_blocks * 512
    except OSError as exc:
        raise HostIOError.from_oserror(path, exc, "cannot stat") from None


def image_info(layer: Qcow2Image | RawImage, name: str) -> dict:
    """The qemu-img ``info --output=json`` object of one opened image; ``name`` is the file
    name as the user gave it (qemu-img prints it as given)."""
    if isinstance(layer, RawImage):
        return {
            "virtual-size": layer.size,
            "filename": name,
            "format": "raw",
            "actual-size": allocated_bytes(layer.file.fd, layer.path),
            "dirty-flag": False,
        }
    h = layer.header
    info: dict = {}
    if h.backing_file and h.backing_format:
        info["backing-filename-format"] = h.backing_format
    snaps = [_snapshot_info(s) for s in layer.snapshots]
    if snaps:
        info["snapshots"] = snaps
    info.update({
        "virtual-size": h.size,
        "filename": name,
        "cluster-size": h.cluster_size,
        "format": "qcow2",
        "actual-size": allocated_bytes(layer.file.fd, layer.path),
    })
    info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(layer)}
    if h.crypt_method:
        info["encrypted"] = True
    if h.backing_file:
        info["full-backing-filename"] = full_backing_filename(name, h.backing_file)
        info["backing-filename"] = h.backing_file
    info["dirty-flag"] = h.dirty
    return info


def _qcow2_specific(image: Qcow2Image) -> dict:
    """format-specific data, in the order qemu-img 7.2 prints it."""
    h = image.header
    data: dict = {"compat": "0.10" if h.version == 2 else "1.1",
                  "compression-type": COMPRESSION_NAMES[h.compression_type]}
    if h.version == 2:
        data["refcount-bits"] = h.refcount_bits
        _add_encrypt(image, data)
        return data
    data["lazy-refcounts"] = h.lazy_refcounts
    bitmaps = read_bitmaps(image)
    if bitmaps:
        data["bitmaps"] = [{"flags": _bitmap_flags(b), "name": b.name,
                            "granularity": 1 << b.granularity_bits} for b in bitmaps]
    data["refcount-bits"] = h.refcount_bits
    _add_encrypt(image, data)
    if h.has_data_file or h.data_file:
        data["data-file"] = h.data_file or ""
        data["data-file-raw"] = h.data_file_raw
    data["corrupt"] = h.corrupt
    data["extended-l2"] = h.extended_l2
    return data


def _add_encrypt(image: Qcow2Image, data: dict) -> None:
    """qemu-img's ``encrypt`` block: the LUKS header's fields (no key needed), or just the
    format for legacy AES."""
    if image.header.crypt_method == hdr.CRYPT_LUKS and image.luks is not None:
        from qcowfs.format.luks import info_dict
        data["encrypt"] = info_dict(image.luks)
    elif image.header.crypt_method:
        data["encrypt"] = {"format": "aes" if image.header.crypt_method == hdr.CRYPT_AES
                           else "luks"}


def _bitmap_flags(b: BitmapEntry) -> list[str]:
    flags = []
    if b.in_use:
        flags.append("in-use")
    if b.auto:
        flags.append("auto")
    return flags


def _snapshot_info(s) -> dict:
    out = {}
    if s.icount is not None and s.icount != NO_ICOUNT:
        out["icount"] = s.icount
    out.update({
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
        "name": s.name,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
        "id": s.id,
        "vm-state-size": s.vm_state_size,
    })
    return out
