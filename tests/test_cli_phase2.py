"""commit, rebase, snapshot and resize: every result judged by qemu-img (compare, check,
convert, info) against what the same operation does with qemu-img."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import qcowfs
from qemutools import assert_check_clean, create, qemu_img, qemu_io


def identical(a, b, *extra) -> bool:
    return qemu_img("compare", *extra, str(a), str(b), check=False).returncode == 0


def guest(path: Path, out: Path) -> Path:
    qemu_img("convert", "-O", "raw", str(path), str(out))
    return out


def info(path: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", str(path)).stdout)


def chain(d: Path, base_fmt: str = "raw", base_size: str = "4M") -> Path:
    base = create(d / f"base.{base_fmt}", base_size, fmt=base_fmt)
    qemu_io(base, "write -P 1 0 2M", fmt=base_fmt)
    mid = create(d / "mid.qcow2", "6M", backing=base.name, backing_fmt=base_fmt)
    qemu_io(mid, "write -P 2 1M 1M", "write -z 3M 64k")
    top = create(d / "top.qcow2", "6M", backing=mid.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 3 1536k 1M", "write -z 100k 8k", "write -P 4 5M 64k")
    return top


def twin(tmp_path: Path, build) -> tuple[Path, Path]:
    """The same chain in two folders: one for qemu-img, one for qcowfs."""
    a, b = tmp_path / "theirs", tmp_path / "ours"
    a.mkdir()
    b.mkdir()
    return build(a), build(b)


# --- commit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_commit_one_level(tmp_path, base_fmt):
    theirs, ours = twin(tmp_path, lambda d: chain(d, base_fmt))
    want = guest(ours, tmp_path / "want.raw")
    qemu_img("commit", "-q", str(theirs))
    r = qcowfs("commit", ours)
    assert r.code == 0 and r.out == "Image committed.\n", r.err
    assert identical(ours, want)
    assert identical(ours.parent / "mid.qcow2", theirs.parent / "mid.qcow2")
    assert_check_clean(ours)
    assert_check_clean(ours.parent / "mid.qcow2")
    # emptied: nothing left at depth 0 but unallocated ranges
    entries = json.loads(qemu_img("map", "--output=json", str(ours)).stdout)
    assert not [e for e in entries if e["depth"] == 0 and e["present"]]
    assert info(ours)["backing-filename"] == "mid.qcow2"


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_commit_two_levels_into_base_grows_it(tmp_path, base_fmt):
    theirs, ours = twin(tmp_path, lambda d: chain(d, base_fmt))
    want = guest(ours, tmp_path / "want.raw")
    base = ours.parent / f"base.{base_fmt}"
    qemu_img("commit", "-q", "-b", str(theirs.parent / f"base.{base_fmt}"), str(theirs))
    r = qcowfs("commit", "-b", str(base), ours)
    assert r.code == 0, r.err
    assert info(base)["virtual-size"] == 6 << 20  # grown to the top's size
    assert identical(base, want, "-f", base_fmt)
    assert identical(base, theirs.parent / f"base.{base_fmt}")
    assert identical(ours, want)  # -b implies -d: the top still holds its data
    if base_fmt == "qcow2":
        assert_check_clean(base)


def test_commit_keep_with_d(tmp_path):
    top = chain(tmp_path)
    want = guest(top, tmp_path / "want.raw")

    def own_data():
        entries = json.loads(qemu_img("map", "--output=json", str(top)).stdout)
        return [e for e in entries if e["depth"] == 0 and e["data"]]

    before = own_data()
    assert before
    assert qcowfs("commit", "-d", top).code == 0
    assert own_data() == before
    assert identical(top, want)
    assert identical(tmp_path / "mid.qcow2", want)  # the data reached the backing file


def test_commit_errors(tmp_path):
    lone = create(tmp_path / "lone.qcow2", "1M")
    r = qcowfs("commit", lone)
    assert r.code == 1 and "backing file" in r.err
    top = chain(tmp_path)
    r = qcowfs("commit", "-b", tmp_path / "elsewhere.qcow2", top)
    assert r.code == 1 and r.err.startswith("qcowfs: commit: ")


# --- rebase ---------------------------------------------------------------------------------

def rebase_setup(d: Path) -> Path:
    old = create(d / "old.qcow2", "4M")
    qemu_io(old, "write -P 1 0 2M")
    new = create(d / "new.qcow2", "3M")
    qemu_io(new, "write -P 1 0 1M", "write -P 9 2M 512k")
    top = create(d / "t.qcow2", "4M", backing=old.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 5 512k 64k", "write -z 1536k 64k")
    return top


def test_rebase_safe_keeps_the_guest_view(tmp_path):
    theirs, ours = twin(tmp_path, rebase_setup)
    want = guest(ours, tmp_path / "want.raw")
    qemu_img("rebase", "-b", "new.qcow2", "-F", "qcow2", str(theirs))
    r = qcowfs("rebase", "-b", "new.qcow2", "-F", "qcow2", ours)
    assert r.code == 0, r.err
    assert identical(ours, want)
    assert identical(ours, theirs)
    assert_check_clean(ours)
    a, b = info(theirs), info(ours)
    for key in ("backing-filename", "backing-filename-format", "full-backing-filename"):
        assert b[key].replace(str(ours.parent), "") == a[key].replace(str(theirs.parent), "")


def test_rebase_detach(tmp_path):
    top = rebase_setup(tmp_path)
    want = guest(top, tmp_path / "want.raw")
    assert qcowfs("rebase", "-b", "", top).code == 0
    assert "backing-filename" not in info(top)
    assert identical(top, want)
    assert_check_clean(top)


def test_rebase_unsafe_only_rewrites_the_header(tmp_path):
    theirs, ours = twin(tmp_path, rebase_setup)
    qemu_img("rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", str(theirs))
    r = qcowfs("rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", ours)
    assert r.code == 0, r.err
    assert ours.read_bytes() == theirs.read_bytes()
    r = qcowfs("rebase", "-u", "-b", "new.qcow2", ours)
    assert r.code == 1 and "format" in r.err


# --- snapshot -------------------------------------------------------------------------------

def test_snapshot_create_apply_delete_list(tmp_path):
    img = create(tmp_path / "s.qcow2", "2M")
    qemu_io(img, "write -P 1 0 128k")
    first = guest(img, tmp_path / "first.raw")
    assert qcowfs("snapshot", "-c", "one", img).code == 0
    assert_check_clean(img)
    qemu_io(img, "write -P 2 64k 128k")
    assert qcowfs("snapshot", "-c", "two", img).code == 0
    second = guest(img, tmp_path / "second.raw")
    qemu_io(img, "write -P 3 1M 64k")
    listed = qcowfs("snapshot", "-l", img)
    assert listed.out == qemu_img("snapshot", "-l", str(img)).stdout.decode()
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=one", "-O", "raw", str(img), str(snap))
    assert identical(snap, first)
    assert qcowfs("snapshot", "-a", "one", img).code == 0
    assert identical(img, first)
    assert_check_clean(img)
    assert qcowfs("snapshot", "-a", "2", img).code == 0
    assert identical(img, second)
    assert qcowfs("snapshot", "-d", "one", img).code == 0
    assert [s["name"] for s in info(img)["snapshots"]] == ["two"]
    assert_check_clean(img)
    r = qcowfs("snapshot", "-d", "nope", img)
    assert r.code == 1 and r.err.startswith("qcowfs: snapshot: ")


# --- resize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["+1M"], ["5M"], ["--shrink", "1M"], ["--shrink", "--", "-512k"],
                                  ["3M"]])
def test_resize_like_qemu_img(tmp_path, args):
    def build(d):
        p = create(d / "r.qcow2", "3M")
        qemu_io(p, "write -P 1 0 3M")
        return p
    theirs, ours = twin(tmp_path, build)
    qemu_img("resize", "-q", str(theirs), *args)
    flags = [a for a in args if a == "--shrink"]
    size = args[-1]
    r = qcowfs("resize", *flags, "--", ours, size)
    assert r.code == 0, r.err
    assert info(ours)["virtual-size"] == info(theirs)["virtual-size"]
    assert identical(ours, theirs)
    assert_check_clean(ours)


def test_shrink_needs_the_flag(tmp_path):
    p = create(tmp_path / "r.qcow2", "3M")
    r = qcowfs("resize", p, "1M")
    assert r.code == 1 and "--shrink" in r.err
    assert info(p)["virtual-size"] == 3 << 20


def test_raw_resize(tmp_path):
    p = create(tmp_path / "r.raw", "1M", fmt="raw")
    assert qcowfs("resize", "-f", "raw", p, "+1M").code == 0
    assert p.stat().st_size == 2 << 20
