"""Random writes, flushes, reopens, snapshots and resizes against a bytearray model, over the
image matrix; QEMU judges the result: ``qemu-img check`` clean (no errors, no leaks) and
``qemu-img compare`` of the image (and of every snapshot) with the model identical, with the
backing files untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from qemutools import assert_check_clean, compare, create, qemu_img, qemu_io, to_raw

import qcowfs
from qcowfs.errors import ImageError, UnsupportedError

MiB = 1024 * 1024


@dataclass
class Config:
    name: str
    size: int
    cluster_size: int = 65536
    options: dict = field(default_factory=dict)
    chain: str | None = None  # None, "qcow2", "raw"
    compressed: bool = False
    qemu_snapshots: bool = False
    data_file: str | None = None  # None, "plain", "raw"

    @property
    def v2(self) -> bool:
        return self.options.get("compat") == "0.10"

    @property
    def snapshots_ok(self) -> bool:
        return self.data_file is None and self.options.get("refcount_bits") != 1

    @property
    def resize_step(self) -> int:
        return max(self.cluster_size, 64 * 1024)


CONFIGS = [
    Config("c512", 1 * MiB, 512, {"cluster_size": 512}),
    Config("c512-r64-growth", 4 * MiB, 512, {"cluster_size": 512, "refcount_bits": 64}),
    Config("c4k-r1", 2 * MiB, 4096, {"cluster_size": 4096, "refcount_bits": 1}),
    Config("c64k-r64", 4 * MiB, 65536, {"refcount_bits": 64}),
    Config("c2m", 8 * MiB, 2 * MiB, {"cluster_size": 2 * MiB}),
    Config("v2", 4 * MiB, 65536, {"compat": "0.10"}),
    Config("v2-c512-chain", 1 * MiB, 512, {"compat": "0.10", "cluster_size": 512},
           chain="qcow2"),
    Config("lazy", 4 * MiB, 65536, {"lazy_refcounts": True}),
    Config("extl2-c64k", 4 * MiB, 65536, {"extended_l2": True}, chain="raw"),
    Config("extl2-c16k", 2 * MiB, 16384, {"extended_l2": True, "cluster_size": 16384},
           chain="qcow2"),
    Config("datafile", 4 * MiB, 65536, data_file="plain"),
    Config("datafile-raw", 4 * MiB, 65536, data_file="raw"),
    Config("compressed", 4 * MiB, 65536, compressed=True),
    Config("compressed-c4k-extl2", 2 * MiB, 16384, {"extended_l2": True, "cluster_size": 16384},
           compressed=True),
    Config("qemu-snapshots", 4 * MiB, 65536, qemu_snapshots=True),
    Config("chain-qcow2", 4 * MiB, 65536, chain="qcow2"),
    Config("chain-raw-longer", 2 * MiB, 4096, {"cluster_size": 4096}, chain="raw"),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_fixture(cfg: Config, d: Path) -> tuple[Path, list[Path]]:
    """The top image (made by qemu-img/qemu-io) and the backing files it stands on."""
    top = d / "top.qcow2"
    backing: list[Path] = []
    opts = dict(cfg.options)
    if cfg.chain == "qcow2":
        base = create(d / "base.qcow2", cfg.size, **opts)
        qemu_io(base, f"write -P 0x11 0 {cfg.size // 2}", f"write -P 0x12 {cfg.size - 8192} 4096")
        mid = create(d / "mid.qcow2", cfg.size, backing=base, backing_fmt="qcow2", **opts)
        qemu_io(mid, f"write -P 0x21 {cfg.size // 4} {cfg.size // 4}", "write -z 0 4096")
        create(top, cfg.size, backing=mid, backing_fmt="qcow2", **opts)
        backing = [base, mid]
    elif cfg.chain == "raw":
        base = create(d / "base.raw", cfg.size + cfg.size // 2, fmt="raw")
        qemu_io(base, f"write -P 0x33 0 {cfg.size + cfg.size // 2}", fmt="raw")
        create(top, cfg.size, backing=base, backing_fmt="raw", **opts)
        backing = [base]
    elif cfg.compressed:
        src = create(d / "src.raw", cfg.size, fmt="raw")
        qemu_io(src, f"write -P 0x44 0 {cfg.size // 2}",
                f"write -P 0x45 {cfg.size // 2 + 4096} {cfg.size // 4}", fmt="raw")
        o = ",".join(f"{k}={'on' if v is True else v}" for k, v in opts.items())
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", *(["-o", o] if o else []),
                 str(src), str(top))
        os.unlink(src)
    elif cfg.data_file:
        opts["data_file"] = str(d / "top.data")
        if cfg.data_file == "raw":
            opts["data_file_raw"] = True
        create(top, cfg.size, **opts)
        qemu_io(top, f"write -P 0x55 0 {cfg.size // 3}")
    else:
        create(top, cfg.size, **opts)
        length = min(3 * cfg.cluster_size + 100, cfg.size // 2)
        qemu_io(top, f"write -P 0x66 {cfg.cluster_size} {length}")
        if cfg.qemu_snapshots:
            qemu_img("snapshot", "-c", "q1", str(top))
            qemu_io(top, f"write -P 0x67 0 {cfg.size // 2}")
            qemu_img("snapshot", "-c", "q2", str(top))
            qemu_io(top, f"write -z {cfg.size // 4} {cfg.size // 4}")
    return top, backing


class WriteMachine(RuleBasedStateMachine):
    cfg: Config

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qcowfs-sm-"))
        self.top, self.backing = build_fixture(self.cfg, self.dir)
        self.backing_sums = {p: _sha(p) for p in self.backing}
        self.model = bytearray(to_raw(self.top, self.dir / "initial.raw"))
        self.snaps: dict[str, bytes] = {}
        with qcowfs.open_image(str(self.top)) as disk:
            ids = [s.id for s in disk.snapshots]
        for sid in ids:
            self.snaps[sid] = to_raw(self.top, self.dir / "snap.raw", snapshot=sid)
        self.disk = qcowfs.open_image(str(self.top), writable=True)
        self.backing_raw = (to_raw(self.backing[-1], self.dir / "backing.raw")
                            if self.backing else b"")
        self.backing_size = (os.path.getsize(self.backing[-1]) if self.cfg.chain == "raw"
                             else self.cfg.size if self.backing else 0)

    @initialize()
    def nothing(self):
        pass

    # --- rules ------------------------------------------------------------------------------

    @rule(data=st.data(), kind=st.sampled_from(["random", "zero", "pattern"]))
    def write(self, data, kind):
        size = len(self.model)
        cs = self.cfg.cluster_size
        near = data.draw(st.booleans())
        if near:
            base = data.draw(st.integers(0, max(0, size // cs - 1))) * cs
            offset = max(0, min(size - 1, base + data.draw(st.integers(-600, 600))))
        else:
            offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.one_of(st.integers(1, 4096), st.integers(1, 3 * cs + 1000),
                                     st.sampled_from([cs, 2 * cs, 512])))
        length = min(length, size - offset)
        if kind == "zero":
            buf = bytes(length)
        elif kind == "pattern":
            buf = bytes([data.draw(st.integers(1, 255))]) * length
        else:
            buf = os.urandom(length)
        self.disk.write(offset, buf)
        self.model[offset:offset + length] = buf

    @rule()
    def flush(self):
        self.disk.flush()

    @rule(zero_detect=st.booleans())
    def reopen(self, zero_detect):
        self.disk.close()
        self.disk = qcowfs.open_image(str(self.top), writable=True, zero_detect=zero_detect)

    @precondition(lambda self: self.cfg.snapshots_ok and len(self.snaps) < 4)
    @rule()
    def create_snapshot(self):
        self.counter = getattr(self, "counter", 0) + 1
        info = self.disk.create_snapshot(f"snap{self.counter}")
        assert info.id not in self.snaps
        assert info.size == len(self.model)
        self.snaps[info.id] = bytes(self.model)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def apply_snapshot(self, data):
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        self.disk.apply_snapshot(sid)
        self.model = bytearray(self.snaps[sid])

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete_snapshot(self, data):
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        self.disk.delete_snapshot(sid)
        del self.snaps[sid]

    @rule(data=st.data())
    def resize(self, data):
        step = self.cfg.resize_step
        old = len(self.model)
        new = data.draw(st.integers(1, 2 * self.cfg.size // step)) * step
        if new == old:
            return
        if new < old and not data.draw(st.booleans()):
            with pytest.raises(ImageError):
                self.disk.resize(new)
            return
        if self.cfg.v2 and (self.snaps or (new > old and self.backing_size > old)):
            with pytest.raises(UnsupportedError):
                self.disk.resize(new, shrink=True)
            return
        self.disk.resize(new, shrink=True)
        if new < old:
            del self.model[new:]
        else:
            self.model += bytes(new - old)

    @invariant()
    def reads_back(self):
        assert self.disk.size == len(self.model)
        if len(self.model) <= 4 * MiB:
            assert self.disk.read(0, len(self.model)) == self.model

    def teardown(self):
        try:
            self.disk.close()
            assert_check_clean(self.top)
            expected = self.dir / "expected.raw"
            expected.write_bytes(self.model)
            assert compare(expected, self.top) == 0, "image differs from the model"
            size = len(self.model)
            for sid, content in self.snaps.items():
                # qemu-img convert -l shows a snapshot at the image's current size.
                # Past the snapshot's own size its L1 has nothing: the backing file shows.
                fitted = content[:size] + self.backing_raw[len(content):size]
                fitted += bytes(size - len(fitted))
                snap = self.dir / "snap.raw"
                assert to_raw(self.top, snap, snapshot=sid) == fitted, f"snapshot {sid} differs"
            if self.cfg.data_file:
                data_file = self.dir / "top.data"
                assert data_file.stat().st_size == len(self.model), "data file size"
                if self.cfg.data_file == "raw":
                    assert data_file.read_bytes() == self.model, "raw data file content"
            for p, digest in self.backing_sums.items():
                assert _sha(p) == digest, f"backing file {p.name} changed"
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_state_machine(cfg):
    machine = type(f"WriteMachine_{cfg.name}", (WriteMachine,), {"cfg": cfg})
    runner = machine.TestCase
    # QCOWFS_SM_EXAMPLES raises the example count for a longer soak.
    examples = int(os.environ.get("QCOWFS_SM_EXAMPLES", "10"))
    runner.settings = settings(max_examples=examples, stateful_step_count=25, deadline=None,
                               suppress_health_check=list(HealthCheck))
    runner().runTest()
