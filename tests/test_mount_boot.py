"""qemu-system-x86_64 boots a small Linux guest (Debian's cloud kernel, a busybox initramfs)
under TCG with the mounted ``disk`` as a raw virtio drive; the guest writes a known pattern and
powers off; the pattern is then in the qcow2 image and ``qemu-img check`` is clean. With the
patched binding the guest also discards a range, and its TRIM reaches the image."""

from __future__ import annotations

import hashlib

import guest
import pytest
from mounttools import mounted, needs_fuse
from qemutools import assert_check_clean, create, map_json, qemu_io, to_raw

from qcowfs.mount.operations import binding_has_thin_handlers

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]

MiB = 1 << 20
MARKER = b"qcowfs-guest-was-here"
SCRIPT = (
    f"echo -n {MARKER.decode()} | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null; "
    "dd if=/dev/zero bs=1M count=4 2>/dev/null | tr '\\000' '\\245' "
    "| dd of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null"
)
DISCARD = "; blkdiscard -o 16777216 -l 4194304 /dev/vda && sync"


def test_guest_writes_through_the_mount(tmp_path):
    try:
        thin = binding_has_thin_handlers()
        initramfs = guest.build_initramfs(tmp_path / "initrd.gz",
                                          SCRIPT + (DISCARD if thin else ""))
    except guest.GuestUnavailable as exc:
        pytest.skip(f"no guest: {exc}")
    base = create(tmp_path / "base.raw", "32M", fmt="raw")
    qemu_io(base, "write -P 0x3c 0 32M", fmt="raw")
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    top = create(tmp_path / "top.qcow2", "32M", backing=base, backing_fmt="raw")
    with mounted(top, tmp_path / "mnt", "rw") as mp:
        p = guest.boot(mp / "disk", initramfs, discard=thin)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        assert "guest: script exit 0" in p.stdout, p.stdout[-2000:]
    assert_check_clean(top)
    data = to_raw(top, tmp_path / "out.raw")
    assert data[:len(MARKER)] == MARKER
    assert data[len(MARKER):512] == bytes(512 - len(MARKER))
    assert data[8 * MiB:12 * MiB] == b"\xa5" * (4 * MiB)
    assert data[512:8 * MiB] == b"\x3c" * (8 * MiB - 512), "the backing data shows through"
    if thin:
        assert data[12 * MiB:16 * MiB] == b"\x3c" * (4 * MiB)
        assert data[16 * MiB:20 * MiB] == bytes(4 * MiB), "the guest's TRIM reads as zeros"
        assert data[20 * MiB:] == b"\x3c" * (12 * MiB)
        trimmed = [e for e in map_json(top) if e["start"] <= 16 * MiB < e["start"] + e["length"]]
        assert trimmed[0]["zero"] and trimmed[0]["depth"] == 0, trimmed
    else:
        assert data[12 * MiB:] == b"\x3c" * (20 * MiB)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before
