"""Cluster 0 of a 512-byte-cluster image is small: a long backing name must still fit, with
the optional feature-name table left out (as QEMU does)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from qemutools import assert_check_clean, create, info, poke, qemu_img

from qcowfs.errors import FormatError
from qcowfs.format.header import parse_header, serialize_header


def test_long_backing_name_fits_without_feature_table(tmp_path):
    base = create(tmp_path / ("b" * 250 + ".raw"),
                  "1M", fmt="raw")
    top = create(tmp_path / "top.qcow2", "1M", cluster_size=512)
    subprocess.run([sys.executable, "-m", "qcowfs", "rebase", "-u", "-b", base.name, "-F", "raw",
                    str(top)], check=True, capture_output=True)
    assert info(top)["backing-filename"] == base.name
    assert_check_clean(top)
    header = parse_header(top.read_bytes()[:512])
    assert header.backing_file == base.name and header.feature_names == {}


def test_nul_in_a_name_is_refused():
    header = parse_header(serialize_header(parse_header(_minimal_v3())))
    with pytest.raises(FormatError, match="NUL"):
        serialize_header(header.replace(backing_file="a\0b"))


def _minimal_v3() -> bytes:
    import struct
    fixed = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, 0, 0, 16, 1 << 20, 0, 1, 0x30000,
                        0x10000, 1, 0, 0)
    return fixed + struct.pack(">QQQII", 0, 0, 0, 4, 112) + bytes(8) + bytes(8)


# --- cluster 0 as QEMU's header update writes it ----------------------------------------------

def _qcowfs(*args, cwd=None) -> None:
    subprocess.run([sys.executable, "-m", "qcowfs", *map(str, args)], check=True,
                   capture_output=True, cwd=cwd)


@pytest.mark.parametrize("cluster_size", [512, 1024, 2048, 4096, 8192, 65536])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_create_writes_cluster0_as_qemu_img(tmp_path, cluster_size, compat):
    """The feature name table is written only for clusters over 4 KiB, as qemu-img does."""
    theirs = create(tmp_path / "q.qcow2", "1M", cluster_size=cluster_size, compat=compat)
    ours = tmp_path / "o.qcow2"
    _qcowfs("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},compat={compat}",
            ours, "1M")
    assert ours.read_bytes()[:cluster_size] == theirs.read_bytes()[:cluster_size]


@pytest.mark.parametrize("cluster_size", [4096, 65536])
@pytest.mark.parametrize("change", ["rebase", "lazy-on", "lazy-off"])
def test_header_update_rewrites_all_of_cluster0(tmp_path, cluster_size, change):
    """Stray bytes past the header in cluster 0 are gone after a header update, in qemu-img
    and in qcowfs alike, and the two files are byte for byte the same."""
    base = create(tmp_path / "base.qcow2", "1M")
    seed = create(tmp_path / "seed.qcow2", "1M", cluster_size=cluster_size,
                  lazy_refcounts=change == "lazy-off")
    poke(seed, cluster_size - 24, b"\xa5" * 16)
    files = {}
    for tool in ("qemu-img", "qcowfs"):
        img = tmp_path / f"{tool}.qcow2"
        shutil.copyfile(seed, img)
        args = (["rebase", "-u", "-b", base.name, "-F", "qcow2", img] if change == "rebase"
                else ["amend", "-o", f"lazy_refcounts={'on' if change == 'lazy-on' else 'off'}",
                      img])
        if tool == "qemu-img":
            qemu_img(*args, cwd=tmp_path)
        else:
            _qcowfs(*args, cwd=tmp_path)
        files[tool] = img.read_bytes()
        assert b"\xa5" not in files[tool][:cluster_size]
        assert_check_clean(img)
    assert files["qcowfs"] == files["qemu-img"]


@pytest.mark.parametrize("row", ["corrupt-mark-keeps-header-cluster-tail",
                                 "snapshot-l1-past-eof-rebuild-refused"])
def test_refused_repair_leaves_the_file_qemu_img_leaves(tmp_path, row):
    """A repair refused by the overlap rule marks the image corrupt by a header update: the
    file is then byte for byte what ``qemu-img check -r all`` leaves."""
    from test_fuzz import REGRESSIONS

    from fuzz.mutate import apply, from_rows
    from fuzz.seeds import TOP, build_seed

    kind, rows = next(p.values[:2] for p in REGRESSIONS if p.id == row)
    seed = build_seed(kind)
    mutated = apply((seed / TOP).read_bytes(), from_rows(rows))
    files = {}
    for tool in ("qemu-img", "qcowfs"):
        case = tmp_path / tool
        shutil.copytree(seed, case)
        (case / TOP).write_bytes(mutated)
        if tool == "qemu-img":
            rc = qemu_img("check", "-r", "all", TOP, check=False, cwd=case).returncode
        else:
            rc = subprocess.run([sys.executable, "-m", "qcowfs", "check", "-r", "all", TOP],
                                capture_output=True, cwd=case).returncode
        assert rc == 1
        files[tool] = (case / TOP).read_bytes()
    assert files["qcowfs"] == files["qemu-img"]
    assert files["qcowfs"][:4096] != mutated[:4096]
