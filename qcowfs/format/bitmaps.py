"""The persistent dirty bitmap directory and bitmap tables (read for info, check and walk)."""

from __future__ import annotations

import struct

from qcowfs.errors import FormatError
from qcowfs.format.record import record

MAX_BITMAPS = 65535
MAX_NAME = 1023
MAX_DIRECTORY_BYTES = 1024 * 65535
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_RESERVED_MASK = 0xFF000000000001FE
BME_ALL_ONES = 1
_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes


@record(frozen=True)
class BitmapEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes = b""

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)


def parse_bitmap_directory(buf: bytes, count: int) -> list[BitmapEntry]:
    if count > MAX_BITMAPS:
        raise FormatError(None, f"too many bitmaps ({count})")
    out: list[BitmapEntry] = []
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(buf):
            raise FormatError(None, f"bitmap directory entry {i} runs past the directory")
        (table_off, table_size, flags, btype, gran, name_size,
         extra_size) = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if name_size > MAX_NAME:
            raise FormatError(None, f"bitmap directory entry {i} has a name too long")
        end = pos + extra_size + name_size
        if end > len(buf):
            raise FormatError(None, f"bitmap directory entry {i} runs past the directory")
        extra = bytes(buf[pos:pos + extra_size])
        pos += extra_size
        name = bytes(buf[pos:pos + name_size]).decode("utf-8", "replace")
        pos = (end + 7) & ~7
        out.append(BitmapEntry(name, table_off, table_size, flags, btype, gran, extra))
    return out


def mark_in_use(buf: bytes, count: int) -> bytes:
    """The directory ``buf`` with the in-use flag set on each of its ``count`` entries: the
    state QEMU leaves bitmaps in while it runs, which every reader treats as inconsistent."""
    out = bytearray(buf)
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(out):
            raise FormatError(None, f"bitmap directory entry {i} runs past the directory")
        flags = int.from_bytes(out[pos + 12:pos + 16], "big") | FLAG_IN_USE
        out[pos + 12:pos + 16] = flags.to_bytes(4, "big")
        name_size = int.from_bytes(out[pos + 18:pos + 20], "big")
        extra_size = int.from_bytes(out[pos + 20:pos + 24], "big")
        pos = (pos + _ENTRY.size + extra_size + name_size + 7) & ~7
    return bytes(out)
