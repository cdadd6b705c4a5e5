"""Progress bars (tqdm) for long commands: shown only when asked for with -p, and only on a
terminal unless asked explicitly."""

from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def progress_bar(enabled: bool, total: int | None, desc: str = "", unit: str = "B"):
    """A callable ``advance(n)`` (bytes, or ``unit``); does nothing when the bar is off. A
    total of None (or 0) shows a running count without a percentage."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    scaled = unit == "B"
    bar = tqdm(total=total or None, unit=unit, unit_scale=scaled, unit_divisor=1024, desc=desc,
               file=sys.stderr, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
