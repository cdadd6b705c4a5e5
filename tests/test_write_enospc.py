"""A host file system that fills up mid-write: the write fails with HostIOError carrying
ENOSPC, nothing flushed earlier is lost, and once space is back the close leaves an image
``qemu-img check`` finds clean and QEMU reads exactly what was written."""

from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest
from qemutools import assert_check_clean, compare, create

import qcowfs
from qcowfs.errors import HostIOError

MiB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("options", [{}, {"cluster_size": 4096, "refcount_bits": 64}],
                         ids=["c64k", "c4k-r64"])
def test_enospc_mid_write(small_fs, tmp_path, options):
    size = 32 * MiB
    path = create(small_fs / "img.qcow2", size, **options)
    filler = small_fs / "filler"
    filler.write_bytes(os.urandom(512 * 1024))
    model = bytearray(size)
    rnd = random.Random(7)
    failure = None
    with qcowfs.open_image(str(path), writable=True) as disk:
        for i in range(size // MiB):
            offset = i * MiB + rnd.randrange(0, 4096)
            data = rnd.randbytes(MiB - 8192)
            try:
                disk.write(offset, data)
            except HostIOError as exc:
                failure = exc
                break
            model[offset:offset + len(data)] = data
            try:
                disk.flush()
            except HostIOError as exc:
                failure = exc
                break
        assert failure is not None, "the file system never filled up"
        assert failure.errno == errno.ENOSPC
        assert "No space left" in str(failure)
        os.unlink(filler)  # space is back: the close can write the metadata
    assert_check_clean(path)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    assert compare(expected, path) == 0
