"""What a check found and fixed (qemu-img check's counters and lines), and the repair modes."""

from __future__ import annotations

from qcowfs.format.record import field, record

FIX_LEAKS = 1


FIX_ERRORS = 2


FIX_ALL = FIX_LEAKS | FIX_ERRORS


@record
class CheckResult:
    """What one pass found (and fixed). ``messages`` are the per-problem lines qemu-img prints
    on stderr."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: the check stopped early (qemu-img then prints no report, only "Check failed")
    aborted: str | None = None
    messages: list[str] = field(default_factory=list)
    #: clusters a leak repair set to refcount 0 (their host space is given back)
    freed: list[int] = field(default_factory=list)

    @property
    def fixed_anything(self) -> bool:
        return bool(self.corruptions_fixed or self.leaks_fixed)
