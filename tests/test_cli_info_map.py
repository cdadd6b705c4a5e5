"""info and map agree with qemu-img info/map on every kind of image the reader handles."""

from __future__ import annotations

import json

import pytest
from cli_fixtures import BUILDERS, build_samples
from cli_helpers import qcowfs
from qemutools import qemu_img


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-images")
    built = build_samples(d)
    return d, built


@pytest.fixture
def images(image_dir, monkeypatch):
    d, built = image_dir
    monkeypatch.chdir(d)
    return built


NAMES = sorted(BUILDERS)


@pytest.mark.parametrize("name", NAMES)
def test_info_json_equals_qemu_img(images, name):
    path = images[name]
    theirs = qemu_img("info", "--output=json", str(path)).stdout.decode()
    ours = qcowfs("info", "--output", "json", path)
    assert ours.code == 0, ours.err
    assert json.loads(ours.out) == json.loads(theirs)
    assert ours.out == theirs  # same layout too, so scripts that diff the text agree


@pytest.mark.parametrize("name", NAMES)
def test_info_human_equals_qemu_img(images, name):
    path = images[name]
    theirs = qemu_img("info", str(path)).stdout.decode()
    ours = qcowfs("info", path)
    assert ours.code == 0, ours.err
    assert ours.out == theirs


@pytest.mark.parametrize("name", ["chain_raw_base", "relative_subdir", "extended_l2"])
@pytest.mark.parametrize("output", ["json", "human"])
def test_info_backing_chain_equals_qemu_img(images, name, output):
    path = images[name]
    theirs = qemu_img("info", "--backing-chain", f"--output={output}", str(path)).stdout.decode()
    ours = qcowfs("info", "--backing-chain", "--output", output, path)
    assert ours.code == 0, ours.err
    assert ours.out == theirs


def test_info_relative_names_as_given(images, monkeypatch):
    top = images["relative_subdir"]
    monkeypatch.chdir(top.parent.parent)
    rel = f"sub/{top.name}"
    theirs = json.loads(qemu_img("info", "--output=json", rel).stdout)
    ours = json.loads(qcowfs("info", "--output=json", rel).out)
    assert ours == theirs
    assert ours["full-backing-filename"] == "sub/../rbase.qcow2"


def test_info_without_backing_file_present(tmp_path):
    p = tmp_path / "orphan.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", str(p), "1M")
    theirs = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    ours = qcowfs("info", "--output=json", p)
    assert ours.code == 0
    assert json.loads(ours.out) == theirs
    chained = qcowfs("info", "--backing-chain", p)
    assert chained.code == 1
    assert chained.err.startswith("qcowfs: info: ") and "gone.qcow2" in chained.err


@pytest.fixture(params=["per-entry", "whole-table"])
def scan(request, monkeypatch):
    """map twice: the per-entry extents small images take, and the numpy whole-table
    extents of large images, forced on these small ones."""
    from qcowfs.image import scanmode
    limit = 0 if request.param == "whole-table" else 1 << 62
    monkeypatch.setattr(scanmode, "WHOLE_TABLE_MIN_CLUSTERS", limit)
    return request.param


@pytest.mark.parametrize("name", NAMES)
def test_map_json_equals_qemu_img(images, name, scan):
    path = images[name]
    theirs = qemu_img("map", "--output=json", str(path)).stdout.decode()
    ours = qcowfs("map", "--output=json", path)
    assert ours.code == 0, ours.err
    assert json.loads(ours.out) == json.loads(theirs)
    assert ours.out == theirs


@pytest.mark.parametrize("name", NAMES)
def test_map_human_equals_qemu_img(images, name, scan):
    path = images[name]
    theirs = qemu_img("map", str(path), check=False)
    ours = qcowfs("map", path)
    if theirs.returncode:
        # compressed clusters cannot be shown in the human table: both refuse
        assert ours.code == 1
        assert "compressed clusters" in ours.err
        assert "compressed clusters" in theirs.stderr.decode()
    else:
        assert ours.code == 0, ours.err
        assert ours.out == theirs.stdout.decode()
