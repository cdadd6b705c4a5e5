"""Making a fresh image: the qcow2 layout ``qemu-img create`` makes, cluster for cluster.

A new qcow2 file is a header cluster, a one-cluster refcount table, one refcount block, the L1
table, and (with ``preallocation=metadata``) every L2 table and data cluster, allocated first-fit
in the order QEMU allocates them: for each L2 range, its table and then its data clusters. When
an allocation reaches clusters no refcount block covers yet, the new block goes to the first free
cluster after it, as QEMU places it. The same bytes land in the same places, so ``qemu-img info``
(disk size included) cannot tell the two apart.
"""

from __future__ import annotations

import errno
import os
from array import array

from qcowfs.errors import FormatError, HostIOError, ImageError
from qcowfs.format import header as hdr
from qcowfs.format.record import field, record
from qcowfs.format.tables import (
    COPIED,
    MAX_L1_BYTES,
    encode_refblock,
    encode_u64_table,
    refblock_entries,
)
from qcowfs.image.hostfile import HostFile

SECTOR = 512
FIRST_BLOCK = 4096  # QEMU writes the first block of a new raw file (alignment probing)


class CreateError(ImageError):
    """The options do not describe an image that can be made."""


@record
class QcowOptions:
    """What ``-o`` can say about a new qcow2 image (qemu-img's option names in comments)."""

    size: int
    cluster_size: int = 65536  # cluster_size
    version: int = 3  # compat: 0.10 -> 2, 1.1 -> 3
    refcount_bits: int = 16  # refcount_bits
    lazy_refcounts: bool = False  # lazy_refcounts
    extended_l2: bool = False  # extended_l2
    compression_type: int = hdr.COMPRESSION_ZLIB  # compression_type
    data_file: str | None = None  # data_file
    data_file_raw: bool = False  # data_file_raw
    preallocation: str = "off"  # preallocation: off | metadata
    backing_file: str | None = None
    backing_format: str | None = None
    encrypt_format: str | None = None  # encrypt.format: luks | aes (encryption=on: aes)
    #: the password (encrypt.key-secret's data)
    encrypt_key: bytes | None = None
    #: encrypt.cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg, iter-time
    encrypt_luks: dict = field(default_factory=dict)


#: off; metadata (every L2 table and data cluster allocated); falloc (and the data clusters'
#: host space allocated with fallocate); full (and zeros written there)
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def round_size(size: int) -> int:
    """Virtual sizes are whole 512-byte sectors (qemu-img rounds up)."""
    return (size + SECTOR - 1) // SECTOR * SECTOR


def validate(path: str, o: QcowOptions) -> None:
    """Refuse what qemu-img refuses, with its reasons."""
    def no(reason: str) -> CreateError:
        return CreateError(path, reason)

    cs = o.cluster_size
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise no("Cluster size must be a power of two between 512 and 2048k")
    rb = o.refcount_bits
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise no("Refcount width must be a power of two and may not exceed 64 bits")
    if o.version not in (2, 3):
        raise no(f"Invalid compatibility level: {o.version}")
    v3 = "compatibility level 1.1 and above (use version=v3 or greater)"
    if o.version < 3:
        if o.lazy_refcounts:
            raise no(f"Lazy refcounts only supported with {v3}")
        if rb != 16:
            raise no("Different refcount widths than 16 bits require compatibility level 1.1 "
                     "or above (use version=v3 or greater)")
        if o.extended_l2:
            raise no(f"Extended L2 entries are only supported with {v3}")
        if o.data_file:
            raise no(f"External data files are only supported with {v3}")
        if o.compression_type != hdr.COMPRESSION_ZLIB:
            raise no(f"Non-zlib compression type is only supported with {v3}")
    if o.extended_l2 and cs < 16384:
        raise no("Extended L2 entries are only supported with cluster sizes of at least "
                 "16384 bytes")
    if o.data_file_raw and not o.data_file:
        raise no("data-file-raw requires data-file")
    if o.preallocation not in PREALLOCATION_MODES:
        raise no(f"Parameter 'preallocation' does not accept value '{o.preallocation}'")
    if o.backing_file and o.preallocation != "off" and not o.extended_l2:
        raise no("Backing file and preallocation can only be used at the same time if "
                 "extended_l2 is on")
    if o.backing_file and not o.backing_format:
        raise no("Backing file specified without backing format")
    if o.backing_format and len(o.backing_format) > hdr.MAX_BACKING_FORMAT:
        raise no("backing format name too long")
    if o.encrypt_format not in (None, "luks", "aes"):
        raise no(f"Invalid parameter value for 'encrypt.format': '{o.encrypt_format}'")
    if o.encrypt_format and o.encrypt_key is None:
        raise no("Parameter 'encrypt.key-secret' is required for cipher")
    if o.size < 0:
        raise no("Image size must be positive")
    cluster_bits = cs.bit_length() - 1
    if hdr.l1_entries_needed(round_size(o.size), cluster_bits, o.extended_l2) * 8 > MAX_L1_BYTES:
        raise no("The image size is too large for file format 'qcow2' (try using a larger "
                 "cluster size)")


