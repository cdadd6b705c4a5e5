"""``make fuzz``: mutate QEMU-made seeds for FUZZ_SECONDS and run every mutant through the
library and the commands (and, every FUZZ_MOUNT_EVERY-th mutant, a read-only mount).

    python -m fuzz.campaign [--seconds N] [--seed N] [--out DIR] [--kinds a,b] [--mount-every N]

Prints mutants per second and each new find (seed kind, the patches, the step, what
happened); writes every find with its mutant to DIR/finds.jsonl and DIR/find-N/. Exits 1 when
anything was found. A hang is confirmed by running that step again alone with three times
the limit, so a loaded machine does not report noise; a hang of the mount (the mount itself,
the I/O through it, the unmount) by mounting that mutant again alone, every limit of the
mount three times as long."""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fuzz.mutate import LUKS_HEADER, LUKS_SLOT_AT, LUKS_SLOT_SIZE, LUKS_SLOTS, Mutator, apply, parse
from fuzz.repair import judge_case
from fuzz.runner import Find, alone, mount_case, run_case
from fuzz.seeds import SEEDS, TOP, build_seed
from qcowfs.format.luks import MAX_ITERATIONS

MOUNT_STEPS = ("mount", "mount-io", "umount")


def confirmed(case: Path, find: Find, limit: float) -> bool:
    if find.kind != "hang":
        return True
    if find.step in MOUNT_STEPS:
        return any(f.kind == "hang" and f.step == find.step
                   for f in mount_case(case, limit * 3))
    steps = alone(find.step)
    again = run_case(case, steps, limit * 3)
    return any(f.kind == "hang" for f in again.finds)


def claimed_kdf_seconds(mutant: bytes, lay) -> float:
    """What the PBKDF2 work the mutant's LUKS header claims (each enabled slot's iterations,
    and the master key digest's once per enabled slot: a wrong or mutated slot costs both)
    takes at this machine's rate, capped as qcowfs caps each derivation. 0 without a LUKS
    header."""
    if not lay.luks:
        return 0.0
    at = int.from_bytes(mutant[lay.luks[0] + 8:lay.luks[0] + 16], "big")
    head = mutant[at:at + LUKS_HEADER]
    if len(head) < LUKS_HEADER:
        return 0.0
    cap = MAX_ITERATIONS

    def u32(o: int) -> int:
        return int.from_bytes(head[o:o + 4], "big")

    digest = min(u32(164), cap)
    work = 0
    for i in range(LUKS_SLOTS):
        o = LUKS_SLOT_AT + i * LUKS_SLOT_SIZE
        if u32(o) == 0x00AC71F3:
            work += min(u32(o + 4), cap) + digest
    name = head[72:104].split(b"\0", 1)[0].decode("ascii", "replace")
    return work / _kdf_rate(name if name in hashlib.algorithms_available else "sha256")


@functools.cache
def _kdf_rate(name: str) -> float:
    """PBKDF2 iterations per second of ``name`` here (hashlib, as qcowfs derives)."""
    rounds = 1 << 16
    t0 = time.perf_counter()
    hashlib.pbkdf2_hmac(name, b"k", bytes(32), rounds, 32)
    return rounds / max(time.perf_counter() - t0, 1e-6)


def excused(find: Find, mutant: bytes, lay, limit: float) -> bool:
    """A hang in PBKDF2 on a mutant whose header claims more work than the limit allows is not
    a find: the work is bounded (MAX_ITERATIONS a derivation) and is what QEMU and cryptsetup
    spend on the same header (docs/robustness.md, "PBKDF2 iteration counts")."""
    return (find.kind == "hang" and find.key()[2] == "qcowfs/format/luks.py:pbkdf2"
            and claimed_kdf_seconds(mutant, lay) > limit / 2)


