"""Structure-aware mutations of a qcow2 image, driven by a seeded ``random.Random``.

``Layout`` finds the structures of a seed by reading the spec's fields directly (independent
of qcowfs's parser, which is what is under test). A mutation is a list of ``Patch``es: bytes
written at one offset, named after the field they hit, so a find can be written down as
(seed kind, patches) and rebuilt from a fresh QEMU seed."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED, COMPRESSED = 1 << 63, 1 << 62

# (name, offset, width) of the header fields, v2 and v3.
HEADER_FIELDS = [
    ("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4), ("cluster_bits", 20, 4), ("size", 24, 8),
    ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8),
]
HEADER_FIELDS_V3 = [
    ("incompatible_features", 72, 8), ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8), ("refcount_order", 96, 4), ("header_length", 100, 4),
    ("compression_type", 104, 1),
]


LUKS_EXT = 0x0537BE77  # the full-disk-encryption header extension: u64 offset, u64 length
# (name, offset, width) of the LUKS1 header's numeric fields, and of each key slot's (48 bytes
# apart from offset 208); the text fields (cipher name, mode, hash) are 32 bytes each.
LUKS_FIELDS = [("payload_offset", 104, 4), ("key_bytes", 108, 4), ("mk_digest_iter", 164, 4),
               ("version", 6, 2)]
LUKS_SLOT_FIELDS = [("active", 0, 4), ("iterations", 4, 4), ("key_offset", 40, 4),
                    ("stripes", 44, 4)]
LUKS_SLOTS, LUKS_SLOT_AT, LUKS_SLOT_SIZE, LUKS_HEADER = 8, 208, 48, 592
LUKS_TEXT = {
    "cipher_name": (8, ["aes", "serpent", "twofish", "cast5", "sm4", "des3_ede", "", "AES",
                        "aes\xff", "x" * 32]),
    "cipher_mode": (40, ["xts-plain64", "cbc-essiv:sha256", "cbc-plain", "cbc-plain64", "ecb",
                         "xts-essiv:sha512", "cbc-essiv:nohash", "cbc-essiv:", "xts-", "xts",
                         "ctr-plain64", "cbc-benbi", "-", "x" * 32]),
    "hash_spec": (72, ["sha1", "sha256", "sha512", "ripemd160", "md5", "whirlpool", "",
                       "x" * 32]),
}


@dataclass(frozen=True)
class Patch:
    where: str
    offset: int
    data: bytes

    def as_row(self) -> tuple[str, int, str]:
        return (self.where, self.offset, self.data.hex())


@dataclass(frozen=True)
class Truncate:
    """Cut the file at ``length`` (a mutation of its own: metadata past the new end)."""
    where: str
    length: int

    def as_row(self) -> tuple[str, int, str]:
        return (self.where, self.length, "")


@dataclass
class Layout:
    data: bytes
    version: int = 0
    cluster_size: int = 512
    fields: list[tuple[str, int, int]] = field(default_factory=list)
    extensions: list[tuple[int, int, int]] = field(default_factory=list)  # (offset, magic, len)
    l1: list[int] = field(default_factory=list)  # byte offsets of L1 entries
    l2: list[int] = field(default_factory=list)  # byte offsets of (in-use) L2 entries
    l2_entry_size: int = 8
    compressed: list[int] = field(default_factory=list)  # offsets of compressed L2 entries
    reftable: list[int] = field(default_factory=list)
    refblocks: list[int] = field(default_factory=list)  # offsets of refblock clusters
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (entry offset, extra size)
    snapshot_l1: list[int] = field(default_factory=list)
    bitmap_dir: tuple[int, int] | None = None  # (offset, size)
    bitmap_tables: list[int] = field(default_factory=list)
    luks: tuple[int, int, int] | None = None  # (extension offset, header offset, area length)
    metadata: list[int] = field(default_factory=list)  # cluster offsets of metadata

    def u32(self, o: int) -> int:
        return struct.unpack_from(">I", self.data, o)[0] if o + 4 <= len(self.data) else 0

    def u64(self, o: int) -> int:
        return struct.unpack_from(">Q", self.data, o)[0] if o + 8 <= len(self.data) else 0


def parse(data: bytes) -> Layout:
    """Where each structure of a (good, QEMU-made) image lies."""
    lay = Layout(data)
    lay.version = lay.u32(4)
    cb = lay.u32(20)
    if data[:4] != b"QFI\xfb" or not 9 <= cb <= 21:
        return lay
    cs = lay.cluster_size = 1 << cb
    lay.fields = list(HEADER_FIELDS) + (HEADER_FIELDS_V3 if lay.version >= 3 else [])
    hlen = lay.u32(100) if lay.version >= 3 else 72
    incompat = lay.u64(72) if lay.version >= 3 else 0
    ext_l2 = bool(incompat & 16)
    lay.l2_entry_size = 16 if ext_l2 else 8
    pos = hlen
    while pos + 8 <= cs:
        magic, length = lay.u32(pos), lay.u32(pos + 4)
        lay.extensions.append((pos, magic, length))
        if magic == 0:
            break
        if magic == 0x23852875 and length == 24:
            lay.bitmap_dir = (lay.u64(pos + 24), lay.u64(pos + 16))
        if magic == LUKS_EXT and length == 16:
            lay.luks = (pos, lay.u64(pos + 8), lay.u64(pos + 16))
            lay.metadata.append(lay.luks[1])
        pos += 8 + ((length + 7) & ~7)
    l1_off, l1_size = lay.u64(40), lay.u32(36)
    lay.metadata += [0, l1_off]
    lay.l1 = [l1_off + 8 * i for i in range(min(l1_size, 4096))]
    entries = cs // lay.l2_entry_size
    for e in lay.l1:
        l2 = lay.u64(e) & OFFSET_MASK
        if not l2 or l2 + cs > len(data):
            continue
        lay.metadata.append(l2)
        for i in range(entries):
            o = l2 + i * lay.l2_entry_size
            v = lay.u64(o)
            if v:
                lay.l2.append(o)
                if v & COMPRESSED:
                    lay.compressed.append(o)
    rt, rtc = lay.u64(48), lay.u32(56)
    lay.metadata.append(rt)
    for i in range(min(rtc * cs // 8, 4096)):
        o = rt + 8 * i
        v = lay.u64(o)
        if v:
            lay.reftable.append(o)
            lay.refblocks.append(v & ~0x1FF)
            lay.metadata.append(v & ~0x1FF)
    pos = lay.u64(64)
    lay.metadata.append(pos)
    for _ in range(min(lay.u32(60), 64)):
        if pos + 40 > len(data):
            break
        extra = lay.u32(pos + 36)
        lay.snapshots.append((pos, extra))
        lay.snapshot_l1.append(lay.u64(pos))
        id_len, name_len = struct.unpack_from(">HH", data, pos + 12)
        pos = (pos + 40 + extra + id_len + name_len + 7) & ~7
    if lay.bitmap_dir:
        off, size = lay.bitmap_dir
        p = off
        while p + 24 <= min(off + size, len(data)):
            lay.bitmap_tables.append(lay.u64(p))
            p += (24 + lay.u32(p + 20) + struct.unpack_from(">H", data, p + 18)[0] + 7) & ~7
    return lay


class Mutator:
    """Picks one to four mutations per mutant; each aims at one kind of structure."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def mutate(self, lay: Layout) -> list[Patch | Truncate]:
        out: list[Patch | Truncate] = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3, 4))):
            p = self._one(lay)
            if p is not None:
                out.append(p)
        return out

    def _one(self, lay: Layout) -> Patch | Truncate | None:
        r = self.rng
        kinds = [self._header] * 4 + [self._extension] * 2 + [self._l1] * 2 + [self._l2] * 3 \
            + [self._refcount] * 2 + [self._snapshot] * 2 + [self._bitmap] * 2 \
            + [self._compressed] * 2 + [self._subclusters] + [self._random] + [self._truncate] \
            + [self._luks] * 4
        for _ in range(8):
            p = r.choice(kinds)(lay)
            if p is not None:
                return p
        return self._random(lay)

    def _value(self, lay: Layout, width: int, old: int) -> int:
        """An interesting value for a field of ``width`` bytes that held ``old``."""
        r, cs, end = self.rng, lay.cluster_size, len(lay.data)
        top = (1 << (8 * width)) - 1
        choices = [
            0, 1, top, top >> 1, old ^ (1 << r.randrange(8 * width)), old + 1, max(old - 1, 0),
            old + cs, old * 2, old >> 1, end, end + cs, end - 1, cs, 1 << r.randrange(8 * width),
            r.randrange(top + 1), r.choice(lay.metadata or [0]), 1 << 56, (1 << 56) - cs,
            0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, r.randrange(max(end // cs, 1)) * cs,
            r.choice(lay.metadata or [0]) + 8 * r.randrange(4),
        ]
        return r.choice(choices) & top

    def _patch_int(self, lay: Layout, where: str, offset: int, width: int,
                   keep_flags: int = 0) -> Patch | None:
        if offset + width > len(lay.data) or offset < 0:
            return None
        old = int.from_bytes(lay.data[offset:offset + width], "big")
        new = self._value(lay, width, old)
        if keep_flags and self.rng.random() < 0.5:
            new = (new & ~keep_flags) | (old & keep_flags)
        if new == old:
            new = old ^ 1
        return Patch(where, offset, new.to_bytes(width, "big"))

    def _header(self, lay: Layout) -> Patch | None:
        if not lay.fields:
            return None
        name, off, width = self.rng.choice(lay.fields[1:])
        if name.endswith("features") and self.rng.random() < 0.6:
            old = lay.u64(off)
            bit = self.rng.choice([0, 1, 2, 3, 4, 5, 63]) if name != "autoclear_features" else \
                self.rng.choice([0, 1, 2, 63])
            return Patch(f"header.{name}", off, (old ^ (1 << bit)).to_bytes(8, "big"))
        return self._patch_int(lay, f"header.{name}", off, width)

    def _extension(self, lay: Layout) -> Patch | None:
        if not lay.extensions:
            return None
        i = self.rng.randrange(len(lay.extensions))
        off, magic, length = lay.extensions[i]
        r = self.rng.random()
        if r < 0.2:
            return self._patch_int(lay, f"ext[{i}].magic", off, 4)
        if r < 0.5:
            return self._patch_int(lay, f"ext[{i}].length", off + 4, 4)
        if length:
            o = off + 8 + self.rng.randrange(length)
            w = self.rng.choice((1, 4, 8))
            return self._patch_int(lay, f"ext[{i}:{magic:#x}].data+{o - off - 8}", o, w)
        return None

    def _l1(self, lay: Layout) -> Patch | None:
        if not lay.l1:
            return None
        src = lay.l1 if self.rng.random() < 0.7 or not lay.snapshot_l1 else \
            [lay.snapshot_l1[0] + 8 * i for i in range(4)]
        # entries that point somewhere first
        used = [o for o in src if lay.u64(o)] or src
        o = self.rng.choice(used)
        return self._patch_int(lay, f"l1@{o:#x}", o, 8, keep_flags=COPIED)

    def _l2(self, lay: Layout) -> Patch | None:
        if not lay.l2:
            return None
        o = self.rng.choice(lay.l2)
        return self._patch_int(lay, f"l2@{o:#x}", o, 8, keep_flags=COPIED | 1)

    def _compressed(self, lay: Layout) -> Patch | None:
        if not lay.compressed:
            return None
        o = self.rng.choice(lay.compressed)
        old = lay.u64(o)
        x = 62 - (lay.cluster_size.bit_length() - 1 - 8)
        r = self.rng.random()
        if r < 0.4:  # sector count
            sectors = self.rng.choice([0, 1, (1 << (62 - x)) - 1, self.rng.randrange(1 << (62 - x))])
            new = (old & ~(((1 << (62 - x)) - 1) << x)) | (sectors << x)
        elif r < 0.8:  # host byte offset
            off = self._value(lay, 8, old & ((1 << x) - 1)) & ((1 << x) - 1)
            new = (old & ~((1 << x) - 1)) | off
        else:
            new = old ^ (1 << self.rng.choice([62, 63, 61, x - 1]))
        return Patch(f"compressed@{o:#x}", o, new.to_bytes(8, "big"))

    def _subclusters(self, lay: Layout) -> Patch | None:
        if lay.l2_entry_size != 16 or not lay.l2:
            return None
        o = self.rng.choice(lay.l2) + 8
        return self._patch_int(lay, f"subclusters@{o:#x}", o, 8)

    def _refcount(self, lay: Layout) -> Patch | None:
        if not lay.refblocks or self.rng.random() < 0.3:
            if not lay.reftable:
                return None
            o = self.rng.choice(lay.reftable)
            return self._patch_int(lay, f"reftable@{o:#x}", o, 8)
        block = self.rng.choice(lay.refblocks)
        o = block + self.rng.randrange(min(lay.cluster_size, 64))
        if o >= len(lay.data):
            return None
        return self._patch_int(lay, f"refblock@{o:#x}", o, self.rng.choice((1, 2, 8)))

    def _snapshot(self, lay: Layout) -> Patch | None:
        if not lay.snapshots:
            return None
        i = self.rng.randrange(len(lay.snapshots))
        pos, extra = lay.snapshots[i]
        fields = [("l1_table_offset", 0, 8), ("l1_size", 8, 4), ("id_len", 12, 2),
                  ("name_len", 14, 2), ("vm_state_size", 32, 4), ("extra_data_size", 36, 4)]
        if extra >= 8:
            fields.append(("vm_state_size_large", 40, 8))
        if extra >= 16:
            fields.append(("disk_size", 48, 8))
        if extra >= 24:
            fields.append(("icount", 56, 8))
        if self.rng.random() < 0.2 and lay.snapshot_l1[i]:
            o = lay.snapshot_l1[i] + 8 * self.rng.randrange(4)
            return self._patch_int(lay, f"snapshot[{i}].l1@{o:#x}", o, 8, keep_flags=COPIED)
        name, off, width = self.rng.choice(fields)
        return self._patch_int(lay, f"snapshot[{i}].{name}", pos + off, width)

    def _bitmap(self, lay: Layout) -> Patch | None:
        if not lay.bitmap_dir:
            return None
        off, size = lay.bitmap_dir
        if self.rng.random() < 0.3 and lay.bitmap_tables:
            t = self.rng.choice(lay.bitmap_tables)
            o = t + 8 * self.rng.randrange(2)
            return self._patch_int(lay, f"bitmap_table@{o:#x}", o, 8)
        fields = [("table_offset", 0, 8), ("table_size", 8, 4), ("flags", 12, 4),
                  ("type", 16, 1), ("granularity_bits", 17, 1), ("name_size", 18, 2),
                  ("extra_data_size", 20, 4)]
        name, f_off, width = self.rng.choice(fields)
        return self._patch_int(lay, f"bitmap_dir.{name}", off + f_off, width)

    def _luks(self, lay: Layout) -> Patch | None:
        """The encryption extension's offset and length, the LUKS1 header's numbers (payload
        offset, key size, PBKDF2 iterations of the digest and of each slot, slot states, key
        material offsets and stripes), its algorithm names, random bytes in the header and in
        the key material."""
        if not lay.luks:
            return None
        r = self.rng
        ext, at, area = lay.luks
        pick = r.random()
        if pick < 0.12:
            name, off = r.choice([("offset", 8), ("length", 16)])
            return self._patch_int(lay, f"luks_ext.{name}", ext + off, 8)
        if pick < 0.3:
            name, off, width = r.choice(LUKS_FIELDS)
            return self._patch_int(lay, f"luks.{name}", at + off, width)
        if pick < 0.6:
            i = r.randrange(LUKS_SLOTS)
            name, off, width = r.choice(LUKS_SLOT_FIELDS)
            o = at + LUKS_SLOT_AT + i * LUKS_SLOT_SIZE + off
            if name == "active" and r.random() < 0.6:  # the two states QEMU writes
                old = lay.u32(o)
                new = 0x0000DEAD if old == 0x00AC71F3 else 0x00AC71F3
                return Patch(f"luks.slot[{i}].active", o, new.to_bytes(4, "big"))
            return self._patch_int(lay, f"luks.slot[{i}].{name}", o, width)
        if pick < 0.75:
            name = r.choice(list(LUKS_TEXT))
            off, names = LUKS_TEXT[name]
            text = r.choice(names).encode("latin-1")[:32]
            return Patch(f"luks.{name}", at + off, text.ljust(32, b"\0"))
        if pick < 0.85:
            o = at + r.randrange(LUKS_HEADER)
        elif pick < 0.93:  # the first slot's key material (where QEMU puts it)
            o = at + 4096 + r.randrange(max(1, lay.u32(at + 108) * 4000))
        else:
            o = at + r.randrange(max(1, min(area, len(lay.data) - at)))
        if o >= len(lay.data):
            return None
        return Patch(f"luks.bytes@{o:#x}", o, r.randbytes(r.choice((1, 2, 4, 8, 16))))

    def _random(self, lay: Layout) -> Patch:
        r = self.rng
        if lay.metadata and r.random() < 0.7:
            base = r.choice(lay.metadata)
            o = base + r.randrange(max(1, min(lay.cluster_size, 4096)))
        else:
            o = r.randrange(max(1, len(lay.data)))
        o = min(o, max(len(lay.data) - 1, 0))
        n = r.choice((1, 1, 2, 4, 8, 16))
        return Patch(f"bytes@{o:#x}", o, r.randbytes(n))

    def _truncate(self, lay: Layout) -> Truncate | None:
        if len(lay.data) <= lay.cluster_size:
            return None
        cut = self.rng.choice([self.rng.randrange(len(lay.data)),
                               len(lay.data) - lay.cluster_size, len(lay.data) - 1])
        return Truncate("truncate", max(cut, 0))


def apply(data: bytes, patches: list[Patch | Truncate]) -> bytes:
    """``data`` with the patches applied in order (past-the-end patches extend the file)."""
    out = bytearray(data)
    for p in patches:
        if isinstance(p, Truncate):
            del out[p.length:]
            continue
        if p.offset > len(out):
            out.extend(bytes(p.offset - len(out)))
        out[p.offset:p.offset + len(p.data)] = p.data
    return bytes(out)


def from_rows(rows: list[tuple[str, int, str]]) -> list[Patch | Truncate]:
    """Patches back from ``Patch.as_row``/``Truncate.as_row`` tuples (the regression table)."""
    return [Truncate(w, o) if w == "truncate" else Patch(w, o, bytes.fromhex(h))
            for w, o, h in rows]
