"""Every reader fixture, read through a real mount, equals what QEMU says the guest sees."""

from __future__ import annotations

import errno
import os
import random

import pytest
from mounttools import mounted, needs_fuse, read_all
from qemutools import create, poke, qemu_img, qemu_io, to_raw

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


def _chain(d):
    """raw base <- qcow2 overlay (bigger than the base) with data, zero and discarded
    clusters, and two internal snapshots taken between writes."""
    base = create(d / "base.raw", "6M", fmt="raw")
    qemu_io(base, "write -P 0x11 0 6M", fmt="raw")
    top = create(d / "top.qcow2", "10M", backing=base, backing_fmt="raw", cluster_size=65536)
    qemu_io(top, "write -P 0x22 100k 300k", "write -z 1M 128k", "discard 2M 64k")
    qemu_img("snapshot", "-c", "before", top)
    qemu_io(top, "write -P 0x33 4M 3M", "write -P 0x44 9M 17k")
    qemu_img("snapshot", "-c", "after", top)
    qemu_io(top, "write -P 0x55 0 4k")
    return top


def _small_clusters(d):
    img = create(d / "c512.qcow2", "3M", cluster_size=512)
    qemu_io(img, "write -P 0x61 1000 70000", "write -P 0x62 2M 513")
    qemu_img("snapshot", "-c", "s", img)
    qemu_io(img, "write -P 0x63 0 1536")
    return img


def _extended_l2(d):
    base = create(d / "b.qcow2", "4M")
    qemu_io(base, "write -P 0x71 0 4M")
    img = create(d / "x.qcow2", "4M", backing=base, extended_l2=True, cluster_size=65536)
    qemu_io(img, "write -P 0x72 2048 3000", "write -z 70k 8k", "write -P 0x73 3M 33k")
    return img


def _compressed(d, kind):
    src = create(d / "src.qcow2", "4M")
    qemu_io(src, "write -P 0x81 0 1M", "write -P 0x82 2M 100k")
    out = d / f"comp-{kind}.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={kind}", src, out)
    return out


def _v2(d):
    img = create(d / "v2.qcow2", "2M", compat="0.10")
    qemu_io(img, "write -P 0x91 4k 100k")
    qemu_img("snapshot", "-c", "v2snap", img)
    qemu_io(img, "write -P 0x92 0 8k")
    return img


def _data_file(d):
    img = create(d / "df.qcow2", "2M", data_file=str(d / "df.data"))
    qemu_io(img, "write -P 0xa1 64k 200k")
    return img


FIXTURES = {
    "chain": _chain,
    "cluster512": _small_clusters,
    "extended_l2": _extended_l2,
    "zlib": lambda d: _compressed(d, "zlib"),
    "zstd": lambda d: _compressed(d, "zstd"),
    "v2": _v2,
    "data_file": _data_file,
}


def _snapshot_ids(img):
    out = qemu_img("snapshot", "-l", img).stdout.decode().splitlines()
    return [ln.split()[0] for ln in out[2:] if ln.strip()]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_mounted_disk_and_snapshots_equal_qemu(tmp_path, name):
    img = FIXTURES[name](tmp_path)
    expected = to_raw(img, tmp_path / "expected.raw")
    snaps = {sid: to_raw(img, tmp_path / f"snap{sid}.raw", snapshot=sid)
             for sid in _snapshot_ids(img)}
    with mounted(img, tmp_path / "mnt", "ro") as mp:
        assert os.stat(mp / "disk").st_size == len(expected)
        host = [img] + ([tmp_path / "df.data"] if name == "data_file" else [])
        assert os.stat(mp / "disk").st_blocks == sum(os.stat(h).st_blocks for h in host)
        assert read_all(mp / "disk") == expected
        assert read_all(mp / "disk", direct=True) == expected
        found = {}
        for entry in os.listdir(mp / "snapshots"):
            info = (mp / "snapshots" / entry / "info").read_text()
            sid = dict(line.split(": ", 1) for line in info.splitlines())["id"]
            found[sid] = read_all(mp / "snapshots" / entry / "disk")
        assert found.keys() == snaps.keys()
        for sid, data in snaps.items():
            assert found[sid] == data, f"snapshot {sid} differs"


def test_reads_at_any_offset_and_length(tmp_path):
    img = _chain(tmp_path)
    expected = to_raw(img, tmp_path / "expected.raw")
    rng = random.Random(4)
    with mounted(img, tmp_path / "mnt", "ro") as mp:
        fd = os.open(mp / "disk", os.O_RDONLY)
        try:
            for _ in range(300):
                off = rng.randrange(0, len(expected) + 4096)
                n = rng.choice([1, 7, 511, 512, 4095, 65537, rng.randrange(1, 3 * MiB)])
                assert os.pread(fd, n, off) == expected[off:off + n], (off, n)
        finally:
            os.close(fd)


