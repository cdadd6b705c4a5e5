"""Images made by qemu-img/qemu-io for the CLI tests: one of each kind the reader handles.

Each builder takes a directory and returns the path of the image to inspect (backing files and
data files sit next to it). Small sizes keep the suite fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from qemutools import create, qemu_img, qemu_io

MiB = 1 << 20


def _plain(d: Path) -> Path:
    p = create(d / "plain.qcow2", "4M")
    qemu_io(p, "write -P 0x11 0 64k", "write -P 0x22 1M 192k", "write -z 2M 64k")
    return p


def _empty(d: Path) -> Path:
    return create(d / "empty.qcow2", "1M")


def _chain_raw_base(d: Path) -> Path:
    base = create(d / "base.raw", "6M", fmt="raw")
    qemu_io(base, "write -P 1 0 1M", "write -P 7 5M 64k", fmt="raw")
    mid = create(d / "mid.qcow2", "4M", backing=base.name, backing_fmt="raw")
    qemu_io(mid, "write -P 2 64k 64k", "write -z 3M 128k")
    top = create(d / "top.qcow2", "8M", backing=mid.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 3 1M 4k", "write -P 4 6M 64k")
    return top


def _chain_longer_backing(d: Path) -> Path:
    base = create(d / "lb-base.qcow2", "8M")
    qemu_io(base, "write -P 5 0 8M")
    return create(d / "lb-top.qcow2", "2M", backing=base.name, backing_fmt="qcow2")


def _snapshots(d: Path) -> Path:
    p = create(d / "snap.qcow2", "2M")
    qemu_io(p, "write -P 1 0 128k")
    qemu_img("snapshot", "-c", "first", str(p))
    qemu_io(p, "write -P 2 64k 128k")
    qemu_img("snapshot", "-c", "second", str(p))
    qemu_io(p, "write -P 3 1M 64k")
    return p


def _compressed_zlib(d: Path) -> Path:
    src = create(d / "czsrc.raw", "1M", fmt="raw")
    qemu_io(src, "write -P 0x61 0 256k", "write -P 0x62 512k 64k", fmt="raw")
    out = d / "zlib.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(out))
    qemu_io(out, "write -P 9 768k 64k")
    return out


def _compressed_zstd(d: Path) -> Path:
    src = create(d / "czstd.raw", "1M", fmt="raw")
    qemu_io(src, "write -P 0x71 0 128k", "write -P 0x72 640k 64k", fmt="raw")
    out = d / "zstd.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
             str(src), str(out))
    return out


def _extended_l2(d: Path) -> Path:
    base = create(d / "xbase.qcow2", "2M")
    qemu_io(base, "write -P 8 0 2M")
    p = create(d / "xl2.qcow2", "2M", backing=base.name, backing_fmt="qcow2",
               extended_l2=True, cluster_size="64k")
    qemu_io(p, "write -P 1 4k 4k", "write -z 8k 2k", "write -z 256k 64k", "write -P 2 1M 6k")
    return p


def _data_file(d: Path) -> Path:
    p = create(d / "df.qcow2", "2M", data_file="df.data")
    qemu_io(p, "write -P 3 0 64k", "write -P 4 1M 64k")
    return p


def _data_file_raw(d: Path) -> Path:
    p = create(d / "dfr.qcow2", "2M", data_file="dfr.data", data_file_raw=True,
               extended_l2=True, cluster_size="128k", lazy_refcounts=True, refcount_bits=64)
    qemu_io(p, "write -P 3 0 64k")
    return p


def _bitmaps(d: Path) -> Path:
    p = create(d / "bm.qcow2", "2M")
    qemu_img("bitmap", "--add", str(p), "b1")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", str(p), "b2")
    qemu_io(p, "write -P 1 0 64k")
    return p


def _v2(d: Path) -> Path:
    p = create(d / "v2.qcow2", "3M", compat="0.10", cluster_size="4k")
    qemu_io(p, "write -P 1 0 12k", "write -P 2 2M 4k")
    return p


def _small_clusters(d: Path) -> Path:
    p = create(d / "c512.qcow2", "1M", cluster_size="512", refcount_bits=1)
    qemu_io(p, "write -P 1 0 3k", "write -P 2 700k 1k")
    return p


def _big_clusters(d: Path) -> Path:
    p = create(d / "c2m.qcow2", "8M", cluster_size="2M", refcount_bits=8)
    qemu_io(p, "write -P 1 0 4k", "write -P 2 6M 4k")
    return p


def _prealloc_metadata(d: Path) -> Path:
    p = create(d / "prealloc.qcow2", "2M", preallocation="metadata")
    qemu_io(p, "write -P 1 64k 4k")
    return p


def _lazy_dirty(d: Path) -> Path:
    p = create(d / "dirty.qcow2", "1M", lazy_refcounts=True)
    # qemu-io killed by SIGKILL after a write leaves the dirty bit set
    from qemutools import run
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "sigraise 9", str(p),
        check=False)
    return p


def _huge_sparse(d: Path) -> Path:
    p = create(d / "huge.qcow2", "4T")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 3T 64k", "write -z 4095G 1M")
    return p


def _raw(d: Path) -> Path:
    p = create(d / "plain.raw", "2M", fmt="raw")
    qemu_io(p, "write -P 1 64k 64k", "write -P 2 1M 4k", fmt="raw")
    return p


def _relative_subdir(d: Path) -> Path:
    base = create(d / "rbase.qcow2", "1M")
    qemu_io(base, "write -P 1 0 64k")
    sub = d / "sub"
    sub.mkdir(exist_ok=True)
    return create(sub / "rtop.qcow2", "1M", backing="../rbase.qcow2", backing_fmt="qcow2")


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "plain": _plain,
    "empty": _empty,
    "chain_raw_base": _chain_raw_base,
    "chain_longer_backing": _chain_longer_backing,
    "snapshots": _snapshots,
    "compressed_zlib": _compressed_zlib,
    "compressed_zstd": _compressed_zstd,
    "extended_l2": _extended_l2,
    "data_file": _data_file,
    "data_file_raw": _data_file_raw,
    "bitmaps": _bitmaps,
    "v2": _v2,
    "clusters_512": _small_clusters,
    "clusters_2m": _big_clusters,
    "prealloc_metadata": _prealloc_metadata,
    "lazy_dirty": _lazy_dirty,
    "huge_sparse": _huge_sparse,
    "raw": _raw,
    "relative_subdir": _relative_subdir,
}


def build_samples(d: Path, names=None) -> dict[str, Path]:
    """Build the named sample images (all when ``names`` is None) in ``d``, working from
    ``d``: qemu-img names external data files relative to its working directory, and qcowfs
    looks for them beside the image."""
    old = os.getcwd()
    os.chdir(d)
    try:
        return {name: BUILDERS[name](d) for name in (names or BUILDERS)}
    finally:
        os.chdir(old)
