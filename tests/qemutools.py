"""QEMU's own tools as the oracle: make fixtures with qemu-img/qemu-io, judge with compare,
check and map. Nothing here uses qcowfs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"


def run(*args: str | os.PathLike, check: bool = True, input: bytes | None = None,
        timeout: float = 120, cwd: str | os.PathLike | None = None
        ) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], check=False, capture_output=True,
                       input=input, timeout=timeout, cwd=cwd)
    if check and p.returncode:
        raise QemuToolError(p.returncode, p.args, p.stdout, p.stderr)
    return p


class QemuToolError(subprocess.CalledProcessError):
    """A failed qemu-img/qemu-io run whose message shows what the tool printed."""

    def __str__(self) -> str:
        err = (self.stderr or b"").decode(errors="replace").strip()
        return f"{super().__str__()}: {err}"


def qemu_img(*args: str | os.PathLike, check: bool = True,
             cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    return run(QEMU_IMG, *args, check=check, cwd=cwd)


def qemu_io(image: str | os.PathLike, *commands: str, fmt: str = "qcow2",
            extra: tuple[str, ...] = (), cwd: str | os.PathLike | None = None) -> str:
    """Run qemu-io commands on an image; raise if any of them reports an error."""
    args: list[str] = [QEMU_IO, "-f", fmt, *extra]
    for c in commands:
        args += ["-c", c]
    args.append(str(image))
    out = run(*args, cwd=cwd).stdout.decode()
    if "error" in out.lower() or "failed" in out.lower():
        raise AssertionError(f"qemu-io reported an error: {out}")
    return out


def qemu_io_killed(image: str | os.PathLike, *commands: str, fmt: str = "qcow2") -> None:
    """Run qemu-io commands, then kill qemu-io with SIGKILL (``sigraise 9``), as a crash
    would: an image with lazy refcounts is left with its dirty bit set."""
    args: list[str] = [QEMU_IO, "-f", fmt]
    for c in (*commands, "sigraise 9"):
        args += ["-c", c]
    args.append(str(image))
    p = run(*args, check=False)
    if p.returncode not in (-9, 137):
        raise AssertionError(f"qemu-io was not killed: exit {p.returncode}: {p.stdout!r}")
    out = p.stdout.decode()
    if "error" in out.lower() or "failed" in out.lower():
        raise AssertionError(f"qemu-io reported an error: {out}")


def create(path: str | os.PathLike, size: str | int, *, fmt: str = "qcow2",
           backing: str | os.PathLike | None = None, backing_fmt: str | None = None,
           cwd: str | os.PathLike | None = None, **options: str | int | bool) -> Path:
    args: list[str] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    opts = ",".join(f"{k}={_opt(v)}" for k, v in options.items())
    if opts:
        args += ["-o", opts]
    args += [str(path), str(size)]
    qemu_img(*args, cwd=cwd)
    return Path(path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, src_fmt: str = "raw",
            compress: bool = False, **options: str | int | bool) -> Path:
    """``qemu-img convert -O qcow2`` (``-c`` to compress) with creation options."""
    args: list[str] = ["convert", "-f", src_fmt, "-O", "qcow2"]
    if compress:
        args.append("-c")
    opts = ",".join(f"{k}={_opt(v)}" for k, v in options.items())
    if opts:
        args += ["-o", opts]
    qemu_img(*args, str(src), str(dst))
    return Path(dst)


def read_range(image: str | os.PathLike, out: str | os.PathLike, offset: int, length: int,
               *, fmt: str = "qcow2") -> bytes:
    """``length`` guest bytes at ``offset`` as QEMU reads them: ``qemu-img convert`` of a raw
    view with an offset and a size over the image (``offset`` a multiple of 512)."""
    opts = (f"driver=raw,offset={offset},size={length},file.driver={fmt},"
            f"file.file.filename={os.fspath(image)}")
    qemu_img("convert", "-O", "raw", "--image-opts", opts, str(out))
    return Path(out).read_bytes()


def _opt(v: str | int | bool) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def to_raw(image: str | os.PathLike, out: str | os.PathLike, *, snapshot: str | None = None,
           fmt: str | None = None, cwd: str | os.PathLike | None = None) -> bytes:
    """What QEMU says the guest sees: ``qemu-img convert -O raw``; returns the bytes.

    With ``snapshot``, ``-l snapshot.id=N``: QEMU 7.2 shows the snapshot at the image's
    *current* virtual size (see :func:`snapshot_to_raw` for its own size)."""
    args: list[str] = ["convert"]
    if fmt:
        args += ["-f", fmt]
    if snapshot is not None:
        args += ["-l", f"snapshot.id={snapshot}"]
    args += ["-O", "raw", str(image), str(out)]
    qemu_img(*args, cwd=cwd)
    return Path(out).read_bytes()


def snapshot_to_raw(image: str | os.PathLike, out: str | os.PathLike, snapshot_id: str) -> bytes:
    """An internal snapshot at its own disk size, as QEMU sees it: a copy of the image (next
    to it, so relative backing names still resolve) is reverted with ``snapshot -a`` (which
    QEMU 7.2 also resizes to the snapshot's size), then converted to raw."""
    image = Path(image)
    copy = image.with_name(f".{image.name}.snapshot-{snapshot_id}")
    shutil.copyfile(image, copy)
    try:
        qemu_img("snapshot", "-a", snapshot_id, str(copy))
        return to_raw(copy, out)
    finally:
        copy.unlink()


def info(image: str | os.PathLike, *extra: str) -> dict:
    return json.loads(qemu_img("info", "--output=json", *extra, str(image)).stdout)


def check(image: str | os.PathLike, *extra: str) -> tuple[int, dict]:
    """(exit code, JSON report) of ``qemu-img check``."""
    p = qemu_img("check", "--output=json", *extra, str(image), check=False)
    try:
        report = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {"raw": p.stdout.decode(), "stderr": p.stderr.decode()}
    report.setdefault("stderr", p.stderr.decode())
    return p.returncode, report


def assert_check_clean(image: str | os.PathLike) -> None:
    """No errors and no leaks, as ``qemu-img check`` judges."""
    code, report = check(image)
    assert code == 0, f"qemu-img check {image}: exit {code}: {report}"


def compare(a: str | os.PathLike, b: str | os.PathLike, *extra: str) -> int:
    """``qemu-img compare`` exit code: 0 identical, 1 different."""
    return qemu_img("compare", *extra, str(a), str(b), check=False).returncode


def map_json(image: str | os.PathLike, *extra: str) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", *extra, str(image)).stdout)


def poke(path: str | os.PathLike, offset: int, data: bytes) -> None:
    """Patch bytes in a file (the iotests' poke_file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def locked_bytes(path: str | os.PathLike) -> set[int]:
    """Bytes of ``path`` that some process holds an OFD lock on (QEMU's and qcowfs's locks),
    read from /proc/locks."""
    ino = os.stat(path).st_ino
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "OFDLCK" in parts and int(parts[-3].split(":")[-1]) == ino:
                out.update(range(int(parts[-2]), int(parts[-1]) + 1))
    return out


# --- encrypted images: QEMU's --object secret and --image-opts forms -----------------------


def secret_object(secret_id: str, key: str) -> str:
    return f"secret,id={secret_id},data={key}"


def encrypted_opts(image: str | os.PathLike, keys: list[str | None], *, fmt: str = "qcow2"
                   ) -> tuple[list[str], str]:
    """(``--object`` arguments, ``--image-opts`` string) that open ``image`` with ``keys``
    (top first, None for a plain layer): secret s0 for the top, s1 for its backing file..."""
    objects: list[str] = []
    opts = [f"driver={fmt}", f"file.filename={os.fspath(image)}"]
    for depth, key in enumerate(keys):
        if key is None:
            continue
        objects += ["--object", secret_object(f"s{depth}", key)]
        opts.append("backing." * depth + f"encrypt.key-secret=s{depth}")
    return objects, ",".join(opts)


def create_encrypted(path: str | os.PathLike, size: str | int, key: str, *,
                     encrypt_format: str = "luks", backing: str | os.PathLike | None = None,
                     backing_fmt: str | None = None, **options: str | int | bool) -> Path:
    """An encrypted qcow2 made by qemu-img. LUKS key slots get ``iter-time=10`` unless given
    (fast fixtures). qemu-img times its key derivation and on a loaded machine sometimes
    gives up ("Unable to get accurate CPU usage"): that flake of QEMU's is retried."""
    opts = {"encrypt.format": encrypt_format, "encrypt.key-secret": "sec0"}
    if encrypt_format == "luks":
        opts["encrypt.iter-time"] = 10
    opts.update({k.replace("__", "."): v for k, v in options.items()})
    args: list[str] = ["create", "-q", "-f", "qcow2", "--object", secret_object("sec0", key)]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    args += ["-o", ",".join(f"{k}={_opt(v)}" for k, v in opts.items()), str(path), str(size)]
    for _attempt in range(12):
        made = qemu_img(*args, check=False)
        if made.returncode == 0 or b"accurate CPU usage" not in made.stderr:
            break
    if made.returncode:
        raise QemuToolError(made.returncode, made.args, made.stdout, made.stderr)
    return Path(path)


def qemu_io_encrypted(image: str | os.PathLike, keys: list[str | None], *commands: str) -> str:
    """qemu-io commands on an encrypted image (or a chain with encrypted layers)."""
    objects, opts = encrypted_opts(image, keys)
    args: list[str] = [QEMU_IO, *objects, "--image-opts"]
    for c in commands:
        args += ["-c", c]
    args.append(opts)
    out = run(*args).stdout.decode()
    if "error" in out.lower() or "failed" in out.lower():
        raise AssertionError(f"qemu-io reported an error: {out}")
    return out


def to_raw_encrypted(image: str | os.PathLike, out: str | os.PathLike,
                     keys: list[str | None]) -> bytes:
    """The guest bytes of an encrypted image (chain) as QEMU decrypts them."""
    objects, opts = encrypted_opts(image, keys)
    qemu_img("convert", *objects, "--image-opts", opts, "-O", "raw", str(out))
    return Path(out).read_bytes()


def check_encrypted(image: str | os.PathLike, keys: list[str | None]) -> tuple[int, dict]:
    """(exit code, JSON report) of ``qemu-img check`` given the keys."""
    objects, opts = encrypted_opts(image, keys)
    p = qemu_img("check", "--output=json", *objects, "--image-opts", opts, check=False)
    try:
        report = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {"raw": p.stdout.decode()}
    report.setdefault("stderr", p.stderr.decode())
    return p.returncode, report


def bitmap_bits(path: str | os.PathLike) -> dict[str, tuple[int, int, bytes]]:
    """The persistent bitmaps of a qcow2 v3 file, parsed straight from the spec's layout:
    {name: (granularity_bits, flags, bitmap bytes)}; {} without a bitmaps extension."""
    import struct

    with open(path, "rb") as f:
        def at(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        head = at(0, 112)
        cluster = 1 << struct.unpack_from(">I", head, 20)[0]
        size = struct.unpack_from(">Q", head, 24)[0]
        pos = struct.unpack_from(">I", head, 100)[0]
        ext = None
        while pos + 8 <= cluster:
            magic, length = struct.unpack(">II", at(pos, 8))
            if magic == 0:
                break
            if magic == 0x23852875:
                ext = struct.unpack(">IIQQ", at(pos + 8, 24))
            pos += 8 + (length + 7) // 8 * 8
        if ext is None:
            return {}
        count, _, dir_size, dir_off = ext
        directory = at(dir_off, dir_size)
        out = {}
        p = 0
        for _ in range(count):
            table_off, table_size, flags, _, gbits, name_len, extra = struct.unpack_from(
                ">QIIBBHI", directory, p)
            name = directory[p + 24 + extra:p + 24 + extra + name_len].decode()
            p = (p + 24 + extra + name_len + 7) // 8 * 8
            granules = -(-size // (1 << gbits))
            nbytes = -(-granules // 8)
            bits = bytearray()
            for (entry,) in struct.iter_unpack(">Q", at(table_off, table_size * 8)):
                n = min(cluster, nbytes - len(bits))
                off = entry & 0x00FFFFFFFFFFFE00
                bits += at(off, n) if off else (b"\xff" if entry & 1 else b"\0") * n
            out[name] = (gbits, flags, bytes(bits))
        return out
