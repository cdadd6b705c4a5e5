"""Bounded work in check and map on hostile images: references far past the end of the file
(up to 2^56) cost one error each, as in qemu-img, not a loop or a table as long as the
reference claims. Each image is a qemu-img image patched with struct at test time; each run is
a subprocess under a wall-time and an address-space limit, so a hang or a runaway allocation
fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, two_copies
from qemutools import create, poke, qemu_img, qemu_io

COPIED = 1 << 63
MEMORY_LIMIT = 1 << 30
LIMIT_S = 30


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def base(d: Path) -> Path:
    p = create(d / "img.qcow2", "1G")
    qemu_io(p, "write -P 1 0 128k")
    return p


def l1_offset(p: Path) -> int:
    return u64(p, 40)


def l2_offset(p: Path) -> int:
    return u64(p, l1_offset(p)) & 0x00FFFFFFFFFFFE00


#: name -> (the table patched, the entry's index, its new value)
ENTRIES = {
    "data_at_2_55": ("l2", 1, COPIED | 1 << 55),
    "data_past_eof": ("l2", 2, COPIED | 100 << 16),
    "l2_at_2_55": ("l1", 1, COPIED | 1 << 55),
    "l2_past_eof": ("l1", 1, COPIED | 200 << 16),
}


def build(d: Path, name: str) -> Path:
    p = base(d)
    if name == "many_far_references":
        # a whole L2 table of entries far past the end: 8192 errors, each counted once
        table = b"".join(struct.pack(">Q", COPIED | (1 << 55) + (i << 16)) for i in range(8192))
        poke(p, l2_offset(p), table)
        return p
    table, index, value = ENTRIES[name]
    start = l1_offset(p) if table == "l1" else l2_offset(p)
    poke(p, start + 8 * index, struct.pack(">Q", value))
    return p


CASES = [*ENTRIES, "many_far_references"]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


#: the qcowfs command in a fresh interpreter, with the whole-table threshold given first
RUN = ("import sys; from qcowfs.image import scanmode; "
       "scanmode.WHOLE_TABLE_MIN_CLUSTERS = int(sys.argv[1]); "
       "from qcowfs.cli.main import main; sys.exit(main(sys.argv[2:]))")


@pytest.fixture(params=["per-entry", "whole-table"])
def scan(request) -> int:
    """Every case twice: the per-entry passes and the numpy whole-table passes (the
    threshold, in clusters, that ``ours`` runs with)."""
    return 0 if request.param == "whole-table" else 1 << 62


def ours(scan: int, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, str(scan), *map(str, args)],
                          capture_output=True, text=True, timeout=LIMIT_S,
                          preexec_fn=_limit_memory,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    return two_copies(build(tmp_path, name), tmp_path)


def report(stdout: str) -> dict:
    out = json.loads(stdout)
    out.pop("filename", None)
    return out


@pytest.mark.timeout(2 * LIMIT_S)
@pytest.mark.parametrize("name", sorted(CASES))
def test_check_counts_far_references_once_like_qemu_img(tmp_path, name, scan):
    theirs, mine = pair(tmp_path, name)
    t = qemu_img("check", "--output=json", str(theirs), check=False)
    o = ours(scan, "check", "--output=json", mine)
    assert "Traceback" not in o.stderr
    assert o.returncode == t.returncode
    assert report(o.stdout) == report(t.stdout.decode())
    # the same lines on stderr, in the same order
    assert o.stderr.splitlines() == t.stderr.decode().splitlines()


@pytest.mark.timeout(4 * LIMIT_S)
@pytest.mark.parametrize("name", sorted(CASES))
def test_repair_of_far_references_is_bounded_and_no_worse(tmp_path, name, scan):
    theirs, mine = pair(tmp_path, name)
    qemu_img("check", "-r", "all", str(theirs), check=False)
    o = ours(scan, "check", "-r", "all", mine)
    assert "Traceback" not in o.stderr
    t_after = qemu_img("check", "--output=json", str(theirs), check=False)
    o_after = qemu_img("check", "--output=json", str(mine), check=False)
    assert o_after.returncode <= t_after.returncode
    assert (report(o_after.stdout.decode()).get("corruptions", 0)
            <= report(t_after.stdout.decode()).get("corruptions", 0))


@pytest.mark.timeout(2 * LIMIT_S)
@pytest.mark.parametrize("name", ["data_at_2_55", "data_past_eof", "many_far_references"])
def test_map_of_far_references_like_qemu_img(tmp_path, name, scan):
    theirs, mine = pair(tmp_path, name)
    t = qemu_img("map", "--output=json", str(theirs))
    o = ours(scan, "map", "--output=json", mine)
    assert o.returncode == 0, o.stderr
    assert json.loads(o.stdout) == json.loads(t.stdout)


@pytest.mark.timeout(2 * LIMIT_S)
@pytest.mark.parametrize("name", ["l2_at_2_55", "l2_past_eof"])
def test_map_of_an_l2_table_past_the_end_is_one_error_line(tmp_path, name, scan):
    """The read path refuses an L2 table outside the file (qemu-img reads it as zeros)."""
    _, mine = pair(tmp_path, name)
    o = ours(scan, "map", "--output=json", mine)
    assert o.returncode == 1
    assert "Traceback" not in o.stderr
    assert o.stderr.startswith("qcowfs: ") and len(o.stderr.splitlines()) == 1


def test_fragmentation_is_counted_per_l2_table_like_qemu_img(tmp_path, scan):
    """Metadata preallocation puts each L2 table between the data runs it maps: QEMU counts
    fragmentation within an L2 table only, so the image is 0.00% fragmented."""
    p = create(tmp_path / "pre.qcow2", "2G", preallocation="metadata")
    t = qemu_img("check", "--output=json", str(p))
    o = ours(scan, "check", "--output=json", p)
    assert o.returncode == 0
    assert report(o.stdout) == report(t.stdout.decode())
    assert report(o.stdout).get("fragmented-clusters", 0) == 0


@pytest.mark.timeout(2 * LIMIT_S)
def test_map_with_an_unaligned_refcount_block_like_qemu_img(tmp_path, scan):
    """map reads refcounts for QEMU's "metadata preallocated" test; a refcount table entry
    that is not cluster-aligned counts as no block there (it was a traceback)."""
    p = base(tmp_path)
    reftable = u64(p, 48)
    poke(p, reftable, struct.pack(">Q", u64(p, reftable) + 512))
    t = qemu_img("map", "--output=json", str(p))
    o = ours(scan, "map", "--output=json", p)
    assert o.returncode == 0, o.stderr
    assert json.loads(o.stdout) == json.loads(t.stdout)
