"""compare gives qemu-img compare's verdict, message and exit code on the same inputs."""

from __future__ import annotations

import shutil

import pytest
from cli_fixtures import build_samples
from cli_helpers import qcowfs
from qemutools import create, qemu_img, qemu_io

SAMPLE = ["plain", "chain_raw_base", "chain_longer_backing", "snapshots", "compressed_zlib",
          "compressed_zstd", "extended_l2", "data_file", "v2", "clusters_512",
          "prealloc_metadata", "huge_sparse", "raw"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp-images")
    return d, build_samples(d, SAMPLE)


@pytest.fixture
def images(built, monkeypatch):
    d, imgs = built
    monkeypatch.chdir(d)
    return imgs


def both(*args):
    theirs = qemu_img("compare", *[str(a) for a in args], check=False)
    ours = qcowfs("compare", *args)
    return theirs, ours


def assert_same(theirs, ours):
    assert ours.code == theirs.returncode, (ours, theirs)
    assert ours.out == theirs.stdout.decode()


@pytest.mark.parametrize("name", SAMPLE)
def test_identical_to_its_raw_conversion(images, name, tmp_path):
    raw = tmp_path / "guest.raw"
    qemu_img("convert", "-O", "raw", str(images[name]), str(raw))
    theirs, ours = both(images[name], raw)
    assert theirs.returncode == 0
    assert_same(theirs, ours)


@pytest.mark.parametrize("name", ["plain", "chain_raw_base", "compressed_zlib", "extended_l2",
                                  "snapshots", "clusters_512"])
@pytest.mark.parametrize("where", [0, 700, 65536 + 3, 786432 + 511])
def test_first_differing_sector(images, name, where, tmp_path):
    raw = tmp_path / "guest.raw"
    qemu_img("convert", "-O", "raw", str(images[name]), str(raw))
    with open(raw, "r+b") as f:
        f.seek(where)
        old = f.read(1)
        f.seek(where)
        f.write(bytes([old[0] ^ 0xFF]))
    theirs, ours = both(images[name], raw)
    assert theirs.returncode == 1
    assert_same(theirs, ours)
    assert f"offset {where // 512 * 512}!" in ours.out


def test_sizes_differ_zero_tail_identical(tmp_path):
    a = create(tmp_path / "a.qcow2", "1M")
    qemu_io(a, "write -P 1 0 4k")
    b = create(tmp_path / "b.qcow2", "3M", backing=a.name, backing_fmt="qcow2")
    theirs, ours = both(a, b)
    assert theirs.returncode == 0
    assert_same(theirs, ours)
    assert ours.out.startswith("Warning: Image size mismatch!")


def test_sizes_differ_data_in_tail(tmp_path):
    a = create(tmp_path / "a.raw", "1M", fmt="raw")
    b = create(tmp_path / "b.qcow2", "3M")
    qemu_io(b, "write -P 9 2M 4k", "write -z 1M 64k")
    for args in ((a, b), (b, a)):
        theirs, ours = both(*args)
        assert theirs.returncode == 1
        assert_same(theirs, ours)


def test_strict_size_mismatch(tmp_path):
    a = create(tmp_path / "a.qcow2", "1M")
    b = create(tmp_path / "b.qcow2", "2M")
    theirs, ours = both("-s", a, b)
    assert theirs.returncode == 1
    assert_same(theirs, ours)


def test_strict_allocation_mismatch(tmp_path):
    a = create(tmp_path / "a.qcow2", "1M")
    b = create(tmp_path / "b.qcow2", "1M")
    qemu_io(a, "write -z 128k 64k")
    theirs, ours = both("-s", a, b)
    assert theirs.returncode == 1
    assert_same(theirs, ours)
    theirs, ours = both(a, b)
    assert theirs.returncode == 0
    assert_same(theirs, ours)


def test_quiet(tmp_path):
    a = create(tmp_path / "a.qcow2", "1M")
    b = create(tmp_path / "b.qcow2", "1M")
    qemu_io(b, "write -P 1 0 512")
    ours = qcowfs("compare", "-q", a, b)
    assert (ours.code, ours.out) == (1, "")


def test_missing_file_is_an_error(tmp_path):
    a = create(tmp_path / "a.qcow2", "1M")
    theirs, ours = both(a, tmp_path / "nope.qcow2")
    assert theirs.returncode == ours.code == 2
    assert ours.err.startswith("qcowfs: compare: ") and "nope.qcow2" in ours.err


def test_formats_forced(tmp_path):
    a = create(tmp_path / "a.qcow2", "1M")
    shutil.copy(a, tmp_path / "copy.qcow2")
    # Read as raw, the two files are the same bytes; as qcow2 against raw they differ.
    theirs, ours = both("-f", "raw", "-F", "raw", a, tmp_path / "copy.qcow2")
    assert_same(theirs, ours)
    theirs, ours = both("-f", "qcow2", "-F", "raw", a, tmp_path / "copy.qcow2")
    assert_same(theirs, ours)