class _TableFull(Exception):
    pass


class _Layout:
    """First-fit cluster allocation with refcount blocks placed the way QEMU places them."""

    def __init__(self, cluster_size: int, refcount_order: int, table_clusters: int = 1):
        self.cs = cluster_size
        self.per_block = refblock_entries(cluster_size.bit_length() - 1, refcount_order)
        self.table_clusters = table_clusters
        self.table_entries = table_clusters * cluster_size // 8
        # header, refcount table, first refcount block
        self.used: set[int] = set(range(table_clusters + 2))
        self.refblocks: dict[int, int] = {0: table_clusters + 1}  # table index -> cluster
        self.free_index = table_clusters + 2
        self.crypto_cluster = 0
        self.data_runs: list[tuple[int, int]] = []

    def _find(self, n: int) -> int:
        start = self.free_index
        while True:
            run = range(start, start + n)
            taken = [c for c in run if c in self.used]
            if not taken:
                return start
            start = taken[-1] + 1

    def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters; returns the first cluster index."""
        while True:
            start = self._find(n)
            missing = sorted({c // self.per_block for c in range(start, start + n)}
                             - set(self.refblocks))
            if not missing:
                self.used.update(range(start, start + n))
                self.free_index = start + n
                return start
            # QEMU puts the new block at the first free cluster after the range, then retries
            # the allocation from where it began.
            self.free_index = start + n
            self._new_refblock(missing[0])
            self.free_index = start

    def _new_refblock(self, index: int) -> None:
        if index >= self.table_entries:
            raise _TableFull
        block = self._find(1)
        self.used.add(block)
        self.refblocks[index] = block
        self.free_index = block + 1
        own = block // self.per_block
        if own not in self.refblocks:
            self._new_refblock(own)

    def refblock_bytes(self, index: int, refcount_order: int) -> bytes:
        first = index * self.per_block
        values = [1 if c in self.used else 0 for c in range(first, first + self.per_block)]
        return encode_refblock(values, refcount_order)


def _plan(o: QcowOptions, size: int, l1_size: int, refcount_order: int, table_clusters: int,
          prealloc: bool, crypto_bytes: int = 0
          ) -> tuple[_Layout, int, array, list[tuple[int, array]], int]:
    """Where every cluster goes: (layout, L1 cluster, L1, [(L2 cluster, L2)], end of the
    last data cluster); ``layout.crypto_cluster`` is where a LUKS area of ``crypto_bytes``
    starts, ``layout.data_runs`` the (first cluster, count) runs of data clusters."""
    cs = o.cluster_size
    layout = _Layout(cs, refcount_order, table_clusters)
    l1_cluster = layout.alloc(-(-l1_size * 8 // cs)) if l1_size else 0
    layout.crypto_cluster = layout.alloc(-(-crypto_bytes // cs)) if crypto_bytes else 0
    l1 = array("Q", bytes(8 * l1_size))
    l2_tables: list[tuple[int, array]] = []
    last_data_end = 0
    if prealloc:
        entry_words = 2 if o.extended_l2 else 1
        l2_entries = cs // (8 * entry_words)
        guest_clusters = -(-size // cs)
        for i in range(l1_size):
            l2_cluster = layout.alloc(1)
            l1[i] = l2_cluster * cs | COPIED
            table = array("Q", bytes(cs))
            first = i * l2_entries
            count = min(l2_entries, guest_clusters - first)
            if o.data_file:
                hosts = [(first + j) * cs for j in range(count)]
            else:
                data = layout.alloc(count)
                layout.data_runs.append((data, count))
                hosts = [(data + j) * cs for j in range(count)]
                last_data_end = (data + count) * cs
            for j, host in enumerate(hosts):
                table[j * entry_words] = host | COPIED
            l2_tables.append((l2_cluster, table))

    return layout, l1_cluster, l1, l2_tables, last_data_end


def create_qcow2(path: str, o: QcowOptions) -> None:
    """Write a new qcow2 image at ``path`` (replacing any file there)."""
    validate(path, o)
    size = round_size(o.size)
    cs = o.cluster_size
    cluster_bits = cs.bit_length() - 1
    refcount_order = o.refcount_bits.bit_length() - 1
    prealloc = o.preallocation != "off" or o.data_file_raw
    l1_size = hdr.l1_entries_needed(size, cluster_bits, o.extended_l2)
    luks_area = b""
    if o.encrypt_format == "luks":
        from qcowfs.image.crypto import new_luks_area
        try:
            luks_area = new_luks_area(o.encrypt_key, **o.encrypt_luks)
        except ImageError as exc:
            raise CreateError(path, exc.reason) from None
    table_clusters = 1
    while True:
        try:
            layout, l1_cluster, l1, l2_tables, last_data_end = _plan(
                o, size, l1_size, refcount_order, table_clusters, prealloc, len(luks_area))
            break
        except _TableFull:
            # QEMU grows the refcount table as it goes; a table big enough from the start
            # is as valid, though laid out differently.
            table_clusters *= 2
    h = hdr.Header(version=o.version, cluster_bits=cluster_bits, size=size,
                   l1_size=l1_size, l1_table_offset=l1_cluster * cs if l1_size else 0,
                   refcount_table_offset=cs, refcount_table_clusters=table_clusters,
                   refcount_order=refcount_order, compression_type=o.compression_type,
                   backing_file=o.backing_file, backing_format=o.backing_format,
                   data_file=o.data_file)
    if o.encrypt_format == "aes":
        h.crypt_method = hdr.CRYPT_AES
    elif luks_area:
        h.crypt_method = hdr.CRYPT_LUKS
        h.crypto = hdr.CryptoExtension(layout.crypto_cluster * cs, len(luks_area))
    if o.version >= 3:
        if o.lazy_refcounts:
            h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
        if o.extended_l2:
            h.incompatible_features |= hdr.INCOMPAT_EXTL2
        if o.compression_type != hdr.COMPRESSION_ZLIB:
            h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
        if o.data_file:
            h.incompatible_features |= hdr.INCOMPAT_DATA_FILE
            if o.data_file_raw:
                h.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW
    try:
        header = hdr.serialize_header(h)
    except FormatError as exc:
        raise CreateError(path, exc.reason) from None

    reftable = array("Q", bytes(cs * table_clusters))
    for index, cluster in layout.refblocks.items():
        reftable[index] = cluster * cs

    if o.data_file:
        data_path = o.data_file if os.path.isabs(o.data_file) else os.path.join(
            os.path.dirname(path) or ".", o.data_file)
        create_raw(data_path, size)
        if prealloc:
            # QEMU's preallocation maps every guest cluster: the data file ends on a whole
            # (sub)cluster (and is not preallocated itself, whatever the mode)
            unit = cs // 32 if o.extended_l2 else cs
            d = HostFile(data_path, writable=True)
            try:
                d.truncate(-(-size // unit) * unit)
            finally:
                d.close()

    f = _create_file(path)
    try:
        f.write(0, header.ljust(cs, b"\0"))
        f.write(cs, encode_u64_table(reftable) + layout.refblock_bytes(0, refcount_order))
        for index, cluster in sorted(layout.refblocks.items()):
            if index:
                f.write(cluster * cs, layout.refblock_bytes(index, refcount_order))
        if l1_size:
            l1_bytes = encode_u64_table(l1)
            if prealloc:
                l1_bytes = l1_bytes.ljust(-(-len(l1_bytes) // SECTOR) * SECTOR, b"\0")
            f.write(l1_cluster * cs, l1_bytes)
        for cluster, table in l2_tables:
            f.write(cluster * cs, encode_u64_table(table))
        if luks_area:
            f.write(layout.crypto_cluster * cs, luks_area)
        if last_data_end > f.size:
            # The file ends with the (sub)cluster holding the last guest byte; QEMU zeroes
            # the rest of that (sub)cluster past the guest's end.
            sub = cs // 32 if o.extended_l2 and o.preallocation == "metadata" else cs
            used = size - (-(-size // cs) - 1) * cs
            last_host = last_data_end - cs
            host_end = last_host + -(-used // sub) * sub
            if host_end > last_host + used:
                f.write(last_host + used, bytes(host_end - last_host - used))
            f.truncate(max(f.size, host_end))
        if o.preallocation in ("falloc", "full") and not o.data_file:
            for first, count in layout.data_runs:
                start = first * cs
                _preallocate(f, start, min(start + count * cs, f.size) - start, o.preallocation)
        f.sync()
    finally:
        f.close()


def _preallocate(f: HostFile, offset: int, length: int, mode: str) -> None:
    """Host space for ``[offset, offset + length)``: allocated (falloc) or written with zeros
    (full), as QEMU preallocates the data clusters."""
    if length <= 0:
        return
    if mode == "falloc":
        try:
            os.posix_fallocate(f.fd, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise HostIOError.from_oserror(f.path, exc, "preallocation failed") from None
        # a file system without fallocate: zeros, as QEMU's fallback writes them
    chunk = bytes(min(length, 1 << 20))
    pos = offset
    while pos < offset + length:
        n = min(len(chunk), offset + length - pos)
        f.write(pos, memoryview(chunk)[:n])
        pos += n


def create_raw(path: str, size: int) -> None:
    """A sparse raw file of ``size`` bytes (rounded up to a sector) whose first block is
    written, as qemu-img creates them."""
    size = round_size(size)
    f = _create_file(path)
    try:
        f.truncate(size)
        if size:
            f.write(0, bytes(min(FIRST_BLOCK, size)))
        f.sync()
    finally:
        f.close()


def _create_file(path: str) -> HostFile:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostIOError.from_oserror(path, exc, "cannot create") from None
    os.close(fd)
    return HostFile(path, writable=True)
