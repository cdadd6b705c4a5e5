"""measure prints what qemu-img measure prints, human and JSON, for virtual sizes and for
images QEMU made (every sample kind, snapshots, bitmaps), and refuses what it refuses."""

from __future__ import annotations

import pytest
from cli_fixtures import build_samples
from cli_helpers import qcowfs
from qemutools import create, qemu_img, qemu_io

OPTIONS = [
    "",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=512,refcount_bits=1",
    "cluster_size=4k,refcount_bits=64",
    "cluster_size=2M",
    "cluster_size=16k,extended_l2=on",
    "cluster_size=2M,extended_l2=on,refcount_bits=8",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full,cluster_size=4k",
    "lazy_refcounts=on,compression_type=zstd",
    "backing_file=base.qcow2,backing_fmt=qcow2",
    "data_file=d.raw,data_file_raw=on",
    "compat=0.10,extended_l2=on",
]
SIZES = ["0", "1", "1000", "64k", "3001k", "1G", "100T"]


def _same(*args: str, cwd=None) -> None:
    want = qemu_img("measure", *args, check=False, cwd=cwd)
    got = qcowfs("measure", *args)
    assert got.code == want.returncode, (args, got.err, want.stderr)
    if want.returncode:
        lines = [line.removeprefix("qemu-img: ") for line in want.stderr.decode().splitlines()]
        # our one line is QEMU's first, or its first two when the sentence wraps
        reason = lines[0] if lines[0][-1] in ".')" else " ".join(lines[:2])
        assert got.err == f"qcowfs: measure: {reason}\n", args
    else:
        assert got.out == want.stdout.decode(), args


@pytest.mark.parametrize("opts", OPTIONS)
def test_size_grid(opts):
    for size in SIZES:
        if size == "100T" and "cluster_size=512" in opts:
            continue  # too large, see test_refusals
        for output in ("human", "json"):
            args = ["--output", output, "-O", "qcow2", "--size", size]
            if opts:
                args += ["-o", opts]
            _same(*args)


@pytest.mark.parametrize("size", ["0", "1001", "3001k", "1G"])
def test_size_raw_output(size):
    _same("--size", size)
    _same("--output=json", "-O", "raw", "-o", "preallocation=full", "--size", size)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    return d, build_samples(d)


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=2M,extended_l2=on",
                                  "compat=0.10", "cluster_size=512,refcount_bits=2",
                                  "preallocation=full"])
def test_images(samples, opts):
    d, images = samples
    for path in images.values():
        for output in ("human", "json"):
            args = ["--output", output, "-O", "qcow2", str(path)]
            if opts:
                args += ["-o", opts]
            _same(*args, cwd=d)
        _same(str(path), cwd=d)  # raw output


def test_bitmaps_and_snapshots(tmp_path):
    img = create(tmp_path / "a.qcow2", "100M")
    qemu_io(img, "write 0 1M", "write 5M 100k")
    qemu_img("bitmap", "--add", "-g", "64k", str(img), "b1")
    qemu_img("bitmap", "--add", "-g", "512", str(img), "a-much-longer-bitmap-name" * 3)
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, "write 10M 3M", "write -z 0 64k")
    qemu_img("resize", str(img), "300M")
    for extra in ([], ["-l", "s1"], ["-l", "1"], ["-l", "snapshot.id=1"],
                  ["-l", "snapshot.name=s1"], ["-l", "snapshot.name=1"], ["-l", "nope"],
                  ["-l", "snapshot.foo=1"]):
        for opts in ("cluster_size=512", "cluster_size=1M", "compat=0.10"):
            _same("--output=json", "-O", "qcow2", "-o", opts, *extra, str(img))
            _same("-O", "qcow2", "-o", opts, *extra, str(img))
        _same("-O", "raw", *extra, str(img))


def test_refusals(tmp_path):
    img = create(tmp_path / "a.qcow2", "1M")
    raw = create(tmp_path / "a.raw", "1M", fmt="raw")
    for args in ([], ["--size", "1G", str(img)], [str(img), str(img)], ["-f", "qcow2"],
                 ["-l", "s"], ["--size", "5x"], ["-O", "foo", "--size", "1M"],
                 ["-O", "vmdk", "--size", "1M"], ["-O", "raw", "-o", "cluster_size=4k",
                                                  "--size", "1M"],
                 ["-l", "s", str(raw)], ["-f", "raw", "-l", "1", str(img)]):
        _same(*args)
    for opts in ("foo=1", "help", "compat=v2", "compat=2", "cluster_size=3k",
                 "cluster_size=64", "refcount_bits=3", "refcount_bits=128",
                 "compat=0.10,refcount_bits=8", "extended_l2=on,cluster_size=8k",
                 "lazy_refcounts=maybe", "preallocation=bogus", "cluster_size=512"):
        _same("-O", "qcow2", "-o", opts, "--size", "100T")

