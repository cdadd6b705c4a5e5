""""Repair must not make things worse", judged with QEMU's tools on one mutant after the
fuzzer's ``check -r all`` step (docs/robustness.md).

The rules, for every outcome of the repair (also exit 1, "check not completed": a repair that
stopped part-way may have written): ``qemu-img check`` of the repaired image finds no more
corruptions than it found in the mutant (and can still check it), and every guest cluster whose
host cluster or L2 table the repair's report does not name reads, through ``qemu-img
convert``, as it read before. Where the first rule fails, QEMU's own ``qemu-img check -r all``
of the mutant is the bound: a repair that leaves no more than QEMU's own leaves (QEMU, refused
by its overlap rule, marks the image corrupt, and that header byte can itself read as one more
bad table entry) is not worse than the oracle's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from fuzz.mutate import parse
from fuzz.seeds import KEY_FILE, TOP, image_opts

#: Guest views larger than this are not compared byte for byte (the 4 TiB sparse seed).
COMPARE_LIMIT = 64 * 1024 * 1024


class QemuCannot(Exception):
    """QEMU itself cannot read the image: there is nothing to judge against."""


#: the exit code a qemu-img run gets when it overran QEMU_SECONDS: QEMU cannot judge it
QEMU_TIMEOUT = -1
QEMU_SECONDS = 60


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``argv`` run to its end, or a result with exit QEMU_TIMEOUT when it overran."""
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace",
                              timeout=QEMU_SECONDS)  # a hostile name need not be UTF-8
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, QEMU_TIMEOUT, "", "timed out")


def _qemu(*args: str, cwd: Path, ok=(0,)) -> subprocess.CompletedProcess:
    p = _run(["qemu-img", *args], cwd)
    if p.returncode not in ok:
        raise QemuCannot(f"qemu-img {args[0]}: exit {p.returncode}: {p.stderr.strip()[-300:]}")
    return p


def source(img: Path, name: str | None = None) -> list[str]:
    """qemu-img's arguments naming ``img`` (as ``name``, default its own): the plain file name,
    or for an encrypted case (a KEY_FILE beside it) the secret and the ``--image-opts`` form."""
    name = name or img.name
    key = img.parent / KEY_FILE
    if not key.exists():
        return [name]
    return ["--object", f"secret,id=s0,data={key.read_text()}", "--image-opts",
            image_opts(name, 0)]


def qemu_check(img: Path) -> tuple[int, dict]:
    p = _run(["qemu-img", "check", "-U", "--output=json", *source(img)], img.parent)
    try:
        return p.returncode, json.loads(p.stdout or "{}")
    except json.JSONDecodeError:
        return p.returncode, {}


def qemu_repair(img: Path) -> tuple[int, dict]:
    """``qemu_check`` of what QEMU's own ``check -r all`` makes of a copy of ``img`` (beside
    it, so the files it names resolve the same)."""
    copy = img.with_name(img.name + ".qemu-repair")
    try:
        shutil.copyfile(img, copy)
        _run(["qemu-img", "check", "-r", "all", *source(img, copy.name)], img.parent)
        return qemu_check(copy)
    finally:
        copy.unlink(missing_ok=True)


def guest_view(img: Path) -> bytes | None:
    """The guest disk as QEMU reads it, or None when it is too large to compare."""
    info = json.loads(_qemu("info", "-U", "--output=json", img.name, cwd=img.parent).stdout)
    if info.get("virtual-size", 0) > COMPARE_LIMIT:
        return None
    out = img.with_name(img.name + ".view.raw")
    try:
        _qemu("convert", "-U", "-O", "raw", *source(img), out.name, cwd=img.parent)
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def host_map(img: Path, cs: int) -> dict[int, int]:
    """guest cluster -> host cluster of the image's own data (qemu-img map, depth 0)."""
    entries = json.loads(_qemu("map", "-U", "--output=json", *source(img),
                               cwd=img.parent).stdout)
    out: dict[int, int] = {}
    for e in entries:
        if e["depth"] == 0 and e.get("offset") is not None:
            for k in range(0, e["length"], cs):
                out[(e["start"] + k) // cs] = (e["offset"] + k) // cs
    return out


def mentioned_host_clusters(report: str, cs: int) -> set[int]:
    """Host clusters the check's per-problem lines name (hex offsets, "cluster N")."""
    out = {int(h, 16) // cs for h in re.findall(r"0x([0-9a-fA-F]+)", report)}
    out |= {int(n) for n in re.findall(r"cluster (\d+)", report)}
    return out


def excused(mutant: bytes, hosts: dict[int, int], named: set[int]) -> set[int]:
    """Guest clusters the report covers: their host cluster or their L2 table is named."""
    lay = parse(mutant)
    cs = lay.cluster_size
    out = {g for g, h in hosts.items() if h in named}
    per_l2 = cs // lay.l2_entry_size
    for i, e in enumerate(lay.l1):
        l2 = lay.u64(e) & 0x00FFFFFFFFFFFE00
        if l2 and l2 // cs in named:
            out |= set(range(i * per_l2, (i + 1) * per_l2))
    return out


def judge(before: Path, after: Path, report: str) -> str | None:
    """What the repair of ``before`` into ``after`` made worse, or None (also when QEMU cannot
    check or read ``before``: nothing to compare against)."""
    code_before, checked_before = qemu_check(before)
    if code_before not in (0, 2, 3):
        return None
    try:
        view_before = guest_view(before)
        mutant = before.read_bytes()
        cs = parse(mutant).cluster_size
        hosts = host_map(before, cs) if view_before is not None else {}
    except Exception:  # noqa: BLE001 (QEMU or the layout parser cannot read the mutant)
        view_before = None
    code_after, checked_after = qemu_check(after)
    was, now = checked_before.get("corruptions", 0), checked_after.get("corruptions", 0)
    if code_after not in (0, 2, 3) or now > was:
        code_qemu, checked_qemu = qemu_repair(before)
        if code_after not in (0, 2, 3):
            if code_qemu in (0, 2, 3):
                return f"qemu-img check cannot check the repaired image (exit {code_after})"
            return None  # nor what QEMU's own repair leaves: nothing to compare against
        own = checked_qemu.get("corruptions", 0) if code_qemu in (0, 2, 3) else was
        if now > max(was, own):
            return (f"qemu-img check: {was} corruptions before the repair, {now} after "
                    f"(qemu-img's own check -r all leaves {own})")
    if view_before is None:
        return None
    try:
        view_after = guest_view(after)
    except QemuCannot as exc:
        return f"QEMU cannot read the repaired image: {exc}"
    if view_after is None:
        return None
    try:
        skip = excused(mutant, hosts, mentioned_host_clusters(report, cs))
    except Exception:  # noqa: BLE001 (the layout parser cannot read the mutant)
        return None
    if len(view_before) != len(view_after):
        return f"the repair changed the disk size: {len(view_before)} -> {len(view_after)}"
    bad = [g for g in range(0, min(len(view_before), len(view_after)), cs)
           if g // cs not in skip and view_before[g:g + cs] != view_after[g:g + cs]]
    if bad:
        return f"guest clusters the report does not name changed: offsets {bad[:5]}"
    return None


def judge_case(case: Path) -> str | None:
    """``judge`` for a case the runner ran (the mutant ``top.qcow2``, the repaired copy
    ``repair/top.qcow2``, the report ``check-r-all.out``)."""
    if not (case / "repair" / TOP).exists():
        return None
    return judge(case / TOP, case / "repair" / TOP, (case / "check-r-all.out").read_text(
        errors="replace"))
