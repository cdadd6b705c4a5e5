"""bitmap changes persistent bitmaps as qemu-img bitmap does: run the same actions with both
tools on copies of one QEMU-made image, then the bitmap tables (parsed from the file), qemu-img
info's bitmaps field for field and qemu-img check must agree; QEMU reads the bits back."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import qcowfs
from qemutools import (
    assert_check_clean,
    bitmap_bits,
    create,
    info,
    qemu_img,
    qemu_io,
    qemu_io_killed,
)

# each step is one call: (options, bitmap name)
SCRIPTS = [
    [("--add", "n1")],
    [("--add -g 512 --disable", "n1")],
    [("--add -g 1M", "n1"), ("--disable", "n1"), ("--enable", "n1")],
    [("--remove", "b1")],
    [("--clear", "b1")],
    [("--disable", "b1"), ("--remove", "b2")],
    [("--add --disable", "n1"), ("--merge b1", "n1")],
    [("--add -g 4k --merge b1 --merge b2", "n1")],
    [("--add -g 2M --merge b1", "n1")],
    [("--merge b2", "b1")],
    [("--add --remove", "n1")],
    [("--remove --add --clear", "b1")],
    [("--add --enable --merge nope", "n1")],
    [("--add", "b1")],
    [("--remove", "nope")],
    [("--add -g 3000", "n1")],
    [("--clear", None)],
    [("", "b1")],
    [("-g 64k --clear", "b1")],
    [("-b x --clear", "b1")],
    [("-F qcow2 --clear", "b1")],
]


@pytest.fixture
def image(tmp_path):
    img = create(tmp_path / "a.qcow2", "5M")
    qemu_img("bitmap", "--add", str(img), "b1")
    qemu_img("bitmap", "--add", "-g", "8k", str(img), "b2")
    qemu_io(img, "write 0 4k", "write 1M 100k", "write 4M 8k")
    qemu_img("bitmap", "--disable", str(img), "b1")
    qemu_io(img, "write 2M 64k", "write -z 3M 64k")
    return img


def _run(tool: str, img, steps) -> tuple[int, str]:
    code, err = 0, ""
    for options, name in steps:
        args = ["bitmap", *options.split(), str(img), *([name] if name else [])]
        if tool == "qemu":
            p = qemu_img(*args, check=False)
            code, err = p.returncode, p.stderr.decode().removeprefix("qemu-img: ")
        else:
            r = qcowfs(*args)
            code, err = r.code, r.err.removeprefix("qcowfs: bitmap: ")
        if code:
            break
    return code, err.split("\n")[0]  # ours is one line; QEMU may add a hint


@pytest.mark.parametrize("steps", SCRIPTS, ids=lambda s: "; ".join(f"{o} {n}" for o, n in s))
def test_same_as_qemu(image, tmp_path, steps):
    ours = tmp_path / "ours.qcow2"
    shutil.copy(image, ours)
    want = _run("qemu", image, steps)
    got = _run("qcowfs", ours, steps)
    assert got == want
    assert bitmap_bits(ours) == bitmap_bits(image)
    spec = "format-specific"
    assert info(ours)[spec]["data"].get("bitmaps") == info(image)[spec]["data"].get("bitmaps")
    assert_check_clean(ours)


def test_qemu_reads_our_bits(image, tmp_path):
    assert qcowfs("bitmap", "--add", "-g", "4k", "--merge", "b1", "--merge", "b2",
                  str(image), "ours").code == 0
    fresh = create(tmp_path / "fresh.qcow2", "5M")
    qemu_img("bitmap", "--add", "-g", "4k", str(fresh), "m")
    qemu_img("bitmap", "--merge", "ours", "-b", str(image), "-F", "qcow2", str(fresh), "m")
    ours = bitmap_bits(image)["ours"]
    assert bitmap_bits(fresh)["m"][2] == ours[2] and any(ours[2])


def test_merge_from_another_image(image, tmp_path):
    other = create(tmp_path / "o.qcow2", "5M")
    ours = tmp_path / "ours.qcow2"
    shutil.copy(other, ours)
    for tool, target in (("qemu", other), ("qcowfs", ours)):
        args = ["bitmap", "--add", "--merge", "b2", "-b", str(image), "-F", "qcow2",
                str(target), "m"]
        if tool == "qemu":
            qemu_img(*args)
        else:
            assert qcowfs(*args).code == 0
    assert bitmap_bits(ours) == bitmap_bits(other)
    assert_check_clean(ours)


@pytest.mark.parametrize("options", ["--clear", "--disable", "--merge b1", "--remove",
                                     "--add -g 4k --merge b1"])
def test_in_use_bitmaps_as_qemu(tmp_path, options):
    """A bitmap QEMU left in use (it was killed) stays in use; only --remove may touch it."""
    img = create(tmp_path / "a.qcow2", "5M")
    qemu_img("bitmap", "--add", str(img), "b1")
    qemu_img("bitmap", "--add", str(img), "b2")
    qemu_io_killed(img, "write 0 4k")
    ours = tmp_path / "ours.qcow2"
    shutil.copy(img, ours)
    name = "n1" if "--add" in options else "b1"
    steps = [(options, name), ("--clear", "b2")]
    assert _run("qcowfs", ours, steps) == _run("qemu", img, steps)
    assert bitmap_bits(ours) == bitmap_bits(img)
    spec = "format-specific"
    assert info(ours)[spec]["data"].get("bitmaps") == info(img)[spec]["data"].get("bitmaps")
