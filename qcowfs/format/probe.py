"""Which image format the first 512 bytes of a file announce.

A raw image whose format was probed, not given, must never be written into something that
probes as another format the next time it is opened: a guest could write a qcow2 header naming
a host file as its backing file, and the next probing open would serve that file. QEMU refuses
such writes to the first sector (EPERM); :func:`announced_format` carries its probe rules (QEMU
7.2's format drivers, checked against qemu-io in tests/test_probed_raw.py), plus qcowfs's own:
qcowfs probes qcow2 on the magic alone, so any qcow2 magic counts.
"""

from __future__ import annotations

import struct

PROBE_SIZE = 512

_QCOW_MAGIC = b"QFI\xfb"
_CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
                b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
_VMDK_TEXT_VERSIONS = tuple(f"version={v}{end}".encode()
                            for v in (1, 2, 3) for end in ("\n", "\r\n"))
_BOCHS_VERSIONS = (0x00020000, 0x00010000)


def _cstr(buf: bytes, offset: int, size: int) -> bytes:
    field = buf[offset:offset + size]
    return field.split(b"\0", 1)[0] if b"\0" in field else b""


def _vmdk_text(buf: bytes) -> bool:
    """A VMDK text descriptor: after comment lines and lines of spaces, a version=1|2|3 line."""
    p, end = 0, len(buf)
    while p < end:
        c = buf[p]
        if c == ord("#"):
            nl = buf.find(b"\n", p)
            if nl < 0:
                return False
            p = nl + 1
            continue
        if c == ord(" "):
            while p < end and buf[p] == ord(" "):
                p += 1
            if p < end and buf[p] == ord("\n"):
                p += 1
                continue
            return False
        return buf.startswith(_VMDK_TEXT_VERSIONS, p)
    return False


def announced_format(sector: bytes) -> str | None:
    """The non-raw format ``sector`` (a file's first bytes, zero-padded to 512) would be
    probed as, or None when it reads as raw."""
    buf = bytes(sector[:PROBE_SIZE]).ljust(PROBE_SIZE, b"\0")
    if buf.startswith(_QCOW_MAGIC):
        return "qcow" if struct.unpack_from(">I", buf, 4)[0] == 1 else "qcow2"
    if buf.startswith(b"QED\0"):
        return "qed"
    if buf.startswith(b"LUKS\xba\xbe") and struct.unpack_from(">H", buf, 6)[0] == 1:
        return "luks"
    if buf.startswith(b"vhdxfile"):
        return "vhdx"
    if buf.startswith(b"conectix"):
        return "vpc"
    if struct.unpack_from("<I", buf, 64)[0] == 0xBEDA107F:
        return "vdi"
    if buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") \
            and struct.unpack_from("<I", buf, 16)[0] == 2:
        return "parallels"
    if buf.startswith((b"KDMV", b"COWD")) or _vmdk_text(buf):
        return "vmdk"
    if buf.startswith(_CLOOP_MAGIC):
        return "cloop"
    if (_cstr(buf, 0, 32) == b"Bochs Virtual HD Image" and _cstr(buf, 32, 16) == b"Redolog"
            and _cstr(buf, 48, 16) == b"Growing"
            and struct.unpack_from("<I", buf, 64)[0] in _BOCHS_VERSIONS):
        return "bochs"
    return None


__all__ = ["PROBE_SIZE", "announced_format"]
