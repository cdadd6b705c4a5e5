"""What a read/write open does to an image before the first write, and the guards of the write
path: dirty images repaired (never by a read-only open), stale bitmaps invalidated, the header
otherwise kept byte for byte, corrupt images refused, writes into metadata stopped."""

from __future__ import annotations

import struct
import subprocess

import pytest
from qemutools import assert_check_clean, check, compare, create, info, poke, qemu_img, to_raw

import qcowfs
from qcowfs.errors import CorruptionError, FormatError, ImageError, UnsupportedError


def header_u64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def test_dirty_image_from_qemu_is_repaired_only_by_a_read_write_open(tmp_path):
    path = create(tmp_path / "lazy.qcow2", "8M", lazy_refcounts=True)
    # qemu-io dies by SIGKILL right after an allocating write: refcounts are stale.
    subprocess.run(["qemu-io", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 4M 64k",
                    "-c", "sigraise 9", str(path)], capture_output=True)
    assert info(path)["dirty-flag"] is True
    code, _ = check(path)
    assert code == 2  # refcount=0 reference=1: QEMU counts it as corruption while dirty
    before = path.read_bytes()
    with qcowfs.open_image(str(path)) as disk:
        assert disk.read(0, 4) == b"\x61" * 4
    assert path.read_bytes() == before, "a read-only open changed the image"
    qcowfs.open_image(str(path), writable=True).close()
    assert info(path)["dirty-flag"] is False
    assert_check_clean(path)
    data = to_raw(path, tmp_path / "out.raw")
    assert data[:1024 * 1024] == b"\x61" * (1024 * 1024)
    assert data[4 << 20:(4 << 20) + 65536] == b"\x62" * 65536


def test_lazy_refcounts_set_dirty_bit_while_writing_and_clear_it_on_close(tmp_path):
    path = create(tmp_path / "lazy.qcow2", "8M", lazy_refcounts=True)
    with qcowfs.open_image(str(path), writable=True) as disk:
        disk.write(0, b"\x01" * 70000)
        assert header_u64(path, 72) & 1, "dirty bit not on disk before the refcounts are"
        disk.flush()
        assert header_u64(path, 72) & 1
    assert header_u64(path, 72) & 1 == 0
    assert_check_clean(path)


def test_bitmaps_in_use_while_open_and_back_after_close(tmp_path):
    """While qcowfs has the image open read/write every bitmap is in use on disk (a crash
    leaves them distrusted); a clean close with no write puts the directory back as it was."""
    path = create(tmp_path / "bm.qcow2", "8M")
    qemu_img("bitmap", "--add", str(path), "b0")
    qemu_img("bitmap", "--add", str(path), "b1")
    before = path.read_bytes()
    with qcowfs.open_image(str(path), writable=True):
        bitmaps = info(path, "-U")["format-specific"]["data"]["bitmaps"]
        assert [b["name"] for b in bitmaps] == ["b0", "b1"]
        assert all("in-use" in b["flags"] for b in bitmaps)
    assert path.read_bytes() == before
    assert_check_clean(path)


def test_read_write_open_clears_unknown_autoclear_bits(tmp_path):
    path = create(tmp_path / "ac.qcow2", "8M")
    poke(path, 88, struct.pack(">Q", (1 << 7) | 1))  # unknown bit 7 (+ bitmaps bit, no ext)
    with qcowfs.open_image(str(path), writable=True):
        pass
    assert header_u64(path, 88) & (1 << 7) == 0
    assert_check_clean(path)


def test_clearing_autoclear_bits_rewrites_cluster0_as_qemu(tmp_path):
    """The bits go by a header update of all of cluster 0, as when QEMU opens the image
    read/write: stray bytes after the header are gone in both, and cluster 0 is the same."""
    seed = create(tmp_path / "seed.qcow2", "8M", cluster_size=4096)
    poke(seed, 88, struct.pack(">Q", 1 << 7))
    poke(seed, 4000, b"\x5a" * 8)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    for path in (theirs, ours):
        path.write_bytes(seed.read_bytes())
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", str(theirs)], check=True,
                   capture_output=True)
    with qcowfs.open_image(str(ours), writable=True):
        pass
    assert theirs.read_bytes()[4000:4008] == bytes(8)
    assert ours.read_bytes()[:4096] == theirs.read_bytes()[:4096]


def test_corrupt_image_is_refused_read_write_but_readable(tmp_path):
    path = create(tmp_path / "c.qcow2", "1M")
    poke(path, 72, struct.pack(">Q", 2))
    with pytest.raises(FormatError, match="corrupt"):
        qcowfs.open_image(str(path), writable=True)
    with qcowfs.open_image(str(path)) as disk:
        assert disk.read(0, 512) == bytes(512)


