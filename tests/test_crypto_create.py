"""create and convert -O qcow2 with ``-o encrypt.*``: QEMU opens what qcowfs made with the
same key, reads what was written, and its check finds nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import qemutools as q
from tests.cli_helpers import qcowfs

KEY = "made by qcowfs"
SECRET = f"secret,id=k,data={KEY}"
MiB = 1 << 20


@pytest.mark.parametrize("enc", [
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha512",
    "encrypt.format=luks,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
    "encrypt.ivgen-hash-alg=sha256,encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
    "encrypt.format=luks,encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc",
    "encrypt.format=aes",
    "encryption=on",  # qemu-img's old spelling of encrypt.format=aes
])
def test_created_encrypted_image_opens_in_qemu(tmp_path: Path, enc: str):
    img = tmp_path / "new.qcow2"
    opts = f"{enc},encrypt.key-secret=k,cluster_size=4096"
    if "luks" in enc:
        opts += ",encrypt.iter-time=10"
    res = qcowfs("create", "-f", "qcow2", "--object", SECRET, "-o", opts, img, "4M")
    assert res.code == 0, res.err
    info = q.info(img)
    assert info["encrypted"] is True
    fmt = "aes" if enc == "encryption=on" else enc.split("=")[1].split(",")[0]
    assert info["format-specific"]["data"]["encrypt"]["format"] == fmt
    q.qemu_io_encrypted(img, [KEY], "write -P 0x71 4096 100000", "read -P 0x71 4096 100000",
                        "read -P 0 0 4096")
    assert q.check_encrypted(img, [KEY])[0] == 0
    if "luks" in enc:  # legacy AES has no key check: any key "opens" it, in QEMU too
        wrong = q.check_encrypted(img, ["another key"])
        assert wrong[0] != 0 and "Invalid password" in wrong[1]["stderr"]


def test_luks_defaults_are_qemus(tmp_path: Path):
    img = tmp_path / "new.qcow2"
    res = qcowfs("create", "-q", "-f", "qcow2", "--object", SECRET, "-o",
                 "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10", img, "1M")
    assert res.code == 0, res.err
    mine = q.info(img)["format-specific"]["data"]["encrypt"]
    ref = q.create_encrypted(tmp_path / "ref.qcow2", "1M", KEY)
    theirs = q.info(ref)["format-specific"]["data"]["encrypt"]
    for key in ("ivgen-alg", "hash-alg", "cipher-alg", "format", "cipher-mode",
                "payload-offset"):
        assert mine[key] == theirs[key], key
    assert [(s["active"], s["key-offset"]) for s in mine["slots"]] == \
        [(s["active"], s["key-offset"]) for s in theirs["slots"]]


def test_convert_to_luks_qcow2(tmp_path: Path):
    src = q.create(tmp_path / "src.qcow2", 4 * MiB)
    q.qemu_io(src, "write -P 0x5e 0 1M", "write -P 0x13 3M 4096")
    dst = tmp_path / "dst.qcow2"
    res = qcowfs("convert", "-O", "qcow2", "--object", SECRET, "-o",
                 "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10", src, dst)
    assert res.code == 0, res.err
    want = q.to_raw(src, tmp_path / "want.raw")
    assert q.to_raw_encrypted(dst, tmp_path / "got.raw", [KEY]) == want
    assert q.check_encrypted(dst, [KEY])[0] == 0


def test_compression_with_encryption_is_refused(tmp_path: Path):
    src = q.create(tmp_path / "src.qcow2", MiB)
    res = qcowfs("convert", "-c", "-O", "qcow2", "--object", SECRET, "-o",
                 "encrypt.format=luks,encrypt.key-secret=k", src, tmp_path / "dst.qcow2")
    assert res.code == 1 and "encryption" in res.err
    assert not (tmp_path / "dst.qcow2").exists()


def test_encryption_needs_a_known_secret(tmp_path: Path):
    img = tmp_path / "x.qcow2"
    res = qcowfs("create", "-f", "qcow2", "-o", "encrypt.format=luks", img, "1M")
    assert res.code == 1 and "encrypt.key-secret" in res.err
    res = qcowfs("create", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=zz",
                 img, "1M")
    assert res.code == 1 and "No secret with id 'zz'" in res.err
    # a secret without a format makes nothing, in qemu-img too: legacy AES only when named
    res = qcowfs("create", "-f", "qcow2", "--object", SECRET, "-o", "encrypt.key-secret=k",
                 img, "1M")
    assert res.code == 1 and "encrypt.format" in res.err
    assert q.qemu_img("create", "-f", "qcow2", "--object", SECRET, "-o",
                      "encrypt.key-secret=k", str(img), "1M", check=False).returncode == 1
    assert not img.exists()


def test_aes192_cbc_is_refused_where_qemu_aborts(tmp_path: Path):
    # qemu-img 7.2 dies on an assertion making it (96000 bytes of key material are not whole
    # sectors); qcowfs says so instead of writing an image QEMU cannot open
    res = qcowfs("create", "-q", "-f", "qcow2", "--object", SECRET, "-o",
                 "encrypt.format=luks,encrypt.key-secret=k,encrypt.cipher-alg=aes-192,"
                 "encrypt.cipher-mode=cbc,encrypt.iter-time=10", tmp_path / "x.qcow2", "1M")
    assert res.code == 1 and "whole sectors" in res.err
