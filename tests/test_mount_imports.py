"""What ``qcowfs mount`` loads before it forks: imports are most of its start-up time, so the
command loads only its own CLI module, and a read-only open loads neither the write path, the
checker nor zstandard. Each case runs in a fresh interpreter (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from qemutools import create

REPO = Path(__file__).resolve().parent.parent

#: Loaded by the mount only on demand: the other commands, the write path and the checker
#: (a writable qcow2 / a dirty one), zstandard (the first zstd cluster).
OTHER_COMMANDS = {f"qcowfs.cli.{name}" for name in (
    "umount", "create", "info", "check", "commit", "rebase", "snapshot", "resize", "map",
    "convert", "compare", "measure", "dd", "bitmap", "amend")}
WRITE_PATH = {"qcowfs.image.write", "qcowfs.image.refcount"}
CHECKER = {"qcowfs.image.check", "qcowfs.image.walk", "qcowfs.image.refcount_read"}


def loaded_modules(code: str) -> set[str]:
    """The modules in sys.modules after running ``code`` in a fresh interpreter."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=60, check=True)
    return set(json.loads(p.stdout.splitlines()[-1]))


def mount_path(image: Path, options: str) -> str:
    """The imports and the open ``qcowfs mount -o OPTIONS IMAGE MNT`` does before it forks."""
    return f"""
        from qcowfs.cli.main import build_parser
        argv = ["mount", "-o", {options!r}, {str(image)!r}, "/nonexistent"]
        args = build_parser(argv).parse_args(argv)
        from qcowfs.mount.daemon import open_disk
        from qcowfs.mount.options import parse_options
        disk = open_disk(args.image, parse_options(args.options))
        assert disk.read(0, 4096) == bytes(4096)
        disk.close()
    """


def test_importing_qcowfs_loads_no_engine_until_the_disk_api_is_used():
    mods = loaded_modules("import qcowfs, qcowfs.errors")
    assert "qcowfs.chain.disk" not in mods
    assert not any(m.startswith(("qcowfs.image", "qcowfs.format")) for m in mods)
    mods = loaded_modules("""
        import qcowfs
        from qcowfs.chain import disk
        assert qcowfs.open_image is disk.open_image and qcowfs.Disk is disk.Disk
        assert qcowfs.SnapshotDisk is disk.SnapshotDisk
        assert qcowfs.SnapshotInfo is disk.SnapshotInfo
        names = {}
        exec("from qcowfs import *", names)
        assert set(qcowfs.__all__) <= set(names)
        try:
            qcowfs.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("qcowfs.no_such_name")
    """)
    assert "qcowfs.chain.disk" in mods


def test_read_only_mount_loads_only_what_it_uses(tmp_path):
    img = create(tmp_path / "a.qcow2", "4T")
    mods = loaded_modules(mount_path(img, "ro"))
    assert {"qcowfs.cli.mount", "qcowfs.mount.daemon", "pyfuse3", "trio"} <= mods
    assert not mods & (OTHER_COMMANDS | WRITE_PATH | CHECKER)
    assert "zstandard" not in mods


def test_read_write_mount_loads_the_write_path_but_not_the_checker(tmp_path):
    img = create(tmp_path / "a.qcow2", "1G")
    mods = loaded_modules(mount_path(img, "rw"))
    assert mods >= WRITE_PATH
    assert not mods & (OTHER_COMMANDS | CHECKER)


def test_help_still_lists_every_command():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "qcowfs", "--help"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0
    for name in sorted(c.removeprefix("qcowfs.cli.") for c in OTHER_COMMANDS) + ["mount"]:
        assert f"    {name} " in p.stdout, name