def test_write_into_metadata_marks_corrupt_instead_of_overwriting(tmp_path):
    path = create(tmp_path / "m.qcow2", "1M")
    with qcowfs.open_image(str(path), writable=True) as disk:
        disk.write(0, b"\x05" * 65536)
    l1_off = header_u64(path, 40)
    l2_off = header_u64(path, l1_off) & 0x00FFFFFFFFFFFE00
    # Point guest cluster 0 at the L1 table itself, with COPIED: an in-place write would
    # destroy the L1.
    poke(path, l2_off, struct.pack(">Q", (1 << 63) | l1_off))
    l1_before = path.read_bytes()[l1_off:l1_off + 512]
    disk = qcowfs.open_image(str(path), writable=True)
    with pytest.raises(CorruptionError):
        disk.write(0, b"\x09" * 512)
    with pytest.raises(CorruptionError):
        disk.write(4096, b"\x09" * 512)
    disk.close()
    assert path.read_bytes()[l1_off:l1_off + 512] == l1_before
    assert info(path)["format-specific"]["data"]["corrupt"] is True


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_corrupt_mark_writes_cluster0_as_qemu(tmp_path, compat):
    """A write that would land on metadata marks the image corrupt the way QEMU does, by a
    header update of all of cluster 0: after the same refused write in qemu-io and in qcowfs,
    cluster 0 is byte for byte the same, on v2 too (which has no corrupt bit: its header
    extensions, here the backing format, must survive)."""
    base = create(tmp_path / "base.qcow2", "1M")
    seed = create(tmp_path / "seed.qcow2", "1M", backing=base.name, cwd=tmp_path, compat=compat)
    qemu_io_write = ["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 64k"]
    subprocess.run([*qemu_io_write, str(seed)], check=True, capture_output=True)
    l1_off = header_u64(seed, 40)
    l2_off = header_u64(seed, l1_off) & 0x00FFFFFFFFFFFE00
    poke(seed, l2_off, struct.pack(">Q", (1 << 63) | l1_off))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    for path in (theirs, ours):
        path.write_bytes(seed.read_bytes())
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 512", str(theirs)],
                       capture_output=True, cwd=tmp_path)
    assert b"Marking image as corrupt" in p.stderr + p.stdout
    disk = qcowfs.open_image(str(ours), writable=True)
    with pytest.raises(CorruptionError):
        disk.write(0, b"\x09" * 512)
    disk.close()
    assert ours.read_bytes()[:65536] == theirs.read_bytes()[:65536]
    assert info(ours)["backing-filename-format"] == "qcow2"


def test_refcount_table_grows(tmp_path):
    """512-byte clusters with 64-bit refcounts: one refcount-table cluster covers 2 MiB."""
    path = create(tmp_path / "g.qcow2", "16M", cluster_size=512, refcount_bits=64)
    table_before = header_u64(path, 48)
    expected = bytearray(16 << 20)
    with qcowfs.open_image(str(path), writable=True) as disk:
        for i in range(0, 12 << 20, 1 << 20):
            chunk = bytes([i >> 20 | 1]) * (1 << 20)
            disk.write(i, chunk)
            expected[i:i + len(chunk)] = chunk
    assert header_u64(path, 48) != table_before
    assert_check_clean(path)
    raw = tmp_path / "e.raw"
    raw.write_bytes(expected)
    assert compare(raw, path) == 0


def test_snapshots_refused_with_external_data_file_and_one_bit_refcounts(tmp_path):
    df = create(tmp_path / "d.qcow2", "1M", data_file=str(tmp_path / "d.data"))
    with qcowfs.open_image(str(df), writable=True) as disk, \
            pytest.raises(UnsupportedError, match="data file"):
        disk.create_snapshot("s")
    r1 = create(tmp_path / "r1.qcow2", "1M", refcount_bits=1)
    with qcowfs.open_image(str(r1), writable=True) as disk:
        disk.write(0, b"\x01" * 65536)
        with pytest.raises(ImageError, match="overflow"):
            disk.create_snapshot("s")
    assert_check_clean(r1)
    assert qemu_img("snapshot", "-l", str(r1)).stdout.strip() == b""


def test_snapshot_made_by_qcowfs_looks_like_qemus(tmp_path):
    path = create(tmp_path / "s.qcow2", "1M")
    with qcowfs.open_image(str(path), writable=True) as disk:
        disk.write(0, b"\x11" * 4096)
        a = disk.create_snapshot("first")
        disk.write(0, b"\x22" * 4096)
        b = disk.create_snapshot("second")
    assert (a.id, b.id) == ("1", "2")
    snaps = info(path)["snapshots"]
    assert [(s["id"], s["name"], s["vm-state-size"]) for s in snaps] == [
        ("1", "first", 0), ("2", "second", 0)]
    qemu_img("snapshot", "-a", "first", str(path))
    assert to_raw(path, tmp_path / "o.raw")[:4096] == b"\x11" * 4096
    assert_check_clean(path)


def test_read_only_disk_refuses_writes(tmp_path):
    path = create(tmp_path / "ro.qcow2", "1M")
    with qcowfs.open_image(str(path)) as disk, pytest.raises(qcowfs.ReadOnlyError):
        disk.write(0, b"x")
    with qcowfs.open_image(str(path), writable=True) as disk:
        with pytest.raises(ImageError):
            disk.write(disk.size - 1, b"xy")
        with pytest.raises(ImageError):
            disk.resize(512 * 1024)
