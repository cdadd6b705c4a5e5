"""convert: what qemu-img compare calls identical, clean under qemu-img check, sparse."""

from __future__ import annotations

import json

import pytest
from cli_fixtures import build_samples
from cli_helpers import qcowfs
from qemutools import assert_check_clean, create, qemu_img, qemu_io

SOURCES = ["plain", "chain_raw_base", "chain_longer_backing", "snapshots", "compressed_zlib",
           "compressed_zstd", "extended_l2", "data_file", "v2", "clusters_512",
           "prealloc_metadata", "raw", "huge_sparse"]
QCOW2_MODES = [
    [],
    ["-c"],
    ["-c", "-o", "compression_type=zstd"],
    ["-o", "compat=0.10"],
    ["-c", "-o", "compat=0.10,cluster_size=4k"],
    ["-o", "extended_l2=on"],
    ["-o", "cluster_size=512,refcount_bits=1"],
    ["-c", "-o", "cluster_size=2M,refcount_bits=64"],
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv-images")
    return d, build_samples(d, SOURCES)


@pytest.fixture
def images(built, monkeypatch):
    d, imgs = built
    monkeypatch.chdir(d)
    return imgs


def identical(a, b) -> bool:
    return qemu_img("compare", str(a), str(b), check=False).returncode == 0


@pytest.mark.parametrize("name", SOURCES)
def test_to_raw_identical_and_sparse(images, name, tmp_path):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    r = qcowfs("convert", "-O", "raw", images[name], ours)
    assert r.code == 0, r.err
    qemu_img("convert", "-O", "raw", str(images[name]), str(theirs))
    assert identical(images[name], ours)
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.stat().st_blocks <= theirs.stat().st_blocks + 8  # as sparse as QEMU's


@pytest.mark.parametrize("mode", QCOW2_MODES, ids=lambda m: " ".join(m) or "default")
@pytest.mark.parametrize("name", [n for n in SOURCES if n != "huge_sparse"])
def test_to_qcow2_identical_and_clean(images, name, mode, tmp_path):
    out = tmp_path / "out.qcow2"
    r = qcowfs("convert", "-O", "qcow2", *mode, images[name], out)
    assert r.code == 0, r.err
    assert identical(images[name], out)
    assert_check_clean(out)
    info = json.loads(qemu_img("info", "--output=json", str(out)).stdout)
    if "compression_type=zstd" in " ".join(mode):
        assert info["format-specific"]["data"]["compression-type"] == "zstd"
    if "-c" in mode and name in ("plain", "chain_raw_base"):
        code, report = _check_json(out)
        assert report.get("compressed-clusters", 0) > 0


def _check_json(path):
    p = qemu_img("check", "--output=json", str(path), check=False)
    return p.returncode, json.loads(p.stdout)


def test_huge_sparse_to_qcow2(images, tmp_path):
    out = tmp_path / "out.qcow2"
    assert qcowfs("convert", "-O", "qcow2", "-c", images["huge_sparse"], out).code == 0
    assert identical(images["huge_sparse"], out)
    assert_check_clean(out)


@pytest.mark.parametrize("backing", ["base.qcow2", "mid.qcow2"])
@pytest.mark.parametrize("extra", [[], ["-c"]])
def test_backing_in_the_source_chain(tmp_path, monkeypatch, backing, extra):
    """-B naming the source's own backing file (or one further down): only what the layers
    above it change is looked at, and the result is the guest disk, storing no more than
    qemu-img's own convert -B does. (With -B naming base.qcow2 under mid.qcow2, qemu-img 7.2
    stores only what the top layer allocates, so its output loses what mid.qcow2 changed;
    there it is not the judge of the content, only the guest disk is.)"""
    monkeypatch.chdir(tmp_path)
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 1 0 4M")
    mid = create(tmp_path / "mid.qcow2", "6M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(mid, "write -P 2 64k 64k", "write -z 1M 128k", "write -P 3 4M 1M")
    top = create(tmp_path / "top.qcow2", "6M", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 1 2M 64k", "write -P 4 3M 64k", "write -z 64k 64k",
            "write -P 0 5M 64k")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    r = qcowfs("convert", "-O", "qcow2", *extra, "-B", backing, "-F", "qcow2", top, ours)
    assert r.code == 0, r.err
    qemu_img("convert", "-O", "qcow2", *extra, "-B", backing, "-F", "qcow2", str(top),
             str(theirs))
    assert_check_clean(ours)
    qemu_img("compare", str(top), str(ours))
    assert json.loads(qemu_img("info", "--output=json", str(ours)).stdout)[
        "backing-filename"] == backing
    mine = _check_json(ours)[1].get("allocated-clusters", 0)
    if backing == "mid.qcow2":
        qemu_img("compare", str(theirs), str(ours))
        assert mine <= _check_json(theirs)[1].get("allocated-clusters", 0)
    else:  # what top and mid change: 64k (data, then zeros), 1M (2 zero clusters), 3M, 4M..5M
        assert mine <= 1 + 2 + 1 + 16


@pytest.mark.parametrize("extra", [[], ["-c"], ["-o", "compat=0.10"], ["-o", "extended_l2=on"]])
def test_backing_only_differences(tmp_path, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 1 0 4M")
    top = create(tmp_path / "top.qcow2", "4M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 2 64k 64k", "write -z 1M 128k", "write -P 1 2M 64k")
    full = tmp_path / "full.raw"
    qemu_img("convert", "-O", "raw", str(top), str(full))
    other = create(tmp_path / "other.qcow2", "4M")
    qemu_io(other, "write -P 1 0 3M")  # differs from the guest in many places
    out = tmp_path / "out.qcow2"
    r = qcowfs("convert", "-O", "qcow2", *extra, "-B", "other.qcow2", "-F", "qcow2", "-f",
               "raw", full, out)
    assert r.code == 0, r.err
    assert identical(full, out)
    assert_check_clean(out)
    info = json.loads(qemu_img("info", "--output=json", str(out)).stdout)
    assert info["backing-filename"] == "other.qcow2"
    # only what differs from other.qcow2 is stored: 64k..128k, 1M..1M+128k (zeros), 3M..4M
    code, report = _check_json(out)
    stored = report.get("allocated-clusters", 0)
    if "compat=0.10" not in extra:
        assert stored <= 1 + 2 + 16
    layers = {e["depth"] for e in json.loads(qemu_img("map", "--output=json",
                                                      str(out)).stdout)}
    assert layers == {0, 1}


def test_snapshot_conversion(images, tmp_path):
    src = images["snapshots"]
    for snap in ("1", "second", "snapshot.id=1", "snapshot.name=second"):
        ours, theirs = tmp_path / "o.raw", tmp_path / "t.raw"
        ident = snap if snap.startswith("snapshot.") else (
            f"snapshot.id={snap}" if snap.isdigit() else f"snapshot.name={snap}")
        qemu_img("convert", "-l", ident, "-O", "raw", str(src), str(theirs))
        r = qcowfs("convert", "-l", snap, "-O", "raw", src, ours)
        assert r.code == 0, r.err
        assert ours.read_bytes() == theirs.read_bytes()


def test_refuses_to_overwrite_source(images):
    r = qcowfs("convert", "-O", "qcow2", images["plain"], images["plain"])
    assert r.code == 1 and r.err.startswith("qcowfs: convert: ")


OUTPUT_OPTIONS = ["preallocation=metadata", "preallocation=falloc", "preallocation=full",
                  "preallocation=metadata,cluster_size=4k", "preallocation=full,extended_l2=on",
                  "preallocation=metadata,compat=0.10", "data_file=out.data",
                  "data_file=out.data,data_file_raw=on",
                  "data_file=out.data,preallocation=metadata,extended_l2=on"]


@pytest.mark.parametrize("opts", OUTPUT_OPTIONS)
@pytest.mark.parametrize("name", ["plain", "chain_raw_base", "snapshots", "compressed_zlib",
                                  "extended_l2", "clusters_512"])
def test_output_options_as_qemu(images, name, opts, tmp_path, monkeypatch):
    """-o preallocation= and data_file= on the output: the same qemu-img map (offsets
    included), info and content as qemu-img convert with the same options, a clean check."""
    src = images[name].resolve()
    maps, infos = [], []
    for who in ("theirs", "ours"):
        d = tmp_path / who
        d.mkdir()
        monkeypatch.chdir(d)  # where both put a relative data file
        if who == "theirs":
            qemu_img("convert", "-O", "qcow2", "-o", opts, str(src), "out.qcow2")
        else:
            r = qcowfs("convert", "-O", "qcow2", "-o", opts, src, "out.qcow2")
            assert r.code == 0, r.err
        assert identical(src, d / "out.qcow2")
        assert_check_clean(d / "out.qcow2")
        maps.append(json.loads(qemu_img("map", "--output=json", "out.qcow2").stdout))
        i = json.loads(qemu_img("info", "--output=json", "out.qcow2").stdout)
        for k in ("actual-size", "filename"):
            i.pop(k)
        infos.append(i)
    assert maps[1] == maps[0]
    assert infos[1] == infos[0]


def test_output_option_refusals(images, tmp_path):
    for args, first in ((["-c", "-o", "preallocation=metadata"],
                         "Compression and preallocation not supported at the same time"),
                        (["-o", "preallocation=foo"],
                         "Parameter 'preallocation' does not accept value 'foo'")):
        want = qemu_img("convert", "-O", "qcow2", *args, str(images["plain"]),
                        str(tmp_path / "t.qcow2"), check=False)
        got = qcowfs("convert", "-O", "qcow2", *args, images["plain"], tmp_path / "o.qcow2")
        assert want.returncode == got.code == 1
        assert first in want.stderr.decode() and first in got.err


def _data_layout(path) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA/SEEK_HOLE)."""
    import os
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
        return out
    finally:
        os.close(fd)


@pytest.mark.parametrize("sparse", ["512", "4k", "8k", "12k", "64k", "1M"])
def test_sparse_size_as_qemu(tmp_path, sparse):
    """-S N: zeros read from the source are left as holes in blocks of N's power-of-two grid,
    short zero runs between data are written: the same holes in raw output, the same
    allocated clusters in qcow2 output as qemu-img's."""
    src = create(tmp_path / "src.qcow2", "4M")
    qemu_io(src, "write -P 0 0 4M", "write -P 1 0 4k", "write -P 2 68k 4k", "write -P 3 84k 4k",
            "write -P 4 200k 64k", "write -P 5 328k 64k", "write -P 6 1M 4k",
            "write -P 7 3M 4k", "write -P 8 3100k 1k", "write -P 8 3110k 1k")
    for fmt in ("raw", "qcow2"):
        theirs, ours = tmp_path / f"theirs.{fmt}", tmp_path / f"ours.{fmt}"
        qemu_img("convert", "-S", sparse, "-O", fmt, str(src), str(theirs))
        r = qcowfs("convert", "-S", sparse, "-O", fmt, src, ours)
        assert r.code == 0, r.err
        assert identical(src, ours)
        if fmt == "raw":
            assert _data_layout(ours) == _data_layout(theirs)
        else:
            assert_check_clean(ours)
            # (the sequential writer lays the file out its own way: offsets differ)
            maps = [[{k: v for k, v in e.items() if k != "offset"}
                     for e in json.loads(qemu_img("map", "--output=json", str(p)).stdout)]
                    for p in (theirs, ours)]
            assert maps[1] == maps[0]
