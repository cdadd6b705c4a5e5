"""The sector ciphers' paths (libcrypto's EVP sector by sector, looped in C by the optional
extension or in Python without it; the array path's XTS shift arithmetic, CBC sector by sector
on one context and by block columns) against the crypto library's own modes, one data unit per
sector, on random data: every key size, runs below and above the sizes where the paths switch,
IVs across the 32- and 64-bit boundaries. Every backend gives the same bytes, and QEMU reads
what the libcrypto paths wrote."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcowfs.image.crypto import SectorCipher

SECTOR = 512
#: sector counts around the switches between the paths (16, 64) and past
#: the 256-sector chunk of the large path
COUNTS = [1, 2, 8, 16, 17, 40, 64, 65, 257]
FIRSTS = [0, 7, (1 << 32) - 5, 1 << 40, (1 << 64) - 5]
#: plain64 and essiv count sectors in 64 bits
MASK64 = (1 << 64) - 1


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
        iv = ((first + s) & MASK64).to_bytes(16, "little")
        t = int.from_bytes(tweak_enc.update(iv), "little")
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
        iv = ((first + s) & MASK64).to_bytes(16, "little")
        c = Cipher(algorithms.AES(key), modes.XTS(iv))
        ctx = c.decryptor() if decrypt else c.encryptor()
        out.append(ctx.update(data[s * SECTOR:(s + 1) * SECTOR]))
    return b"".join(out)


#: the backends: libcrypto looped in C (the optional extension), libcrypto looped in Python
#: (the extension absent), the array path
BACKENDS = ["loop", "pyloop", "arrays"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Which backend SectorCipher picks while the test runs: "pyloop" hides the extension
    as if it had not been built."""
    from qcowfs.image import evp
    if request.param == "pyloop":
        monkeypatch.setattr(evp, "_looped", None)
        monkeypatch.setitem(sys.modules, "qcowfs.image._sectors", None)
        monkeypatch.delattr(sys.modules["qcowfs.image"], "_sectors", raising=False)
    elif request.param == "loop" and evp._loop() is None:
        pytest.skip("the C sector loop was not built (or libcrypto 3 is missing)")
    return request.param


def _cipher(backend: str, *args) -> SectorCipher:
    cipher = SectorCipher(*args, fast=backend != "arrays")
    if backend == "arrays":
        assert cipher._evp is None
    elif cipher._evp is not None:
        assert (cipher._evp.loop is not None) == (backend == "loop")
    return cipher


