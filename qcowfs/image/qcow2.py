"""One open qcow2 file: header, L1 and L2 tables behind a cache, the data file, compressed
clusters, encryption and the snapshot table. What a guest range reads as through one L1 table
is :class:`qcowfs.image.mapping.Mapping`.
"""

from __future__ import annotations

import os
from array import array
from collections import OrderedDict

from qcowfs.errors import (
    BackingChainError,
    FormatError,
    HostIOError,
    ImageError,
    KeyRequiredError,
)
from qcowfs.format import header as hdr
from qcowfs.format.compression import decompress_cluster
from qcowfs.format.snapshot import (
    MAX_SNAPSHOTS,
    MAX_TABLE_BYTES,
    SnapshotEntry,
    SnapshotScan,
    parse_snapshot_table,
    scan_snapshot_table,
)
from qcowfs.format.tables import (
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    ClusterKind,
    CompressedLayout,
    decode_u64_table,
)
from qcowfs.image.cache import TableCache
from qcowfs.image.hostfile import HostFile
from qcowfs.image.mapping import Extent, Mapping, zero_fill

UNALLOCATED = ClusterKind.UNALLOCATED
ZERO = ClusterKind.ZERO
NORMAL = ClusterKind.NORMAL
COMPRESSED_KIND = ClusterKind.COMPRESSED

DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
COMPRESSED_CACHE_CLUSTERS = 16
READ_AHEAD_SPAN = 8 << 20  # the longest run of compressed streams read at once
_ZEROS = bytes(1 << 21)

