"""``amend -o encrypt.state=active|inactive,...``: key slots added and erased by qcowfs open in
QEMU with the new secret and refuse the old one, and the other way round; every refusal is
qemu-img 7.2's, message for message, on a copy of the same image, and leaves the file as it
was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import qcowfs
from qcowfs.errors import InvalidKeyError
from tests import qemutools as q
from tests.cli_helpers import qcowfs as cli

KEY, NEW, WRONG = "old pass", "new pass", "wrong pass"
MiB = 1 << 20
OBJECTS = ["--object", f"secret,id=s,data={KEY}", "--object", f"secret,id=n,data={NEW}",
           "--object", f"secret,id=w,data={WRONG}"]


def _opts(img: Path, sid: str = "s") -> str:
    return f"driver=qcow2,file.filename={img},encrypt.key-secret={sid}"


def _qemu_amend(img: Path, options: str, *extra: str, sid: str = "s"):
    """qemu-img amend, retrying its "Unable to get accurate CPU usage" flake (it times
    PBKDF2 for a new slot)."""
    for _attempt in range(12):
        p = q.qemu_img("amend", *OBJECTS, *extra, "-o", options, "--image-opts",
                       _opts(img, sid), check=False)
        if p.returncode == 0 or b"accurate CPU usage" not in p.stderr:
            return p
    return p


def _opens_in_qemu(img: Path, key: str) -> bool:
    objects, opts = q.encrypted_opts(img, [key])
    p = q.qemu_img("check", *objects, "--image-opts", opts, check=False)
    assert p.returncode == 0 or b"Invalid password" in p.stderr, p.stderr
    return p.returncode == 0


def _active(img: Path) -> list[bool]:
    return [s["active"] for s in q.info(img)["format-specific"]["data"]["encrypt"]["slots"]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    img = q.create_encrypted(tmp_path_factory.mktemp("amend") / "base.qcow2", 4 * MiB, KEY,
                             cluster_size=65536)
    q.qemu_io_encrypted(img, [KEY], "write -P 0x6b 0 1M", "write -P 0x21 3M 4096")
    return img


@pytest.fixture
def img(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "img.qcow2"
    shutil.copyfile(base, out)
    return out


def test_slot_added_by_qcowfs_opens_in_qemu_then_the_old_one_erased(img: Path, tmp_path):
    want = q.to_raw_encrypted(img, tmp_path / "want.raw", [KEY])
    res = cli("amend", *OBJECTS, "-o", "encrypt.state=active,encrypt.new-secret=n,"
              "encrypt.iter-time=10", "--image-opts", _opts(img))
    assert res.code == 0 and res.err == "", res.err
    assert _active(img) == [True, True] + [False] * 6
    assert _opens_in_qemu(img, NEW) and _opens_in_qemu(img, KEY)
    assert q.to_raw_encrypted(img, tmp_path / "new.raw", [NEW]) == want
    # the old password's slots erased (opening with the new one): QEMU refuses the old
    res = cli("amend", *OBJECTS, "-o", "encrypt.state=inactive,encrypt.old-secret=s",
              "--image-opts", _opts(img, "n"))
    assert res.code == 0, res.err
    assert _active(img) == [False, True] + [False] * 6
    assert not _opens_in_qemu(img, KEY)
    assert q.to_raw_encrypted(img, tmp_path / "after.raw", [NEW]) == want
    q.qemu_io_encrypted(img, [NEW], "read -P 0x21 3M 4096")
    code, report = q.check_encrypted(img, [NEW])
    assert code == 0, report
    # info shows what qemu-img shows, slot for slot
    got = cli("info", "--output=json", img)
    ours = json.loads(got.out)["format-specific"]["data"]["encrypt"]
    assert ours == q.info(img)["format-specific"]["data"]["encrypt"]


def test_slots_changed_by_qemu_img_open_in_qcowfs(img: Path):
    assert _qemu_amend(img, "encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=5,"
                            "encrypt.iter-time=50").returncode == 0
    with qcowfs.open_image(str(img), keys=[NEW.encode()]) as disk:
        assert disk.read(0, MiB) == b"\x6b" * MiB
    assert _qemu_amend(img, "encrypt.state=inactive,encrypt.keyslot=0",
                       sid="n").returncode == 0
    with pytest.raises(InvalidKeyError):
        qcowfs.open_image(str(img), keys=[KEY.encode()])
    with qcowfs.open_image(str(img), keys=[NEW.encode()]) as disk:
        assert disk.read(3 * MiB, 4096) == b"\x21" * 4096


def test_explicit_slot_and_force_overwrite(img: Path):
    res = cli("amend", *OBJECTS, "-o", "encrypt.state=active,encrypt.new-secret=n,"
              "encrypt.keyslot=7,encrypt.iter-time=10", "--image-opts", _opts(img))
    assert res.code == 0, res.err
    assert _active(img) == [True] + [False] * 6 + [True]
    # --force overwrites the active slot 0 with the new password: the old one is gone
    res = cli("amend", *OBJECTS, "--force", "-o", "encrypt.state=active,"
              "encrypt.new-secret=n,encrypt.keyslot=0,encrypt.iter-time=10",
              "--image-opts", _opts(img))
    assert res.code == 0, res.err
    assert not _opens_in_qemu(img, KEY) and _opens_in_qemu(img, NEW)
    # --force erases the last matching slots too: then no password opens the image
    res = cli("amend", *OBJECTS, "--force", "-o", "encrypt.state=inactive,"
              "encrypt.old-secret=n", "--image-opts", _opts(img, "n"))
    assert res.code == 0, res.err
    assert _active(img) == [False] * 8
    assert not _opens_in_qemu(img, NEW)


def test_all_slots_in_use(img: Path):
    for _ in range(7):
        res = cli("amend", *OBJECTS, "-o", "encrypt.state=active,encrypt.new-secret=n,"
                  "encrypt.iter-time=1", "--image-opts", _opts(img))
        assert res.code == 0, res.err
    assert _active(img) == [True] * 8
    before = img.read_bytes()
    res = cli("amend", *OBJECTS, "-o", "encrypt.state=active,encrypt.new-secret=n",
              "--image-opts", _opts(img))
    assert res.err == "qcowfs: amend: Can't add a keyslot - all keyslots are in use\n"
    assert img.read_bytes() == before
    assert _opens_in_qemu(img, NEW) and _opens_in_qemu(img, KEY)


# (options, whether the image holds a second slot under NEW): each refused by both tools
REFUSALS = [
    ("encrypt.new-secret=n", False),
    ("encrypt.state=on,encrypt.new-secret=n", False),
    ("encrypt.state=active", False),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.old-secret=s", False),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=0", False),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=8", False),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=-1", False),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=one", False),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.iter-time=x", False),
    ("encrypt.state=active,encrypt.new-secret=zz", False),
    ("encrypt.state=active,encrypt.new-secret=zz,encrypt.keyslot=0", False),
    ("encrypt.state=inactive", False),
    ("encrypt.state=inactive,encrypt.new-secret=n", False),
    ("encrypt.state=inactive,encrypt.keyslot=1,encrypt.iter-time=10", False),
    ("encrypt.state=inactive,encrypt.keyslot=3", False),
    ("encrypt.state=inactive,encrypt.keyslot=9", False),
    ("encrypt.state=inactive,encrypt.keyslot=-1", False),
    ("encrypt.state=inactive,encrypt.old-secret=w", False),
    ("encrypt.state=inactive,encrypt.old-secret=zz", False),
    ("encrypt.state=inactive,encrypt.keyslot=0,encrypt.old-secret=w", False),
    ("encrypt.state=inactive,encrypt.keyslot=0", False),
    ("encrypt.state=inactive,encrypt.old-secret=s", False),
    ("encrypt.state=inactive,encrypt.keyslot=1,encrypt.old-secret=s", True),
    ("encrypt.state=inactive,encrypt.keyslot=2,encrypt.old-secret=n", True),
]


@pytest.fixture(scope="module")
def two_slots(base: Path, tmp_path_factory) -> Path:
    img = tmp_path_factory.mktemp("amend2") / "two.qcow2"
    shutil.copyfile(base, img)
    assert _qemu_amend(img, "encrypt.state=active,encrypt.new-secret=n,"
                            "encrypt.iter-time=50").returncode == 0
    return img


@pytest.mark.parametrize("options,second", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_qemu_imgs(options: str, second: bool, base: Path, two_slots: Path,
                                tmp_path: Path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for copy in (ours, theirs):
        shutil.copyfile(two_slots if second else base, copy)
    before = ours.read_bytes()
    qemu = _qemu_amend(theirs, options)
    assert qemu.returncode == 1
    res = cli("amend", *OBJECTS, "-o", options, "--image-opts", _opts(ours))
    assert res.code == 1
    want = qemu.stderr.decode().removeprefix("qemu-img: ")
    assert res.err == f"qcowfs: amend: {want}"
    assert ours.read_bytes() == before


@pytest.mark.parametrize("kind", ["plain", "aes"])
def test_images_without_luks_are_refused_as_qemu_refuses_them(kind: str, tmp_path: Path):
    if kind == "plain":
        img = q.create(tmp_path / "x.qcow2", MiB)
        opts = f"driver=qcow2,file.filename={img}"
    else:
        img = q.create_encrypted(tmp_path / "x.qcow2", MiB, KEY, encrypt_format="aes")
        opts = _opts(img)
    amend = ("-o", "encrypt.state=active,encrypt.new-secret=n", "--image-opts", opts)
    qemu = q.qemu_img("amend", *OBJECTS, *amend, check=False)
    res = cli("amend", *OBJECTS, *amend)
    assert qemu.returncode == res.code == 1
    assert res.err == f"qcowfs: amend: {qemu.stderr.decode().removeprefix('qemu-img: ')}"


def test_wrong_or_missing_key_changes_nothing(img: Path):
    before = img.read_bytes()
    res = cli("amend", *OBJECTS, "-o", "encrypt.state=active,encrypt.new-secret=n",
              "--image-opts", _opts(img, "w"))
    assert res.code == 1 and res.err == f"qcowfs: amend: {img}: invalid password\n"
    res = cli("amend", *OBJECTS, "-o", "encrypt.state=active,encrypt.new-secret=n", img)
    assert res.code == 1 and "encrypt.key-secret" in res.err and res.err.count("\n") == 1
    assert img.read_bytes() == before
