"""Property tests of the pure codecs in ``qcowfs.format``: round trips, and hostile bytes that
may only ever raise ``ImageError`` subclasses."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qcowfs.errors import FormatError, ImageError
from qcowfs.format import header as hdr
from qcowfs.format.compression import compress_cluster, decompress_cluster
from qcowfs.format.snapshot import SnapshotEntry, parse_snapshot_table, serialize_snapshot_table
from qcowfs.format.tables import (
    COMPRESSED,
    COPIED,
    ClusterKind,
    CompressedLayout,
    classify_l2_entry,
    decode_refblock,
    decode_u64_table,
    encode_refblock,
    encode_u64_table,
    refblock_entries,
    refcount_max,
    subcluster_kinds,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
KNOWN_EXTENSIONS = {hdr.EXT_END, hdr.EXT_BACKING_FORMAT, hdr.EXT_FEATURE_TABLE, hdr.EXT_BITMAPS,
                    hdr.EXT_CRYPTO, hdr.EXT_DATA_FILE}
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                min_size=1, max_size=40)


# --- header --------------------------------------------------------------------------------------


@st.composite
def headers(draw) -> hdr.Header:
    version = draw(st.sampled_from([2, 3]))
    cluster_bits = draw(st.integers(hdr.MIN_CLUSTER_BITS, hdr.MAX_CLUSTER_BITS))
    h = hdr.Header(
        version=version, cluster_bits=cluster_bits, size=draw(st.integers(0, 2**62)),
        crypt_method=hdr.CRYPT_NONE, l1_size=draw(u32), l1_table_offset=draw(u64),
        refcount_table_offset=draw(u64), refcount_table_clusters=draw(u32),
        nb_snapshots=draw(u32), snapshots_offset=draw(u64))
    if draw(st.booleans()):
        h.backing_file = draw(names)
        h.backing_format = draw(st.sampled_from([None, "raw", "qcow2"]))
    if version == 3:
        h.refcount_order = draw(st.integers(0, 6))
        incompat = draw(st.sampled_from([0, hdr.INCOMPAT_DIRTY, hdr.INCOMPAT_CORRUPT]))
        if draw(st.booleans()):
            h.compression_type = hdr.COMPRESSION_ZSTD
            incompat |= hdr.INCOMPAT_COMPRESSION
        if cluster_bits >= 14 and draw(st.booleans()):
            incompat |= hdr.INCOMPAT_EXTL2
        autoclear = draw(st.sampled_from([0, hdr.AUTOCLEAR_BITMAPS]))
        if draw(st.booleans()):
            incompat |= hdr.INCOMPAT_DATA_FILE
            h.data_file = draw(names)
            if draw(st.booleans()):
                autoclear |= hdr.AUTOCLEAR_DATA_FILE_RAW
        h.incompatible_features = incompat
        h.compatible_features = draw(st.sampled_from([0, hdr.COMPAT_LAZY_REFCOUNTS, 1 << 40]))
        h.autoclear_features = autoclear
        h.unknown_header_fields = draw(st.binary(max_size=3).map(lambda b: b * 8))
        if draw(st.booleans()):
            h.bitmaps = hdr.BitmapsExtension(draw(u32), draw(u64), draw(u64))
        h.unknown_extensions = draw(st.lists(
            st.tuples(u32.filter(lambda m: m not in KNOWN_EXTENSIONS), st.binary(max_size=40)),
            max_size=3, unique_by=lambda e: e[0]))
    return h


def _fields(h: hdr.Header) -> dict:
    keep = ("version", "cluster_bits", "size", "crypt_method", "l1_size", "l1_table_offset",
            "refcount_table_offset", "refcount_table_clusters", "nb_snapshots",
            "snapshots_offset", "incompatible_features", "compatible_features",
            "autoclear_features", "refcount_order", "compression_type", "unknown_header_fields",
            "backing_file", "backing_format", "data_file", "bitmaps", "crypto",
            "unknown_extensions", "header_length", "backing_file_offset", "backing_file_size")
    return {k: getattr(h, k) for k in keep}


@SETTINGS
@given(headers())
def test_header_serialize_parse_round_trip(h: hdr.Header):
    try:
        raw = hdr.serialize_header(h)
    except FormatError:
        # Everything must fit in cluster 0; small clusters cannot hold long names.
        assume(False)
    assert len(raw) <= h.cluster_size
    cluster0 = raw + bytes(h.cluster_size - len(raw))
    parsed = hdr.parse_header(cluster0)
    assert _fields(parsed) == _fields(h)
    if h.version == 3:
        # The table (8 + 8 * 48 bytes) is written, as QEMU writes it, for clusters over 4 KiB
        # where it fits.
        if parsed.feature_names:
            assert parsed.feature_names == hdr.STANDARD_FEATURE_NAMES
            assert h.cluster_size > 4096
        else:
            assert h.cluster_size <= 4096 or len(raw) + 8 + 384 > h.cluster_size
    assert hdr.serialize_header(parsed) == raw


@SETTINGS
@given(st.binary(max_size=4096))
def test_parse_header_on_arbitrary_bytes_raises_only_image_errors(data: bytes):
    try:
        hdr.parse_header(data)
    except ImageError:
        pass


@SETTINGS
@given(headers(), st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1,
                           max_size=12))
def test_parse_header_on_mutated_headers_raises_only_image_errors(h: hdr.Header, pokes):
    try:
        raw = bytearray(hdr.serialize_header(h))
    except FormatError:
        assume(False)
    raw += bytes(max(0, min(h.cluster_size, 1024) - len(raw)))
    for pos, value in pokes:
        if pos < len(raw):
            raw[pos] = value
    try:
        parsed = hdr.parse_header(bytes(raw))
    except ImageError:
        return
    assert 9 <= parsed.cluster_bits <= 21 and parsed.version in (2, 3)


@SETTINGS
@given(st.integers(9, 21), u32, u32, st.binary(max_size=64))
def test_parse_header_with_hostile_lengths_raises_only_image_errors(cluster_bits, header_length,
                                                                    ext_length, tail):
    raw = bytearray(struct.pack(">4sIQIIQIIQQIIQ", hdr.MAGIC, 3, 0, 0, cluster_bits, 1 << 20, 0,
                                1, 1 << cluster_bits, 2 << cluster_bits, 1, 0, 0))
    raw += struct.pack(">QQQII", 0, 0, 0, 4, header_length) + bytes(8)
    raw += struct.pack(">II", 0x12345678, ext_length) + tail
    try:
        hdr.parse_header(bytes(raw))
    except ImageError:
        pass


# --- refcount blocks -----------------------------------------------------------------------------


@st.composite
def refblocks(draw) -> tuple[int, int, list[int]]:
    order = draw(st.integers(0, 6))
    cluster_bits = draw(st.integers(9, 12))
    n = refblock_entries(cluster_bits, order)
    top = refcount_max(order)
    seed = draw(st.lists(st.one_of(st.integers(0, top), st.just(top)), min_size=1, max_size=97))
    return order, cluster_bits, (seed * (n // len(seed) + 1))[:n]


@SETTINGS
@given(refblocks())
def test_refblock_encode_decode_round_trip(block):
    order, cluster_bits, values = block
    raw = encode_refblock(values, order)
    assert len(raw) == 1 << cluster_bits
    assert decode_refblock(raw, order) == values


@SETTINGS
@given(st.integers(0, 6), st.binary(min_size=512, max_size=512))
def test_refblock_decode_encode_is_identity_on_bytes(order, raw):
    values = decode_refblock(raw, order)
    assert len(values) == refblock_entries(9, order)
    assert all(0 <= v <= refcount_max(order) for v in values)
    assert encode_refblock(values, order) == raw


def test_refblock_bit_order_of_narrow_widths():
    # Spec: for widths below 8 bits, bit 0 of a byte belongs to the first refcount.
    assert decode_refblock(b"\x01" + bytes(511), 0)[:8] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert decode_refblock(b"\x0e" + bytes(511), 1)[:4] == [2, 3, 0, 0]
    assert decode_refblock(b"\x21" + bytes(511), 2)[:2] == [1, 2]
    assert decode_refblock(b"\x01\x02" + bytes(510), 4)[0] == 0x0102


# --- compressed descriptors and data -------------------------------------------------------------


@SETTINGS
@given(st.data(), st.integers(9, 21))
def test_compressed_descriptor_round_trip_for_every_cluster_size(data, cluster_bits):
    layout = CompressedLayout(cluster_bits)
    host = data.draw(st.integers(0, min(layout.offset_mask, 2**56 - 1)))
    max_len = (layout.sectors_mask + 1) * 512 - (host & 511)
    length = data.draw(st.integers(1, max_len))
    entry = layout.encode(host, length)
    assert entry & COMPRESSED and not entry & COPIED
    got_host, got_len = layout.decode(entry)
    assert got_host == host
    assert length <= got_len < length + 512
    assert (host + got_len) % 512 == 0
    kind, _ = classify_l2_entry(entry, 3, False)
    assert kind == ClusterKind.COMPRESSED


@SETTINGS
@given(st.integers(9, 21), u64)
def test_compressed_descriptor_decode_of_any_entry_stays_in_its_fields(cluster_bits, entry):
    layout = CompressedLayout(cluster_bits)
    host, length = layout.decode(entry)
    assert 0 <= host < 1 << layout.sectors_shift
    assert 1 <= length <= (1 << cluster_bits) * 2


@SETTINGS
@given(st.integers(9, 21), st.sampled_from([hdr.COMPRESSION_ZLIB, hdr.COMPRESSION_ZSTD]),
       st.binary(max_size=8192))
def test_decompress_cluster_on_arbitrary_bytes_gives_one_cluster_or_format_error(
        cluster_bits, ctype, data):
    cs = 1 << cluster_bits
    try:
        out = decompress_cluster(data, cs, ctype)
    except FormatError:
        return
    assert isinstance(out, bytes) and len(out) == cs


@SETTINGS
@given(st.integers(9, 16), st.sampled_from([hdr.COMPRESSION_ZLIB, hdr.COMPRESSION_ZSTD]),
       st.binary(min_size=1, max_size=64), st.binary(max_size=600))
def test_compress_then_decompress_returns_the_cluster(cluster_bits, ctype, seed, trailer):
    cs = 1 << cluster_bits
    cluster = (seed * (cs // len(seed) + 1))[:cs]
    packed = compress_cluster(cluster, ctype)
    assume(packed is not None)
    # Descriptors count whole sectors, so whatever follows the stream is handed over too.
    assert decompress_cluster(packed + trailer, cs, ctype) == cluster


@settings(SETTINGS, max_examples=40)
@given(st.integers(9, 21), st.sampled_from([hdr.COMPRESSION_ZLIB, hdr.COMPRESSION_ZSTD]),
       st.integers(2, 16))
def test_decompress_never_returns_more_than_a_cluster(cluster_bits, ctype, factor):
    """A stream that expands to many clusters (a decompression bomb) yields one cluster or a
    FormatError, never more output."""
    cs = 1 << cluster_bits
    bomb = compress_cluster(bytes(cs * factor), ctype)
    assert bomb is not None
    try:
        out = decompress_cluster(bomb, cs, ctype)
    except FormatError:
        return
    assert len(out) == cs


@SETTINGS
@given(st.integers(2, 255), st.binary(max_size=100))
def test_decompress_with_unknown_type_is_a_format_error(ctype, data):
    try:
        decompress_cluster(data, 65536, ctype)
    except FormatError:
        return
    raise AssertionError("an unknown compression type was accepted")


# --- tables --------------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(u64, max_size=200))
def test_u64_table_round_trip_is_big_endian(values):
    from array import array
    raw = b"".join(struct.pack(">Q", v) for v in values)
    table = decode_u64_table(raw)
    assert table.tolist() == values
    assert encode_u64_table(array("Q", values)) == raw


@SETTINGS
@given(u64, st.sampled_from([2, 3]), st.booleans())
def test_classify_any_l2_entry_returns_a_kind_or_format_error(entry, version, data_file):
    try:
        kind, host = classify_l2_entry(entry, version, data_file)
    except FormatError:
        return
    assert isinstance(kind, ClusterKind)
    assert 0 <= host < 2**56 and host % 512 == 0


@SETTINGS
@given(u64, u64, st.booleans())
def test_subcluster_kinds_of_any_entry_returns_kinds_or_format_error(entry, bitmap, data_file):
    try:
        kind, host, kinds = subcluster_kinds(entry, bitmap, data_file)
    except FormatError:
        return
    assert kinds is None or len(kinds) == 32


# --- snapshot table ------------------------------------------------------------------------------


@st.composite
def snapshot_entries(draw) -> SnapshotEntry:
    unknown = draw(st.binary(max_size=48))
    return SnapshotEntry(
        id=draw(names), name=draw(st.text(max_size=30)), l1_table_offset=draw(u64),
        l1_size=draw(u32), date_sec=draw(u32), date_nsec=draw(st.integers(0, 10**9 - 1)),
        vm_clock_nsec=draw(u64), vm_state_size=draw(u64), disk_size=draw(u64),
        icount=draw(st.one_of(st.none(), st.integers(0, 2**64 - 2))),
        extra_data_size=24 + len(unknown), unknown_extra=unknown)


@SETTINGS
@given(st.lists(snapshot_entries(), max_size=8))
def test_snapshot_table_round_trip(entries):
    raw = serialize_snapshot_table(entries)
    assert len(raw) % 8 == 0
    parsed, used = parse_snapshot_table(raw + bytes(64), len(entries))
    assert used == len(raw)
    assert parsed == entries
    assert serialize_snapshot_table(parsed) == raw


@SETTINGS
@given(st.binary(max_size=2048), st.integers(0, 70000))
def test_parse_snapshot_table_on_arbitrary_bytes_raises_only_image_errors(data, count):
    try:
        entries, used = parse_snapshot_table(data, count)
    except ImageError:
        return
    assert len(entries) == count and used <= len(data)