class Qcow2Image:
    """An open qcow2 file. Opening reads cluster 0, the L1 table and the snapshot table: nothing
    in proportion to the virtual size."""

    format = "qcow2"

    def __init__(self, path: str, file: HostFile, header: hdr.Header, *,
                 l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES):
        self.path = path
        self.file = file
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.extended_l2 = header.extended_l2
        self.l2_bits = header.cluster_bits - (4 if self.extended_l2 else 3)
        self.l2_entries = 1 << self.l2_bits
        self.has_data_file = header.has_data_file
        self.data_file: HostFile = file
        self.compressed = CompressedLayout(header.cluster_bits)
        self.l2_cache: TableCache[array] = TableCache(
            max(16, l2_cache_bytes // self.cluster_size), self._load_l2)
        self._compressed_cache: OrderedDict[int, bytes] = OrderedDict()
        self.snapshots: list[SnapshotEntry] = []
        self.snapshot_table_bytes = 0
        #: set by ``open(scan_snapshots=True)``: what the snapshot table scan found
        self.snapshot_scan: SnapshotScan | None = None
        self.active: Mapping = Mapping(self, array("Q"), header.size, "active")
        self.writable = file.writable
        self.encrypted = header.crypt_method != hdr.CRYPT_NONE
        #: the data cipher; None for a plain image, or an encrypted one opened without a key
        self.crypto = None  # qcowfs.image.crypto.ImageCrypto once unlocked
        #: the LUKS header of a LUKS image (parsed at open; no key needed)
        self.luks = None
        #: an executor for ``decompress_ahead`` (set by convert and compare), or None
        self.decompressor = None

    # --- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, writable: bool = False,
             l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
             data_file_path: str | None = None, open_data_file: bool = True,
             scan_snapshots: bool = False, key: bytes | None = None,
             direct: bool = False) -> Qcow2Image:
        """Open ``path``. ``open_data_file=False`` leaves an external data file closed (for
        commands that only look at metadata, as qemu-img info does). ``scan_snapshots=True``
        (for check) reads a snapshot table the repair can fix -- more than 65536 entries,
        extra data over 1024 bytes, over 64 MiB -- keeping what QEMU's repair keeps and
        recording the rest in ``snapshot_scan``. ``key`` is the password of an encrypted
        image; without it the image opens for its metadata only (reads of its data raise
        :class:`KeyRequiredError`), as qemu-img info opens one. ``direct`` opens the file
        (and an external data file) for O_DIRECT as well (see :class:`HostFile`)."""
        file = HostFile(path, writable, direct=direct)
        try:
            header = read_header(file)
            image = cls(path, file, header, l2_cache_bytes=l2_cache_bytes)
            image.snapshot_scan = SnapshotScan([], 0) if scan_snapshots else None
            image._validate_and_load(data_file_path, open_data_file)
            if image.encrypted:
                image._load_crypto(key)
            return image
        except BaseException:
            file.close()
            raise

    def _validate_and_load(self, data_file_path: str | None, open_data_file: bool = True
                           ) -> None:
        h = self.header
        path = self.path
        cs = self.cluster_size
        if h.refcount_table_clusters == 0:
            raise FormatError(path, "image does not contain a reference count table")
        if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError(path, "reference count table too large")
        if h.refcount_table_offset % cs or not h.refcount_table_offset:
            raise FormatError(path, "invalid reference count table offset")
        if h.refcount_table_offset + h.refcount_table_clusters * cs > self.file.size:
            raise FormatError(path, "reference count table lies past the end of the file")
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise FormatError(path, "active L1 table too large")
        needed = hdr.l1_entries_needed(h.size, h.cluster_bits, h.extended_l2)
        if h.l1_size < needed:
            raise FormatError(path, "L1 table is too small")
        if h.l1_size and (h.l1_table_offset % cs or not h.l1_table_offset):
            raise FormatError(path, "invalid L1 table offset")
        if h.nb_snapshots > MAX_SNAPSHOTS and self.snapshot_scan is None:
            raise FormatError(path, f"too many snapshots ({h.nb_snapshots})")
        if h.nb_snapshots and (h.snapshots_offset % cs or not h.snapshots_offset):
            raise FormatError(path, "invalid snapshot table offset")
        if self.has_data_file and open_data_file:
            self._open_data_file(data_file_path)
        l1 = self.read_l1(h.l1_table_offset, h.l1_size, "active L1 table")
        self.active = Mapping(self, l1, h.size, "active")
        self._load_snapshot_table()

    def _load_crypto(self, key: bytes | None) -> None:
        """Parse the LUKS header (no key needed) and, given ``key``, unlock the data cipher.
        The crypto module (cryptography, numpy) loads only here."""
        from qcowfs.image import crypto

        h = self.header
        try:
            if h.crypt_method == hdr.CRYPT_LUKS:
                ext = h.crypto
                if ext is None:
                    raise FormatError(None, "LUKS image without an encryption header extension")
                if ext.offset % self.cluster_size or not ext.offset \
                        or ext.offset + ext.length > self.file.size:
                    raise FormatError(None, "encryption header lies at an invalid offset")

                def read(pos: int, n: int) -> bytes:
                    return self.file.read_exact(ext.offset + pos, n, "LUKS header")

                self.luks = crypto.read_luks_header(read, ext.length)
                if key is not None:
                    self.crypto = crypto.unlock_luks(read, ext.length, key)
            elif key is not None:
                self.crypto = crypto.legacy_aes(key)
        except ImageError as exc:
            raise type(exc)(self.path, exc.reason, errno=exc.errno) from None

    def require_key(self) -> None:
        if self.encrypted and self.crypto is None:
            raise KeyRequiredError(self.path, "the image is encrypted: give its key "
                                              "(encrypt.key-secret)")

    def _open_data_file(self, override: str | None) -> None:
        name = override or self.header.data_file
        if not name:
            raise FormatError(self.path, "image needs an external data file but names none")
        full = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.path), name)
        try:
            self.data_file = HostFile(full, self.file.writable, direct=self.file.direct)
        except HostIOError as exc:
            raise BackingChainError(self.path, f"cannot open external data file {full!r}: "
                                               f"{exc.reason}") from None

    def read_l1(self, offset: int, entries: int, what: str) -> array:
        if not entries:
            return array("Q")
        if offset + entries * 8 > self.file.size:
            raise FormatError(self.path, f"{what} runs past the end of the file")
        return decode_u64_table(self.file.read_exact(offset, entries * 8, what))

    def _load_snapshot_table(self) -> None:
        h = self.header
        if not h.nb_snapshots:
            return
        if h.snapshots_offset >= self.file.size:
            raise FormatError(self.path, "snapshot table lies past the end of the file")
        if self.snapshot_scan is not None:
            self._scan_snapshot_table()
            return
        want = min(64 * 1024, MAX_TABLE_BYTES)
        while True:
            avail = min(want, self.file.size - h.snapshots_offset, MAX_TABLE_BYTES)
            buf = self.file.read(h.snapshots_offset, avail)
            try:
                self.snapshots, self.snapshot_table_bytes = parse_snapshot_table(
                    buf, h.nb_snapshots)
                return
            except FormatError as exc:
                if "runs past" in exc.reason and avail == want and want < MAX_TABLE_BYTES:
                    want *= 4
                    continue
                raise FormatError(self.path, exc.reason) from None

    def _scan_snapshot_table(self) -> None:
        h = self.header
        window: list = [0, b""]  # (table position, bytes): reads in 1 MiB windows

        def read(pos: int, n: int) -> bytes:
            start, buf = window
            if pos < start or pos + n > start + len(buf):
                if n > 1 << 20:
                    return self.file.read(h.snapshots_offset + pos, n)
                window[0], window[1] = pos, self.file.read(h.snapshots_offset + pos, 1 << 20)
                start, buf = window
            return buf[pos - start:pos - start + n]

        try:
            scan = scan_snapshot_table(read, h.nb_snapshots)
        except FormatError as exc:
            raise FormatError(self.path, exc.reason) from None
        self.snapshot_scan = scan
        self.snapshots, self.snapshot_table_bytes = scan.entries, scan.disk_bytes

    # --- tables -----------------------------------------------------------------------------

    def _load_l2(self, offset: int) -> array:
        cs = self.cluster_size
        if offset & (cs - 1):
            raise FormatError(self.path, f"L2 table at unaligned offset {offset}")
        clash = self.metadata_overlap(offset, cs)
        if clash:
            raise FormatError(self.path, f"L2 table at offset {offset} overlaps {clash}")
        if offset + cs > self.file.size:
            self.file.refresh_size()
            if offset + cs > self.file.size:
                raise FormatError(self.path, f"L2 table at offset {offset} lies past the end of "
                                             f"the file")
        return decode_u64_table(self.file.read_exact(offset, cs, "L2 table"))

    def l2_table(self, offset: int) -> array:
        return self.l2_cache.get(offset)

    def metadata_overlap(self, offset: int, length: int) -> str | None:
        """Which fixed metadata area of this file (the header cluster, the active L1 table,
        the refcount table) ``[offset, offset + length)`` overlaps, or None."""
        h = self.header
        end = offset + length
        if offset < self.cluster_size:
            return "the header"
        if offset < h.l1_table_offset + h.l1_size * 8 and h.l1_table_offset < end:
            return "the active L1 table"
        rt = h.refcount_table_offset
        if offset < rt + h.refcount_table_clusters * self.cluster_size and rt < end:
            return "the refcount table"
        return None

    def read_data_bytes(self, host: int, length: int) -> bytes | None:
        """``length`` bytes of guest data at ``host``, or None when they run past the end of
        the data file (then :meth:`read_data` decides)."""
        if self.encrypted:
            return None
        f = self.data_file
        if f is self.file:
            clash = self.metadata_overlap(host, length)
            if clash:
                raise FormatError(self.path, f"data cluster at host offset {host} overlaps "
                                             f"{clash}")
        data = f.read(host, length)
        return data if len(data) == length else None

    def read_data(self, buf: memoryview, host: int, guest: int) -> None:
        """Read guest data stored at ``host`` (guest offset ``guest``) in the data file;
        zeros past its end. Encrypted data is read in whole sectors and decrypted."""
        if self.encrypted:
            self._read_encrypted(buf, host, guest)
            return
        self._read_plain(buf, host)

    def _read_encrypted(self, buf: memoryview, host: int, guest: int) -> None:
        crypto = self.crypto
        if crypto is None:
            self.require_key()
        head = host & 511
        n = len(buf)
        span = (head + n + 511) & ~511
        if not head and span == n:
            self._read_plain(buf, host)
            crypto.decrypt_into(buf, host, guest)
            return
        raw = memoryview(bytearray(span))
        self._read_plain(raw, host - head)
        buf[:] = crypto.decrypt(raw, host - head, guest - head)[head:head + n]

    def _read_plain(self, buf: memoryview, host: int) -> None:
        f = self.data_file
        if f is self.file:
            clash = self.metadata_overlap(host, len(buf))
            if clash:
                raise FormatError(self.path, f"data cluster at host offset {host} overlaps "
                                             f"{clash}")
        got = f.readinto(buf, host)
        if got < len(buf):
            # Past the end of the file: the tail of a last, partly written cluster reads as
            # zeros; a whole cluster out there is a broken pointer.
            cs = self.cluster_size
            eof = f.refresh_size()
            if not self.header.data_file_raw and (eof + cs - 1) // cs * cs < host + len(buf):
                raise FormatError(self.path, f"data cluster at host offset {host + got} lies "
                                             f"past the end of {f.path}")
            zero_fill(buf[got:])

    def compressed_cluster(self, entry: int, ahead: dict | None = None) -> bytes:
        """The decompressed cluster a compressed L2 entry describes (small LRU cache);
        ``ahead`` holds the clusters ``decompress_ahead`` started."""
        cache = self._compressed_cache
        data = cache.get(entry)
        if data is not None:
            cache.move_to_end(entry)
            return data
        host, length = self.compressed.decode(entry)
        started = ahead.get(entry) if ahead else None
        if started is not None:
            data = started.result()
        else:
            if host >= self.file.size:
                raise FormatError(self.path, f"compressed cluster at host offset {host} lies "
                                             f"past the end of the file")
            data = self._decompress(self.file.read(host, length), host)
        cache[entry] = data
        if len(cache) > COMPRESSED_CACHE_CLUSTERS:
            cache.popitem(last=False)
        return data

    def _decompress(self, raw: bytes, host: int) -> bytes:
        try:
            return decompress_cluster(raw, self.cluster_size, self.header.compression_type)
        except FormatError as exc:
            raise FormatError(self.path, f"{exc.reason} (host offset {host})") from None

    def decompress_ahead(self, extents: list[Extent]) -> dict:
        """Start decompressing the compressed clusters among ``extents`` on
        ``self.decompressor`` (zlib and zstandard release the GIL, so a copy decompresses on
        every core): {L2 entry: future}. Streams that lie together (QEMU packs them
        back to back) are read with one ``pread``; the rest of the checks stay in
        ``compressed_cluster``, which takes the results."""
        cache = self._compressed_cache
        wanted: dict[int, tuple[int, int]] = {}
        for e in extents:
            if e.kind == COMPRESSED_KIND and e.entry not in cache and e.entry not in wanted:
                host, length = self.compressed.decode(e.entry)
                if host < self.file.size:
                    wanted[e.entry] = (host, length)
        futures: dict = {}
        if len(wanted) < 2:
            return futures
        order = sorted(wanted.items(), key=lambda item: item[1][0])
        i = 0
        while i < len(order):
            start = order[i][1][0]
            end = start + order[i][1][1]
            j = i + 1
            while j < len(order) and order[j][1][0] <= end + 4096 \
                    and order[j][1][0] + order[j][1][1] - start <= READ_AHEAD_SPAN:
                end = max(end, order[j][1][0] + order[j][1][1])
                j += 1
            blob = self.file.read(start, end - start)
            for entry, (host, length) in order[i:j]:
                raw = blob[host - start:host - start + length]
                futures[entry] = self.decompressor.submit(self._decompress, raw, host)
            i = j
        return futures

    # --- snapshots --------------------------------------------------------------------------

    def find_snapshot(self, id_or_name: str) -> SnapshotEntry:
        """By id first, then by name (QEMU's order); a name two snapshots share is ambiguous."""
        for s in self.snapshots:
            if s.id == id_or_name:
                return s
        named = [s for s in self.snapshots if s.name == id_or_name]
        if len(named) == 1:
            return named[0]
        if named:
            raise ImageError(self.path, f"snapshot name {id_or_name!r} is ambiguous; use its id")
        raise ImageError(self.path, f"no snapshot with id or name {id_or_name!r}")

    def snapshot_mapping(self, snap: SnapshotEntry) -> Mapping:
        size = snap.disk_size if snap.disk_size is not None else self.header.size
        cs = self.cluster_size
        what = f"L1 table of snapshot {snap.id}"
        if snap.l1_size * 8 > MAX_L1_BYTES:
            raise FormatError(self.path, f"{what} too large")
        if snap.l1_size < hdr.l1_entries_needed(size, self.cluster_bits, self.extended_l2):
            raise FormatError(self.path, f"{what} too small for its disk size")
        if snap.l1_size and (snap.l1_table_offset % cs or not snap.l1_table_offset):
            raise FormatError(self.path, f"{what} at invalid offset {snap.l1_table_offset}")
        l1 = self.read_l1(snap.l1_table_offset, snap.l1_size, what)
        return Mapping(self, l1, size, f"snapshot {snap.id}")

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self.data_file is not self.file:
            self.data_file.close()
        self.file.close()


def read_header(file: HostFile) -> hdr.Header:
    """Parse cluster 0 of ``file``; errors name the file."""
    head = file.read(0, 104)
    if len(head) < 4 or head[:4] != hdr.MAGIC:
        raise FormatError(file.path, "not a qcow2 image")
    if len(head) < 24:
        raise FormatError(file.path, "file too short for a qcow2 header")
    cluster_bits = int.from_bytes(head[20:24], "big")
    if not hdr.MIN_CLUSTER_BITS <= cluster_bits <= hdr.MAX_CLUSTER_BITS:
        raise FormatError(file.path, f"unsupported cluster size: 2^{cluster_bits} bytes")
    cluster0 = file.read(0, 1 << cluster_bits)
    try:
        return hdr.parse_header(cluster0)
    except ImageError as exc:
        raise type(exc)(file.path, exc.reason) from None


def is_qcow2(file: HostFile) -> bool:
    return file.read(0, 4) == hdr.MAGIC
