"""The internal snapshot table: variable-length entries, 8-byte aligned."""

from __future__ import annotations

import struct
from collections.abc import Callable

from qcowfs.errors import FormatError
from qcowfs.format.record import field, record

MAX_SNAPSHOTS = 65536
MAX_TABLE_BYTES = 64 * 1024 * 1024
MAX_EXTRA_DATA = 1024
V3_MIN_EXTRA_DATA = 16  # vm_state_size_large and disk_size
_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
_EXTRA = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount
NO_ICOUNT = (1 << 64) - 1  # the icount field's "not recorded" (-1)


@record
class SnapshotEntry:
    """One snapshot table entry. ``disk_size`` is None when the entry does not record it (then
    the image's size applies); ``icount`` is None when absent."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int | None = None
    extra_data_size: int = _EXTRA.size
    unknown_extra: bytes = b""

    def encoded_size(self) -> int:
        n = _ENTRY.size + self.extra_data_size + len(self.id.encode()) + len(self.name.encode())
        return (n + 7) & ~7


def parse_snapshot_table(buf: bytes, count: int) -> tuple[list[SnapshotEntry], int]:
    """Parse ``count`` entries from ``buf``; returns the entries and the bytes they took."""
    if count > MAX_SNAPSHOTS:
        raise FormatError(None, f"too many snapshots ({count})")
    entries: list[SnapshotEntry] = []
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(buf):
            raise FormatError(None, f"snapshot table entry {i} runs past the table")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if extra_size > MAX_EXTRA_DATA:
            raise FormatError(None, f"snapshot table entry {i} has too much extra data "
                                    f"({extra_size} bytes)")
        end = pos + extra_size + id_len + name_len
        if end > len(buf):
            raise FormatError(None, f"snapshot table entry {i} runs past the table")
        extra = bytes(buf[pos:pos + extra_size])
        pos += extra_size
        ident = _text(buf[pos:pos + id_len], i, "id")
        pos += id_len
        name = _text(buf[pos:pos + name_len], i, "name")
        pos += name_len
        pos = (pos + 7) & ~7
        padded = extra.ljust(_EXTRA.size, b"\0")
        vm_large, disk_size, icount = _EXTRA.unpack_from(padded, 0)
        entries.append(SnapshotEntry(
            id=ident, name=name, l1_table_offset=l1_off, l1_size=l1_size, date_sec=date_sec,
            date_nsec=date_nsec, vm_clock_nsec=vm_clock,
            vm_state_size=vm_large if extra_size >= 8 else vm_state32,
            disk_size=disk_size if extra_size >= 16 else None,
            icount=icount if extra_size >= 24 and icount != NO_ICOUNT else None,
            extra_data_size=extra_size, unknown_extra=extra[_EXTRA.size:]))
        if pos > MAX_TABLE_BYTES:
            raise FormatError(None, "snapshot table larger than 64 MiB")
    return entries, min(pos, len(buf))


@record
class SnapshotScan:
    """A snapshot table read as ``check -r all`` reads it (facts §2.3 step 1): what could be
    kept, and what had to go.

    ``entries`` are the entries kept, over-long extra data cut to 1024 bytes;
    ``disk_bytes`` is how many bytes of the file those entries span as they are on disk (the
    walk counts the table's clusters from it); ``too_many`` entries past QEMU's 65536 and
    ``overhanging`` entries past its 64 MiB table size were dropped; ``long_extra`` lists
    (index, recorded size) of the entries whose extra data was cut."""

    entries: list[SnapshotEntry]
    disk_bytes: int
    too_many: int = 0
    overhanging: int = 0
    long_extra: list[tuple[int, int]] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.too_many + self.overhanging


def scan_snapshot_table(read: Callable[[int, int], bytes], count: int) -> SnapshotScan:
    """Read ``count`` entries through ``read(pos, n)`` (``pos`` relative to the table's start;
    it returns fewer bytes only at the end of the file), tolerating what the repair fixes:
    more than 65536 entries, extra data over 1024 bytes, a table over 64 MiB. The rest of an
    over-long extra data is never read. Raises FormatError for what cannot be read at all."""
    too_many = max(0, count - MAX_SNAPSHOTS)
    count -= too_many
    entries: list[SnapshotEntry] = []
    long_extra: list[tuple[int, int]] = []
    pos = 0  # where the next entry starts on disk
    length = 0  # the table's length with over-long extra data cut
    for i in range(count):
        head = read(pos, _ENTRY.size)
        if len(head) < _ENTRY.size:
            raise FormatError(None, f"snapshot table entry {i} runs past the end of the file")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = _ENTRY.unpack(head)
        kept = min(extra_size, MAX_EXTRA_DATA)
        extra = read(pos + _ENTRY.size, kept)
        names_at = pos + _ENTRY.size + extra_size
        names = read(names_at, id_len + name_len)
        if len(extra) < kept or len(names) < id_len + name_len:
            raise FormatError(None, f"snapshot table entry {i} runs past the end of the file")
        if extra_size > MAX_EXTRA_DATA:
            long_extra.append((i, extra_size))
        length = (length + _ENTRY.size + kept + id_len + name_len + 7) & ~7
        if length > MAX_TABLE_BYTES:
            return SnapshotScan(entries, pos, too_many, count - i, long_extra)
        pos = (names_at + id_len + name_len + 7) & ~7
        entries.append(_entry(l1_off, l1_size, date_sec, date_nsec, vm_clock, vm_state32,
                              extra, names[:id_len], names[id_len:], i))
    return SnapshotScan(entries, pos, too_many, 0, long_extra)


def _entry(l1_off: int, l1_size: int, date_sec: int, date_nsec: int, vm_clock: int,
           vm_state32: int, extra: bytes, ident: bytes, name: bytes, i: int) -> SnapshotEntry:
    size = len(extra)
    vm_large, disk_size, icount = _EXTRA.unpack_from(extra.ljust(_EXTRA.size, b"\0"), 0)
    return SnapshotEntry(
        id=_text(ident, i, "id"), name=_text(name, i, "name"), l1_table_offset=l1_off,
        l1_size=l1_size, date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
        vm_state_size=vm_large if size >= 8 else vm_state32,
        disk_size=disk_size if size >= 16 else None,
        icount=icount if size >= 24 and icount != NO_ICOUNT else None,
        extra_data_size=size, unknown_extra=extra[_EXTRA.size:])


def _text(raw: bytes, index: int, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw).decode("latin-1")


def serialize_snapshot_table(entries: list[SnapshotEntry]) -> bytes:
    """The table as QEMU writes it: each entry with (at least) 24 bytes of extra data."""
    out = bytearray()
    for e in entries:
        extra = _EXTRA.pack(e.vm_state_size, e.disk_size or 0,
                            e.icount if e.icount is not None else NO_ICOUNT)
        extra += e.unknown_extra
        ident, name = e.id.encode(), e.name.encode()
        out += _ENTRY.pack(e.l1_table_offset, e.l1_size, len(ident), len(name), e.date_sec,
                           e.date_nsec, e.vm_clock_nsec, min(e.vm_state_size, 0xFFFFFFFF),
                           len(extra))
        out += extra + ident + name
        out += b"\0" * (-len(out) % 8)
    return bytes(out)
