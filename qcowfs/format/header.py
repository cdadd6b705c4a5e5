"""The qcow2 header (cluster 0): fixed fields, header extensions and the backing file name."""

from __future__ import annotations

import struct

from qcowfs.errors import FormatError, UnsupportedError
from qcowfs.format.record import field, record, replace

MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # what QEMU writes: adds compression_type and padding
MAX_BACKING_NAME = 1023
MAX_BACKING_FORMAT = 15

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FEATURE_INCOMPAT, FEATURE_COMPAT, FEATURE_AUTOCLEAR = 0, 1, 2

# The feature name table QEMU 7.2 writes, whatever names the image held before; qcowfs
# writes the same one, and like QEMU only where clusters are larger than this.
FEATURE_TABLE_MIN_CLUSTER = 4096
STANDARD_FEATURE_NAMES: dict[tuple[int, int], str] = {
    (FEATURE_INCOMPAT, 0): "dirty bit",
    (FEATURE_INCOMPAT, 1): "corrupt bit",
    (FEATURE_INCOMPAT, 2): "external data file",
    (FEATURE_INCOMPAT, 3): "compression type",
    (FEATURE_INCOMPAT, 4): "extended L2 entries",
    (FEATURE_COMPAT, 0): "lazy refcounts",
    (FEATURE_AUTOCLEAR, 0): "bitmaps",
    (FEATURE_AUTOCLEAR, 1): "raw external data",
}

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes, at offset 72
_EXT_HEAD = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")

# Offsets of fields that the writer updates in place with one small write.
OFF_BACKING = 8  # backing_file_offset (8) + backing_file_size (4)
OFF_SIZE = 24
OFF_L1 = 36  # l1_size (4) + l1_table_offset (8): 12 bytes
OFF_REFTABLE = 48  # refcount_table_offset (8) + refcount_table_clusters (4): 12 bytes
OFF_SNAPSHOTS = 60  # nb_snapshots (4) + snapshots_offset (8): 12 bytes
OFF_INCOMPAT = 72
OFF_COMPAT = 80
OFF_AUTOCLEAR = 88


@record(frozen=True)
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@record(frozen=True)
class CryptoExtension:
    offset: int
    length: int


@record
class Header:
    """Everything cluster 0 says. Unknown fields and extensions are kept for rewriting."""

    version: int
    cluster_bits: int
    size: int
    crypt_method: int = CRYPT_NONE
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    unknown_header_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: BitmapsExtension | None = None
    crypto: CryptoExtension | None = None
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)
    # Where the fields sit in the file as read (0 when the header was built in memory).
    backing_file_offset: int = 0
    backing_file_size: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    def replace(self, **changes) -> Header:
        return replace(self, **changes)

    def feature_name(self, kind: int, bit: int) -> str:
        name = self.feature_names.get((kind, bit))
        return name if name else f"unknown feature bit {bit}"


def l1_entries_needed(size: int, cluster_bits: int, extended_l2: bool = False) -> int:
    """How many L1 entries a disk of ``size`` bytes needs."""
    l2_bits = cluster_bits - (4 if extended_l2 else 3)
    span = 1 << (cluster_bits + l2_bits)
    return (size + span - 1) // span


