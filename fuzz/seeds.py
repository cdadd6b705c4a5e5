"""Seed images of every kind the reader handles, made by qemu-img and qemu-io at run time.

A seed is a folder: ``top.qcow2`` (the image the mutator changes) and the files it names
(backing files, an external data file), which stay as QEMU wrote them, plus two images the
writing steps need: ``overlay.qcow2`` (backed by ``top.qcow2``, with a little data of its own:
committed into the mutant, rebased away from it) and ``other.qcow2`` (a small plain image to
rebase onto). Seeds are built once
per recipe version into a cache folder and reused by every case and every run.

An encrypted seed (LUKS or legacy AES) also holds ``secret.key``, its password (no newline):
the runner passes it to every step in qemu-img's forms (``--object secret`` and
``--image-opts``), to the library as ``keys`` and to the mount as ``-o key_file=``. LUKS key
slots are made with ``encrypt.iter-time=10`` so an unlock costs milliseconds."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
TOP = "top.qcow2"
#: the password of an encrypted seed, in its folder as KEY_FILE (the runner's signal)
KEY = "fuzz-seed-key"
KEY_FILE = "secret.key"


def _run(*args: str, cwd: Path) -> None:
    for _attempt in range(12):
        p = subprocess.run(list(args), cwd=cwd, capture_output=True, timeout=120)
        # qemu-img times its key derivation and on a loaded machine sometimes gives up
        if p.returncode == 0 or b"accurate CPU usage" not in p.stderr:
            break
    if p.returncode not in (0,) and not (args[0] == "qemu-io" and p.returncode in (-9, 137)):
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.decode()}")


def _create(d: Path, size: int | str, name: str = TOP, **opts) -> None:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    _run("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", o] if o else []), name, str(size),
         cwd=d)


def _io(d: Path, *cmds: str, name: str = TOP, killed: bool = False, depth: int | None = None
        ) -> None:
    """qemu-io ``cmds`` on ``name``; ``depth``: the layer of the chain that is encrypted
    with KEY (0 the image itself, 1 its backing file)."""
    args = ["qemu-io"]
    if depth is None:
        args += ["-f", "qcow2"]
    else:
        args += ["--object", f"secret,id=s0,data={KEY}", "--image-opts"]
    for c in (*cmds, *(["sigraise 9"] if killed else [])):
        args += ["-c", c]
    if depth is not None:
        name = image_opts(name, depth)
    _run(*args, name, cwd=d)


def image_opts(name: str, depth: int) -> str:
    """The ``--image-opts`` string that opens ``name`` with secret s0 (``--object
    secret,id=s0,data=KEY``) for the layer ``depth`` levels down its chain."""
    return f"driver=qcow2,file.filename={name}," + "backing." * depth + "encrypt.key-secret=s0"


def _encrypted(fmt: str, cs: int = 65536, backing: bool = False, **opts) -> Callable[[Path], None]:
    """An encrypted image (``encrypt.format=fmt``) with the plain workload; ``backing``: over a
    plain qcow2 base with data of its own."""
    def build(d: Path) -> None:
        size = 2 * MiB
        extra = {"encrypt.format": fmt, "encrypt.key-secret": "s0", "cluster_size": cs, **opts}
        if fmt == "luks":
            extra["encrypt.iter-time"] = 10
        back = []
        if backing:
            _create(d, size, name="base.qcow2", cluster_size=4096)
            _io(d, "write -P 0x17 0 1M", name="base.qcow2")
            back = ["-b", "base.qcow2", "-F", "qcow2"]
        o = ",".join(f"{k}={v}" for k, v in extra.items())
        _run("qemu-img", "create", "-q", "-f", "qcow2", "--object", f"secret,id=s0,data={KEY}",
             *back, "-o", o, TOP, str(size), cwd=d)
        _io(d, *_workload(cs, size), depth=0)
        (d / KEY_FILE).write_text(KEY)
    return build


def _workload(cs: int, size: int) -> list[str]:
    """Data, zero, discarded and partial clusters across the disk (a few clusters only)."""
    if cs >= MiB:
        return ["write -P 0x11 0 3000", f"write -P 0x22 {cs + 512} 4096",
                f"write -z {2 * cs} {cs}", f"write -P 0x33 {size - 4096} 4096"]
    return [f"write -P 0x11 0 {3 * cs + 700}", f"write -P 0x22 {5 * cs + 512} {cs + 1024}",
            f"write -z {cs} {cs}", f"discard {2 * cs} {cs}",
            f"write -P 0x33 {size // 2 + 3} {2 * cs}", f"write -P 0x44 {size - cs} {cs}"]


def _plain(cs: int, size: int = 2 * MiB, **opts) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        _create(d, size, cluster_size=cs, **opts)
        _io(d, *_workload(cs, size))
    return build


def _compressed(ctype: str, compat: str = "1.1") -> Callable[[Path], None]:
    def build(d: Path) -> None:
        raw = d / "src.raw"
        with open(raw, "wb") as f:
            f.truncate(2 * MiB)
            for i in range(0, 2 * MiB, 128 * KiB):
                f.seek(i)
                f.write(bytes(range(256)) * 128)
        opts = f"cluster_size=4096,compat={compat}"
        if compat == "1.1":
            opts += f",compression_type={ctype}"
        _run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "src.raw", TOP,
             cwd=d)
        raw.unlink()
        _io(d, "write -P 0x55 8192 4096", "write -z 262144 4096")
    return build


def _snapshots(d: Path) -> None:
    _create(d, 2 * MiB, cluster_size=4096)
    _io(d, "write -P 0x11 0 64k")
    _run("qemu-img", "snapshot", "-c", "one", TOP, cwd=d)
    _io(d, "write -P 0x22 4096 8k", "write -z 32k 4k")
    _run("qemu-img", "snapshot", "-c", "two", TOP, cwd=d)
    _io(d, "write -P 0x33 12k 4k")


def _snapshots_v2(d: Path) -> None:
    _create(d, 1 * MiB, cluster_size=4096, compat="0.10")
    _io(d, "write -P 0x11 0 20k")
    _run("qemu-img", "snapshot", "-c", "old", TOP, cwd=d)
    _io(d, "write -P 0x22 4096 4k")


def _bitmaps(d: Path) -> None:
    _create(d, 2 * MiB, cluster_size=4096)
    _io(d, "write -P 0x11 0 64k")
    _run("qemu-img", "bitmap", "--add", TOP, "b0", cwd=d)
    _run("qemu-img", "bitmap", "--add", "-g", "65536", TOP, "b1", cwd=d)
    _run("qemu-img", "bitmap", "--disable", TOP, "b1", cwd=d)


def _lazy_dirty(d: Path) -> None:
    _create(d, 2 * MiB, cluster_size=4096, lazy_refcounts="on")
    _io(d, "write -P 0x11 0 40k", "write -P 0x22 1M 8k", killed=True)


def _chain(d: Path) -> None:
    _create(d, 2 * MiB, name="base.qcow2", cluster_size=4096)
    _io(d, "write -P 0x11 0 1M", name="base.qcow2")
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         "-o", "cluster_size=4096", TOP, cwd=d)
    _io(d, "write -P 0x22 4096 8k", "write -z 64k 4k")


def _raw_chain(d: Path) -> None:
    with open(d / "base.raw", "wb") as f:
        f.write(b"\x66" * (1 * MiB))
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         "-o", "cluster_size=65536", TOP, "2M", cwd=d)
    _io(d, "write -P 0x22 70000 9000")


def _data_file(raw: bool) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        _create(d, 2 * MiB, cluster_size=4096, data_file="data.raw",
                data_file_raw="on" if raw else "off")
        _io(d, "write -P 0x11 0 12k", "write -P 0x22 1M 4k")
    return build


def _extended_l2(d: Path) -> None:
    _create(d, 2 * MiB, cluster_size=32768, extended_l2="on")
    _io(d, "write -P 0x11 4096 4096", "write -z 8192 2048", "write -P 0x22 65536 40000",
        "write -P 0x33 1M 1024")


def _huge_sparse(d: Path) -> None:
    _create(d, "4T", cluster_size=65536)
    _io(d, "write -P 0x11 0 64k", "write -P 0x22 3T 4k")


SEEDS: dict[str, Callable[[Path], None]] = {
    "c512": _plain(512, 1 * MiB),
    "c4k": _plain(4096),
    "c64k": _plain(65536),
    "c2m": _plain(2 * MiB, 8 * MiB),
    **{f"refcount{b}": _plain(4096, 1 * MiB, refcount_bits=b) for b in (1, 2, 4, 8, 32, 64)},
    "v2": _plain(4096, compat="0.10"),
    "zlib": _compressed("zlib"),
    "zlib-v2": _compressed("zlib", "0.10"),
    "zstd": _compressed("zstd"),
    "extl2": _extended_l2,
    "datafile": _data_file(False),
    "datafile-raw": _data_file(True),
    "lazy-dirty": _lazy_dirty,
    "bitmaps": _bitmaps,
    "snapshots": _snapshots,
    "snapshots-v2": _snapshots_v2,
    "chain": _chain,
    "raw-chain": _raw_chain,
    "huge-sparse": _huge_sparse,
    "luks": _encrypted("luks"),
    "luks-essiv": _encrypted("luks", 4096, **{
        "encrypt.cipher-mode": "cbc", "encrypt.ivgen-alg": "essiv",
        "encrypt.ivgen-hash-alg": "sha256", "encrypt.hash-alg": "sha1"}),
    "luks-overlay": _encrypted("luks", 4096, backing=True),
    "aes": _encrypted("aes", 4096),
}


def _companions(d: Path) -> None:
    """``overlay.qcow2`` over ``top.qcow2`` and a fresh ``other.qcow2`` (see the module doc)."""
    import json
    info = subprocess.run(["qemu-img", "info", "--output=json", TOP], cwd=d,
                          capture_output=True, text=True, check=True)
    size = json.loads(info.stdout)["virtual-size"]
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", TOP, "-F", "qcow2",
         "-o", "cluster_size=65536", "overlay.qcow2", str(size), cwd=d)
    keyed = (d / KEY_FILE).exists()
    _io(d, "write -P 0x61 0 65536", f"write -P 0x62 {size // 2 // 65536 * 65536} 4096",
        name="overlay.qcow2", depth=1 if keyed else None)
    _create(d, 1 * MiB, name="other.qcow2", cluster_size=65536)
    _io(d, "write -P 0x63 0 8192", name="other.qcow2")


def cache_root() -> Path:
    """A folder per version of these recipes and of qemu-img, so a changed recipe rebuilds."""
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(Path(__file__).read_bytes() + qemu.encode()).hexdigest()[:12]
    return Path(os.environ.get("FUZZ_SEED_CACHE", tempfile.gettempdir())) / f"qcowfs-seeds-{key}"


def build_seed(kind: str, root: Path | None = None) -> Path:
    """The folder of seed ``kind``, built on first use (atomically: a half-built seed is never
    seen by another run)."""
    root = root or cache_root()
    folder = root / kind
    if (folder / TOP).exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        SEEDS[kind](tmp)
        _companions(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / TOP).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
