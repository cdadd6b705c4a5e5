"""Encrypted images qemu-img made (LUKS in every AES mode qemu-img offers, and legacy AES)
read back byte for byte as ``qemu-img convert -O raw`` decrypts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qcowfs
from qcowfs.errors import FormatError, InvalidKeyError, KeyRequiredError
from qcowfs.format import header as hdr
from tests import qemutools as q
from tests.cli_helpers import qcowfs as cli

KEY = "correct horse"
MiB = 1 << 20

# (name, cluster size, encryption options): the cipher matrix of the issue
LUKS_CASES = [
    ("aes256-xts-plain64-sha256", 65536, {}),
    ("aes128-xts-plain64-sha1", 65536, {"cipher-alg": "aes-128", "hash-alg": "sha1"}),
    ("aes192-xts-plain-sha224", 4096, {"cipher-alg": "aes-192", "ivgen-alg": "plain",
                                       "hash-alg": "sha224"}),
    ("aes256-cbc-plain64-sha512", 65536, {"cipher-mode": "cbc", "hash-alg": "sha512"}),
    # (qemu-img 7.2 aborts creating aes-192-cbc: its 96000 bytes of key material are not
    # whole sectors)
    ("aes128-cbc-plain-sha384", 65536, {"cipher-alg": "aes-128", "cipher-mode": "cbc",
                                        "ivgen-alg": "plain", "hash-alg": "sha384"}),
    ("aes128-cbc-essiv-sha256", 65536, {"cipher-alg": "aes-128", "cipher-mode": "cbc",
                                        "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256"}),
    ("aes256-cbc-essiv-sha256-512b", 512, {"cipher-mode": "cbc", "ivgen-alg": "essiv",
                                           "ivgen-hash-alg": "sha256"}),
    ("aes256-xts-2m", 2 * MiB, {}),
    ("aes192-xts-plain64-sha512", 65536, {"cipher-alg": "aes-192", "hash-alg": "sha512"}),
    ("aes256-xts-essiv-sha256", 65536, {"ivgen-alg": "essiv", "ivgen-hash-alg": "sha256"}),
    ("aes128-cbc-plain64-1k", 1024, {"cipher-alg": "aes-128", "cipher-mode": "cbc"}),
    ("aes256-cbc-essiv-sha256-sha224", 65536, {"cipher-mode": "cbc", "ivgen-alg": "essiv",
                                               "ivgen-hash-alg": "sha256",
                                               "hash-alg": "sha224"}),
    ("aes256-ecb", 65536, {"cipher-mode": "ecb"}),
    ("aes256-xts-ripemd160", 65536, {"hash-alg": "ripemd160"}),
    # CAST5 (8-byte blocks): cbc and ecb, as qemu-img offers it (no xts, no essiv)
    ("cast5-cbc-plain64", 65536, {"cipher-alg": "cast5-128", "cipher-mode": "cbc"}),
    ("cast5-cbc-plain-sha1-512b", 512, {"cipher-alg": "cast5-128", "cipher-mode": "cbc",
                                        "ivgen-alg": "plain", "hash-alg": "sha1"}),
]

WRITES = ("write -P 0x5a 0 65536", "write -P 0xa5 1049088 3000", "write -P 0x11 3145216 512",
          "write -z 2097152 65536")


def _make_luks(tmp: Path, name: str, cluster: int, enc: dict) -> Path:
    img = tmp / f"{name}.qcow2"
    opts = {f"encrypt__{k}": v for k, v in enc.items()}
    q.create_encrypted(img, 4 * MiB, KEY, cluster_size=cluster, **opts)
    q.qemu_io_encrypted(img, [KEY], *WRITES)
    return img


@pytest.fixture(scope="module", params=LUKS_CASES, ids=[c[0] for c in LUKS_CASES])
def luks_image(request, tmp_path_factory) -> Path:
    name, cluster, enc = request.param
    return _make_luks(tmp_path_factory.mktemp("luks"), name, cluster, enc)


def _assert_reads_as_qemu(img: Path, keys: list[str | None], tmp: Path) -> None:
    want = q.to_raw_encrypted(img, tmp / "want.raw", keys)
    with qcowfs.open_image(str(img), keys=[k.encode() if k else None for k in keys]) as disk:
        assert disk.size == len(want)
        assert disk.read(0, disk.size) == want
        # unaligned reads inside one sector and across sectors and clusters
        for off, n in ((1049000, 300), (1049088 + 511, 2), (65530, 12), (3145216 + 7, 505)):
            assert disk.read(off, n) == want[off:off + n]


def test_luks_reads_as_qemu(luks_image: Path, tmp_path: Path):
    _assert_reads_as_qemu(luks_image, [KEY], tmp_path)


@pytest.mark.parametrize("key", ["short", "a password longer than sixteen bytes"])
def test_legacy_aes_reads_as_qemu(tmp_path: Path, key: str):
    img = q.create_encrypted(tmp_path / "aes.qcow2", 4 * MiB, key, encrypt_format="aes",
                             cluster_size=4096)
    q.qemu_io_encrypted(img, [key], *WRITES)
    _assert_reads_as_qemu(img, [key], tmp_path)


def test_wrong_key_and_no_key_are_refused(tmp_path: Path):
    img = _make_luks(tmp_path, "default", 65536, {})
    with pytest.raises(InvalidKeyError, match="invalid password"):
        qcowfs.open_image(str(img), keys=[b"wrong"])
    with pytest.raises(KeyRequiredError):
        qcowfs.open_image(str(img))


def test_luks2_header_is_refused(tmp_path: Path):
    img = _make_luks(tmp_path, "v2", 65536, {})
    h = hdr.parse_header(img.read_bytes()[:65536])
    q.poke(img, h.crypto.offset + 6, (2).to_bytes(2, "big"))
    with pytest.raises(qcowfs.UnsupportedError, match="LUKS version 2"):
        qcowfs.open_image(str(img), keys=[KEY.encode()])


def test_luks_key_material_outside_the_header_is_refused(tmp_path: Path):
    img = _make_luks(tmp_path, "hostile", 65536, {})
    h = hdr.parse_header(img.read_bytes()[:65536])
    # key slot 0's stripes field: 4000 -> a count whose material runs far past the area
    q.poke(img, h.crypto.offset + 208 + 44, (1 << 30).to_bytes(4, "big"))
    with pytest.raises(FormatError, match="key slot 0"):
        qcowfs.open_image(str(img), keys=[KEY.encode()])


@pytest.mark.parametrize("sector", [0, 7, (1 << 32) - 3, 1 << 40])
def test_whole_run_xts_equals_the_librarys_xts_sector_by_sector(sector: int):
    # The vectorised tweaks (every block's GF(2^128) multiple at once) against the crypto
    # library's own XTS, one data unit per sector, across the 32-bit boundary plain64 crosses.
    import os

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from qcowfs.image.crypto import SectorCipher
    key, data = os.urandom(64), os.urandom(16 * 512)
    ours = SectorCipher("aes", "xts", "plain64", None, key).encrypt(data, sector)
    ref = b"".join(
        Cipher(algorithms.AES(key), modes.XTS((sector + i).to_bytes(16, "little")))
        .encryptor().update(data[i * 512:(i + 1) * 512]) for i in range(16))
    assert ours == ref


@pytest.mark.parametrize("alg", ["serpent-256", "twofish-128"])
def test_ciphers_the_library_lacks_are_refused_by_name(tmp_path: Path, alg: str):
    # qemu-img makes them; cryptography has neither, so opening names the algorithm, and
    # info (which needs no key) still shows the image as qemu-img does
    img = q.create_encrypted(tmp_path / "x.qcow2", MiB, KEY, **{"encrypt.cipher-alg": alg})
    name = alg.split("-")[0]
    with pytest.raises(qcowfs.UnsupportedError, match=f"{alg}.*no {name}"):
        qcowfs.open_image(str(img), keys=[KEY.encode()])
    objects, opts = q.encrypted_opts(img, [KEY])
    res = cli("convert", "-O", "raw", *objects, "--image-opts", opts, tmp_path / "out.raw")
    assert res.code == 1 and res.err == (
        f"qcowfs: convert: {img}: LUKS cipher {alg} is not supported: the cryptography "
        f"library has no {name}\n")
    assert not (tmp_path / "out.raw").exists()
    got = cli("info", "--output=json", img)
    assert got.code == 0, got.err
    want = q.info(img)
    got_json = json.loads(got.out)
    for d in (want, got_json):
        d.pop("actual-size")
    assert got_json == want
