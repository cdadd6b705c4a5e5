"""The persistent dirty bitmap directory (the bitmaps header extension points at it)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qcowfs.errors import FormatError

MAX_BITMAPS = 65535
MAX_NAME = 1023
MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
TYPE_DIRTY_TRACKING = 1
_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes


@dataclass(frozen=True)
class BitmapEntry:
    """One bitmap directory entry. The bitmap table itself is not read."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)


def parse_bitmap_directory(buf: bytes, count: int) -> list[BitmapEntry]:
    """Parse ``count`` entries from the directory bytes ``buf`` (exactly the directory)."""
    if count > MAX_BITMAPS:
        raise FormatError(None, f"too many bitmaps ({count})")
    if len(buf) > MAX_DIRECTORY_BYTES:
        raise FormatError(None, "bitmap directory too large")
    out: list[BitmapEntry] = []
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(buf):
            raise FormatError(None, f"bitmap directory entry {i} runs past the directory")
        (table_off, table_size, flags, btype, gran_bits, name_size,
         extra_size) = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if name_size > MAX_NAME or name_size == 0:
            raise FormatError(None, f"bitmap directory entry {i} has a bad name length")
        end = pos + extra_size + name_size
        if end > len(buf):
            raise FormatError(None, f"bitmap directory entry {i} runs past the directory")
        extra = bytes(buf[pos:pos + extra_size])
        pos += extra_size
        try:
            name = bytes(buf[pos:pos + name_size]).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(None, f"bitmap directory entry {i} has a name that is not "
                                    f"UTF-8") from None
        pos = (end + 7) & ~7
        out.append(BitmapEntry(name=name, table_offset=table_off, table_size=table_size,
                               flags=flags, type=btype, granularity_bits=gran_bits,
                               extra_data=extra))
    return out
