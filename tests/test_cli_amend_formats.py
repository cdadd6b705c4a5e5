"""amend's format changes beside qemu-img amend on copies of the same QEMU-made images:
compat=0.10|1.1 both ways, refcount_bits= every width, data_file= and data_file_raw=, and the
backing file (which qemu-img 7.2 refuses to change). Judged by qemu-img info (the same
afterwards), check (clean), compare (the guest view unchanged) and each snapshot's content.
A refusal prints qemu-img's message and changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import qcowfs
from qemutools import (
    assert_check_clean,
    check,
    compare,
    create,
    info,
    map_json,
    qemu_img,
    qemu_io,
    qemu_io_killed,
    to_raw,
)


def _info(path) -> dict:
    out = info(path)
    out.pop("filename")
    out.pop("actual-size")
    return out


def _snapshots(path: Path, out: Path) -> dict[str, bytes]:
    return {s["name"]: to_raw(path, out, snapshot=s["id"]) for s in info(path).get("snapshots", [])}


def _amend_both(d: Path, img: Path, opts: str):
    """qemu-img amend on ``img``, qcowfs amend on a copy: (qemu-img's result, ours, our copy,
    the original's guest view as a copy, its snapshots' content)."""
    orig = d / f"orig-{img.name}"
    ours = d / f"ours-{img.name}"
    shutil.copy(img, orig)
    shutil.copy(img, ours)
    snaps = _snapshots(orig, d / "snap.raw")
    want = qemu_img("amend", "-o", opts, str(img), check=False)
    got = qcowfs("amend", "-o", opts, str(ours))
    return want, got, ours, orig, snaps


def _amend_and_judge(d: Path, img: Path, opts: str) -> Path:
    """Amend ``img`` both ways and judge ours against qemu-img's; our copy."""
    want, got, ours, orig, snaps = _amend_both(d, img, opts)
    _judge(d, want, got, img, ours, orig, snaps)
    return ours


def _judge(d: Path, want, got, img: Path, ours: Path, orig: Path, snaps: dict[str, bytes],
           *, same_info: bool = True) -> None:
    assert want.returncode == got.code == 0, (want.stderr, got.err)
    if same_info:
        assert _info(ours) == _info(img)
    assert_check_clean(ours)
    assert compare(orig, ours) == 0
    assert _snapshots(ours, d / "snap.raw") == snaps


# --- images QEMU makes ----------------------------------------------------------------------


def zeros_backed(d: Path) -> Path:
    """Zero clusters plain and preallocated over a backing file, v3."""
    base = create(d / "base.qcow2", "1M")
    qemu_io(base, "write -P 7 0 1M")
    p = create(d / "img.qcow2", "1M", backing=base.name, cwd=d)
    qemu_io(p, "write -P 1 0 64k", "write -z 64k 64k", "write -P 2 256k 64k",
            "write -z 256k 64k", "write -P 3 512k 64k", "write -z -u 512k 64k")
    return p


def zeros_alone(d: Path) -> Path:
    p = create(d / "img.qcow2", "1M")
    qemu_io(p, "write -P 1 0 64k", "write -z 64k 64k", "write -P 2 256k 64k",
            "write -z 256k 64k")
    return p


def zero_under_snapshot(d: Path) -> Path:
    """A preallocated zero cluster whose data a snapshot still holds (QEMU 7.2's downgrade
    zeroes that snapshot's data; ours must keep it)."""
    base = create(d / "base.qcow2", "1M")
    qemu_io(base, "write -P 7 0 1M")
    p = create(d / "img.qcow2", "1M", backing=base.name, cwd=d)
    qemu_io(p, "write -P 1 0 64k", "write -z 64k 64k", "write -P 3 128k 64k",
            "write -z 128k 64k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -z 0 64k")
    qemu_img("snapshot", "-c", "s2", str(p))
    return p


def dirty_lazy(d: Path) -> Path:
    p = create(d / "img.qcow2", "1M", lazy_refcounts=True)
    qemu_io(p, "write -P 1 0 64k", "write -z 128k 64k")
    qemu_io_killed(p, "write -P 2 256k 128k")
    return p


def zstd_uncompressed(d: Path) -> Path:
    p = create(d / "img.qcow2", "1M", compression_type="zstd")
    qemu_io(p, "write -P 1 0 64k")
    return p


def with_bitmap(d: Path) -> Path:
    p = create(d / "img.qcow2", "1M")
    qemu_img("bitmap", "--add", str(p), "b0")
    qemu_io(p, "write -P 1 0 64k")
    return p


def small_clusters_snapshots(d: Path) -> Path:
    p = create(d / "img.qcow2", "2M", cluster_size=512)
    qemu_io(p, "write -P 1 0 300k", "write -z 100k 50k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 2 200k 300k")
    return p