def campaign(seconds: float, seed: int, out: Path, kinds: list[str], mount_every: int,
             limit: float, log=print, count: int | None = None, judge_every: int = 1) -> dict:
    """Run for ``seconds`` (or ``count`` mutants: the same ones for the same seed); returns
    the summary (mutants, rate, finds, and the finds themselves under "rows")."""
    rng = random.Random(seed)
    mutator = Mutator(rng)
    seeds = {k: build_seed(k) for k in kinds}
    layouts = {k: parse((seeds[k] / TOP).read_bytes()) for k in kinds}
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="case-", dir=out))
    seen: dict[tuple, int] = {}
    finds: list[dict] = []
    n = mounts = judged = slow_kdf = 0
    step_time: collections.Counter = collections.Counter()
    step_runs: collections.Counter = collections.Counter()
    start = time.monotonic()
    last_report = start
    try:
        while (n < count) if count is not None else (time.monotonic() - start < seconds):
            kind = rng.choice(kinds)
            lay = layouts[kind]
            patches = mutator.mutate(lay)
            case = work / "case"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(seeds[kind], case)
            data = apply(lay.data, patches)
            (case / TOP).write_bytes(data)
            result = run_case(case, limit=limit)
            if any(excused(f, data, lay, limit) for f in result.finds):
                slow_kdf += 1
                result.finds = [f for f in result.finds if not excused(f, data, lay, limit)]
            for step, secs in result.seconds.items():
                step_time[step] += secs
                step_runs[step] += 1
            # QEMU derives whatever PBKDF2 work a header claims (no cap): a mutant claiming
            # more than the step limit is not judged, qemu-img would take that long per run
            if judge_every and n % judge_every == 0 and not result.finds \
                    and result.codes.get("check-r-all") in (0, 1, 2, 3) \
                    and claimed_kdf_seconds(data, lay) <= limit:
                judged += 1
                t0 = time.monotonic()
                worse = judge_case(case)
                step_time["repair-judge"] += time.monotonic() - t0
                step_runs["repair-judge"] += 1
                if worse:
                    result.finds.append(Find("check-r-all", "repair", worse))
            new = [f for f in result.finds if f.key() not in seen]
            if mount_every and n % mount_every == 0 and not result.finds:
                mounts += 1
                t0 = time.monotonic()
                new += [f for f in mount_case(case, limit) if f.key() not in seen]
                step_time["mount"] += time.monotonic() - t0
                step_runs["mount"] += 1
            n += 1
            for f in new:
                if not confirmed(case, f, limit):
                    continue
                seen[f.key()] = len(finds)
                # faulthandler prints the innermost frame first, a traceback last
                detail = f.detail[:3000] if f.kind == "hang" else f.detail[-3000:]
                row = {"seed": kind, "patches": [p.as_row() for p in patches], "step": f.step,
                       "kind": f.kind, "where": f.key()[2], "detail": detail, "mutant": n}
                finds.append(row)
                keep = out / f"find-{len(finds)}"
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(case, keep, ignore=shutil.ignore_patterns("mnt", "out.raw"))
                with open(out / "finds.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                last = [ln for ln in f.detail.strip().splitlines() if ln.strip()][-1:] or [""]
                log(f"FIND {len(finds)}: seed={kind} step={f.step} kind={f.kind} "
                    f"where={row['where']} patches={row['patches']} :: {last[0].strip()[:200]}")
            now = time.monotonic()
            if now - last_report > 60:
                log(f"{n} mutants, {n / (now - start):.1f}/s, {mounts} mounts, "
                    f"{len(finds)} finds")
                last_report = now
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - start
    summary = {"mutants": n, "seconds": round(elapsed, 1), "per_second": round(n / elapsed, 2),
               "mounts": mounts, "repairs_judged": judged, "finds": len(finds), "seed": seed,
               "slow_kdf_excused": slow_kdf,
               "per_step": {k: {"runs": step_runs[k], "seconds": round(step_time[k], 1),
                                "per_second": round(step_runs[k] / step_time[k], 1)
                                if step_time[k] else None} for k in step_runs},
               "rows": finds}
    log(f"fuzz: {n} mutants in {elapsed:.0f} s ({n / elapsed:.1f}/s), {mounts} mounts, "
        f"{len(finds)} finds (seed {seed}; details in {out}/finds.jsonl)")
    log("per step (runs, s, runs/s): " + ", ".join(
        f"{k} {v['runs']} {v['seconds']} {v['per_second']}"
        for k, v in summary["per_step"].items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fuzz")
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", 1)))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--kinds", default=os.environ.get("FUZZ_KINDS", ""))
    ap.add_argument("--mount-every", type=int, default=int(os.environ.get("FUZZ_MOUNT_EVERY", 25)))
    ap.add_argument("--limit", type=float, default=float(os.environ.get("FUZZ_CASE_SECONDS", 2)))
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k] or list(SEEDS)
    out = args.out or Path(tempfile.gettempdir()) / f"qcowfs-fuzz-{args.seed}"
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        args.mount_every = 0
    summary = campaign(args.seconds, args.seed, out, kinds, args.mount_every, args.limit,
                       log=lambda s: print(s, flush=True))
    return 1 if summary["finds"] else 0


if __name__ == "__main__":
    sys.exit(main())
