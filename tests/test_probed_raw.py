"""A raw image whose format was probed cannot be written into something that probes as another
format (QEMU's rule, EPERM). Judged against qemu-io on the same first sectors."""

from __future__ import annotations

import errno
import os
import struct
import subprocess

import pytest
from mounttools import mounted, needs_fuse
from qemutools import create

import qcowfs
from qcowfs.format.probe import announced_format


def _sector(prefix: bytes = b"", at: dict | None = None) -> bytes:
    b = bytearray(512)
    b[:len(prefix)] = prefix
    for off, val in (at or {}).items():
        b[off:off + len(val)] = val
    return bytes(b)


CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
BOCHS = {32: b"Redolog", 48: b"Growing"}
SECTORS = {
    "qcow2 v3": _sector(b"QFI\xfb" + struct.pack(">I", 3)),
    "qcow v1": _sector(b"QFI\xfb" + struct.pack(">I", 1)),
    "qed": _sector(b"QED\x00"),
    "luks v1": _sector(b"LUKS\xba\xbe" + struct.pack(">H", 1)),
    "luks v2": _sector(b"LUKS\xba\xbe" + struct.pack(">H", 2)),
    "vhdx": _sector(b"vhdxfile"),
    "vpc": _sector(b"conectix"),
    "vdi": _sector(at={64: struct.pack("<I", 0xBEDA107F)}),
    "vdi other signature": _sector(at={64: struct.pack("<I", 0xBEDA1070)}),
    "parallels v2": _sector(b"WithoutFreeSpace" + struct.pack("<I", 2)),
    "parallels v1": _sector(b"WithoutFreeSpace" + struct.pack("<I", 1)),
    "parallels ext v2": _sector(b"WithouFreSpacExt" + struct.pack("<I", 2)),
    "vmdk4": _sector(b"KDMV"),
    "vmdk3": _sector(b"COWD"),
    "vmdk text": _sector(b"# Disk DescriptorFile\nversion=1\n"),
    "vmdk text bare": _sector(b"version=3\n"),
    "vmdk text crlf": _sector(b"# x\r\nversion=2\r\n"),
    "vmdk text spaces": _sector(b"   version=1\n"),
    "vmdk text line of spaces first": _sector(b" \nversion=1\n"),
    "vmdk text spaces then text": _sector(b"  abc\nversion=1\n"),
    "vmdk text empty line first": _sector(b"\nversion=1\n"),
    "vmdk text comment then spaces": _sector(b"#a\n  version=1\n"),
    "vmdk text unterminated comment": _sector(b"#abc"),
    "vmdk text other line first": _sector(b"createType=x\nversion=1\n"),
    "vmdk text version 4": _sector(b"version=4\n"),
    "vmdk text no newline": _sector(b"version=1"),
    "cloop": _sector(CLOOP),
    "cloop prefix only": _sector(CLOOP[:23]),
    "bochs v2": _sector(b"Bochs Virtual HD Image",
                        {**BOCHS, 64: struct.pack("<I", 0x00020000)}),
    "bochs v1": _sector(b"Bochs Virtual HD Image",
                        {**BOCHS, 64: struct.pack("<I", 0x00010000)}),
    "bochs other type": _sector(b"Bochs Virtual HD Image",
                                {32: b"Redologs", 48: b"Growing",
                                 64: struct.pack("<I", 0x00020000)}),
    "text": _sector(b"hello, world"),
    "mbr": _sector(at={510: b"\x55\xaa"}),
}


def _qemu_refuses(tmp_path, data: bytes, offset: int = 0, before: bytes | None = None) -> bool:
    target = tmp_path / "q.raw"
    target.write_bytes((before or b"").ljust(1 << 20, b"\0"))
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    p = subprocess.run(["qemu-io", str(target), "-c", f"write -s {src} {offset} {len(data)}"],
                       capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert "not permitted" in out or "wrote" in out, out
    return "not permitted" in out


def _qcowfs_refuses(tmp_path, data: bytes, offset: int = 0, before: bytes | None = None,
                    fmt: str | None = None) -> bool:
    target = tmp_path / "c.raw"
    original = (before or b"").ljust(1 << 20, b"\0")
    target.write_bytes(original)
    disk = qcowfs.open_image(str(target), writable=True, format=fmt)
    try:
        disk.write(offset, data)
    except qcowfs.ImageError as exc:
        assert exc.errno == errno.EPERM
        assert target.read_bytes() == original, "a refused write changed the file"
        return True
    finally:
        disk.close()
    return False


@pytest.mark.parametrize("name", sorted(SECTORS))
def test_first_sector_writes_are_refused_exactly_as_qemu_refuses(tmp_path, name):
    data = SECTORS[name]
    assert _qcowfs_refuses(tmp_path, data) == _qemu_refuses(tmp_path, data)
    assert (announced_format(data) is not None) == _qemu_refuses(tmp_path, data)


def test_any_qcow2_magic_is_refused_because_qcowfs_probes_on_the_magic(tmp_path):
    """Stricter than QEMU (which wants version >= 2 too): qcowfs would open it as qcow2."""
    data = _sector(b"QFI\xfb")
    assert not _qemu_refuses(tmp_path, data)
    assert _qcowfs_refuses(tmp_path, data)


def test_a_small_write_that_completes_a_header_is_refused(tmp_path):
    before = _sector(b"LUK\xfb\xba\xbe\x00\x00")  # "QFI" at 0 makes it qcow2 version 0xbabe0000
    assert _qemu_refuses(tmp_path, b"QFI", 0, before)
    assert _qcowfs_refuses(tmp_path, b"QFI", 0, before)
    assert not _qcowfs_refuses(tmp_path, b"QF", 0, before)


def test_writes_past_the_first_sector_and_given_formats_are_not_checked(tmp_path):
    vpc = SECTORS["vpc"]
    assert not _qcowfs_refuses(tmp_path, vpc, offset=512)
    assert not _qcowfs_refuses(tmp_path, vpc, fmt="raw")


@needs_fuse
@pytest.mark.fuse
def test_mount_serves_raw_only_when_told(tmp_path):
    """Unprobed, a raw file is refused (tests/test_first_contact.py); with -o format=raw the
    format is given, so QEMU's first-sector guard does not apply and a header may be written."""
    image = create(tmp_path / "disk.raw", "4M", fmt="raw")
    header = SECTORS["qcow2 v3"]
    with mounted(image, tmp_path / "mnt", "format=raw") as mp:
        fd = os.open(mp / "disk", os.O_WRONLY)
        try:
            assert os.pwrite(fd, header, 0) == 512
        finally:
            os.close(fd)
    assert image.read_bytes()[:512] == header
