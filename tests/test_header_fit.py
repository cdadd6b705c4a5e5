"""Cluster 0 of a 512-byte-cluster image is small: a long backing name must still fit, with
the optional feature-name table left out (as QEMU does)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from qemutools import assert_check_clean, create, info

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