@pytest.mark.parametrize("key_bits", [128, 192, 256])
@pytest.mark.parametrize("decrypt", [False, True], ids=["encrypt", "decrypt"])
def test_xts_equals_xts_sector_by_sector(key_bits: int, decrypt: bool, backend: str):
    key = os.urandom(key_bits // 4)
    cipher = _cipher(backend, "aes", "xts", "plain64", None, key)
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
    iv = (sector & MASK64).to_bytes(16, "little")
    if ivgen == "essiv":
        iv = _ecb(hashlib.sha256(key).digest())[0].update(iv)
    return iv


@pytest.mark.parametrize("key_bits", [128, 192, 256])
@pytest.mark.parametrize("ivgen", ["plain", "plain64", "essiv"])
def test_cbc_equals_cbc_sector_by_sector(key_bits: int, ivgen: str, backend: str):
    key = os.urandom(key_bits // 8)
    hash_name = "sha256" if ivgen == "essiv" else None
    cipher = _cipher(backend, "aes", "cbc", ivgen, hash_name, key)
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


def _needs_libcrypto(cipher: SectorCipher) -> None:
    if cipher._evp is None:
        pytest.skip("libcrypto 3 cannot be loaded through cffi here")


#: every AES combination libcrypto takes (OpenSSL has no aes-192-xts: the arrays do it)
LIBCRYPTO_CIPHERS = [("xts", "plain64", None, 32), ("xts", "plain64", None, 64),
                     ("xts", "plain", None, 64), ("xts", "essiv", "sha256", 64),
                     ("cbc", "plain", None, 16), ("cbc", "plain64", None, 24),
                     ("cbc", "essiv", "sha256", 32), ("cbc", "essiv", "sha256", 16)]


@pytest.mark.parametrize("mode,ivgen,hash_name,key_len", LIBCRYPTO_CIPHERS,
                         ids=[f"{m}-{i}-{k * 8}" for m, i, _, k in LIBCRYPTO_CIPHERS])
@pytest.mark.parametrize("backend", ["loop", "pyloop"], indirect=True)
def test_the_backends_give_the_same_bytes(mode: str, ivgen: str, hash_name, key_len: int,
                                          backend: str):
    key = os.urandom(key_len)
    fast = _cipher(backend, "aes", mode, ivgen, hash_name, key)
    arrays = SectorCipher("aes", mode, ivgen, hash_name, key, fast=False)
    _needs_libcrypto(fast)
    assert arrays._evp is None
    for count in COUNTS + [3, 255, 256, 513]:
        data = os.urandom(count * SECTOR)
        for first in FIRSTS:
            sealed = fast.encrypt(data, first)
            assert sealed == arrays.encrypt(data, first), (count, first)
            assert fast.decrypt(sealed, first) == data == arrays.decrypt(sealed, first)
            buf = bytearray(sealed)
            fast.decrypt_into(memoryview(buf), first)
            assert buf == data, (count, first)
            if backend == "loop":  # in place, straight through the extension
                buf = bytearray(data)
                fast._evp.sectors(buf, buf, first, count, True)
                assert buf == sealed, (count, first)


def test_the_loop_refuses_short_buffers_and_bad_arguments(backend: str):
    if backend != "loop":
        pytest.skip("the C loop's own checks")
    from qcowfs.image import evp
    cipher = SectorCipher("aes", "xts", "plain64", None, os.urandom(64))
    fast = cipher._evp
    with pytest.raises(ValueError):
        fast.sectors(bytes(1024), bytearray(1024), 0, 3, True)
    with pytest.raises(ValueError):
        fast.sectors(bytes(2048), bytearray(1000), 0, 2, False)
    with pytest.raises(BufferError):  # the destination must be writable
        fast.sectors(bytes(1024), bytes(1024), 0, 2, False)
    with pytest.raises(ValueError):
        evp._loop().run(0, 0, bytes(512), bytearray(512), 0, 1, 1, 0)
    with pytest.raises(ValueError):
        fast.sectors(bytes(512), bytearray(512), 0, -1, True)


@pytest.mark.parametrize("backend", ["loop", "pyloop"], indirect=True)
@pytest.mark.parametrize("count", [8, 300])
def test_libcrypto_contexts_are_per_thread(backend: str, count: int):
    """Sectors done on two threads at once come out as on one (encrypt, decrypt and
    decrypt in place)."""
    import threading
    key = os.urandom(64)
    cipher = _cipher(backend, "aes", "xts", "plain64", None, key)
    _needs_libcrypto(cipher)
    data = os.urandom(count * SECTOR)
    want = {first: _library_xts(key, data, first, False)
            for first in range(0, 4000 if count < 100 else 400, 8)}
    bad = []

    def work():
        for first, sealed in want.items():
            buf = bytearray(sealed)
            cipher.decrypt_into(memoryview(buf), first)
            if (cipher.encrypt(data, first) != sealed or cipher.decrypt(sealed, first) != data
                    or buf != data):
                bad.append(first)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_no_libcrypto_in_the_environment_keeps_the_arrays(monkeypatch):
    from qcowfs.image import evp
    monkeypatch.setattr(evp, "_loaded", None)
    monkeypatch.setattr(evp, "_looped", None)
    monkeypatch.setenv("QCOWFS_NO_LIBCRYPTO", "1")
    assert SectorCipher("aes", "xts", "plain64", None, os.urandom(64))._evp is None


def test_no_sector_loop_in_the_environment_keeps_the_python_loop(monkeypatch):
    from qcowfs.image import crypto, evp
    monkeypatch.setattr(evp, "_looped", None)
    monkeypatch.setenv("QCOWFS_NO_SECTOR_LOOP", "1")
    key = os.urandom(64)
    cipher = SectorCipher("aes", "xts", "plain64", None, key)
    _needs_libcrypto(cipher)
    assert cipher._evp.loop is None
    assert cipher._evp_decrypt == crypto._EVP_SECTORS["xts"]
    data = os.urandom(40 * SECTOR)
    assert cipher.encrypt(data, 5) == _library_xts(key, data, 5, False)


def test_a_loop_that_disagrees_is_dropped(monkeypatch):
    """The C loop is checked per key like the contexts: one that gives other bytes (here a
    stand-in that leaves the output as it is) is not used, and the Python loop is."""
    from qcowfs.image import evp

    class Wrong:
        @staticmethod
        def run(*args):
            pass

    if evp._loop() is None:
        pytest.skip("the C sector loop was not built")
    monkeypatch.setattr(evp, "_looped", Wrong)
    key = os.urandom(64)
    cipher = SectorCipher("aes", "xts", "plain64", None, key)
    _needs_libcrypto(cipher)
    assert cipher._evp.loop is None
    data = os.urandom(4 * SECTOR)
    assert cipher.encrypt(data, 9) == _library_xts(key, data, 9, False)


def test_equal_xts_halves_fall_back_to_the_arrays():
    """OpenSSL refuses an XTS key whose halves are equal; the arrays take any key."""
    half = os.urandom(32)
    cipher = SectorCipher("aes", "xts", "plain64", None, half + half)
    data = os.urandom(4 * SECTOR)
    assert cipher.encrypt(data, 3) == _xts_reference(half + half, data, 3, False)


@pytest.mark.parametrize("options", [{}, {"encrypt.cipher-mode": "cbc", "encrypt.ivgen-alg":
                                          "essiv", "encrypt.ivgen-hash-alg": "sha256",
                                          "encrypt.cipher-alg": "aes-128"},
                                     {"encrypt_format": "aes"}],
                         ids=["luks-xts", "luks-cbc-essiv", "aes"])
@pytest.mark.parametrize("backend", ["loop", "pyloop"], indirect=True)
def test_qemu_reads_what_libcrypto_wrote(tmp_path, options, backend):
    """512 B to 1 MiB writes (the libcrypto paths; the long ones only through the C loop)
    into a qemu-img image: qemu-img and qemu-io decrypt them to the bytes written, and
    qemu-img check finds nothing."""
    import random

    import qcowfs
    from tests import qemutools as q

    key = "fast key"
    size = 4 << 20
    img = q.create_encrypted(tmp_path / "e.qcow2", size, key, **options)
    expect = bytearray(size)
    rng = random.Random(12)
    with qcowfs.open_image(str(img), writable=True, keys=[key.encode()]) as disk:
        _needs_libcrypto(disk.top.crypto.cipher)
        for _ in range(40):
            n = rng.choice([512, 4096, 8192, 65536, 1 << 20])
            off = rng.randrange((size - n) // 512) * 512
            data = rng.randbytes(n)
            disk.write(off, data)
            expect[off:off + n] = data
        disk.write(size - 8192, b"\x5a" * 8192)
        expect[size - 8192:] = b"\x5a" * 8192
        disk.flush()
        for off in range(0, size, 4096):  # read back through the same path
            assert disk.read(off, 4096) == expect[off:off + 4096]
    assert q.to_raw_encrypted(img, tmp_path / "out.raw", [key]) == bytes(expect)
    out = q.qemu_io_encrypted(img, [key], f"read -P 0x5a {size - 8192} 8192")
    assert "read 8192/8192" in out
    code, report = q.check_encrypted(img, [key])
    assert code == 0, report