def v2_with_snapshot(d: Path) -> Path:
    base = create(d / "base.qcow2", "1M")
    p = create(d / "img.qcow2", "1M", compat="0.10", backing=base.name, cwd=d)
    qemu_io(p, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 2 32k 64k")
    return p


def compressed_and_shared(d: Path, **opts) -> Path:
    src = create(d / "src.raw", "2M", fmt="raw")
    qemu_io(src, "write -P 5 0 1M", fmt="raw")
    p = d / "img.qcow2"
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    qemu_img("convert", "-c", "-O", "qcow2", *(["-o", o] if o else []), str(src), str(p))
    qemu_io(p, "write -P 6 1M 200k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 7 1100k 64k")
    return p


DOWNGRADE = {"zeros_backed": zeros_backed, "zeros_alone": zeros_alone,
             "dirty_lazy": dirty_lazy, "zstd_uncompressed": zstd_uncompressed,
             "small_clusters_snapshots": small_clusters_snapshots,
             "compressed_and_shared": compressed_and_shared}


@pytest.mark.parametrize("name", sorted(DOWNGRADE))
def test_downgrade_as_qemu(tmp_path, name):
    img = DOWNGRADE[name](tmp_path)
    ours = _amend_and_judge(tmp_path, img, "compat=0.10")
    assert not any(m.get("zero") and not m.get("data") and m["present"] and "offset" in m
                   for m in map_json(ours)), "a preallocated zero cluster is left"
    # and back: the same as qemu-img's upgrade of qemu-img's downgrade
    want, got, ours2, orig2, snaps = _amend_both(tmp_path, img, "compat=1.1")
    _judge(tmp_path, want, got, img, ours2, orig2, snaps)


def test_downgrade_keeps_snapshot_data_under_zero_clusters(tmp_path):
    img = zero_under_snapshot(tmp_path)
    _amend_and_judge(tmp_path, img, "compat=0.10")


def test_downgrade_drops_bitmaps_without_leaks(tmp_path):
    """QEMU keeps the bitmaps extension, which v2 cannot mark consistent: every later open
    warns and check finds their clusters leaked. qcowfs removes them: the same info, a clean
    check."""
    img = with_bitmap(tmp_path)
    ours = _amend_and_judge(tmp_path, img, "compat=0.10")
    assert check(img)[0] == 3  # QEMU's leaked bitmap clusters
    assert "bitmaps" not in info(ours)["format-specific"]["data"]


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=v3", "compat=1.1,lazy_refcounts=on",
                                  "compat=1.1,refcount_bits=4", "compat=1.1,size=3M"])
def test_upgrade_as_qemu(tmp_path, opts):
    img = v2_with_snapshot(tmp_path)
    want, got, ours, orig, snaps = _amend_both(tmp_path, img, opts)
    assert want.returncode == got.code == 0, (want.stderr, got.err)
    assert _info(ours) == _info(img)
    assert_check_clean(ours)
    if "size" not in opts:
        assert compare(orig, ours) == 0
    # (QEMU shows a snapshot at the image's current size)
    got_snaps = _snapshots(ours, tmp_path / "snap.raw")
    assert {k: v[:1 << 20] for k, v in got_snaps.items()} == snaps
    with open(ours, "rb") as f:
        head = f.read(112)
    assert head[4:8] == b"\0\0\0\3" and head[100:104] == (112).to_bytes(4, "big")


WIDTHS = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("start", [16, 1, 64])
def test_refcount_bits_as_qemu(tmp_path, bits, start):
    img = create(tmp_path / "img.qcow2", "4M", refcount_bits=start, cluster_size=4096)
    qemu_io(img, "write -P 1 0 1M", "write -z 1M 64k", "write -P 2 3M 100k")
    ours = _amend_and_judge(tmp_path, img, f"refcount_bits={bits}")
    assert info(ours)["format-specific"]["data"]["refcount-bits"] == bits


@pytest.mark.parametrize("bits", [2, 8, 64])
def test_refcount_bits_with_snapshots_and_compression(tmp_path, bits):
    img = compressed_and_shared(tmp_path)
    if bits == 2:  # 32 compressed clusters share a host cluster
        _refused(tmp_path, img, "refcount_bits=2")
        return
    _amend_and_judge(tmp_path, img, f"refcount_bits={bits}")


def test_refcount_bits_many_blocks(tmp_path):
    """512-byte clusters: the 1-bit width needs few blocks, 64-bit ones many, and the new
    table more than one cluster."""
    img = create(tmp_path / "img.qcow2", "8M", cluster_size=512)
    qemu_io(img, "write -P 1 0 3M")
    for bits in (64, 1, 32):
        _amend_and_judge(tmp_path, img, f"refcount_bits={bits}")


def test_refcount_bits_on_a_dirty_image(tmp_path):
    img = dirty_lazy(tmp_path)
    _amend_and_judge(tmp_path, img, "refcount_bits=4")


def test_data_file(tmp_path):
    img = create(tmp_path / "img.qcow2", "1M", data_file=str(tmp_path / "img.data"),
                 data_file_raw=True)
    qemu_io(img, "write -P 3 0 64k")
    shutil.copy(tmp_path / "img.data", tmp_path / "other.data")
    for opts in ("data_file_raw=on", "data_file_raw=off", f"data_file={tmp_path}/other.data",
                 f"data_file_raw=off,data_file={tmp_path}/img.data"):
        _amend_and_judge(tmp_path, img, opts)


