"""Images with defective snapshot tables, as qemu-iotest 261 makes them: qemu-img makes the
image and its snapshots, then the table is rewritten byte by byte (entries with too little or
too much extra data, unknown extra data, a table over 64 MiB, more than 65536 entries). Nothing
here uses qcowfs; the table is parsed with struct, straight from the spec."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from qemutools import create, poke, qemu_img, qemu_io

CS = 65536
_FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes


@dataclass
class Entry:
    fixed: bytes  # the 40-byte fixed part, as on disk
    extra: bytes
    ident: bytes
    name: bytes

    @property
    def l1(self) -> tuple[int, int]:
        return struct.unpack_from(">QI", self.fixed)

    def with_extra(self, extra: bytes, size: int | None = None) -> Entry:
        """The same entry with other extra data (``size`` overrides the recorded length)."""
        fixed = bytearray(self.fixed)
        struct.pack_into(">I", fixed, 36, len(extra) if size is None else size)
        return Entry(bytes(fixed), extra, self.ident, self.name)

    def encode(self) -> bytes:
        fixed = bytearray(self.fixed)
        struct.pack_into(">HH", fixed, 12, len(self.ident), len(self.name))
        raw = bytes(fixed) + self.extra + self.ident + self.name
        return raw + bytes(-len(raw) % 8)


def u32(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">I", f.read(4))[0]


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def table(path: Path) -> tuple[int, int]:
    """(nb_snapshots, snapshots_offset) from the header."""
    return u32(path, 60), u64(path, 64)


def read_entries(path: Path, limit: int | None = None) -> list[Entry]:
    count, offset = table(path)
    if limit is not None:
        count = min(count, limit)
    out = []
    with open(path, "rb") as f:
        f.seek(offset)
        for _ in range(count):
            fixed = f.read(40)
            id_len, name_len = struct.unpack_from(">HH", fixed, 12)
            extra_len = struct.unpack_from(">I", fixed, 36)[0]
            extra = f.read(extra_len)
            ident, name = f.read(id_len), f.read(name_len)
            f.seek(-(40 + extra_len + id_len + name_len) % 8, 1)
            out.append(Entry(fixed, extra, ident, name))
    return out


def set_table(path: Path, raw: bytes, count: int, offset: int | None = None) -> None:
    """Write a table's bytes (at its place, or at ``offset``) and point the header at it."""
    if offset is None:
        offset = table(path)[1]
    poke(path, offset, raw)
    poke(path, 60, struct.pack(">IQ", count, offset))


def move_table(path: Path, raw: bytes, count: int, counted: int | None = None) -> int:
    """Put a table at the end of the file instead of the old one (freed): ``counted``
    clusters of it get refcount 1 (all by default). Returns the new offset."""
    old_count, old_offset = table(path)
    old_len = sum(len(x.encode()) for x in read_entries(path))
    start = -(-path.stat().st_size // CS) * CS
    set_table(path, raw, count, start)
    with open(path, "ab") as f:
        f.truncate(start + -(-len(raw) // CS) * CS)
    set_refcounts(path, old_offset // CS, -(-old_len // CS), 0)
    set_refcounts(path, start // CS, -(-len(raw) // CS) if counted is None else counted)
    return start


def set_refcounts(path: Path, first: int, count: int, value: int = 1) -> None:
    """16-bit refcounts of clusters ``first`` .. ``first + count - 1`` (refcount block 0)."""
    reftable = u64(path, 48)
    block = u64(path, reftable)
    assert first + count <= CS // 2
    poke(path, block + 2 * first, struct.pack(">H", value) * count)


def with_snapshots(d: Path, compat: str = "1.1", names=("sn0", "sn1", "sn2")) -> Path:
    """A 4 MiB image with a snapshot after each of a few writes, so each holds its own data."""
    p = create(d / "img.qcow2", "4M", compat=compat)
    for i, name in enumerate(names):
        qemu_io(p, f"write -P {0x10 + i} {i}M 1M")
        qemu_img("snapshot", "-c", name, str(p))
    qemu_io(p, "write -P 0x77 512k 2M")
    return p


def incomplete_entries(d: Path) -> Path:
    """v3 entries with 0 and 8 bytes of extra data (v3 needs 16), and one with 42 bytes whose
    last 18 qemu does not know."""
    p = with_snapshots(d)
    e = read_entries(p)
    e[0] = e[0].with_extra(b"")
    e[1] = e[1].with_extra(e[1].extra[:24] + b"very important dat")
    e[2] = e[2].with_extra(e[2].extra[:8])
    set_table(p, b"".join(x.encode() for x in e), len(e))
    return p


def unknown_extra(d: Path) -> Path:
    """Only a 42-byte extra data entry: valid, and the unknown bytes must survive."""
    p = with_snapshots(d)
    e = read_entries(p)
    e[1] = e[1].with_extra(e[1].extra[:24] + b"very important dat")
    set_table(p, b"".join(x.encode() for x in e), len(e))
    return p


def oversized_extra(d: Path) -> Path:
    """The last entry carries 64 KiB of extra data (over QEMU's 1024), its id and name after
    it; the table, moved to the end of the file, spills into a cluster with refcount 0."""
    p = with_snapshots(d)
    e = read_entries(p)
    e[-1] = e[-1].with_extra(e[-1].extra + bytes(65536 - len(e[-1].extra)))
    move_table(p, b"".join(x.encode() for x in e), len(e), counted=1)
    return p


def too_big_table(d: Path) -> Path:
    """A 64 MiB + 8 bytes table (entries with 1 KiB of extra data and 65535-byte ids and
    names) after one real snapshot: the last entry overhangs QEMU's 64 MiB limit."""
    p = with_snapshots(d, names=("sn0",))
    real = read_entries(p)[0]
    filler = Entry(real.fixed, bytes(1024), bytes(65535), bytes(65535))
    filler = filler.with_extra(bytes(1024))
    filler_raw = bytearray(filler.encode())
    struct.pack_into(">QI", filler_raw, 0, 0, 0)  # no L1 table
    head = real.encode()
    n = -(-(64 * 2**20 - len(head)) // len(filler_raw))  # first past the limit
    if len(head) + (n - 1) * len(filler_raw) + len(filler_raw) <= 64 * 2**20:
        n += 1
    move_table(p, head + bytes(filler_raw) * n, 1 + n)
    return p


def too_many_snapshots(d: Path) -> Path:
    """A v2 image whose table lists 131072 entries: one real snapshot, then all-zero 40-byte
    entries (valid in v2); QEMU keeps only the first 65536."""
    p = with_snapshots(d, compat="0.10", names=("sn0",))
    real = read_entries(p)[0].encode()
    move_table(p, real + bytes(40 * (131072 - 1)), 131072)
    return p


CASES = {
    "incomplete": incomplete_entries,
    "unknown-extra": unknown_extra,
    "oversized-extra": oversized_extra,
    "too-big-table": too_big_table,
    "too-many": too_many_snapshots,
}
