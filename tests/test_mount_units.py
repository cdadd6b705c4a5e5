"""The mount's pure parts without FUSE: options, snapshot names, and how the request handlers
answer engine errors (a fake engine, the real handlers)."""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from qcowfs.chain.disk import SnapshotInfo
from qcowfs.errors import FormatError, HostIOError
from qcowfs.mount.operations import QcowfsOperations
from qcowfs.mount.options import OptionError, parse_options, parse_size, split_options
from qcowfs.mount.tree import DISK_INO, FsError, Tree, snapshot_dir_names


def test_options_fstab_style():
    o = parse_options(["ro,uid=1000,gid=100", "umask=027,l2_cache_size=64M",
                       "zero_detect=off,nodirect_io,allow_other,nofail,x-systemd.automount"])
    assert o.read_only and o.allow_other and not o.zero_detect and not o.direct_io
    assert (o.uid, o.gid, o.umask, o.l2_cache_bytes) == (1000, 100, 0o027, 64 << 20)
    assert parse_options(["ro", "rw"]).read_only is False
    assert parse_options([]).fast_loop
    assert not parse_options(["nofast_loop"]).fast_loop
    assert not parse_options(["fast_loop=off"]).fast_loop
    assert parse_options(["poll_us=0"]).poll_us == 0
    assert parse_options([]).format is None
    assert parse_options(["format=raw"]).format == "raw"
    assert "ro" in parse_options(["ro,nosuid"]).fuse_options("/i")
    assert "nosuid" in parse_options(["ro,nosuid"]).fuse_options("/i")
    assert "fsname=/a\\,b" in parse_options([]).fuse_options("/a,b")
    assert split_options("a,b\\,c,,d") == ["a", "b,c", "d"]
    assert parse_size("1G") == 1 << 30 and parse_size("512k") == 512 << 10
    for bad in ("frob", "uid=x", "umask=9", "zero_detect=maybe", "l2_cache_size=lots",
                "fast_loop=sometimes", "poll_us=-3",
                "format=vmdk"):
        with pytest.raises(OptionError):
            parse_options([bad])


def _snap(sid, name):
    return SnapshotInfo(id=sid, name=name, size=1 << 20, date_sec=0, date_nsec=0, vm_clock=0,
                        vm_state_size=0, icount=None)


def test_snapshot_naming_rule():
    snaps = [_snap("1", "a"), _snap("2", "a"), _snap("3", ""), _snap("4", "x/y"),
             _snap("5", "a~1"), _snap("6", "ok"), _snap("7", "n" * 300)]
    names = snapshot_dir_names(snaps)
    by_id = {s.id: n for n, s in names.items()}
    assert by_id == {"1": "a~1~1", "2": "a~2", "3": "~3", "4": "x_y~4", "5": "a~1",
                     "6": "ok", "7": "n" * 253 + "~7"}
    assert len(names) == len(snaps)


class FakeDisk:
    """Just enough of the engine for the handlers, failing the way it is told to."""

    size = 1 << 20
    snapshots: list = []

    def __init__(self, fail):
        self.fail = fail
        self.flushed = 0

    def readinto(self, buf, off):
        raise self.fail

    def write(self, off, data):
        raise self.fail

    def flush(self):
        self.flushed += 1


def _ops(fail, tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"")
    tree = Tree(FakeDisk(fail), str(image), read_only=False, uid=0, gid=0, umask=0o022)
    return QcowfsOperations(tree, direct_io=True, allow_shrink=False)


@pytest.mark.parametrize("fail, code", [
    (HostIOError("/img", "no space", errno=errno.ENOSPC), errno.ENOSPC),
    (FormatError("/img", "bad L2 entry"), errno.EIO),
    (RuntimeError("engine bug"), errno.EIO),
])
async def test_engine_errors_become_errnos(tmp_path, fail, code, caplog):
    ops = _ops(fail, tmp_path)
    fi = await ops.open(DISK_INO, 2, None)  # O_RDWR
    for call in (ops.read(fi.fh, 4096, 512), ops.write(fi.fh, 8192, b"x" * 512)):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call
        assert exc.value.errno == code
    assert ops.errors == 2
    assert "offset 4096" in caplog.text and "offset 8192" in caplog.text
    await ops.fsync(fi.fh, False)
    assert ops.tree.disk.flushed == 1


async def test_writes_past_the_end_and_shrinks_are_refused(tmp_path):
    ops = _ops(RuntimeError("unused"), tmp_path)
    fi = await ops.open(DISK_INO, 2, None)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.write(fi.fh, 1 << 20, b"x")
    assert exc.value.errno == errno.ENOSPC
    # setattr(size=...) calls _truncate; SetattrFields cannot be built with update_size here
    with pytest.raises(FsError) as refused:
        await ops._truncate(ops.tree.disk_node, 4096)
    assert refused.value.errno == errno.EPERM


@pytest.mark.parametrize("patched", [True, False])
def test_a_stock_binding_logs_one_line_that_discard_and_holes_are_unavailable(
        tmp_path, caplog, monkeypatch, patched):
    monkeypatch.setattr(pyfuse3, "HANDLES_FALLOCATE_LSEEK", patched, raising=False)
    ops = _ops(RuntimeError("unused"), tmp_path)
    with caplog.at_level("INFO", logger="qcowfs.mount"):
        ops.init()
    said = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(said) == (0 if patched else 1), said
