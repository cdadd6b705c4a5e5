"""L1/L2 table entries, compressed cluster descriptors and refcount blocks.

Tables are decoded into ``array('Q')`` of native integers in one step (byteswap), so lookups cost
an index, not a struct call. Extended L2 tables decode into the same array with two words per
entry: the descriptor, then the subcluster bitmap.
"""

from __future__ import annotations

import sys
from array import array
from enum import IntEnum

from qcowfs.errors import FormatError

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
MAX_HOST_OFFSET = 1 << 56
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
SUBCLUSTERS = 32
SUB_ALLOC_MASK = 0xFFFFFFFF

_SWAP = sys.byteorder == "little"  # the disk is big-endian


def decode_u64_table(buf: bytes | bytearray | memoryview) -> array:
    """Big-endian u64s -> native array('Q'). ``len(buf)`` must be a multiple of 8."""
    table = array("Q")
    table.frombytes(buf)
    if _SWAP:
        table.byteswap()
    return table


def encode_u64_table(table: array) -> bytes:
    """Native array('Q') -> big-endian bytes."""
    if _SWAP:
        out = array("Q", table)
        out.byteswap()
        return out.tobytes()
    return table.tobytes()


class ClusterKind(IntEnum):
    """What a guest cluster (or subcluster) is, as the L2 entry says."""

    UNALLOCATED = 0  # read from the backing file, or zeros
    ZERO = 1  # reads as zeros (with or without a preallocated host cluster)
    NORMAL = 2  # data at a host offset
    COMPRESSED = 3  # compressed data at a host byte offset


def check_l1_entry(entry: int) -> int:
    """The L2 table offset an L1 entry points at (0 = none). Raises on reserved bits."""
    if entry & L1E_RESERVED_MASK:
        raise FormatError(None, f"L1 entry 0x{entry:016x} has reserved bits set")
    return entry & L1E_OFFSET_MASK


class CompressedLayout:
    """How a compressed descriptor splits into host offset and sector count for a cluster size."""

    __slots__ = ("cluster_bits", "offset_mask", "sectors_shift", "sectors_mask")

    def __init__(self, cluster_bits: int):
        self.cluster_bits = cluster_bits
        self.sectors_shift = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.sectors_shift) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def decode(self, entry: int) -> tuple[int, int]:
        """(host byte offset, bytes to read) for a compressed L2 entry.

        The length is where the last 512-byte sector ends, so it may include a few bytes of the
        next compressed cluster: decompressors stop at the end of their stream.
        """
        host = entry & self.offset_mask
        sectors = ((entry >> self.sectors_shift) & self.sectors_mask) + 1
        length = sectors * 512 - (host & 511)
        return host, length

    def encode(self, host_offset: int, compressed_length: int) -> int:
        """The L2 entry (with bit 62 set) for ``compressed_length`` bytes at ``host_offset``."""
        end = host_offset + compressed_length
        sectors = ((end + 511) >> 9) - (host_offset >> 9)
        if sectors < 1 or sectors - 1 > self.sectors_mask:
            raise FormatError(None, "compressed cluster too large for its descriptor")
        if host_offset > self.offset_mask:
            raise FormatError(None, "compressed cluster offset too large")
        return COMPRESSED | ((sectors - 1) << self.sectors_shift) | host_offset


def classify_l2_entry(entry: int, version: int, has_data_file: bool) -> tuple[ClusterKind, int]:
    """(kind, host offset) of a standard (not extended) L2 entry; raises on invalid entries."""
    if entry & COMPRESSED:
        if has_data_file:
            raise FormatError(None, "compressed cluster in an image with an external data file")
        if entry & COPIED:
            raise FormatError(None, f"compressed L2 entry 0x{entry:016x} has the COPIED flag")
        return ClusterKind.COMPRESSED, 0
    if entry & L2E_STD_RESERVED_MASK:
        raise FormatError(None, f"L2 entry 0x{entry:016x} has reserved bits set")
    host = entry & L2E_OFFSET_MASK
    if entry & ZERO_FLAG:
        if version < 3:
            raise FormatError(None, "zero cluster entry in a version 2 image")
        return ClusterKind.ZERO, host
    if host:
        return ClusterKind.NORMAL, host
    if entry & COPIED and has_data_file:
        return ClusterKind.NORMAL, 0
    return ClusterKind.UNALLOCATED, 0


def subcluster_kinds(entry: int, bitmap: int, has_data_file: bool
                     ) -> tuple[ClusterKind, int, list[ClusterKind] | None]:
    """Classify an extended L2 entry: (cluster kind, host offset, per-subcluster kinds).

    The third value is None when the whole cluster is one kind (compressed, or no bitmap bits).
    """
    if entry & COMPRESSED:
        if has_data_file:
            raise FormatError(None, "compressed cluster in an image with an external data file")
        if entry & COPIED:
            raise FormatError(None, f"compressed L2 entry 0x{entry:016x} has the COPIED flag")
        return ClusterKind.COMPRESSED, 0, None
    if entry & (L2E_STD_RESERVED_MASK | ZERO_FLAG):
        raise FormatError(None, f"extended L2 entry 0x{entry:016x} has reserved bits set")
    host = entry & L2E_OFFSET_MASK
    allocated = host != 0 or bool(entry & COPIED and has_data_file)
    alloc_bits = bitmap & SUB_ALLOC_MASK
    zero_bits = bitmap >> 32
    if alloc_bits & zero_bits:
        raise FormatError(None, "extended L2 entry marks a subcluster both allocated and zero")
    if not allocated and alloc_bits:
        raise FormatError(None, "extended L2 entry allocates subclusters of an unallocated cluster")
    kinds = []
    for i in range(SUBCLUSTERS):
        if alloc_bits >> i & 1:
            kinds.append(ClusterKind.NORMAL)
        elif zero_bits >> i & 1:
            kinds.append(ClusterKind.ZERO)
        else:
            kinds.append(ClusterKind.UNALLOCATED)
    kind = ClusterKind.NORMAL if allocated else ClusterKind.UNALLOCATED
    return kind, host, kinds


# --- refcount blocks ---------------------------------------------------------------------------

_ARRAY_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def decode_refblock(buf: bytes | bytearray, refcount_order: int) -> list[int]:
    """All refcounts in one refcount block, as a list of ints."""
    code = _ARRAY_CODES.get(refcount_order)
    if code is not None:
        values = array(code)
        values.frombytes(buf)
        if _SWAP and code != "B":
            values.byteswap()
        return values.tolist()
    bits = 1 << refcount_order
    mask = (1 << bits) - 1
    per_byte = 8 // bits
    return [(byte >> (i * bits)) & mask for byte in buf for i in range(per_byte)]


def encode_refblock(values: list[int], refcount_order: int) -> bytes:
    """Inverse of decode_refblock."""
    code = _ARRAY_CODES.get(refcount_order)
    if code is not None:
        arr = array(code, values)
        if _SWAP and code != "B":
            arr.byteswap()
        return arr.tobytes()
    bits = 1 << refcount_order
    per_byte = 8 // bits
    out = bytearray(len(values) // per_byte)
    for i, v in enumerate(values):
        out[i // per_byte] |= v << ((i % per_byte) * bits)
    return bytes(out)


def refcount_max(refcount_order: int) -> int:
    return (1 << (1 << refcount_order)) - 1


def refblock_entries(cluster_bits: int, refcount_order: int) -> int:
    """How many refcounts one refcount block holds."""
    return 1 << (cluster_bits + 3 - refcount_order)
