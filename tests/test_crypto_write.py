"""Writes into encrypted images (and chains mixing encrypted and plain layers), judged by
QEMU: qemu-img convert and qemu-io decrypt what qcowfs wrote, qemu-img check finds nothing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import qcowfs
from tests import qemutools as q

KEY = "write key"
BASE_KEY = "base key"
MiB = 1 << 20
SIZE = 4 * MiB

ENCRYPTIONS = {
    "luks-xts": {},
    "luks-cbc-essiv": {"encrypt.cipher-mode": "cbc", "encrypt.ivgen-alg": "essiv",
                       "encrypt.ivgen-hash-alg": "sha256", "encrypt.cipher-alg": "aes-128"},
    "luks-cast5-cbc": {"encrypt.cipher-mode": "cbc", "encrypt.cipher-alg": "cast5-128"},
    "aes": {"encrypt_format": "aes"},
}


def _writes(seed: int) -> list[tuple[int, bytes]]:
    """Aligned and unaligned writes: inside one sector, across sectors and clusters."""
    rng = random.Random(seed)
    out = [(0, b"\x5a" * 65536), (100, b"head"), (65536 - 7, b"across clusters!"),
           (SIZE - 512, b"\xee" * 512), (1 * MiB + 3, bytes(rng.randrange(256) for _ in range(9000)))]
    for _ in range(20):
        off = rng.randrange(SIZE - 5000)
        out.append((off, rng.randbytes(rng.randrange(1, 5000))))
    out.append((2 * MiB, bytes(65536)))  # an all-zero cluster (a zero cluster in v3)
    return out


def _apply(expect: bytearray, writes) -> None:
    for off, data in writes:
        expect[off:off + len(data)] = data


def _create(path: Path, kind: str, key: str, **extra) -> Path:
    opts = dict(ENCRYPTIONS[kind])
    fmt = opts.pop("encrypt_format", "luks")
    return q.create_encrypted(path, SIZE, key, encrypt_format=fmt, cluster_size=4096,
                              **opts, **extra)


@pytest.mark.parametrize("kind", list(ENCRYPTIONS))
def test_writes_into_an_encrypted_image_read_back_in_qemu(tmp_path: Path, kind: str):
    img = _create(tmp_path / "top.qcow2", kind, KEY)
    q.qemu_io_encrypted(img, [KEY], "write -P 0x33 0 1M")
    expect = bytearray(q.to_raw_encrypted(img, tmp_path / "before.raw", [KEY]))
    writes = _writes(1)
    with qcowfs.open_image(str(img), writable=True, keys=[KEY.encode()]) as disk:
        for off, data in writes:
            disk.write(off, data)
            _apply(expect, [(off, data)])
        disk.write(3 * MiB + 100, b"\x9c" * 1000)
        _apply(expect, [(3 * MiB + 100, b"\x9c" * 1000)])
        assert disk.read(0, SIZE) == bytes(expect)
    got = q.to_raw_encrypted(img, tmp_path / "after.raw", [KEY])
    assert got == bytes(expect)
    code, report = q.check_encrypted(img, [KEY])
    assert code == 0, report
    # qemu-io verifies the last, unaligned write's pattern (it reports a mismatch as failed)
    q.qemu_io_encrypted(img, [KEY], f"read -P 0x9c {3 * MiB + 100} 1000")


def test_luks_overlay_on_a_plain_base(tmp_path: Path):
    base = q.create(tmp_path / "base.qcow2", SIZE)
    q.qemu_io(base, "write -P 0x42 0 4M")
    top = _create(tmp_path / "top.qcow2", "luks-xts", KEY, backing=base.name)
    expect = bytearray(b"\x42" * SIZE)
    writes = _writes(2)
    with qcowfs.open_image(str(top), writable=True, keys=[KEY.encode()]) as disk:
        for off, data in writes:
            disk.write(off, data)
    _apply(expect, writes)
    assert q.to_raw_encrypted(top, tmp_path / "got.raw", [KEY]) == bytes(expect)
    assert q.check_encrypted(top, [KEY])[0] == 0


def test_plain_overlay_on_a_luks_base(tmp_path: Path):
    base = _create(tmp_path / "base.qcow2", "luks-cbc-essiv", BASE_KEY)
    q.qemu_io_encrypted(base, [BASE_KEY], "write -P 0x24 0 4M")
    top = q.create(tmp_path / "top.qcow2", SIZE, backing=base.name)
    expect = bytearray(b"\x24" * SIZE)
    writes = _writes(3)
    with qcowfs.open_image(str(top), writable=True, keys={1: BASE_KEY.encode()}) as disk:
        for off, data in writes:
            disk.write(off, data)
    _apply(expect, writes)
    assert q.to_raw_encrypted(top, tmp_path / "got.raw", [None, BASE_KEY]) == bytes(expect)
    assert q.check_encrypted(top, [None, BASE_KEY])[0] == 0


def test_encrypted_overlay_on_an_encrypted_base_with_another_key(tmp_path: Path):
    base = _create(tmp_path / "base.qcow2", "luks-xts", BASE_KEY)
    q.qemu_io_encrypted(base, [BASE_KEY], "write -P 0x61 0 4M")
    top = _create(tmp_path / "top.qcow2", "luks-xts", KEY, backing=base.name)
    writes = _writes(4)
    with qcowfs.open_image(str(top), writable=True,
                           keys=[KEY.encode(), BASE_KEY.encode()]) as disk:
        for off, data in writes:
            disk.write(off, data)
    expect = bytearray(b"\x61" * SIZE)
    _apply(expect, writes)
    assert q.to_raw_encrypted(top, tmp_path / "got.raw", [KEY, BASE_KEY]) == bytes(expect)
    assert q.check_encrypted(top, [KEY, BASE_KEY])[0] == 0


def test_internal_snapshot_of_a_luks_image_reads_as_qemu(tmp_path: Path):
    img = _create(tmp_path / "snap.qcow2", "luks-xts", KEY)
    q.qemu_io_encrypted(img, [KEY], "write -P 0x0f 0 1M")
    objects, opts = q.encrypted_opts(img, [KEY])
    q.qemu_img("snapshot", *objects, "--image-opts", "-c", "before", opts)
    q.qemu_io_encrypted(img, [KEY], "write -P 0xf0 0 512k")
    with qcowfs.open_image(str(img), writable=True, keys=[KEY.encode()]) as disk:
        with disk.snapshot("before") as snap:
            assert snap.read(0, MiB) == b"\x0f" * MiB
        disk.create_snapshot("after")
        disk.write(4096, b"\x42" * 100)
    # QEMU reads both snapshots and the active disk as qcowfs left them
    for name, want in (("before", b"\x0f" * 512), ("after", b"\xf0" * 512)):
        out = tmp_path / f"{name}.raw"
        q.qemu_img("convert", *objects, "--image-opts", "-l", f"snapshot.name={name}",
                   "-O", "raw", opts, str(out))
        assert out.read_bytes()[4096:4096 + 512] == want
    assert q.to_raw_encrypted(img, tmp_path / "a.raw", [KEY])[4096:4196] == b"\x42" * 100
    assert q.check_encrypted(img, [KEY])[0] == 0
