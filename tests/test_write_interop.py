"""qcowfs and QEMU taking turns on the same image: each accepts what the other wrote, and the
result is what both wrote, in order."""

from __future__ import annotations

import os

from qemutools import assert_check_clean, compare, create, qemu_img, qemu_io

import qcowfs


def test_turns_with_qemu_io_and_qemu_img_snapshots(tmp_path):
    size = 8 * 1024 * 1024
    base = create(tmp_path / "base.raw", size, fmt="raw")
    qemu_io(base, f"write -P 0x10 0 {size}", fmt="raw")
    path = create(tmp_path / "top.qcow2", size, backing=base, backing_fmt="raw",
                  cluster_size=16384, extended_l2=True)
    model = bytearray(b"\x10" * size)

    def ours(offset: int, data: bytes) -> None:
        with qcowfs.open_image(str(path), writable=True) as disk:
            disk.write(offset, data)
        model[offset:offset + len(data)] = data

    def qemus(offset: int, length: int, pattern: int) -> None:
        qemu_io(path, f"write -P {pattern} {offset} {length}")
        model[offset:offset + length] = bytes([pattern]) * length

    ours(1000, os.urandom(70000))
    qemus(4096, 8192, 0x21)
    qemu_img("snapshot", "-c", "by-qemu", str(path))
    saved = bytes(model)
    ours(0, bytes(3 * 16384))          # zero clusters over data shared with the snapshot
    qemus(40000, 100000, 0x22)
    with qcowfs.open_image(str(path), writable=True) as disk:
        disk.write(2 * 1024 * 1024, os.urandom(5000))
        disk.apply_snapshot("by-qemu")  # revert to what QEMU saved
        model[:] = saved
        disk.create_snapshot("by-qcowfs")
        disk.write(size - 3000, b"\x33" * 3000)
        model[size - 3000:] = b"\x33" * 3000
    assert_check_clean(path)
    qemu_img("snapshot", "-d", "by-qemu", str(path))
    qemus(size // 2, 65536, 0x44)
    with qcowfs.open_image(str(path), writable=True) as disk:
        disk.delete_snapshot("by-qcowfs")
        disk.write(12345, b"\x55" * 54321)
        model[12345:12345 + 54321] = b"\x55" * 54321
    assert_check_clean(path)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    assert compare(expected, path) == 0
    assert qemu_img("snapshot", "-l", str(path)).stdout.strip() == b""
