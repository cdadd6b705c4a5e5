"""The LUKS1 header an encrypted qcow2 keeps in its full-disk-encryption clusters, and the
anti-forensic split that hides each key slot's copy of the master key.

Pure functions of bytes (hashlib only). The layout is cryptsetup's LUKS1 on-disk format:
big-endian fields, eight key slots, key material in 512-byte sectors counted from the start of
the header. The ciphers themselves live in ``qcowfs.image.crypto``.
"""

from __future__ import annotations

import hashlib
import struct

from qcowfs.errors import FormatError, UnsupportedError
from qcowfs.format.record import field, record

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
SECTOR = 512
NUM_SLOTS = 8
SALT_LEN = 32
DIGEST_LEN = 20
STRIPES = 4000
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
#: where the first key slot's material starts (QEMU's and cryptsetup's choice)
KEY_SLOT_OFFSET = 4096

_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HEAD.size + NUM_SLOTS * _SLOT.size  # 592

HASHES = {"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64,
          "ripemd160": 20}
IVGENS = ("plain", "plain64", "essiv")
MODES = ("xts", "cbc", "ecb")
#: cipher names QEMU writes into a LUKS header, with the key sizes each takes
CIPHER_KEY_SIZES = {"aes": (16, 24, 32), "serpent": (16, 24, 32), "twofish": (16, 24, 32),
                    "cast5": (16,), "sm4": (16,)}
#: a slot asking for more PBKDF2 rounds than this is refused rather than ground through
MAX_ITERATIONS = 1 << 27
MAX_KEY_MATERIAL = 64 << 20


@record
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_offset: int = 0  # in 512-byte sectors from the start of the header
    stripes: int = STRIPES

    @property
    def enabled(self) -> bool:
        return self.active == SLOT_ENABLED


@record
class LuksHeader:
    cipher_name: str
    cipher_mode: str  # e.g. "xts-plain64", "cbc-essiv:sha256"
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: list[KeySlot] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.cipher_mode.split("-", 1)[0]

    @property
    def ivgen(self) -> str:
        parts = self.cipher_mode.split("-", 1)
        return parts[1].split(":", 1)[0] if len(parts) > 1 else ""

    @property
    def ivgen_hash(self) -> str | None:
        spec = self.cipher_mode.split("-", 1)
        if len(spec) < 2 or ":" not in spec[1]:
            return None
        return spec[1].split(":", 1)[1]

    @property
    def cipher_key_bytes(self) -> int:
        """The block cipher's own key size (XTS keys are two of them)."""
        return self.key_bytes // 2 if self.mode == "xts" else self.key_bytes

    @property
    def cipher_alg(self) -> str:
        """QEMU's name for the algorithm: "aes-256", "cast5-128", "sm4"."""
        if self.cipher_name == "sm4":
            return "sm4"
        return f"{self.cipher_name}-{self.cipher_key_bytes * 8}"