def test_data_file_removed_from_the_header(tmp_path):
    img = create(tmp_path / "img.qcow2", "1M", data_file=str(tmp_path / "img.data"))
    ours = tmp_path / "ours.qcow2"
    shutil.copy(img, ours)
    want = qemu_img("amend", "-o", "data_file=", str(img), check=False)
    got = qcowfs("amend", "-o", "data_file=", str(ours))
    assert want.returncode == got.code == 0, (want.stderr, got.err)
    assert _info(ours) == _info(img)
    assert "data-file" not in _info(ours)["format-specific"]["data"]


def _refused(tmp_path, img: Path, opts: str) -> None:
    ours = tmp_path / f"ours-{img.name}"
    shutil.copy(img, ours)
    before = ours.read_bytes()
    want = qemu_img("amend", "-o", opts, str(img), check=False)
    got = qcowfs("amend", "-o", opts, str(ours))
    first = want.stderr.decode().splitlines()[0].removeprefix("qemu-img: ")
    assert want.returncode == got.code == 1, (opts, want.stderr, got.err)
    assert got.err == f"qcowfs: amend: {first}\n", opts
    assert ours.read_bytes() == before, f"{opts}: a refusal changed the image"


REFUSED = [
    ("refcount_bits=8", {"refcount_bits": 8}, "compat=0.10"),
    ("data_file", {"data_file": "img.data"}, "compat=0.10"),
    ("extended_l2", {"extended_l2": True}, "compat=0.10"),
    ("plain", {}, "compat=0.9"),
    ("plain", {}, "compat="),
    ("plain", {}, "compat=0.10,refcount_bits=8"),
    ("plain", {}, "compat=0.10,lazy_refcounts=on"),
    ("plain", {}, "refcount_bits=3"),
    ("plain", {}, "refcount_bits=128"),
    ("plain", {}, "refcount_bits=0"),
    ("plain", {}, "refcount_bits=x"),
    ("plain", {}, "data_file=x.raw"),
    ("plain", {}, "data_file_raw=on"),
    ("data_file", {"data_file": "img.data"}, "data_file_raw=on"),
    ("v2", {"compat": "0.10"}, "refcount_bits=8"),
]


@pytest.mark.parametrize("name,create_opts,opts", REFUSED)
def test_refusals_as_qemu(tmp_path, name, create_opts, opts):
    create_opts = dict(create_opts)
    if "data_file" in create_opts:
        create_opts["data_file"] = str(tmp_path / create_opts["data_file"])
    img = create(tmp_path / "img.qcow2", "1M", **create_opts)
    qemu_io(img, "write -P 1 0 64k")
    _refused(tmp_path, img, opts)


def test_downgrade_refusals(tmp_path):
    img = create(tmp_path / "z.qcow2", "1M", compression_type="zstd")
    qemu_io(img, "write -c -P 1 0 64k")
    _refused(tmp_path, img, "compat=0.10")
    img = create(tmp_path / "s.qcow2", "1M")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_img("resize", str(img), "2M")
    _refused(tmp_path, img, "compat=0.10")
    img = create(tmp_path / "n.qcow2", "1M")
    qemu_img("snapshot", "-c", "s1", str(img))
    _refused(tmp_path, img, "compat=0.10,size=2M")  # QEMU refuses after the resize


def test_refcount_too_wide_for_the_new_width(tmp_path):
    img = create(tmp_path / "img.qcow2", "1M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", str(img))
    _refused(tmp_path, img, "refcount_bits=1")


def test_backing_file_as_qemu(tmp_path):
    """qemu-img 7.2 refuses to change the backing file (or format) with amend, even to none,
    and accepts both given unchanged; ours says so in one line and points at rebase."""
    base = create(tmp_path / "base.qcow2", "1M")
    img = create(tmp_path / "img.qcow2", "1M", backing=base.name, cwd=tmp_path)
    plain = create(tmp_path / "plain.qcow2", "1M")
    for path, opts, ok in ((img, "backing_file=base.qcow2,backing_fmt=qcow2", True),
                           (img, "backing_file=base.qcow2", False),
                           (img, "backing_fmt=qcow2", False),
                           (img, "backing_file=other.qcow2,backing_fmt=qcow2", False),
                           (img, "backing_file=", False),
                           (plain, "backing_file=base.qcow2,backing_fmt=qcow2", False),
                           (plain, "backing_fmt=", False)):
        ours = tmp_path / "ours.qcow2"
        shutil.copy(path, ours)
        before = ours.read_bytes()
        want = qemu_img("amend", "-o", opts, str(path), check=False)
        got = qcowfs("amend", "-o", opts, str(ours))
        assert (want.returncode == 0) == ok and got.code == want.returncode, (opts, got.err)
        if not ok:
            assert want.stderr.decode().startswith("qemu-img: Cannot amend the backing file")
            assert got.err == ("qcowfs: amend: Cannot amend the backing file (you can use "
                               "'qcowfs rebase' instead)\n")
            assert ours.read_bytes() == before
        assert _info(ours)["backing-filename" if path is img else "virtual-size"] == \
            _info(path)["backing-filename" if path is img else "virtual-size"]