def test_format_option_skips_probing(tmp_path):
    """`-o format=raw` serves a qcow2 file as the raw bytes it holds, as `-f raw` does."""
    img = create(tmp_path / "img.qcow2", "4M")
    qemu_io(img, "write -P 0x6b 0 64k")
    with mounted(img, tmp_path / "mnt", "ro,format=raw") as mp:
        assert read_all(mp / "disk") == img.read_bytes()
    with mounted(img, tmp_path / "mnt", "ro") as mp:
        assert read_all(mp / "disk")[:65536] == b"\x6b" * 65536


def test_read_only_mount_refuses_changes(tmp_path):
    img = _chain(tmp_path)
    with mounted(img, tmp_path / "mnt", "ro") as mp:
        for path, flags in ((mp / "disk", os.O_WRONLY),
                            (mp / "snapshots" / "before" / "disk", os.O_RDWR)):
            with pytest.raises(OSError) as exc:
                os.open(path, flags)
            assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            os.mkdir(mp / "snapshots" / "new")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            os.rmdir(mp / "snapshots" / "before")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            os.truncate(mp / "disk", 0)
        assert exc.value.errno == errno.EROFS
        assert sorted(os.listdir(mp / "snapshots")) == ["after", "before"]


def test_attributes_statfs_and_du(tmp_path):
    img = _chain(tmp_path)
    with mounted(img, tmp_path / "mnt", "ro", "uid=1234", "gid=4321", "umask=027",
                 "allow_other,noexec") as mp:
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == str(mp))
        assert " fuse.qcowfs " in line and "noexec" in line and "allow_other" in line
        st = os.stat(mp / "disk")
        assert st.st_size == 10 * MiB
        assert st.st_blocks == os.stat(img).st_blocks
        assert (st.st_uid, st.st_gid) == (1234, 4321)
        assert st.st_mode & 0o777 == 0o440
        host = os.statvfs(tmp_path)
        seen = os.statvfs(mp)
        assert (seen.f_frsize, seen.f_blocks) == (host.f_frsize, host.f_blocks)
        snap = mp / "snapshots" / "before"
        assert os.stat(snap / "disk").st_size == 10 * MiB
        info = dict(line.split(": ", 1) for line in (snap / "info").read_text().splitlines())
        assert info["name"] == "before"
        assert int(info["disk_size"]) == 10 * MiB
        assert os.stat(snap / "disk").st_mtime == int(info["date_sec"]) + \
            int(info["date_nsec"]) / 1e9


def test_awkward_snapshot_names_are_all_reachable(tmp_path):
    """Names QEMU allows but a directory cannot use, and names two snapshots share."""
    img = create(tmp_path / "n.qcow2", "1M")
    names = ["twin", "twin", "a/b", "..", ".", "plain"]
    for i, name in enumerate(names):
        qemu_io(img, f"write -P {0x10 + i} 0 4k")
        qemu_img("snapshot", "-c", name, img)
    ids = _snapshot_ids(img)
    with mounted(img, tmp_path / "mnt", "ro") as mp:
        entries = sorted(os.listdir(mp / "snapshots"))
        assert entries == sorted(["twin~1", "twin~2", "a_b~3", "..~4", ".~5", "plain"])
        for sid, name in zip(ids, names, strict=True):
            entry = name if name == "plain" else f"{name.replace('/', '_')}~{sid}"
            info = (mp / "snapshots" / entry / "info").read_text()
            assert f"id: {sid}\n" in info and f"name: {name}\n" in info
            with open(mp / "snapshots" / entry / "disk", "rb") as f:
                assert f.read(4096) == bytes([0x10 + int(sid) - 1]) * 4096


def test_bad_cluster_answers_eio_and_the_daemon_goes_on(tmp_path):
    img = create(tmp_path / "bad.qcow2", "4M", cluster_size=65536)
    qemu_io(img, "write -P 0x77 0 64k", "write -P 0x78 1M 64k")
    mapping = {e["start"]: e for e in json_map(img)}
    assert mapping[0]["data"] and mapping[1 << 20]["data"]
    l2 = _l2_offset(img)
    with open(img, "rb") as f:
        f.seek(l2 + 16 * 8)  # the L2 entry of guest offset 1 MiB
        entry = int.from_bytes(f.read(8), "big")
    assert entry & 0x00FFFFFFFFFFFE00
    poke(img, l2 + 16 * 8, (entry | 0x100).to_bytes(8, "big"))  # a reserved bit
    with mounted(img, tmp_path / "mnt", "ro") as mp:
        fd = os.open(mp / "disk", os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 65536)
            with pytest.raises(OSError) as exc:
                os.preadv(fd, [buf], 1 << 20)
            assert exc.value.errno == errno.EIO
            assert os.preadv(fd, [buf], 0) == 65536 and buf[:] == b"\x77" * 65536
        finally:
            os.close(fd)
        with open(mp / "disk", "rb") as f:  # the daemon still serves new requests
            assert f.read(4) == b"\x77" * 4


def json_map(img):
    import json
    return json.loads(qemu_img("map", "--output=json", img).stdout)


def _l2_offset(img):
    """The host offset of the first L2 table (from the header's L1 table pointer)."""
    with open(img, "rb") as f:
        head = f.read(104)
        l1_offset = int.from_bytes(head[40:48], "big")
        f.seek(l1_offset)
        return int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
