"""Sector ciphers of encrypted qcow2 images: LUKS1 (crypt_method 2) and legacy AES (1).

Both encrypt each 512-byte sector on its own, with an IV made from a sector number: the host
sector for LUKS, the guest sector for legacy AES (QEMU's rules).

Small runs (up to 8 KiB, 32 KiB for CBC encryption) go through the system's libcrypto when it
is there (:mod:`qcowfs.image.evp`): one ``EVP_Cipher`` per sector, without the GIL, checked
once per key against the array path below. Everything else, and every run when libcrypto is
missing, takes the array path, a handful of library calls per run and no Python loop over
blocks: XTS computes every block's tweak for the run at once around one ECB pass (GF(2^128)
shifts in 64-bit lanes); CBC decrypts in one ECB pass plus one XOR, and encrypts a few sectors
with one library call each on one long-lived context, more block column by block column across
all sectors (32 ECB calls for any run length). IVs are one integer product. The array path's
cost is numpy's and the library's per-call cost (some 15 µs for 4 KiB, twice that with the
daemon's cold caches), which is why small runs leave it.

``cryptography`` and ``numpy`` load only with this module, that is only when an encrypted image
is opened.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcowfs.errors import FormatError, InvalidKeyError, UnsupportedError
from qcowfs.format import luks

SECTOR = luks.SECTOR
_BLOCKS = SECTOR // 16
_U64 = np.dtype("<u8")


def _cast5(key: bytes):
    try:  # cryptography 43 moved CAST5 to its "decrepit" package
        from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
    except ImportError:  # pragma: no cover - older cryptography
        CAST5 = algorithms.CAST5
    return CAST5(key)


def _block_cipher(name: str, key: bytes):
    if name == "aes":
        return algorithms.AES(key)
    if name == "sm4" and hasattr(algorithms, "SM4"):
        return algorithms.SM4(key)
    if name == "cast5":
        return _cast5(key)
    raise UnsupportedError(None, f"LUKS cipher {name}-{len(key) * 8} is not supported: the "
                                 f"cryptography library has no {name}")


def _ecb(name: str, key: bytes):
    c = Cipher(_block_cipher(name, key), modes.ECB())
    return c.encryptor(), c.decryptor()


def _essiv_key(name: str, digest: bytes) -> bytes:
    """The key of the ESSIV cipher, QEMU's rule: the same cipher family keyed with the whole
    digest (AES-256 for sha256), refused where the family has no key that long; CAST5 and
    SM4 never take essiv."""
    if name in ("cast5", "sm4"):
        raise UnsupportedError(None, f"cipher {name} is not supported with essiv")
    if len(digest) not in luks.CIPHER_KEY_SIZES[name]:
        raise UnsupportedError(None, f"no {name} cipher with a {len(digest)}-byte key for "
                                     f"essiv")
    return digest


_J = np.arange(1, _BLOCKS, dtype=_U64)
_RJ = np.uint64(64) - _J
_ONE, _FIVE = np.uint64(1), np.uint64(5)
#: XTS and CBC decryption work through a run this many sectors at a time (128 KiB): their
#: temporaries then stay in the CPU cache, which makes a 1 MiB run about twice as fast
_CHUNK = 256


def _tweak_table(t0: np.ndarray) -> np.ndarray:
    """Each sector's first tweak times x^j in XTS's GF(2^128) for j = 0..31, all at once:
    lanes are (lo, hi) little-endian halves; x^j is a shift by j, and the j bits shifted out
    fold back times x^7 + x^2 + x + 1 (they stay below bit 38, so one fold is enough). The
    arithmetic runs on contiguous (sectors, 31) arrays, in place where it can."""
    lo, hi = t0[:, 0:1], t0[:, 1:2]
    carry = hi >> _RJ
    high = hi << _J
    high |= lo >> _RJ
    low = lo << _J
    for shift in (None, _ONE, _ONE, _FIVE):  # carry times x^0, x^1, x^2, x^7
        if shift is not None:
            carry <<= shift
        low ^= carry
    t = np.empty((len(t0), _BLOCKS, 2), _U64)
    t[:, 0, :] = t0
    t[:, 1:, 0] = low
    t[:, 1:, 1] = high
    return t


#: requests of at most this many sectors (8 KiB) take CBC encryption sector by sector on the
#: array path; above it the column passes win
_SMALL = 16
#: requests of at most this many sectors go through libcrypto (qcowfs.image.evp) when it is
#: there: about 0.5-1 µs a sector, against the array path's ~15 µs per 4 KiB request hot and
#: 30-40 µs in the daemon (cold caches); beyond, the array path's fixed cost is spread thin
_EVP_SECTORS = {"xts": 16, "cbc": 16}
#: CBC encryption is sequential on the array path (32 ECB calls a run): libcrypto longer
_EVP_SECTORS_CBC_ENCRYPT = 64
#: with the C loop (qcowfs/image/_sectors.c) libcrypto takes runs up to this many sectors
_LOOP_SECTORS = 1 << 30


@functools.lru_cache(maxsize=64)
def _iv_spread(count: int, width: int) -> tuple[int, int]:
    """``(ones, iota)``: integers whose ``width``-byte little-endian blocks are 1 and 0, 1,
    2, ... for ``count`` blocks, so that ``first * ones + iota`` is the counter IV blocks
    of ``count`` sectors from ``first`` (no block overflows: each counter fits in 8 bytes)."""
    ones = iota = 0
    for i in reversed(range(count)):
        ones = (ones << (8 * width)) | 1
        iota = (iota << (8 * width)) | i
    return ones, iota


def _bytes_of(arr: np.ndarray) -> memoryview:
    return memoryview(arr).cast("B")


class SectorCipher:
    """One key with its mode and IV generator; ``encrypt``/``decrypt`` take whole cipher
    blocks (16 bytes, 8 for CAST5) starting at a sector boundary, with ``sector`` the number
    of the first sector. Arrays are (sectors, blocks per sector, 64-bit lanes per block)."""

    def __init__(self, cipher: str, mode: str, ivgen: str, ivgen_hash: str | None, key: bytes,
                 *, fast: bool = True):
        if mode not in ("xts", "cbc", "ecb"):
            raise UnsupportedError(None, f"cipher mode {mode!r} is not supported")
        self.mode = mode
        self.ivgen = ivgen
        data_key = key[:len(key) // 2] if mode == "xts" else key
        self._enc, self._dec = _ecb(cipher, data_key)
        self.block = _block_cipher(cipher, data_key).block_size // 8
        self._lanes = self.block // 8
        self._blocks = SECTOR // self.block
        if mode == "xts":
            if self.block != 16:
                raise UnsupportedError(None, f"xts needs a 16-byte block cipher, not {cipher}")
            self._tweak_enc, _ = _ecb(cipher, key[len(key) // 2:])
        elif mode == "cbc":
            self._chain_enc = Cipher(_block_cipher(cipher, data_key),
                                     modes.CBC(bytes(self.block))).encryptor()
            self._chain = 0
            self._chain_lock = threading.Lock()
        self._essiv = None
        essiv_key = None
        if ivgen == "essiv":
            digest = hashlib.new(ivgen_hash, key).digest()
            essiv_key = _essiv_key(cipher, digest)
            self._essiv, _ = _ecb(cipher, essiv_key)
        elif ivgen not in ("plain", "plain64") and mode != "ecb":
            raise UnsupportedError(None, f"IV generator {ivgen!r} is not supported")
        self._evp = None
        self._evp_decrypt = _EVP_SECTORS.get(mode, 0)
        self._evp_encrypt = _EVP_SECTORS_CBC_ENCRYPT if mode == "cbc" else self._evp_decrypt
        if fast and cipher == "aes" and mode in ("xts", "cbc"):
            self._evp = self._open_evp(f"aes-{len(data_key) * 8}-{mode}",
                                       key if mode == "xts" else data_key, essiv_key)
        if self._evp is not None and self._evp.loop is not None:
            self._evp_decrypt = self._evp_encrypt = _LOOP_SECTORS

    def _open_evp(self, name: str, key: bytes, essiv_key: bytes | None):
        """libcrypto's context for this cipher and key (:mod:`qcowfs.image.evp`), kept only
        when it encrypts and decrypts a known run exactly as the array path does (first
        with the IV written in place, else with one IV call per sector; the C loop too,
        which is dropped if it differs); None otherwise."""
        try:
            from qcowfs.image import evp
            fast = evp.EvpSectors(name, key, self.block, self.ivgen, essiv_key)
        except OSError:
            return None
        sample = bytes(range(256)) * 4
        sector = 0x1_2345_6789
        want = self.encrypt(sample, sector)
        ivs = self._iv_bytes(sector, 2)
        for live in (True, False):
            fast.live_iv = live
            enc, dec = bytearray(len(sample)), bytearray(len(sample))
            try:
                fast.run(sample, enc, ivs, 2, True)
                fast.run(want, dec, ivs, 2, False)
            except OSError:
                return None
            if enc == want and dec == sample:
                if fast.loop is not None and not self._loop_agrees(fast, sample, want, sector):
                    fast.loop = None
                return fast
        return None

    @staticmethod
    def _loop_agrees(fast, sample: bytes, want: bytes, sector: int) -> bool:
        enc, dec = bytearray(len(sample)), bytearray(len(sample))
        try:
            fast.sectors(sample, enc, sector, 2, True)
            fast.sectors(want, dec, sector, 2, False)
        except (OSError, ValueError, RuntimeError):
            return False
        return enc == want and dec == sample

    def _iv_bytes(self, sector: int, count: int) -> bytes:
        """The IV blocks of ``count`` sectors from ``sector``, as one integer product (no
        array work): plain64 counts in 64 bits, plain in 32 (wrapping), essiv encrypts
        plain64's blocks."""
        width = self.block
        bits = 32 if self.ivgen == "plain" else 64
        mask = (1 << bits) - 1
        sector &= mask
        if sector + count > 1 << bits:  # the counter wraps inside this run
            ivs = b"".join(((sector + i) & mask).to_bytes(width, "little")
                           for i in range(count))
        else:
            ones, iota = _iv_spread(count, width)
            ivs = (sector * ones + iota).to_bytes(count * width, "little")
        return self._essiv.update(ivs) if self._essiv is not None else ivs

    def _ivs(self, sector: int, count: int) -> np.ndarray:
        return np.frombuffer(self._iv_bytes(sector, count), _U64).reshape(count, self._lanes)

    def _tweaks(self, sector: int, count: int) -> np.ndarray:
        """Every block's XTS tweak for ``count`` sectors, shape (count, 32, 2)."""
        t0 = np.frombuffer(self._tweak_enc.update(self._iv_bytes(sector, count)), _U64)
        return _tweak_table(t0.reshape(count, 2))

    def _xts_small(self, data, sector: int, count: int, ecb) -> bytes:
        """XTS over a few whole sectors without the chunking and shaping of :meth:`_xts`:
        the tweaks, then XOR, ECB pass, XOR."""
        t = self._tweaks(sector, count)
        x = np.frombuffer(data, _U64).reshape(t.shape) ^ t
        done = np.frombuffer(ecb.update(_bytes_of(x)), _U64).reshape(t.shape)
        np.bitwise_xor(done, t, out=t)
        return t.tobytes()

    def _cbc_encrypt_small(self, data, sector: int, count: int) -> bytes:
        """CBC encryption of a few whole sectors, one library call per sector on one
        long-lived CBC context: its chain value is the last block it produced, so each
        sector's first block goes in XORed with that block and the sector's IV, which
        makes the context start that sector from the IV."""
        width = self.block
        ivs = self._iv_bytes(sector, count)
        view = memoryview(data)
        out = []
        with self._chain_lock:
            chain, enc = self._chain, self._chain_enc
            for i in range(count):
                at = i * SECTOR
                first = (int.from_bytes(view[at:at + width], "little") ^ chain
                         ^ int.from_bytes(ivs[i * width:(i + 1) * width], "little"))
                done = enc.update(first.to_bytes(width, "little")) + enc.update(
                    view[at + width:at + SECTOR])
                chain = int.from_bytes(done[-width:], "little")
                out.append(done)
            self._chain = chain
        return b"".join(out)

    def _shaped(self, data) -> tuple[np.ndarray, int, int]:
        """``data`` as (sectors, blocks, lanes): without a copy when it is whole sectors."""
        n = len(data)
        if n % self.block:
            raise ValueError("encrypted data must be whole cipher blocks")
        count = -(-n // SECTOR)
        if n == count * SECTOR:
            arr = np.frombuffer(data, np.uint8)
        else:
            arr = np.zeros(count * SECTOR, np.uint8)
            arr[:n] = np.frombuffer(data, np.uint8)
        return arr.view(_U64).reshape(count, self._blocks, self._lanes), count, n

    def _xts(self, arr: np.ndarray, sector: int, ecb, out: np.ndarray | None = None
             ) -> np.ndarray:
        """XTS over whole sectors: for each chunk of sectors, the tweaks, one XOR, one ECB
        pass, one XOR into the output (``out`` may be ``arr`` itself: each chunk is read
        before it is written)."""
        count = len(arr)
        if out is None:
            out = np.empty_like(arr)
        for first in range(0, count, _CHUNK):
            part = arr[first:first + _CHUNK]
            t = self._tweaks(sector + first, len(part))
            t2 = part ^ t
            done = np.frombuffer(ecb.update(_bytes_of(t2)), _U64).reshape(t.shape)
            np.bitwise_xor(done, t, out=out[first:first + len(part)])
        return out

    def decrypt_into(self, buf, sector: int) -> None:
        """Decrypt ``buf`` (whole sectors, writable) in place."""
        count = len(buf) >> 9
        if self._evp is not None and count <= self._evp_decrypt:
            self._evp_into(buf, buf, sector, count, False)
        elif self.mode in ("xts", "cbc") and count > _SMALL:
            # In place: no output array, no bytes copy of it and no copy back (a 1 MiB
            # read spent half its time allocating, faulting in and copying those)
            arr = np.frombuffer(buf, _U64).reshape(count, self._blocks, self._lanes)
            if self.mode == "xts":
                self._xts(arr, sector, self._dec, out=arr)
            else:
                self._cbc_decrypt(arr, sector, arr)
        else:
            buf[:] = self.decrypt(buf, sector)

    def _evp_into(self, src, dst, sector: int, count: int, enc: bool) -> None:
        evp = self._evp
        if evp.loop is not None:
            evp.sectors(src, dst, sector, count, enc)
        else:
            evp.run(src, dst, self._iv_bytes(sector, count), count, enc)

    def _evp_run(self, data, sector: int, count: int, enc: bool) -> bytearray:
        out = bytearray(len(data))
        self._evp_into(data, out, sector, count, enc)
        return out

    def decrypt(self, data, sector: int) -> bytes:
        if self.mode == "ecb":
            return self._dec.update(bytes(data))
        count = len(data) >> 9
        if self._evp is not None and count <= self._evp_decrypt and len(data) == count * SECTOR:
            return bytes(self._evp_run(data, sector, count, False))
        if self.mode == "xts" and count <= _SMALL and len(data) == count * SECTOR:
            return self._xts_small(data, sector, count, self._dec)
        arr, count, n = self._shaped(data)
        if self.mode == "xts":
            return self._xts(arr, sector, self._dec).tobytes()[:n]
        return self._cbc_decrypt(arr, sector, np.empty_like(arr)).tobytes()[:n]

    def _cbc_decrypt(self, arr: np.ndarray, sector: int, out: np.ndarray) -> np.ndarray:
        """CBC decryption of whole sectors, chunk by chunk: one ECB pass, then XOR with the
        ciphertext shifted by a block (each sector's IV in front). ``out`` may be ``arr``:
        a chunk's ECB output and shifted ciphertext are taken before it is written."""
        for first in range(0, len(arr), _CHUNK):
            part = arr[first:first + _CHUNK]
            plain = np.frombuffer(self._dec.update(_bytes_of(part)), _U64).reshape(part.shape)
            shifted = part[:, :-1, :].copy() if out is arr else part[:, :-1, :]
            dest = out[first:first + len(part)]
            np.bitwise_xor(plain[:, 0, :], self._ivs(sector + first, len(part)),
                           out=dest[:, 0, :])
            np.bitwise_xor(plain[:, 1:, :], shifted, out=dest[:, 1:, :])
        return out

    def encrypt(self, data, sector: int) -> bytes | bytearray:
        """``data`` (whole sectors) encrypted; a bytearray from libcrypto (callers take any
        buffer, and a 1 MiB run is not copied again into bytes)."""
        if self.mode == "ecb":
            return self._enc.update(bytes(data))
        count = len(data) >> 9
        if self._evp is not None and count <= self._evp_encrypt and len(data) == count * SECTOR:
            return self._evp_run(data, sector, count, True)
        if count <= _SMALL and len(data) == count * SECTOR:
            if self.mode == "xts":
                return self._xts_small(data, sector, count, self._enc)
            return self._cbc_encrypt_small(data, sector, count)
        arr, count, n = self._shaped(data)
        if self.mode == "xts":
            out = self._xts(arr, sector, self._enc)
            # whole sectors: the array itself, without a bytes copy of it (a 1 MiB write
            # spent a quarter of its encryption allocating, faulting in and copying that)
            return _bytes_of(out) if n == count * SECTOR else out.tobytes()[:n]
        out = np.empty_like(arr)
        prev = self._ivs(sector, count)
        for j in range(self._blocks):
            block = np.frombuffer(self._enc.update(_bytes_of(arr[:, j, :] ^ prev)), _U64)
            prev = block.reshape(count, self._lanes)
            out[:, j, :] = prev
        return _bytes_of(out) if n == count * SECTOR else out.tobytes()[:n]


class ImageCrypto:
    """What an open encrypted image needs for its data: the cipher and whether IVs count host
    sectors (LUKS) or guest sectors (legacy AES); for LUKS also the master key, which adding
    a key slot needs."""

    def __init__(self, cipher: SectorCipher, physical: bool, header: luks.LuksHeader | None,
                 master_key: bytes | None = None):
        self.cipher = cipher
        self.physical = physical
        self.luks = header
        self.master_key = master_key

    def decrypt(self, data, host: int, guest: int) -> bytes:
        return self.cipher.decrypt(data, (host if self.physical else guest) // SECTOR)

    def encrypt(self, data, host: int, guest: int) -> bytes | bytearray:
        return self.cipher.encrypt(data, (host if self.physical else guest) // SECTOR)

    def decrypt_into(self, buf, host: int, guest: int) -> None:
        """Decrypt ``buf``, whole sectors read from ``host``, in place."""
        self.cipher.decrypt_into(buf, (host if self.physical else guest) // SECTOR)


def legacy_aes(password: bytes) -> ImageCrypto:
    """crypt_method 1: AES-128-CBC, the password truncated or zero-padded to 16 bytes as the
    key, plain64 IVs of the guest sector."""
    key = password[:16].ljust(16, b"\0")
    return ImageCrypto(SectorCipher("aes", "cbc", "plain64", None, key), False, None)


def read_luks_header(read: Callable[[int, int], bytes], area: int) -> luks.LuksHeader:
    """The validated LUKS header of an encryption area of ``area`` bytes; ``read(pos, n)``
    reads inside that area."""
    if area < luks.HEADER_SIZE:
        raise FormatError(None, "encryption header area is smaller than a LUKS header")
    header = luks.parse_header(read(0, luks.HEADER_SIZE))
    luks.validate(header, area)
    return header


def slot_cipher(header: luks.LuksHeader, key: bytes) -> SectorCipher:
    return SectorCipher(header.cipher_name, header.mode, header.ivgen, header.ivgen_hash, key)


def slot_master_key(read: Callable[[int, int], bytes], header: luks.LuksHeader, index: int,
                    password: bytes) -> bytes | None:
    """The master key key slot ``index`` holds under ``password``, or None (an inactive slot
    or another password): PBKDF2 gives the slot key, which decrypts the slot's AF stripes;
    their merge is the master key when its PBKDF2 digest matches the header's."""
    slot = header.slots[index]
    if not slot.enabled:
        return None
    kb = header.key_bytes
    slot_key = luks.pbkdf2(header.hash_spec, password, slot.salt, slot.iterations, kb)
    material = read(slot.key_offset * SECTOR, kb * slot.stripes)
    plain = slot_cipher(header, slot_key).decrypt(material, 0)
    master = luks.af_merge(plain, kb, slot.stripes, header.hash_spec)
    digest = luks.pbkdf2(header.hash_spec, master, header.mk_digest_salt,
                         header.mk_digest_iter, luks.DIGEST_LEN)
    return master if digest == header.mk_digest else None


def unlock_luks(read: Callable[[int, int], bytes], area: int, password: bytes) -> ImageCrypto:
    """Try each active key slot with ``password``; the first that yields the master key
    unlocks the data cipher."""
    header = read_luks_header(read, area)
    for i in range(luks.NUM_SLOTS):
        master = slot_master_key(read, header, i, password)
        if master is not None:
            return ImageCrypto(slot_cipher(header, master), True, header, master)
    raise InvalidKeyError(None, "invalid password")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


# --- creating a LUKS header -------------------------------------------------------------------

MIN_ITERATIONS = 1000


def _iterations_per_second(hash_name: str, secret: bytes) -> float:
    rounds = 1 << 14
    while True:
        t0 = time.perf_counter()
        luks.pbkdf2(hash_name, secret, bytes(luks.SALT_LEN), rounds, luks.DIGEST_LEN)
        spent = time.perf_counter() - t0
        if spent > 0.05 or rounds >= 1 << 24:
            return rounds / max(spent, 1e-6)
        rounds *= 4


def new_luks_area(password: bytes, *, cipher_alg: str = "aes-256", cipher_mode: str = "xts",
                  ivgen_alg: str = "plain64", ivgen_hash_alg: str = "sha256",
                  hash_alg: str = "sha256", iter_time_ms: int = 2000) -> bytes:
    """A LUKS1 header with key slot 0 holding a new random master key under ``password``,
    laid out as QEMU lays it out (slots 4 KiB apart after the header, 4000 stripes, payload
    offset just past the eighth slot); PBKDF2 rounds are timed to ``iter_time_ms`` for the
    slot and an eighth of it for the master-key digest, at least 1000, as QEMU does.
    Returns the whole encryption area (its length is the payload offset)."""
    name, _, bits = cipher_alg.partition("-")
    sizes = luks.CIPHER_KEY_SIZES.get(name)
    if sizes is None or name == "sm4":  # qemu-img 7.2 does not offer sm4
        raise UnsupportedError(None, f"cipher {cipher_alg!r} is not supported")
    if name not in ("aes", "cast5"):
        raise UnsupportedError(None, f"LUKS cipher {cipher_alg} is not supported: the "
                                     f"cryptography library has no {name}")
    key_size = int(bits) // 8 if bits.isdigit() else sizes[0]
    if key_size not in sizes:
        raise UnsupportedError(None, f"cipher {cipher_alg!r} is not supported")
    if cipher_mode not in ("xts", "cbc", "ecb"):
        raise UnsupportedError(None, f"cipher mode {cipher_mode!r} is not supported")
    if ivgen_alg not in luks.IVGENS:
        raise UnsupportedError(None, f"IV generator {ivgen_alg!r} is not supported")
    for h in (hash_alg, ivgen_hash_alg):
        if h not in luks.HASHES or h == "ripemd160":
            raise UnsupportedError(None, f"hash {h!r} is not supported")
    key_bytes = key_size * 2 if cipher_mode == "xts" else key_size
    if key_bytes * luks.STRIPES % SECTOR:
        raise UnsupportedError(None, f"{cipher_alg}-{cipher_mode} key material is not whole "
                                     f"sectors (QEMU cannot open such an image)")
    mode_spec = f"{cipher_mode}-{ivgen_alg}"
    if ivgen_alg == "essiv":
        mode_spec += f":{ivgen_hash_alg}"
    master = random_bytes(key_bytes)
    mk_salt = random_bytes(luks.SALT_LEN)
    mk_iters = max(MIN_ITERATIONS,
                   int(_iterations_per_second(hash_alg, master) * iter_time_ms / 1000 / 8))
    stride = luks.slot_sectors(key_bytes, luks.STRIPES)
    first = luks.KEY_SLOT_OFFSET // SECTOR
    header = luks.LuksHeader(
        name, mode_spec, hash_alg, first + luks.NUM_SLOTS * stride, key_bytes,
        luks.pbkdf2(hash_alg, master, mk_salt, mk_iters, luks.DIGEST_LEN), mk_salt, mk_iters,
        str(uuid.uuid4()),
        [luks.KeySlot(luks.SLOT_DISABLED, 0, bytes(luks.SALT_LEN), first + i * stride,
                      luks.STRIPES) for i in range(luks.NUM_SLOTS)])
    luks.validate(header, header.payload_offset * SECTOR)
    material = fill_key_slot(header, 0, master, password, iter_time_ms)
    area = bytearray(header.payload_offset * SECTOR)
    packed = luks.pack_header(header)
    area[:len(packed)] = packed
    start = header.slots[0].key_offset * SECTOR
    area[start:start + len(material)] = material
    return bytes(area)


def fill_key_slot(header: luks.LuksHeader, index: int, master: bytes, password: bytes,
                  iter_time_ms: int) -> bytes:
    """Make key slot ``index`` of ``header`` hold ``master`` under ``password`` (new salt,
    PBKDF2 rounds timed to ``iter_time_ms``, at least 1000, as QEMU times them) and return
    the slot's key material, to be written at its key offset before the header is."""
    slot = header.slots[index]
    slot.active = luks.SLOT_ENABLED
    slot.salt = random_bytes(luks.SALT_LEN)
    slot.stripes = luks.STRIPES
    rate = _iterations_per_second(header.hash_spec, password)
    slot.iterations = max(MIN_ITERATIONS, int(rate * iter_time_ms / 1000))
    kb = header.key_bytes
    slot_key = luks.pbkdf2(header.hash_spec, password, slot.salt, slot.iterations, kb)
    stripes = luks.af_split(master, slot.stripes, header.hash_spec,
                            random_bytes(kb * (slot.stripes - 1)))
    return slot_cipher(header, slot_key).encrypt(stripes, 0)