def _text(raw: bytes, what: str) -> str:
    raw = raw.split(b"\0", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(None, f"LUKS header {what} is not ASCII") from None


def parse_header(buf: bytes) -> LuksHeader:
    """The LUKS1 header at the start of ``buf`` (at least HEADER_SIZE bytes), checked so that
    every later use of its fields stays inside the header's own area."""
    if len(buf) < HEADER_SIZE:
        raise FormatError(None, "LUKS header is truncated")
    (magic, version, cipher, mode, hash_spec, payload, key_bytes, digest, dsalt, diter,
     uuid) = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError(None, "encryption header is not in LUKS format")
    if version != VERSION:
        raise UnsupportedError(None, f"LUKS version {version} is not supported (only LUKS1)")
    h = LuksHeader(_text(cipher, "cipher name"), _text(mode, "cipher mode"),
                   _text(hash_spec, "hash"), payload, key_bytes, digest, dsalt, diter,
                   _text(uuid, "uuid"))
    for i in range(NUM_SLOTS):
        h.slots.append(KeySlot(*_SLOT.unpack_from(buf, _HEAD.size + i * _SLOT.size)))
    return h


def validate(h: LuksHeader, area: int) -> None:
    """Refuse what cannot be unlocked safely: unknown algorithms, key sizes the cipher does not
    take, key material outside the ``area`` bytes of the encryption header, absurd work."""
    sizes = CIPHER_KEY_SIZES.get(h.cipher_name)
    if sizes is None:
        raise UnsupportedError(None, f"LUKS cipher {h.cipher_name!r} is not supported")
    if h.mode not in MODES:
        raise UnsupportedError(None, f"LUKS cipher mode {h.mode!r} is not supported")
    if h.mode == "xts" and h.key_bytes % 2 or h.cipher_key_bytes not in sizes:
        raise FormatError(None, f"LUKS key size {h.key_bytes} does not fit {h.cipher_name}-"
                                f"{h.mode}")
    if h.ivgen not in IVGENS:
        raise UnsupportedError(None, f"LUKS IV generator {h.ivgen!r} is not supported")
    if h.ivgen == "essiv" and h.ivgen_hash not in HASHES:
        raise UnsupportedError(None, f"LUKS IV generator hash {h.ivgen_hash!r} is not "
                                     f"supported")
    if h.hash_spec not in HASHES:
        raise UnsupportedError(None, f"LUKS hash {h.hash_spec!r} is not supported")
    if h.mk_digest_iter > MAX_ITERATIONS or not h.mk_digest_iter:
        raise UnsupportedError(None, f"LUKS master key digest asks for {h.mk_digest_iter} "
                                     f"PBKDF2 iterations")
    for i, slot in enumerate(h.slots):
        if not slot.enabled:
            continue
        if slot.iterations > MAX_ITERATIONS or not slot.iterations:
            raise UnsupportedError(None, f"LUKS key slot {i} asks for {slot.iterations} "
                                         f"PBKDF2 iterations")
        length = h.key_bytes * slot.stripes
        start = slot.key_offset * SECTOR
        if not slot.stripes or length > MAX_KEY_MATERIAL or start + length > area:
            raise FormatError(None, f"LUKS key slot {i} lies outside the encryption header")


def _xor(a: bytes, b: bytes) -> bytearray:
    n = len(a)
    return bytearray((int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(
        n, "little"))


def _diffuse(block: bytearray, hash_name: str) -> None:
    n = HASHES[hash_name]
    for i in range(0, -(-len(block) // n)):
        chunk = block[i * n:(i + 1) * n]
        block[i * n:i * n + len(chunk)] = hashlib.new(
            hash_name, i.to_bytes(4, "big") + chunk).digest()[:len(chunk)]


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """Join ``stripes`` AF stripes of ``key_bytes`` each back into the key they hide."""
    acc = bytearray(key_bytes)
    for i in range(stripes - 1):
        stripe = material[i * key_bytes:(i + 1) * key_bytes]
        acc = _xor(acc, stripe)
        _diffuse(acc, hash_name)
    return bytes(_xor(acc, material[(stripes - 1) * key_bytes:stripes * key_bytes]))


def af_split(key: bytes, stripes: int, hash_name: str, noise: bytes) -> bytes:
    """The AF stripes of ``key``; ``noise`` supplies the first ``stripes - 1`` of them."""
    n = len(key)
    acc = bytearray(n)
    for i in range(stripes - 1):
        stripe = noise[i * n:(i + 1) * n]
        acc = _xor(acc, stripe)
        _diffuse(acc, hash_name)
    return bytes(noise[:(stripes - 1) * n]) + bytes(_xor(acc, key))


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_name, secret, salt, iterations, length)


def pack_header(h: LuksHeader) -> bytes:
    out = bytearray(_HEAD.pack(MAGIC, VERSION, h.cipher_name.encode(), h.cipher_mode.encode(),
                               h.hash_spec.encode(), h.payload_offset, h.key_bytes, h.mk_digest,
                               h.mk_digest_salt, h.mk_digest_iter, h.uuid.encode()))
    for slot in h.slots:
        out += _SLOT.pack(slot.active, slot.iterations, slot.salt, slot.key_offset, slot.stripes)
    return bytes(out)


def slot_sectors(key_bytes: int, stripes: int) -> int:
    """Sectors one key slot's material takes: rounded up to whole sectors, then to a multiple
    of the header's own 4 KiB (cryptsetup's rule, which QEMU follows)."""
    sectors = -(-key_bytes * stripes // SECTOR)
    align = KEY_SLOT_OFFSET // SECTOR
    return -(-sectors // align) * align


def info_dict(h: LuksHeader) -> dict:
    """The ``encrypt`` object of qemu-img info, in qemu-img 7.2's field order."""
    out: dict = {"ivgen-alg": h.ivgen, "hash-alg": h.hash_spec, "cipher-alg": h.cipher_alg,
                 "uuid": h.uuid}
    if h.ivgen_hash is not None:
        out["ivgen-hash-alg"] = h.ivgen_hash
    out.update({"format": "luks", "cipher-mode": h.mode})
    slots = []
    for s in h.slots:
        if s.enabled:
            slots.append({"active": True, "iters": s.iterations,
                          "key-offset": s.key_offset * SECTOR, "stripes": s.stripes})
        else:
            slots.append({"active": False, "key-offset": s.key_offset * SECTOR})
    out["slots"] = slots
    out["payload-offset"] = h.payload_offset * SECTOR
    out["master-key-iters"] = h.mk_digest_iter
    return out
