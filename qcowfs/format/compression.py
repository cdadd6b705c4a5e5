"""Compressed clusters: raw deflate (window 4 KiB, as QEMU needs) and zstd frames."""

from __future__ import annotations

import threading
import zlib

from qcowfs.errors import FormatError
from qcowfs.format.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

_DEFLATE_WBITS = -12  # raw deflate with a 4 KiB window: QEMU cannot read larger windows


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Exactly ``cluster_size`` bytes from the compressed stream at the start of ``data``.

    ``data`` may run on past the stream (descriptors count whole sectors); a stream that ends
    short or is garbage raises FormatError. Output is capped at one cluster, so a hostile stream
    cannot make this allocate more.
    """
    if compression_type == COMPRESSION_ZLIB:
        try:
            d = zlib.decompressobj(_DEFLATE_WBITS)
            out = d.decompress(data, cluster_size)
        except zlib.error as exc:
            raise _undecompressable(exc) from None
    elif compression_type == COMPRESSION_ZSTD:
        out = _zstd_decompress(data, cluster_size)
    else:
        raise FormatError(None, f"unknown compression type {compression_type}")
    if len(out) != cluster_size:
        raise FormatError(None, "compressed cluster decompresses to the wrong size")
    return out


_per_thread = threading.local()


def _zstd_compressor(level: int):
    """One compressor per thread and level: making one costs about 20 us, a fifth of
    compressing a 64 KiB cluster, and one must not be shared between threads."""
    compressors = getattr(_per_thread, "zstd", None)
    if compressors is None:
        compressors = _per_thread.zstd = {}
    c = compressors.get(level)
    if c is None:
        import zstandard

        c = compressors[level] = zstandard.ZstdCompressor(level=level, write_content_size=False)
    return c


def _undecompressable(exc: Exception) -> FormatError:
    return FormatError(None, f"compressed cluster cannot be decompressed: {exc}")


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    # Loaded on the first zstd cluster: opening an image (and mounting it) does not pay for it.
    import zstandard

    # A cluster may be stored as several frames back to back; never produce more than a cluster.
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        out = bytearray()
        while len(out) < cluster_size:
            chunk = reader.read(cluster_size - len(out))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:
        raise _undecompressable(exc) from None
    return bytes(out)


def compress_cluster(data: bytes, compression_type: int, level: int | None = None) -> bytes | None:
    """The compressed form of one cluster, or None when it would not save a sector."""
    if compression_type == COMPRESSION_ZLIB:
        c = zlib.compressobj(level if level is not None else zlib.Z_DEFAULT_COMPRESSION,
                             zlib.DEFLATED, _DEFLATE_WBITS, 9)
        out = c.compress(data) + c.flush()
    elif compression_type == COMPRESSION_ZSTD:
        out = _zstd_compressor(level if level is not None else 3).compress(data)
    else:
        raise FormatError(None, f"unknown compression type {compression_type}")
    if len(out) + 512 > len(data):
        return None
    return out
