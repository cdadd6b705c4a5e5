"""``make demo``: make a sample chain with qemu-img, mount it, look around, write, unmount, and
let ``qemu-img check`` judge. Nothing stays mounted, whatever fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(*args: str, show: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    if show:
        print("$", " ".join(args), flush=True)
    p = subprocess.run(args, capture_output=True, text=True)
    out = (p.stdout + p.stderr).rstrip()
    if show and out:
        print(out, flush=True)
    if check and p.returncode:
        raise SystemExit(f"demo: {args[0]} failed (exit {p.returncode})")
    return p


def qcowfs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    print("$ qcowfs", " ".join(args), flush=True)
    p = subprocess.run([sys.executable, "-m", "qcowfs", *args], capture_output=True, text=True)
    out = (p.stdout + p.stderr).rstrip()
    if out:
        print(out, flush=True)
    if check and p.returncode:
        raise SystemExit(f"demo: qcowfs {args[0]} failed (exit {p.returncode})")
    return p


def make_chain(d: str) -> str:
    base = os.path.join(d, "base.raw")
    top = os.path.join(d, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "raw", base, "64M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 8M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "64M")
    run("qemu-io", "-c", "write -P 0x61 1M 2M", top)
    run("qemu-img", "snapshot", "-c", "installed", top)
    run("qemu-io", "-c", "write -P 0x62 1M 512k", "-c", "write -P 0x63 32M 4M", top)
    run("qemu-img", "snapshot", "-c", "configured", top)
    run("qemu-io", "-c", "write -P 0x64 1M 64k", top)
    run("qemu-img", "info", top)
    return top


def show_tree(mp: str) -> None:
    for root, dirs, files in os.walk(mp):
        dirs.sort()
        depth = root[len(mp):].count(os.sep)
        print("  " * depth + (os.path.basename(root) or mp) + "/")
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            print("  " * (depth + 1) + f"{f:<8} {st.st_size:>12,} bytes  "
                  f"{st.st_blocks * 512:>10,} on disk")


def byte_at(path: str, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f"0x{f.read(1)[0]:02x}"


def can_write() -> bool:
    import qcowfs as lib

    with tempfile.TemporaryDirectory() as d:
        probe = os.path.join(d, "p.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", probe, "1M"], check=True)
        try:
            lib.open_image(probe, writable=True).close()
            return True
        except lib.ImageError:
            return False


def force_unmount(mp: str) -> None:
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == os.path.realpath(mp) for line in f)
    if mounted:
        subprocess.run(["fusermount3", "-u", mp], capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


def main() -> int:
    for tool in ("qemu-img", "qemu-io", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} is missing (make demo installs it)", file=sys.stderr)
            return 1
    d = tempfile.mkdtemp(prefix="qcowfs-demo-")
    mp = os.path.join(d, "mnt")
    os.mkdir(mp)
    writable = can_write()
    try:
        say("A sample chain: raw base <- qcow2 overlay with two internal snapshots")
        top = make_chain(d)

        say("Mount it" + ("" if writable else " (read-only: the write engine is not here yet)"))
        t0 = time.monotonic()
        qcowfs("mount", "-o", "rw" if writable else "ro", top, mp)
        print(f"(live after {time.monotonic() - t0:.2f} s)")
        run("grep", "qcowfs", "/proc/mounts")

        say("The tree")
        show_tree(mp)

        say("The same guest offset now and in each snapshot")
        for label, path in (("disk", os.path.join(mp, "disk")),
                            *((f"snapshots/{s}/disk", os.path.join(mp, "snapshots", s, "disk"))
                              for s in sorted(os.listdir(os.path.join(mp, "snapshots"))))):
            print(f"  {label:<32} byte at 1 MiB: {byte_at(path, MiB)}   "
                  f"at 1.5 MiB: {byte_at(path, MiB + 512 * 1024)}   "
                  f"at 32 MiB: {byte_at(path, 32 * MiB)}")
        print("  snapshots/installed/info:")
        with open(os.path.join(mp, "snapshots", "installed", "info")) as f:
            print("    " + f.read().strip().replace("\n", "\n    "))
        run("cmp", os.path.join(mp, "snapshots", "installed", "disk"), os.path.join(mp, "disk"),
            check=False)

        say("Write to disk")
        if writable:
            message = b"hello from qcowfs\n"
            fd = os.open(os.path.join(mp, "disk"), os.O_RDWR)
            try:
                os.pwrite(fd, message, 40 * MiB)
                os.fsync(fd)
                print(f"  wrote {message!r} at 40 MiB; reads back as "
                      f"{os.pread(fd, len(message), 40 * MiB)!r}")
            finally:
                os.close(fd)
            os.mkdir(os.path.join(mp, "snapshots", "demo"))
            print("  mkdir snapshots/demo took a live snapshot:",
                  sorted(os.listdir(os.path.join(mp, "snapshots"))))
        else:
            print("  skipped: the write engine has not landed yet (mounted read-only)")

        say("Unmount: returns once the image is flushed, closed and unlocked")
        qcowfs("umount", mp)
        run("qemu-img", "snapshot", "-l", top)

        say("qemu-img check")
        run("qemu-img", "check", top)
        print("\ndemo: all steps passed")
        return 0
    except OSError as exc:
        print(f"\ndemo: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        force_unmount(mp)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
