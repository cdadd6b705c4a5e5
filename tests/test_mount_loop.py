"""Real file systems on the mounted disk, through loop devices."""

from __future__ import annotations

import filecmp
import os
import random
import subprocess
from pathlib import Path

import pytest
from mounttools import fs_mounted, loop_device, mounted, needs_fuse
from qemutools import qemu_img

pytestmark = [needs_fuse, pytest.mark.fuse]


def make_tree(root, seed=1):
    """A small tree of files of assorted sizes, with a symlink and an empty directory."""
    rng = random.Random(seed)
    for d in ("etc", "usr/share/doc", "var/empty", "home/user/deep/er"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(40):
        sub = rng.choice(["etc", "usr/share/doc", "home/user", "home/user/deep/er", "."])
        size = rng.choice([0, 1, 100, 4095, 4096, 70000, 1 << 20, 3 * (1 << 20) + 17])
        (root / sub / f"file{i}").write_bytes(rng.randbytes(size))
    (root / "link").symlink_to("etc/file0" if (root / "etc/file0").exists() else "etc")
    return root


def assert_same_tree(a, b):
    cmp = filecmp.dircmp(a, b, ignore=["lost+found"])
    stack = [cmp]
    while stack:
        c = stack.pop()
        c.left, c.right = Path(c.left), Path(c.right)
        assert not c.left_only and not c.right_only, (c.left, c.left_only, c.right_only)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch, errors)
        stack.extend(filecmp.dircmp(c.left / s, c.right / s) for s in c.common_dirs)


def test_compressed_ext4_image_browsed_read_only(tmp_path):
    tree = make_tree(tmp_path / "tree")
    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], check=True,
                   capture_output=True)
    img = tmp_path / "fs.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", raw, img)
    assert os.path.getsize(img) < os.path.getsize(raw)
    with mounted(img, tmp_path / "mnt", "ro") as mp, \
            loop_device(mp / "disk", read_only=True) as dev, \
            fs_mounted(dev, tmp_path / "fs", "ro", "noload") as fs:
        assert_same_tree(tree, fs)
