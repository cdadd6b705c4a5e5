"""The sector ciphers' fast paths (the XTS byte table and shift arithmetic, CBC sector by
sector on one context and by block columns) against the crypto library's own modes, one data
unit per sector, on random data: every key size, runs below and above the size where the
paths switch, IVs across the 32-bit boundary."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcowfs.image.crypto import SectorCipher

SECTOR = 512
#: sector counts around the switch between the small and the large paths (16) and past
#: the 256-sector chunk of the large path
COUNTS = [1, 2, 8, 16, 17, 40, 257]
FIRSTS = [0, 7, (1 << 32) - 5, 1 << 40]


def _gf_double(t: int) -> int:
    t <<= 1
    return t ^ 0x87 ^ (1 << 128) if t >> 128 else t


def _ecb(key: bytes):
    c = Cipher(algorithms.AES(key), modes.ECB())
    return c.encryptor(), c.decryptor()


def _xts_reference(key: bytes, data: bytes, first: int, decrypt: bool) -> bytes:
    """XTS block by block with the tweak doubled in Python integers: works for every AES
    key size (the library has no AES-192-XTS)."""
    half = len(key) // 2
    enc, dec = _ecb(key[:half])
    tweak_enc, _ = _ecb(key[half:])
    out = bytearray()
    for s in range(len(data) // SECTOR):
        t = int.from_bytes(tweak_enc.update((first + s).to_bytes(16, "little")), "little")
        for b in range(SECTOR // 16):
            at = s * SECTOR + b * 16
            block = int.from_bytes(data[at:at + 16], "little") ^ t
            done = (dec if decrypt else enc).update(block.to_bytes(16, "little"))
            out += (int.from_bytes(done, "little") ^ t).to_bytes(16, "little")
            t = _gf_double(t)
    return bytes(out)


def _library_xts(key: bytes, data: bytes, first: int, decrypt: bool) -> bytes:
    out = []
    for s in range(len(data) // SECTOR):
        c = Cipher(algorithms.AES(key), modes.XTS((first + s).to_bytes(16, "little")))
        ctx = c.decryptor() if decrypt else c.encryptor()
        out.append(ctx.update(data[s * SECTOR:(s + 1) * SECTOR]))
    return b"".join(out)


@pytest.mark.parametrize("key_bits", [128, 192, 256])
@pytest.mark.parametrize("decrypt", [False, True], ids=["encrypt", "decrypt"])
def test_xts_equals_xts_sector_by_sector(key_bits: int, decrypt: bool):
    key = os.urandom(key_bits // 4)
    cipher = SectorCipher("aes", "xts", "plain64", None, key)
    for count in COUNTS:
        data = os.urandom(count * SECTOR)
        for first in FIRSTS:
            ours = (cipher.decrypt if decrypt else cipher.encrypt)(data, first)
            if key_bits == 192:
                assert ours == _xts_reference(key, data, first, decrypt), (count, first)
            else:
                assert ours == _library_xts(key, data, first, decrypt), (count, first)
    # the Python reference agrees with the library where both exist
    if key_bits != 192:
        data = os.urandom(3 * SECTOR)
        assert _xts_reference(key, data, 9, decrypt) == _library_xts(key, data, 9, decrypt)


def _iv(ivgen: str, key: bytes, sector: int) -> bytes:
    if ivgen == "plain":
        return (sector & 0xFFFFFFFF).to_bytes(16, "little")
    iv = sector.to_bytes(16, "little")
    if ivgen == "essiv":
        iv = _ecb(hashlib.sha256(key).digest())[0].update(iv)
    return iv


@pytest.mark.parametrize("key_bits", [128, 192, 256])
@pytest.mark.parametrize("ivgen", ["plain", "plain64", "essiv"])
def test_cbc_equals_cbc_sector_by_sector(key_bits: int, ivgen: str):
    key = os.urandom(key_bits // 8)
    hash_name = "sha256" if ivgen == "essiv" else None
    cipher = SectorCipher("aes", "cbc", ivgen, hash_name, key)
    for count in COUNTS:
        data = os.urandom(count * SECTOR)
        for first in FIRSTS:
            ref_enc, ref_dec = [], []
            for s in range(count):
                c = Cipher(algorithms.AES(key), modes.CBC(_iv(ivgen, key, first + s)))
                piece = data[s * SECTOR:(s + 1) * SECTOR]
                ref_enc.append(c.encryptor().update(piece))
                ref_dec.append(c.decryptor().update(piece))
            # twice: the sector-by-sector path keeps one context whose chain carries over
            for _ in range(2):
                assert cipher.encrypt(data, first) == b"".join(ref_enc), (count, first)
            assert cipher.decrypt(data, first) == b"".join(ref_dec), (count, first)
