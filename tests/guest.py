"""A tiny Linux guest for QEMU under TCG: Debian's cloud kernel (fetched once with
``apt-get download`` and cached) and an initramfs built here from busybox-static and the kernel's
virtio modules. Its /init runs a shell script given by the test, then powers off."""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("QCOWFS_TEST_CACHE", Path.home() / ".cache" / "qcowfs-tests"))
META = "linux-image-cloud-amd64"
MODULES = ("virtio_blk", "virtio_pci")


class GuestUnavailable(Exception):
    pass


def kernel_tree() -> Path:
    """The unpacked kernel package (vmlinuz and modules), downloaded on first use."""
    done = [p for p in CACHE.glob("kernel/*/boot/vmlinuz-*")
            if not p.parent.parent.name.endswith(".partial")]
    if done:
        return done[0].parent.parent
    deps = subprocess.run(["apt-cache", "depends", META], capture_output=True, text=True)
    match = re.search(r"Depends: (linux-image-\S+)", deps.stdout)
    if not match:
        raise GuestUnavailable(f"apt-cache knows no {META} (run apt-get update)")
    pkg = match.group(1)
    work = CACHE / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    p = subprocess.run(["apt-get", "download", "-q", pkg], cwd=work, capture_output=True,
                       text=True)
    debs = list(work.glob("*.deb"))
    if p.returncode or not debs:
        raise GuestUnavailable(f"apt-get download {pkg} failed: {p.stderr.strip()[-200:]}")
    target = CACHE / "kernel" / pkg
    tmp = CACHE / "kernel" / (pkg + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], check=True)
    tmp.rename(target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def _module_paths(tree: Path) -> dict[str, Path]:
    return {Path(p).stem: Path(p) for p in
            glob.glob(str(tree / "lib/modules/*/kernel/**/*.ko"), recursive=True)}


def _depends(path: Path) -> list[str]:
    m = re.search(rb"depends=([^\0]*)", path.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def module_order(tree: Path, wanted=MODULES) -> list[Path]:
    """The .ko files to insmod, dependencies first."""
    paths = _module_paths(tree)
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in paths:
            raise GuestUnavailable(f"module {name} not in the kernel package")
        for dep in _depends(paths[name]):
            visit(dep)
        order.append(name)

    for w in wanted:
        visit(w)
    return [paths[n] for n in order]


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = head + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(path: Path, script: str) -> Path:
    """gzip'd newc cpio: busybox, the virtio modules, and /init running ``script``."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestUnavailable("busybox is missing (install busybox-static)")
    tree = kernel_tree()
    mods = module_order(tree)
    insmods = "\n".join(f"insmod /lib/{m.name}" for m in mods)
    init = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmods}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "guest: starting script"
{script}
echo "guest: script exit $?"
sync
poweroff -f
"""
    ino = 1
    out = bytearray()
    for d in ("bin", "lib", "dev", "proc", "sys"):
        out += _cpio_entry(d, 0o040755, ino=ino)
        ino += 1
    out += _cpio_entry("bin/busybox", 0o100755, Path(busybox).read_bytes(), ino)
    ino += 1
    for m in mods:
        out += _cpio_entry(f"lib/{m.name}", 0o100644, m.read_bytes(), ino)
        ino += 1
    out += _cpio_entry("init", 0o100755, init.encode(), ino)
    out += _cpio_entry("TRAILER!!!", 0)
    path.write_bytes(gzip.compress(bytes(out), compresslevel=1))
    return path


def kernel_image() -> Path:
    return next((kernel_tree() / "boot").glob("vmlinuz-*"))


def boot(drive: Path, initramfs: Path, *, timeout: float = 600,
         discard: bool = False) -> subprocess.CompletedProcess:
    """Boot under TCG with ``drive`` as a raw virtio disk; returns when the guest powers off.
    With ``discard`` the guest's TRIM is passed on to the drive (``discard=unmap``)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestUnavailable("qemu-system-x86_64 is missing (install qemu-system-x86)")
    return subprocess.run(
        [qemu, "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1", "-nographic",
         "-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel", str(kernel_image()),
         "-initrd", str(initramfs), "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
         "-drive", f"file={drive},format=raw,if=virtio,cache=none,aio=threads"
                   + (",discard=unmap" if discard else "")],
        capture_output=True, text=True, timeout=timeout)