def parse_header(cluster0: bytes) -> Header:
    """Parse the header from the first bytes of the file (at least the whole of cluster 0 when
    the file has it). Raises FormatError or UnsupportedError."""
    if len(cluster0) < V2_HEADER_LENGTH:
        raise FormatError(None, "file too short for a qcow2 header")
    (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(cluster0, 0)
    if magic != MAGIC:
        raise FormatError(None, "not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise UnsupportedError(None, f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(None, f"unsupported cluster size: 2^{cluster_bits} bytes")
    cluster_size = 1 << cluster_bits
    h = Header(version=version, cluster_bits=cluster_bits, size=size, crypt_method=crypt,
               l1_size=l1_size, l1_table_offset=l1_off, refcount_table_offset=rt_off,
               refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
               snapshots_offset=snap_off, backing_file_offset=backing_off,
               backing_file_size=backing_len)
    if version == 2:
        h.header_length = V2_HEADER_LENGTH
        h.refcount_order = 4
    else:
        if len(cluster0) < V3_MIN_HEADER_LENGTH:
            raise FormatError(None, "file too short for a version 3 header")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3_EXTRA.unpack_from(cluster0, V2_HEADER_LENGTH)
        if h.header_length < V3_MIN_HEADER_LENGTH or h.header_length % 8:
            raise FormatError(None, f"invalid header length {h.header_length}")
        if h.header_length > cluster_size:
            raise FormatError(None, "header length larger than the cluster size")
        if h.header_length > len(cluster0):
            raise FormatError(None, "header runs past the end of the file")
        if h.refcount_order > 6:
            raise FormatError(None, f"invalid refcount order {h.refcount_order}")
        if h.header_length > 104:
            h.compression_type = cluster0[104]
            known_end = min(h.header_length, V3_HEADER_LENGTH)
            if any(cluster0[105:known_end]):
                # Padding QEMU defines as zero; keep whatever is there, it is harmless.
                pass
            h.unknown_header_fields = bytes(cluster0[V3_HEADER_LENGTH:h.header_length])
    if size > (1 << 63) - 1:
        raise FormatError(None, "virtual size too large")
    _parse_extensions(h, cluster0)
    _parse_backing_name(h, cluster0)
    _check_features(h)
    return h


def _extension_area_end(h: Header, available: int) -> int:
    cluster_size = h.cluster_size
    end = h.backing_file_offset if h.backing_file_offset else cluster_size
    return min(end, cluster_size, available)


def _parse_extensions(h: Header, buf: bytes) -> None:
    if h.backing_file_offset > h.cluster_size:
        raise FormatError(None, "backing file name offset lies outside cluster 0")
    pos = h.header_length
    end = _extension_area_end(h, len(buf))
    seen: set[int] = set()
    while pos + _EXT_HEAD.size <= end:
        magic, length = _EXT_HEAD.unpack_from(buf, pos)
        pos += _EXT_HEAD.size
        if magic == EXT_END:
            break
        if length > end - pos:
            raise FormatError(None, f"header extension 0x{magic:08x} too large")
        data = bytes(buf[pos:pos + length])
        pos += (length + 7) & ~7
        if magic in seen and magic != EXT_END:
            raise FormatError(None, f"header extension 0x{magic:08x} appears twice")
        seen.add(magic)
        if magic == EXT_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT:
                raise FormatError(None, "backing file format name too long")
            h.backing_format = _decode_name(data, "backing file format")
        elif magic == EXT_FEATURE_TABLE:
            for i in range(0, length - length % 48, 48):
                kind, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0]
                h.feature_names[(kind, bit)] = name.decode("utf-8", "replace")
        elif magic == EXT_BITMAPS:
            if length != _BITMAPS_EXT.size:
                raise FormatError(None, "bitmaps header extension has a bad length")
            nb, _reserved, dsize, doff = _BITMAPS_EXT.unpack(data)
            h.bitmaps = BitmapsExtension(nb, dsize, doff)
        elif magic == EXT_CRYPTO:
            if length != _CRYPTO_EXT.size:
                raise FormatError(None, "encryption header extension has a bad length")
            h.crypto = CryptoExtension(*_CRYPTO_EXT.unpack(data))
        elif magic == EXT_DATA_FILE:
            h.data_file = _decode_name(data, "data file name")
        else:
            h.unknown_extensions.append((magic, data))


def _decode_name(data: bytes, what: str) -> str:
    if b"\0" in data:
        raise FormatError(None, f"{what} contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(None, f"{what} is not valid UTF-8") from None


def _parse_backing_name(h: Header, buf: bytes) -> None:
    if not h.backing_file_offset:
        return
    length = h.backing_file_size
    if length > MAX_BACKING_NAME or length > h.cluster_size - h.backing_file_offset:
        raise FormatError(None, "backing file name too long")
    if h.backing_file_offset + length > len(buf):
        raise FormatError(None, "backing file name runs past the end of the file")
    if length:
        h.backing_file = _decode_name(bytes(buf[h.backing_file_offset:
                                                h.backing_file_offset + length]),
                                      "backing file name")


def _check_features(h: Header) -> None:
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = [h.feature_name(FEATURE_INCOMPAT, b) for b in range(64) if unknown >> b & 1]
        raise UnsupportedError(None, "unsupported qcow2 feature(s): " + ", ".join(names))
    if h.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
        raise FormatError(None, f"invalid encryption method {h.crypt_method}")
    if h.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise UnsupportedError(None, f"unknown compression type {h.compression_type}")
    has_bit = bool(h.incompatible_features & INCOMPAT_COMPRESSION)
    if has_bit != (h.compression_type != COMPRESSION_ZLIB):
        raise FormatError(None, "compression type bit does not match the compression type field")
    if h.extended_l2 and h.cluster_bits < 14:
        raise FormatError(None, "extended L2 entries need clusters of at least 16 KiB")
    if h.data_file_raw and not h.has_data_file:
        raise FormatError(None, "raw external data bit set without an external data file")
    if h.version == 2 and h.incompatible_features:
        raise FormatError(None, "version 2 image with feature bits")


def serialize_header(h: Header) -> bytes:
    """The bytes of cluster 0 up to the end of the backing file name (not padded to a cluster).

    Extensions are written in QEMU's order: backing format, data file, crypto, bitmaps, feature
    names, unknown ones; the backing file name follows the end marker. Sets
    ``h.backing_file_offset``/``backing_file_size`` to where the name went.
    """
    if h.version == 2:
        header_length = V2_HEADER_LENGTH
    else:
        header_length = V3_HEADER_LENGTH + len(h.unknown_header_fields)
    h.header_length = header_length
    name = h.backing_file.encode() if h.backing_file else b""
    if len(name) > MAX_BACKING_NAME:
        raise FormatError(None, "backing file name too long")
    for text in (h.backing_file, h.backing_format, h.data_file):
        if text and "\0" in text:
            raise FormatError(None, "names in the header cannot contain NUL bytes")
    # QEMU 7.2 writes the feature name table only for clusters over 4 KiB, where it cannot
    # crowd out a long backing name; when even then it does not fit, it is left out.
    for with_names in (h.cluster_size > FEATURE_TABLE_MIN_CLUSTER, False):
        ext = _serialize_extensions(h, with_names)
        total = header_length + len(ext) + len(name)
        if total <= h.cluster_size:
            break
    else:
        raise FormatError(None, "header, extensions and backing file name do not fit in cluster 0")
    backing_off = header_length + len(ext) if name else 0
    h.backing_file_offset, h.backing_file_size = backing_off, len(name)
    out = bytearray(_V2.pack(MAGIC, h.version, backing_off, len(name), h.cluster_bits, h.size,
                             h.crypt_method, h.l1_size, h.l1_table_offset,
                             h.refcount_table_offset, h.refcount_table_clusters,
                             h.nb_snapshots, h.snapshots_offset))
    if h.version >= 3:
        out += _V3_EXTRA.pack(h.incompatible_features, h.compatible_features,
                              h.autoclear_features, h.refcount_order, header_length)
        out += bytes([h.compression_type]) + b"\0" * 7
        out += h.unknown_header_fields
    out += ext
    out += name
    return bytes(out)


def _serialize_extensions(h: Header, with_feature_names: bool) -> bytes:
    ext = bytearray()

    def add(magic: int, data: bytes) -> None:
        ext.extend(_EXT_HEAD.pack(magic, len(data)))
        ext.extend(data)
        ext.extend(b"\0" * (-len(data) % 8))

    if h.backing_format:
        add(EXT_BACKING_FORMAT, h.backing_format.encode())
    if h.data_file:
        add(EXT_DATA_FILE, h.data_file.encode())
    if h.crypto:
        add(EXT_CRYPTO, _CRYPTO_EXT.pack(h.crypto.offset, h.crypto.length))
    if h.bitmaps:
        add(EXT_BITMAPS, _BITMAPS_EXT.pack(h.bitmaps.nb_bitmaps, 0, h.bitmaps.directory_size,
                                           h.bitmaps.directory_offset))
    if h.version >= 3 and with_feature_names:
        table = bytearray()
        for (kind, bit), text in sorted(STANDARD_FEATURE_NAMES.items()):
            table += bytes([kind, bit]) + text.encode().ljust(46, b"\0")
        add(EXT_FEATURE_TABLE, bytes(table))
    for magic, data in h.unknown_extensions:
        add(magic, data)
    ext.extend(_EXT_HEAD.pack(EXT_END, 0))
    return bytes(ext)


def pack_u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def pack_l1_pointer(l1_size: int, l1_offset: int) -> bytes:
    """The 12 bytes at OFF_L1: l1_size then l1_table_offset."""
    return struct.pack(">IQ", l1_size, l1_offset)


def pack_reftable_pointer(offset: int, clusters: int) -> bytes:
    """The 12 bytes at OFF_REFTABLE: refcount_table_offset then refcount_table_clusters."""
    return struct.pack(">QI", offset, clusters)


def pack_snapshots_pointer(nb: int, offset: int) -> bytes:
    """The 12 bytes at OFF_SNAPSHOTS: nb_snapshots then snapshots_offset."""
    return struct.pack(">IQ", nb, offset)
