"""check: the same verdict as qemu-img check (exit code, counts, JSON) on clean, dirty, leaked
and corrupted images; each repair leaves an image qemu-img check finds clean, with the guest
data unchanged."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import qcowfs, two_copies
from qemutools import create, poke, qemu_img, qemu_io, run


def header(path: Path) -> dict:
    d = path.read_bytes()[:112]
    return {"cluster_size": 1 << struct.unpack(">I", d[20:24])[0],
            "l1_offset": struct.unpack(">Q", d[40:48])[0],
            "reftable": struct.unpack(">Q", d[48:56])[0],
            "refcount_order": struct.unpack(">I", d[96:100])[0] if d[7] == 3 else 4}


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def set_refcount16(path: Path, cluster: int, value: int) -> None:
    h = header(path)
    assert h["refcount_order"] == 4
    block = u64(path, h["reftable"]) & ~511
    poke(path, block + 2 * cluster, struct.pack(">H", value))


def l2_offset(path: Path, index: int = 0) -> int:
    return u64(path, header(path)["l1_offset"] + 8 * index) & 0x00FFFFFFFFFFFE00


def base_image(d: Path, **opts) -> Path:
    p = create(d / "img.qcow2", "2M", **opts)
    qemu_io(p, "write -P 1 0 128k", "write -P 2 1M 64k")
    return p


def leak_by_bumping(d: Path) -> Path:
    p = base_image(d)
    set_refcount16(p, l2_offset(p) // 65536, 2)
    return p


def refcount_zero(d: Path) -> Path:
    p = base_image(d)
    set_refcount16(p, l2_offset(p) // 65536 + 1, 0)  # a data cluster
    return p


def refcount_too_low(d: Path) -> Path:
    p = base_image(d)
    qemu_img("snapshot", "-c", "s1", str(p))
    data = u64(p, l2_offset(p)) & 0x00FFFFFFFFFFFE00
    set_refcount16(p, data // 65536, 1)  # shared with the snapshot: should be 2
    return p


def l1_copied_cleared(d: Path) -> Path:
    p = base_image(d)
    off = header(p)["l1_offset"]
    poke(p, off, struct.pack(">Q", u64(p, off) & ~(1 << 63)))
    return p


def l2_copied_cleared(d: Path) -> Path:
    p = base_image(d)
    off = l2_offset(p)
    poke(p, off, struct.pack(">Q", u64(p, off) & ~(1 << 63)))
    return p


def copied_on_shared(d: Path) -> Path:
    p = base_image(d)
    qemu_img("snapshot", "-c", "s1", str(p))
    off = l2_offset(p)  # the active L2 after the snapshot is still shared (refcount 2)
    poke(p, off, struct.pack(">Q", u64(p, off) | (1 << 63)))
    return p


def dirty_lazy(d: Path) -> Path:
    p = create(d / "img.qcow2", "2M", lazy_refcounts=True)
    qemu_io(p, "write -P 1 0 64k")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 128k", "-c", "sigraise 9", str(p),
        check=False)
    return p


def unaligned_l2(d: Path) -> Path:
    p = create(d / "img.qcow2", "2M")
    qemu_io(p, "write -P 0 1M 64k")  # the misread table runs into this zeroed cluster
    off = header(p)["l1_offset"]
    poke(p, off, struct.pack(">Q", u64(p, off) + 512))
    return p


def unaligned_data(d: Path) -> Path:
    p = base_image(d)
    off = l2_offset(p)
    poke(p, off, struct.pack(">Q", u64(p, off) + 512))
    return p


def unaligned_copied_past_eof(d: Path) -> Path:
    """The last data cluster's entry moved 512 bytes in, COPIED kept, and the file cut there:
    QEMU does not count a reference past the end, so the repair frees that cluster as a leak
    and then clears the flag its refcount of 0 no longer allows (a ``make fuzz`` find)."""
    p = base_image(d)
    off = l2_offset(p) + 8 * ((1 << 20) // 65536)
    host = u64(p, off) & ((1 << 56) - 512)
    poke(p, off, struct.pack(">Q", (host + 512) | (1 << 63)))
    assert host + 65536 == p.stat().st_size
    os.truncate(p, host + 512)
    return p


def zero_alloc_unaligned(d: Path) -> Path:
    """A preallocated zero cluster whose offset is 512 bytes off: QEMU's repair makes it a
    plain zero cluster during its walk and counts no reference for it (``-r leaks`` and a
    plain check only report it)."""
    p = base_image(d)
    off = l2_offset(p) + 8
    host = u64(p, off) & ((1 << 56) - 512)
    poke(p, off, struct.pack(">Q", (host + 512) | 1 | (1 << 63)))
    return p


def refblock_unaligned(d: Path) -> Path:
    p = base_image(d)
    rt = header(p)["reftable"]
    poke(p, rt, struct.pack(">Q", u64(p, rt) + 512))
    return p


def leaked_small_clusters(d: Path) -> Path:
    p = create(d / "img.qcow2", "1M", cluster_size="512", refcount_bits=1)
    qemu_io(p, "write -P 1 0 8k")
    # a cluster past everything, counted but unused: grow the file and mark it
    size = p.stat().st_size
    with open(p, "ab") as f:
        f.write(bytes(512 * 4))
    h = header(p)
    block = u64(p, h["reftable"]) & ~511
    cluster = size // 512 + 1
    with open(p, "r+b") as f:
        f.seek(block + cluster // 8)
        byte = f.read(1)[0]
        f.seek(block + cluster // 8)
        f.write(bytes([byte | 1 << (cluster % 8)]))
    return p


def leaked_wide_refcounts(d: Path) -> Path:
    p = create(d / "img.qcow2", "2M", refcount_bits=64, extended_l2=True)
    qemu_io(p, "write -P 1 4k 8k", "write -P 2 1M 64k")
    h = header(p)
    block = u64(p, h["reftable"]) & ~511
    poke(p, block + 8 * 2, struct.pack(">Q", 5))  # the refblock itself
    return p


def compressed_leak(d: Path) -> Path:
    src = create(d / "src.raw", "1M", fmt="raw")
    qemu_io(src, "write -P 7 0 512k", fmt="raw")
    p = d / "img.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(p))
    set_refcount16(p, 0, 3)
    return p


def data_file_leak(d: Path) -> Path:
    p = create(d / "img.qcow2", "2M", data_file=str(d / "img.data"))
    qemu_io(p, "write -P 1 0 64k")
    set_refcount16(p, 2, 2)
    return p


def l2_is_the_l1(d: Path) -> Path:
    """The L1 entry points its L2 table at the L1 table itself (overlapping metadata)."""
    p = base_image(d)
    off = header(p)["l1_offset"]
    poke(p, off, struct.pack(">Q", (1 << 63) | off))
    return p


# --- tables that are one run of contiguous clusters (the numpy-free whole-table path) ---


def run_image(d: Path, **opts) -> Path:
    p = create(d / "img.qcow2", "2M", **opts)
    qemu_io(p, "write -P 1 0 256k")  # one L2 table: four contiguous data clusters, then zeros
    return p


def run_data_cluster(p: Path, k: int) -> int:
    return (u64(p, l2_offset(p) + 8 * k) & 0x00FFFFFFFFFFFE00) // 65536


def run_leak(d: Path) -> Path:
    p = run_image(d)
    set_refcount16(p, run_data_cluster(p, 2), 2)  # a leak, and COPIED now wrong
    return p


def run_refcount_zero(d: Path) -> Path:
    p = run_image(d)
    set_refcount16(p, run_data_cluster(p, 3), 0)
    return p


def run_shared(d: Path) -> Path:
    p = run_image(d)
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 5 1M 64k")  # the active table is copied; its data stays shared
    return p


def run_copied_cleared(d: Path) -> Path:
    p = run_image(d)
    off = l2_offset(p)
    for k in range(4):
        poke(p, off + 8 * k, struct.pack(">Q", u64(p, off + 8 * k) & ~(1 << 63)))
    return p


def run_past_eof(d: Path) -> Path:
    p = run_image(d)
    off = l2_offset(p)
    far = 1 << 30  # the run moved one GiB up: every cluster past the end of the file
    for k in range(4):
        poke(p, off + 8 * k, struct.pack(">Q", u64(p, off + 8 * k) + far))
    return p


def run_refblock_unaligned(d: Path) -> Path:
    p = run_image(d)
    rt = header(p)["reftable"]
    poke(p, rt, struct.pack(">Q", u64(p, rt) + 512))
    return p


def run_wide_refcounts(d: Path) -> Path:
    p = run_image(d, refcount_bits=32)
    h = header(p)
    block = u64(p, h["reftable"]) & ~511
    poke(p, block + 4 * run_data_cluster(p, 1), struct.pack(">I", 7))
    return p


def run_one_bit_refcounts(d: Path) -> Path:
    return run_image(d, refcount_bits=1)


CASES: dict[str, Callable[[Path], Path]] = {
    "run_clean": run_image,
    "run_leak": run_leak,
    "run_refcount_zero": run_refcount_zero,
    "run_shared": run_shared,
    "run_copied_cleared": run_copied_cleared,
    "run_past_eof": run_past_eof,
    "run_refblock_unaligned": run_refblock_unaligned,
    "run_wide_refcounts": run_wide_refcounts,
    "run_one_bit_refcounts": run_one_bit_refcounts,
    "l2_is_the_l1": l2_is_the_l1,
    "clean": base_image,
    "leak": leak_by_bumping,
    "refcount_zero": refcount_zero,
    "refcount_too_low": refcount_too_low,
    "l1_copied_cleared": l1_copied_cleared,
    "l2_copied_cleared": l2_copied_cleared,
    "copied_on_shared": copied_on_shared,
    "dirty_lazy": dirty_lazy,
    "unaligned_l2": unaligned_l2,
    "unaligned_data": unaligned_data,
    "refblock_unaligned": refblock_unaligned,
    "unaligned_copied_past_eof": unaligned_copied_past_eof,
    "zero_alloc_unaligned": zero_alloc_unaligned,
    "leaked_small_clusters": leaked_small_clusters,
    "leaked_wide_refcounts": leaked_wide_refcounts,
    "compressed_leak": compressed_leak,
    "data_file_leak": data_file_leak,
}


@pytest.fixture(autouse=True, params=["per-entry", "runs", "whole-table", "runs+whole-table"])
def scan(request, monkeypatch):
    """Every case four ways: the per-entry passes; the numpy-free whole tables (tables that
    are one run of contiguous clusters, as small images take them); the numpy whole-table
    passes of large images, forced on these small ones; and both, as large images run."""
    from qcowfs.image import scanmode
    whole = "whole-table" in request.param
    monkeypatch.setattr(scanmode, "WHOLE_TABLE_MIN_CLUSTERS", 0 if whole else 1 << 62)
    monkeypatch.setattr(scanmode, "TABLE_RUNS", request.param.startswith("runs"))
    return request.param


def pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    return two_copies(CASES[name](tmp_path), tmp_path)


def their_check(path: Path, *extra: str) -> tuple[int, dict]:
    p = qemu_img("check", "--output=json", *extra, str(path), check=False)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {}


def our_check(path: Path, *extra: str) -> tuple[int, dict]:
    r = qcowfs("check", "--output=json", *extra, path)
    assert "Traceback" not in r.err
    return r.code, json.loads(r.out) if r.out.strip() else {}


def comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "filename"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdict_equals_qemu_img(tmp_path, name):
    theirs, ours = pair(tmp_path, name)
    t, o = their_check(theirs), our_check(ours)
    assert o[0] == t[0]
    assert comparable(o[1]) == comparable(t[1])
    # checking changes nothing
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_human_output_equals_qemu_img(tmp_path, name):
    theirs, ours = pair(tmp_path, name)
    t = qemu_img("check", str(theirs), check=False)
    o = qcowfs("check", ours)
    assert o.code == t.returncode
    assert o.out == t.stdout.decode()


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_repair_like_qemu_img(tmp_path, name, mode):
    theirs, ours = pair(tmp_path, name)
    before = tmp_path / "before.raw"
    # QEMU cannot read some corrupted images at all; there is no guest data to keep then
    readable = qemu_img("convert", "-O", "raw", str(ours), str(before),
                        check=False).returncode == 0
    t = their_check(theirs, "-r", mode)
    o = our_check(ours, "-r", mode)
    assert o[0] == t[0]
    if t[1]:
        assert comparable(o[1]) == comparable(t[1])
    after_code, _ = their_check(ours)
    their_after, _ = their_check(theirs)
    if t[1]:
        assert after_code == their_after
    else:
        # qemu-img gave up half way (it marked the image corrupt, then could not write its
        # rebuilt refcounts): ours must at least not be worse
        assert after_code in (0, their_after)
    if readable and after_code in (0, 3):
        assert qemu_img("compare", "-f", "raw", str(before), str(ours),
                        check=False).returncode == 0
    if mode == "all" and t[0] == 0:
        info = json.loads(qemu_img("info", "--output=json", str(ours)).stdout)
        assert info["dirty-flag"] is False
        assert info["format-specific"]["data"]["corrupt"] is False


def test_raw_has_no_checks(tmp_path):
    p = create(tmp_path / "x.raw", "1M", fmt="raw")
    t = qemu_img("check", str(p), check=False)
    o = qcowfs("check", p)
    assert t.returncode == o.code == 63
    assert o.err.startswith("qcowfs: check: ")


def test_repair_dirty_for_the_writer(tmp_path):
    from qcowfs.image.check import repair_dirty
    from qcowfs.image.qcow2 import Qcow2Image

    p = dirty_lazy(tmp_path)
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", str(p), str(before))
    assert their_check(p)[0] == 2
    img = Qcow2Image.open(str(p), writable=True)
    try:
        repair_dirty(img)
    finally:
        img.close()
    assert their_check(p)[0] == 0
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    assert info["dirty-flag"] is False
    assert qemu_img("compare", "-f", "raw", str(before), str(p), check=False).returncode == 0


def leaked_data_clusters(d: Path) -> Path:
    """Ten data clusters the L2 table no longer points at: leaks with data in the file."""
    p = create(d / "img.qcow2", "4M")
    qemu_io(p, "write -P 1 0 2M")
    poke(p, l2_offset(p) + 8 * 4, bytes(8 * 10))
    return p


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_leak_repair_gives_host_space_back(tmp_path, mode):
    """qemu-img check -r punches holes where it frees leaked clusters inside the file: the
    same blocks come back (st_blocks) for ours, and the file keeps its size."""
    src = leaked_data_clusters(tmp_path)
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copyfile(src, theirs)  # written in full: both start with the same blocks
    shutil.copyfile(src, ours)
    before = ours.stat()
    assert their_check(theirs, "-r", mode)[0] == 0
    assert qcowfs("check", "-r", mode, ours).code == 0
    after = ours.stat()
    assert after.st_size == before.st_size
    assert before.st_blocks - after.st_blocks >= 10 * 65536 // 512
    assert after.st_blocks == theirs.stat().st_blocks
    assert their_check(ours)[0] == 0
    assert qemu_img("compare", str(theirs), str(ours), check=False).returncode == 0
