"""The daemon's life: failing before it detaches, readiness, signals, fusermount3, systemd
notification, the mount helper, and ``qcowfs umount``."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mounttools import (
    REPO,
    env,
    force_unmount,
    is_mounted,
    mounted,
    needs_fuse,
    qcowfs,
    read_all,
    wait_until,
)
from qemutools import assert_check_clean, create, poke, qemu_img, qemu_io, to_raw

pytestmark = [needs_fuse, pytest.mark.fuse]


@pytest.fixture
def image(tmp_path):
    img = create(tmp_path / "img.qcow2", "4M")
    qemu_io(img, "write -P 0x5a 0 1M")
    qemu_img("snapshot", "-c", "snap", img)
    return img


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _daemon_pid(mp) -> int:
    return int(os.getxattr(mp, "user.qcowfs.pid"))


def _assert_one_line_failure(p, mp=None, *, contains: str = ""):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"qcowfs: {lines[0].split(':')[1].strip()}: ")
    assert contains in lines[0], lines[0]
    if mp is not None:
        assert not is_mounted(mp)


# --- failing before the mount ----------------------------------------------------------------

def test_errors_print_one_line_and_mount_nothing(tmp_path, image):
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        _assert_one_line_failure(qcowfs("mount", "-o", "ro", tmp_path / "missing.qcow2", mp),
                                 mp, contains="missing.qcow2")
        _assert_one_line_failure(qcowfs("mount", "-o", "ro", image, tmp_path / "nodir"), mp,
                                 contains="No such file or directory")
        _assert_one_line_failure(qcowfs("mount", "-o", "ro", image, image), mp,
                                 contains="not a directory")
        _assert_one_line_failure(qcowfs("mount", "-o", "ro,frobnicate", image, mp), mp,
                                 contains="unknown option 'frobnicate'")
        _assert_one_line_failure(qcowfs("mount", "-o", "uid=abc", image, mp), mp,
                                 contains="not a number")
        base = create(tmp_path / "base.qcow2", "4M")
        top = create(tmp_path / "top.qcow2", "4M", backing=base)
        base.unlink()
        _assert_one_line_failure(qcowfs("mount", "-o", "ro", top, mp), mp,
                                 contains="backing file")
        bad = tmp_path / "bad.qcow2"
        bad.write_bytes(image.read_bytes())
        poke(bad, 20, (40).to_bytes(4, "big"))  # cluster_bits 40
        _assert_one_line_failure(qcowfs("mount", "-o", "ro", bad, mp), mp,
                                 contains="cluster size")
    finally:
        force_unmount(mp)


def test_umount_of_something_else_is_a_clear_error(tmp_path):
    (tmp_path / "plain").mkdir()
    _assert_one_line_failure(qcowfs("umount", tmp_path / "plain"),
                             contains="not a qcowfs mount point")
    _assert_one_line_failure(qcowfs("umount", "/"), contains="not a qcowfs mount point")


# --- ways to end a mount ---------------------------------------------------------------------

def test_umount_returns_after_the_daemon_is_gone(tmp_path, image):
    with mounted(image, tmp_path / "mnt", "ro") as mp:
        pid = _daemon_pid(mp)
        assert _pid_alive(pid)
        u = qcowfs("umount", mp)
        assert u.returncode == 0, u.stderr
        assert not _pid_alive(pid)
        assert not is_mounted(mp)
    assert_check_clean(image)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_closes(tmp_path, image, signum):
    with mounted(image, tmp_path / "mnt", "ro") as mp:
        pid = _daemon_pid(mp)
        os.kill(pid, signum)
        wait_until(lambda: not _pid_alive(pid), what="the daemon to exit")
        assert not is_mounted(mp)
    assert_check_clean(image)


def test_fusermount_u_closes_the_daemon(tmp_path, image):
    with mounted(image, tmp_path / "mnt", "ro") as mp:
        pid = _daemon_pid(mp)
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        wait_until(lambda: not _pid_alive(pid), what="the daemon to exit")
        assert not is_mounted(mp)


# --- foreground, systemd ---------------------------------------------------------------------

@contextlib.contextmanager
def _notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        yield sock, path
    finally:
        sock.close()


def test_foreground_notifies_systemd_and_logs_to_stderr(tmp_path, image):
    mp = tmp_path / "mnt"
    mp.mkdir()
    with _notify_socket(tmp_path) as (sock, path):
        e = env()
        e["NOTIFY_SOCKET"] = path
        proc = subprocess.Popen([sys.executable, "-m", "qcowfs", "mount", "-f", "--debug",
                                 "-o", "ro", str(image), str(mp)], env=e,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert b"READY=1" in sock.recv(4096)
            assert is_mounted(mp)
            assert read_all(mp / "disk")[:4] == b"\x5a" * 4
            proc.send_signal(signal.SIGTERM)
            assert b"STOPPING=1" in sock.recv(4096)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            force_unmount(mp)
    assert not is_mounted(mp)
    assert "mounted " in err and "image closed cleanly" in err
    assert "read(" in err, "--debug shows request traces"


# --- the mount helper ------------------------------------------------------------------------

HELPER = Path("/usr/sbin/mount.fuse.qcowfs")


@pytest.fixture
def mount_helper():
    """mount(8) finds helpers only in /sbin: install one for this tree unless one is there."""
    created = False
    marker = "# written by qcowfs tests\n"
    stale = HELPER.exists() and not HELPER.is_symlink() and marker in HELPER.read_text()
    if not HELPER.exists() or stale:  # a helper a killed test run left behind is replaced
        HELPER.write_text(f"#!/bin/sh\n{marker}PYTHONPATH={REPO} exec {sys.executable} "
                          f"-m qcowfs.cli.mount_helper \"$@\"\n")
        HELPER.chmod(0o755)
        created = True
    try:
        yield HELPER
    finally:
        if created:
            HELPER.unlink()


def test_mount_t_fuse_qcowfs_and_fstab(tmp_path, image, mount_helper):
    mp = tmp_path / "mnt"
    mp.mkdir()
    expected = to_raw(image, tmp_path / "expected.raw")
    try:
        p = subprocess.run(["mount", "-t", "fuse.qcowfs", str(image), str(mp), "-o", "ro"],
                           capture_output=True, text=True, env=env())
        assert p.returncode == 0, p.stderr
        assert read_all(mp / "disk") == expected
        pid = _daemon_pid(mp)
        subprocess.run(["umount", str(mp)], check=True)
        wait_until(lambda: not _pid_alive(pid), what="the daemon to exit")

        fstab = tmp_path / "fstab"
        fstab.write_text(f"{image} {mp} fuse.qcowfs ro,nofail,x-systemd.automount 0 0\n")
        p = subprocess.run(["mount", "--fstab", str(fstab), str(mp)], capture_output=True,
                           text=True, env=env())
        assert p.returncode == 0, p.stderr
        assert os.listdir(mp / "snapshots") == ["snap"]
        assert qcowfs("umount", mp).returncode == 0
    finally:
        force_unmount(mp)
    assert not is_mounted(mp)


def test_sigkilled_daemon_dead_mount_is_cleared_and_remounts(tmp_path, image):
    mp = tmp_path / "mnt"
    with mounted(image, mp, "ro"):
        pid = _daemon_pid(mp)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _pid_alive(pid), what="the daemon to die")
        with pytest.raises(OSError):
            os.listdir(mp)  # ENOTCONN: a dead FUSE mount
        u = qcowfs("umount", mp)
        assert u.returncode == 0, u.stderr
        assert "not closed cleanly" in u.stderr
        assert not is_mounted(mp)
    assert_check_clean(image)
    with mounted(image, mp, "ro") as again:
        assert os.listdir(again / "snapshots") == ["snap"]


def test_image_inside_its_own_mount_point(tmp_path):
    """The daemon never walks a path under its own mount (that would deadlock it). Such a
    mount point holds the image, so it takes -o nonempty."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    img = create(mp / "hidden.qcow2", "4M")
    qemu_io(img, "write -P 0x42 0 64k")
    with mounted(img, mp, "ro,nonempty"):
        st = os.stat(mp / "disk")
        assert st.st_size == 4 << 20 and st.st_blocks > 0
        assert os.statvfs(mp).f_blocks == os.statvfs(tmp_path).f_blocks
        assert read_all(mp / "disk")[:65536] == b"\x42" * 65536


def test_detached_daemon_keeps_no_descriptor_of_its_caller(tmp_path, image):
    """A pipe the caller hands down (as a shell or a supervisor might) reaches end-of-file
    once `qcowfs mount` returns: the daemon does not keep it open until the unmount."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    r, w = os.pipe()
    try:
        p = subprocess.run([sys.executable, "-m", "qcowfs", "mount", "-o", "ro", str(image),
                            str(mp)], env=env(), pass_fds=(w,), capture_output=True, text=True,
                           timeout=120)
        os.close(w)
        w = -1
        assert p.returncode == 0, p.stderr
        ready, _, _ = select.select([r], [], [], 10)
        assert ready and os.read(r, 1) == b"", "the daemon holds its caller's pipe open"
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        if is_mounted(mp):
            qcowfs("umount", mp)
        force_unmount(mp)
