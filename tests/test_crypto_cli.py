"""The commands on encrypted images, in qemu-img's forms (``--object secret``,
``--image-opts``), judged against qemu-img on the same files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests import qemutools as q
from tests.cli_helpers import qcowfs

KEY = "s3cret pass"
MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cryptocli")
    out = {
        "luks": q.create_encrypted(tmp / "luks.qcow2", 4 * MiB, KEY),
        "essiv": q.create_encrypted(tmp / "essiv.qcow2", 4 * MiB, KEY, **{
            "encrypt.cipher-mode": "cbc", "encrypt.ivgen-alg": "essiv",
            "encrypt.ivgen-hash-alg": "sha256", "encrypt.hash-alg": "sha1"}),
        "aes": q.create_encrypted(tmp / "aes.qcow2", 4 * MiB, KEY, encrypt_format="aes"),
    }
    for img in out.values():
        q.qemu_io_encrypted(img, [KEY], "write -P 0x3c 0 65536", "write -P 0x77 2097152 4096")
    return out


def _opts(img: Path) -> list[str]:
    objects, opts = q.encrypted_opts(img, [KEY])
    return [*objects, "--image-opts", opts]


@pytest.mark.parametrize("kind", ["luks", "essiv", "aes"])
def test_info_needs_no_key_and_matches_qemu_img(images, kind: str):
    img = images[kind]
    want = q.info(img)
    got = qcowfs("info", "--output", "json", img)
    assert got.code == 0, got.err
    got_json = json.loads(got.out)
    for d in (want, got_json):
        d.pop("actual-size")
    assert got_json == want
    assert list(got_json["format-specific"]["data"]["encrypt"]) == \
        list(want["format-specific"]["data"]["encrypt"])
    human = q.qemu_img("info", str(img)).stdout.decode().splitlines()
    ours = qcowfs("info", img).out.splitlines()
    assert [ln for ln in ours if not ln.startswith("disk size")] == \
        [ln for ln in human if not ln.startswith("disk size")]


@pytest.mark.parametrize("kind", ["luks", "aes"])
def test_convert_to_raw_with_image_opts_matches_qemu(images, kind: str, tmp_path: Path):
    img = images[kind]
    want = q.to_raw_encrypted(img, tmp_path / "want.raw", [KEY])
    res = qcowfs("convert", "-O", "raw", *_opts(img), tmp_path / "got.raw")
    assert res.code == 0, res.err
    assert (tmp_path / "got.raw").read_bytes() == want


def test_wrong_key_is_one_line_and_leaves_no_output(images, tmp_path: Path):
    img = images["luks"]
    objects, opts = q.encrypted_opts(img, ["not the key"])
    out = tmp_path / "out.raw"
    res = qcowfs("convert", "-O", "raw", *objects, "--image-opts", opts, out)
    assert res.code == 1
    assert res.err == f"qcowfs: convert: {img}: invalid password\n"
    assert not out.exists()
    qemu = q.qemu_img("convert", *objects, "--image-opts", opts, "-O", "raw", str(out),
                      check=False)
    assert qemu.returncode == 1


def test_commands_without_key_are_refused_as_qemu_refuses_them(images):
    img = images["luks"]
    for cmd in (("map",), ("check",), ("compare", img)):
        res = qcowfs(*cmd, img)
        assert res.code != 0 and "encrypted" in res.err and res.err.count("\n") == 1, res
        assert q.qemu_img(*cmd, str(img), check=False).returncode != 0


def test_map_json_matches_qemu(images):
    img = images["luks"]
    objects, opts = q.encrypted_opts(img, [KEY])
    want = q.qemu_img("map", "--output=json", *objects, "--image-opts", opts).stdout.decode()
    got = qcowfs("map", "--output", "json", *objects, "--image-opts", opts)
    assert got.code == 0, got.err
    assert json.loads(got.out) == json.loads(want)


def test_check_with_key(images):
    res = qcowfs("check", *_opts(images["luks"]))
    assert res.code == 0, res.err
    assert "No errors were found" in res.out


def test_secret_file_and_base64_forms(images, tmp_path: Path):
    img = images["luks"]
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY.encode())
    b64 = base64.b64encode(KEY.encode()).decode()
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=k"
    raw = q.to_raw_encrypted(img, tmp_path / "want.raw", [KEY])
    for obj in (f"secret,id=k,file={keyfile}", f"secret,id=k,data={b64},format=base64"):
        res = qcowfs("compare", "--object", obj, "--image-opts", opts,
                     f"driver=raw,file.filename={tmp_path / 'want.raw'}")
        assert res.code == 0, (obj, res.err)
        assert q.qemu_img("compare", "--object", obj, "--image-opts", opts,
                          f"driver=raw,file.filename={tmp_path / 'want.raw'}").returncode == 0
    assert raw  # the image has data, so compare compared something
    # QEMU reads the file's bytes as they are: a trailing newline is part of the key
    keyfile.write_bytes(KEY.encode() + b"\n")
    res = qcowfs("map", "--object", f"secret,id=k,file={keyfile}", "--image-opts", opts)
    assert res.code == 1 and res.err.endswith("invalid password\n")
    assert q.qemu_img("map", "--object", f"secret,id=k,file={keyfile}", "--image-opts", opts,
                      check=False).returncode == 1


def test_unknown_secret_id_and_bad_objects_are_one_line_errors(images):
    img = images["luks"]
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=nope"
    res = qcowfs("map", "--image-opts", opts)
    assert res.code == 1 and "No secret with id 'nope'" in res.err
    res = qcowfs("map", "--object", "throttle-group,id=t", img)
    assert res.code == 1 and res.err.count("\n") == 1


def test_commit_of_a_plain_overlay_into_a_luks_base(tmp_path: Path):
    base = q.create_encrypted(tmp_path / "base.qcow2", 4 * MiB, KEY)
    q.qemu_io_encrypted(base, [KEY], "write -P 0x21 0 4M")
    top = q.create(tmp_path / "top.qcow2", 4 * MiB, backing=base.name)
    q.qemu_io_encrypted(top, [None, KEY], "write -P 0x65 1M 100000")
    want = q.to_raw_encrypted(top, tmp_path / "want.raw", [None, KEY])
    objects, opts = q.encrypted_opts(top, [None, KEY])
    res = qcowfs("commit", *objects, "--image-opts", opts)
    assert res.code == 0, res.err
    assert q.to_raw_encrypted(base, tmp_path / "got.raw", [KEY]) == want
    assert q.check_encrypted(base, [KEY])[0] == 0


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_commit_of_an_encrypted_overlay_empties_it_as_qemu_img(tmp_path: Path, fmt: str):
    """Without -d the encrypted top is emptied, as qemu-img empties it (QEMU discards every
    cluster rather than rewriting the image, which would lose the key material): it keeps its
    encryption and header, allocates nothing, and reads as the base."""
    sides = {}
    for side in ("qemu", "qcowfs"):
        d = tmp_path / side
        d.mkdir()
        base = q.create(d / "base.qcow2", 8 * MiB)
        q.qemu_io(base, "write -P 0x11 0 4M")
        top = q.create_encrypted(d / "top.qcow2", 8 * MiB, KEY, backing=base.name,
                                 encrypt_format=fmt)
        q.qemu_io_encrypted(top, [KEY], "write -P 0x33 1M 1M", "write -P 0x44 6M 65536")
        want = q.to_raw_encrypted(top, d / "want.raw", [KEY])
        objects, opts = q.encrypted_opts(top, [KEY])
        if side == "qemu":
            q.qemu_img("commit", *objects, "--image-opts", opts)
        else:
            res = qcowfs("commit", *objects, "--image-opts", opts)
            assert res.code == 0, res.err
        assert q.to_raw(base, d / "base.raw") == want
        assert q.to_raw_encrypted(top, d / "got.raw", [KEY]) == want
        assert q.check_encrypted(top, [KEY])[0] == 0
        assert q.info(top)["encrypted"]
        sides[side] = json.loads(q.qemu_img("map", "--output=json", *objects, "--image-opts",
                                            opts).stdout)
    assert sides["qcowfs"] == sides["qemu"]
    assert not any(e["depth"] == 0 for e in sides["qcowfs"])


def test_rebase_of_a_luks_overlay_keeps_the_guest_view(tmp_path: Path):
    old = q.create(tmp_path / "old.qcow2", 4 * MiB)
    q.qemu_io(old, "write -P 0x31 0 4M")
    new = q.create(tmp_path / "new.qcow2", 4 * MiB)
    top = q.create_encrypted(tmp_path / "top.qcow2", 4 * MiB, KEY, backing=old.name)
    q.qemu_io_encrypted(top, [KEY], "write -P 0x44 2M 5000")
    want = q.to_raw_encrypted(top, tmp_path / "want.raw", [KEY])
    res = qcowfs("rebase", "-b", new.name, "-F", "qcow2", *_opts(top))
    assert res.code == 0, res.err
    assert q.to_raw_encrypted(top, tmp_path / "got.raw", [KEY]) == want
    assert q.check_encrypted(top, [KEY])[0] == 0


def _wrong_key_cases(img: Path, out: Path) -> dict[str, list]:
    """Each command given a wrong key for ``img`` (--image-opts), writing, if at all, to
    ``out``."""
    objects, opts = q.encrypted_opts(img, ["not the key"])
    src = [*objects, "--image-opts"]
    return {
        "check": ["check", *src, opts],
        "map": ["map", *src, opts],
        "compare": ["compare", *src, opts, opts],
        "convert": ["convert", "-O", "qcow2", *src, opts, out],
        "commit": ["commit", *src, opts],
        "rebase": ["rebase", "-b", "", *src, opts],
        "rebase -u": ["rebase", "-u", "-b", "", *src, opts],
        "resize": ["resize", *src, opts, "8M"],
        "snapshot -c": ["snapshot", "-c", "s1", *src, opts],
        "snapshot -l": ["snapshot", "-l", *src, opts],
        "amend": ["amend", "-o", "lazy_refcounts=on", *src, opts],
        "bitmap": ["bitmap", "--add", *src, opts, "b0"],
        "measure": ["measure", "-O", "qcow2", *src, opts],
        "dd": ["dd", *src, f"if={opts}", f"of={out}"],
    }


WRONG_KEY_COMMANDS = list(_wrong_key_cases(Path("x"), Path("y")))


@pytest.mark.parametrize("command", WRONG_KEY_COMMANDS)
def test_a_wrong_key_is_one_line_for_every_command_and_writes_nothing(
        images, command: str, tmp_path: Path):
    img = tmp_path / "luks.qcow2"
    img.write_bytes(images["luks"].read_bytes())
    before = img.read_bytes()
    out = tmp_path / "out.img"
    argv = _wrong_key_cases(img, out)[command]
    res = qcowfs(*argv)
    qemu = q.qemu_img(*[str(a) for a in argv], check=False)
    assert b"Invalid password" in qemu.stderr, qemu.stderr
    # exit 1 (compare's error code is 2, in qemu-img too)
    assert res.code == qemu.returncode == (2 if command == "compare" else 1)
    name = command.split()[0]
    assert res.err == f"qcowfs: {name}: {img}: invalid password\n"
    assert img.read_bytes() == before
    assert not out.exists()


def test_resize_of_a_luks_image_grows_and_shrinks_as_qemu_sees_it(images, tmp_path: Path):
    img = tmp_path / "luks.qcow2"
    img.write_bytes(images["luks"].read_bytes())
    want = bytearray(q.to_raw_encrypted(img, tmp_path / "want.raw", [KEY]))
    res = qcowfs("resize", *_opts(img), "8M")
    assert res.code == 0, res.err
    got = q.to_raw_encrypted(img, tmp_path / "grown.raw", [KEY])
    assert got == bytes(want) + bytes(4 * MiB)
    q.qemu_io_encrypted(img, [KEY], "write -P 0x5d 7M 4096")
    res = qcowfs("resize", "--shrink", *_opts(img), "3M")
    assert res.code == 0, res.err
    assert q.to_raw_encrypted(img, tmp_path / "shrunk.raw", [KEY]) == bytes(want[:3 * MiB])
    code, report = q.check_encrypted(img, [KEY])
    assert code == 0, report
