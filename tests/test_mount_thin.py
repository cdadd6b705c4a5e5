"""disk as a thin block device: fallocate (punch hole, zero range) and SEEK_DATA/SEEK_HOLE
through real mounts, judged by qemu-img map/check and qemu-io reads."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import subprocess
import threading

import pytest
from mounttools import (
    force_unmount,
    fs_mounted,
    is_mounted,
    loop_device,
    mounted,
    needs_fuse,
    wait_until,
)
from qemutools import assert_check_clean, check, create, map_json, qemu_img, qemu_io

from qcowfs.mount.operations import binding_has_thin_handlers

pytestmark = [needs_fuse, pytest.mark.fuse,
              pytest.mark.skipif(not binding_has_thin_handlers(),
                                 reason="pyfuse3 without qcowfs's patch (make venv installs it)")]

KIB, MIB = 1 << 10, 1 << 20
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE = 0x01, 0x02, 0x08, 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _chain(tmp_path, setup: str):
    """16 MiB of 0x22 written by qemu-io in the top (64 KiB clusters); with a backing file
    of 8 MiB of 0x11 below it unless ``setup`` is "lone"; v2 for "v2"."""
    opts = {"compat": "0.10"} if setup == "v2" else {}
    backing = None
    if setup != "lone":
        backing = create(tmp_path / "base.qcow2", 8 * MIB, **opts)
        qemu_io(backing, "write -P 0x11 0 8M")
    top = create(tmp_path / "top.qcow2", 16 * MIB,
                 backing="base.qcow2" if backing else None, cwd=tmp_path, **opts)
    qemu_io(top, "write -P 0x22 0 16M")
    return top


def _entry_at(entries: list[dict], offset: int) -> dict:
    return next(e for e in entries if e["start"] <= offset < e["start"] + e["length"])


@pytest.mark.parametrize("setup", ["backed", "lone", "v2"])
def test_fallocate_modes_judged_by_qemu(tmp_path, setup):
    top = _chain(tmp_path, setup)
    with mounted(top, tmp_path / "mnt") as mp:
        fd = os.open(mp / "disk", os.O_RDWR)
        try:
            # whole clusters below the backing file's end, with unaligned edges
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 1 * MIB - 1000, 2 * MIB + 3000)
            # whole clusters past the backing file's end
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 9 * MIB, 2 * MIB)
            fallocate(fd, ZERO_RANGE, 4 * MIB, 1 * MIB)
            fallocate(fd, ZERO_RANGE | KEEP_SIZE, 12 * MIB + 512, 4 * MIB)  # clipped at 16M
            fallocate(fd, 0, 0, 1 * MIB)  # inside the disk: nothing to do
            for mode in (KEEP_SIZE, COLLAPSE_RANGE, PUNCH_HOLE | KEEP_SIZE | ZERO_RANGE):
                with pytest.raises(OSError) as exc:
                    fallocate(fd, mode, 0, 64 * KIB)
                assert exc.value.errno == errno.EOPNOTSUPP, mode
            for mode in (0, ZERO_RANGE):  # past the end without KEEP_SIZE, as a block device
                with pytest.raises(OSError) as exc:
                    fallocate(fd, mode, 15 * MIB, 2 * MIB)
                assert exc.value.errno == errno.EINVAL
            with pytest.raises(OSError) as exc:
                fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 16 * MIB, 64 * KIB)
            assert exc.value.errno == errno.EINVAL
            assert os.pread(fd, 4096, 2 * MIB) == bytes(4096), "the punched range reads zeros"
            assert os.fstat(fd).st_size == 16 * MIB
        finally:
            os.close(fd)
    assert_check_clean(top)
    qemu_io(top, "read -P 0x22 0 1047576", "read -P 0 1047576 2100152",
            "read -P 0x22 3147728 1046576", "read -P 0 4M 1M", "read -P 0x22 5M 4M",
            "read -P 0 9M 2M", "read -P 0x22 11M 1049088", "read -P 0 12583424 4193792")
    entries = map_json(top)
    cluster = _entry_at(entries, 2 * MIB)
    past_backing = _entry_at(entries, 10 * MIB)
    zeroed = _entry_at(entries, 4 * MIB)
    if setup == "v2":
        # no zero clusters: where the backing file would show, zeros are written as data
        assert cluster["data"] and cluster["depth"] == 0, cluster
        assert not past_backing["present"] and past_backing["zero"], past_backing
    elif setup == "backed":
        assert cluster["zero"] and cluster["present"] and cluster["depth"] == 0, cluster
        assert "offset" not in cluster, "the zero cluster still holds a host cluster"
        assert not past_backing["present"] and past_backing["zero"], past_backing
        assert zeroed["zero"] and not zeroed["data"], zeroed
    else:
        assert not cluster["present"] and cluster["zero"], cluster
        assert not past_backing["present"], past_backing
        assert zeroed["zero"] and not zeroed["data"], zeroed
    assert _entry_at(entries, 6 * MIB)["data"], "untouched data stays"


def _data_ranges_by_map(entries: list[dict]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for e in entries:
        if not e["data"]:
            continue
        if out and out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], e["start"] + e["length"])
        else:
            out.append((e["start"], e["start"] + e["length"]))
    return out


def _data_ranges_by_seek(path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            assert end > start
            out.append((start, end))
            pos = end
        with pytest.raises(OSError) as exc:
            os.lseek(fd, size, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
        return out
    finally:
        os.close(fd)


def test_seek_walks_equal_qemu_img_map_on_disk_and_snapshot_disks(tmp_path):
    base = create(tmp_path / "base.qcow2", 12 * MIB)
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x11 6M 512k", "write -z 8M 1M")
    top = create(tmp_path / "top.qcow2", 16 * MIB, backing="base.qcow2", cwd=tmp_path)
    qemu_io(top, "write -P 0x22 512k 1M", "write -z 6M 256k", "write -P 0x22 14M 64k")
    qemu_img("snapshot", "-c", "s1", str(top))
    qemu_io(top, "write -P 0x33 3M 1M", "write -z 0 256k")
    want = _data_ranges_by_map(map_json(top))
    snap_copy = tmp_path / "snapcopy.qcow2"
    shutil.copyfile(top, snap_copy)
    qemu_img("snapshot", "-a", "s1", str(snap_copy))
    want_snap = _data_ranges_by_map(map_json(snap_copy))
    assert want != want_snap, "the fixture must tell the snapshot from the disk"
    with mounted(top, tmp_path / "mnt") as mp:
        assert _data_ranges_by_seek(mp / "disk") == want
        assert _data_ranges_by_seek(mp / "snapshots" / "s1" / "disk") == want_snap
        assert _data_ranges_by_seek(mp / "layers" / "1-base.qcow2" / "disk") == \
            _data_ranges_by_map(map_json(base))


def _mapped_data(image) -> int:
    return sum(e["length"] for e in map_json(image) if e["data"] and e["depth"] == 0)


@pytest.mark.slow
def test_fstrim_through_loop_and_ext4_lowers_the_tops_data(tmp_path):
    top = create(tmp_path / "top.qcow2", 256 * MIB)
    mp, fs = tmp_path / "mnt", tmp_path / "fs"
    with mounted(top, mp) as m, loop_device(m / "disk") as dev:
        subprocess.run(["mkfs.ext4", "-q", "-E", "nodiscard", dev], check=True)
        with fs_mounted(dev, fs), open(fs / "big", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(MIB))
            os.fsync(f.fileno())
    full = _mapped_data(top)
    assert full >= 64 * MIB
    with mounted(top, mp) as m, loop_device(m / "disk") as dev, fs_mounted(dev, fs):
        os.unlink(fs / "big")
        os.sync()
        subprocess.run(["fstrim", str(fs)], check=True, capture_output=True)
    trimmed = _mapped_data(top)
    assert_check_clean(top)
    assert trimmed < full - 60 * MIB, (full, trimmed)


def test_sigkill_during_discard_leaves_check_clean(tmp_path):
    top = create(tmp_path / "top.qcow2", 256 * MIB, cluster_size=4096)
    qemu_io(top, "write -P 0x22 0 256M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        with mounted(top, mp):
            pid = int(os.getxattr(mp, "user.qcowfs.pid"))
            fd = os.open(mp / "disk", os.O_RDWR)
            started = threading.Event()
            failures: list[BaseException] = []

            def punch() -> None:
                try:
                    for i in range(256):
                        started.set()
                        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, i * MIB, MIB)
                        if i % 16 == 0:
                            os.fsync(fd)
                except OSError as exc:
                    failures.append(exc)

            worker = threading.Thread(target=punch)
            worker.start()
            started.wait(30)
            wait_until(lambda: _punched_some(top), what="some discards to reach the image")
            os.kill(pid, signal.SIGKILL)
            worker.join(60)
            with contextlib.suppress(OSError):
                os.close(fd)  # ENOTCONN: the daemon is gone
            assert failures, "the daemon was killed only after every discard had finished"
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the daemon to die")
            force_unmount(mp)
            assert not is_mounted(mp)
    finally:
        force_unmount(mp)
    code, report = check(top)
    assert code in (0, 3), report  # leaks allowed, nothing worse
    assert not report.get("corruptions"), report


def _punched_some(image) -> bool:
    p = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(image)],
                       capture_output=True, text=True)
    return p.returncode == 0 and '"data": false' in p.stdout
