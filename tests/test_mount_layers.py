"""layers/: each image of the backing chain as the guest saw it, judged by qemu-img convert."""

from __future__ import annotations

import errno
import os

import pytest
from mounttools import mounted, needs_fuse, read_all
from qemutools import create, info, qemu_io, to_raw

pytestmark = [needs_fuse, pytest.mark.fuse]

MIB = 1 << 20


def _chain(tmp_path):
    """raw base (3 MiB) < qcow2 mid (5 MiB, v2) < qcow2 top (8 MiB): each layer writes its own
    pattern over part of the one below, so every layer's view differs."""
    base = tmp_path / "base.img"
    create(base, 3 * MIB, fmt="raw")
    qemu_io(base, "write -P 0x11 0 3M", fmt="raw")
    mid = create(tmp_path / "mid.qcow2", 5 * MIB, backing="base.img", backing_fmt="raw",
                 cwd=tmp_path, compat="0.10")
    qemu_io(mid, "write -P 0x22 1M 3M")
    top = create(tmp_path / "top.qcow2", 8 * MIB, backing="mid.qcow2", cwd=tmp_path)
    qemu_io(top, "write -P 0x33 2M 1M", "write -z 4M 64k", "write -P 0x44 7M 512k")
    return [top, mid, base]


def test_each_layer_equals_qemu_img_convert_of_that_layer(tmp_path):
    images = _chain(tmp_path)
    expected = [to_raw(img, tmp_path / f"want{i}.raw") for i, img in enumerate(images)]
    infos = [info(img) for img in images]
    with mounted(images[0], tmp_path / "mnt") as mp:
        names = os.listdir(mp / "layers")
        assert names == ["0-top.qcow2", "1-mid.qcow2", "2-base.img"]
        assert "layers" in os.listdir(mp)
        for depth, name in enumerate(names):
            got = read_all(mp / "layers" / name / "disk")
            assert got == expected[depth], f"layer {name} differs from qemu-img convert"
            assert os.stat(mp / "layers" / name / "disk").st_size == infos[depth]["virtual-size"]
            fields = dict(line.split(": ", 1) for line in
                          (mp / "layers" / name / "info").read_text().splitlines())
            assert fields["path"] == str(images[depth])
            assert fields["format"] == infos[depth]["format"]
            assert int(fields["virtual_size"]) == infos[depth]["virtual-size"]
            assert fields["backing_file"] == infos[depth].get("backing-filename", "")
            assert fields["depth"] == str(depth)


def test_layers_are_read_only_and_the_top_layer_follows_writes(tmp_path):
    images = _chain(tmp_path)
    with mounted(images[0], tmp_path / "mnt") as mp:
        layer = mp / "layers" / "1-mid.qcow2" / "disk"
        for path in (layer, mp / "layers" / "0-top.qcow2" / "disk"):
            with pytest.raises(OSError) as exc:
                os.open(path, os.O_RDWR)
            assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            os.mkdir(mp / "layers" / "new")
        assert exc.value.errno in (errno.EPERM, errno.EROFS)
        fd = os.open(mp / "disk", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x55" * 4096, 5 * MIB)
            os.fsync(fd)
        finally:
            os.close(fd)
        top = read_all(mp / "layers" / "0-top.qcow2" / "disk")
        assert top[5 * MIB:5 * MIB + 4096] == b"\x55" * 4096
        assert top == read_all(mp / "disk")
