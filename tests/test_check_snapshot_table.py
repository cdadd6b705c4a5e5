"""check -r all repairs snapshot tables as qemu-img does (the qemu-iotest 261 cases): entries of
a v3 image with less than 16 bytes of extra data, unknown extra data (kept), extra data over
1024 bytes, a table over 64 MiB, more than 65536 snapshots. Each image is made once by
qemu-img and byte-patched, then copied: qemu-img and qcowfs each check and repair their own
copy, and their verdicts, exit codes and results are compared."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import qcowfs
from qemutools import qemu_img, to_raw
from snaptable_fixtures import CASES, read_entries, table

MiB = 1 << 20


def _qemu_check(path: Path, *extra: str) -> tuple[int, dict]:
    p = qemu_img("check", "--output=json", *extra, str(path), check=False)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {}


def _our_check(path: Path, *extra: str) -> tuple[int, dict]:
    r = qcowfs("check", "--output=json", *extra, path)
    return r.code, json.loads(r.out) if r.out.strip() else {}


def _counts(report: dict) -> dict:
    keys = ("corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "check-errors",
            "image-end-offset")
    return {k: report.get(k) for k in keys}


def _snapshot_list(path: Path) -> list[tuple[str, str]]:
    """(id, name) of every snapshot as qemu-img snapshot -l lists them (the first 50)."""
    p = subprocess.run(["qemu-img", "snapshot", "-l", str(path)], capture_output=True,
                       text=True, check=True)
    rows = p.stdout.splitlines()[2:52]
    return [(r[:10].strip(), r[10:28].strip()) for r in rows]


def _own_data(snapshot_index: int) -> bytes:
    """What snapshot ``sn<i>`` of snaptable_fixtures.with_snapshots holds: the patterns
    written before it was taken."""
    data = bytearray(4 * MiB)
    for k in range(snapshot_index + 1):
        data[k * MiB:(k + 1) * MiB] = bytes([0x10 + k]) * MiB
    return bytes(data)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Each case built once; tests work on copies."""
    root = tmp_path_factory.mktemp("snaptables")
    out = {}
    for name, build in CASES.items():
        d = root / name
        d.mkdir()
        out[name] = build(d)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.parametrize("case", list(CASES))
def test_verdicts_before_repair_match_qemu(tmp_path, images, case):
    src = images[case]
    for extra in ((), ("-r", "leaks")):
        theirs = _copy(src, tmp_path / "theirs.qcow2")
        ours = _copy(src, tmp_path / "ours.qcow2")
        code, report = _qemu_check(theirs, *extra)
        our_code, our_report = _our_check(ours, *extra)
        assert our_code == code, (extra, our_report)
        assert _counts(our_report) == _counts(report), extra
        assert ours.read_bytes() == theirs.read_bytes(), f"{extra}: the same change (or none)"


@pytest.mark.parametrize("case", list(CASES))
def test_repair_all_as_qemu(tmp_path, images, case):
    src = images[case]
    readable_before = case in ("incomplete", "unknown-extra")
    before = _snapshot_list(src) if readable_before else None
    theirs = _copy(src, tmp_path / "theirs.qcow2")
    ours = _copy(src, tmp_path / "ours.qcow2")

    code, report = _qemu_check(theirs, "-r", "all")
    our_code, our_report = _our_check(ours, "-r", "all")
    assert our_code == code == 0, our_report
    assert _counts(our_report) == _counts(report)
    after_code, after = _qemu_check(ours)
    assert after_code == 0, after
    assert not {k: v for k, v in _counts(after).items() if k != "image-end-offset" and v}

    assert table(ours)[0] == table(theirs)[0], "as many snapshots as qemu-img kept"
    assert _snapshot_list(ours) == _snapshot_list(theirs)
    if before is not None:
        assert _snapshot_list(ours) == before
    real = [e for e in read_entries(ours, limit=3) if e.name.startswith(b"sn")]
    assert real, "the snapshots qemu-img made survive"
    for i, e in enumerate(real):
        ident = e.ident.decode()
        data = to_raw(ours, tmp_path / f"ours-{ident}.raw", snapshot=ident)
        assert data == _own_data(i)
        assert data == to_raw(theirs, tmp_path / f"theirs-{ident}.raw", snapshot=ident)


def test_incomplete_entries_are_completed_and_unknown_extra_data_kept(tmp_path, images):
    ours = _copy(images["incomplete"], tmp_path / "ours.qcow2")
    old_offset = table(ours)[1]
    assert qcowfs("check", "-r", "all", ours).code == 0
    count, offset = table(ours)
    assert offset != old_offset, "the table is rewritten at a new place"
    entries = read_entries(ours)
    assert [len(e.extra) for e in entries] == [24, 42, 24]
    assert entries[1].extra[24:] == b"very important dat"
    for e in entries:
        assert int.from_bytes(e.extra[8:16], "big") == 4 * MiB  # disk_size


def test_oversized_extra_data_is_cut_to_1024_bytes(tmp_path, images):
    ours = _copy(images["oversized-extra"], tmp_path / "ours.qcow2")
    theirs = _copy(images["oversized-extra"], tmp_path / "theirs.qcow2")
    assert qcowfs("check", "-r", "all", ours).code == 0
    qemu_img("check", "-r", "all", str(theirs))
    assert [len(e.extra) for e in read_entries(ours)] == \
        [len(e.extra) for e in read_entries(theirs)] == [24, 24, 1024]
    assert [e.ident for e in read_entries(ours)] == [b"1", b"2", b"3"]
