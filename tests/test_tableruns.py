"""The numpy-free whole-table tests (``image/tableruns.py``, ``refcount_read``'s block
counting) agree with the plain per-entry definition on every table shape. (That map's output
through them is qemu-img's is tests/test_cli_info_map.py.)"""

from __future__ import annotations

from array import array

from hypothesis import given
from hypothesis import strategies as st

from qcowfs.format.tables import COPIED, L2E_OFFSET_MASK, ZERO_FLAG
from qcowfs.image.refcount_read import count_nonzero_words
from qcowfs.image.tableruns import contiguous_run

CS = 65536


def naive_run(entries: list[int]) -> int | None:
    if not any(entries):
        return 0
    e0 = entries[0]
    if any(not e & L2E_OFFSET_MASK or e & ~(COPIED | L2E_OFFSET_MASK) or e % CS
           for e in entries):
        return None  # every entry must be plain data, as the per-entry walk takes it
    return e0 if entries == [e0 + i * CS for i in range(len(entries))] else None


@st.composite
def tables(draw):
    n = draw(st.integers(1, 64))
    host = draw(st.sampled_from([CS, 7 * CS, (1 << 56) - 8 * CS, (1 << 55) + 3 * CS]))
    flag = draw(st.sampled_from([0, COPIED]))
    entries = [0] * n if draw(st.booleans()) else \
        [(host + i * CS) | flag for i in range(n)]
    for _ in range(draw(st.integers(0, 2))):  # perturb a few entries
        i = draw(st.integers(0, n - 1))
        entries[i] = draw(st.sampled_from([0, entries[i] ^ COPIED, entries[i] + CS,
                                           entries[i] | ZERO_FLAG, entries[i] + 512,
                                           (entries[i] + 2 ** 64 - CS) % 2 ** 64]))
    return entries


@given(tables())
def test_contiguous_run_is_the_per_entry_definition(entries):
    assert contiguous_run(array("Q", entries), 0, len(entries), CS) == naive_run(entries)
    padded = array("Q", [5, *entries, 9])  # a part inside a table
    assert contiguous_run(padded, 1, len(entries), CS) == naive_run(entries)


@given(st.sampled_from([1, 2, 4, 8]), st.lists(st.sampled_from([0, 1, 255, 256, 65535,
                                                                 2 ** 31, 2 ** 63]), max_size=40))
def test_count_nonzero_words(width, values):
    values = [v % (1 << (8 * width)) for v in values]
    raw = b"".join(v.to_bytes(width, "big") for v in values)
    assert count_nonzero_words(raw, width) == sum(1 for v in values if v)


@given(st.lists(st.sampled_from([0, 1, 2, 2 ** 40]), min_size=1, max_size=40),
       st.integers(0, 39), st.integers(0, 40))
def test_add_one_is_a_slice_increment(values, first, count):
    from qcowfs.image.tableruns import add_one
    first = min(first, len(values))
    count = min(count, len(values) - first)
    counts = array("Q", values)
    add_one(counts, first, count)
    assert counts.tolist() == [v + (first <= i < first + count) for i, v in enumerate(values)]


@given(st.lists(st.sampled_from([0, 1, 256, 2 ** 63]), max_size=40))
def test_used_entries(values):
    from qcowfs.image.tableruns import used_entries
    nonzero = [i for i, v in enumerate(values) if v]
    assert used_entries(array("Q", values)) == (nonzero[-1] + 1 if nonzero else 0)


@given(st.sampled_from([1, 2, 4, 8]),
       st.lists(st.sampled_from([0, 1, 2, 255, 256, 65535, 65536, 2 ** 32, 2 ** 63]),
                min_size=1, max_size=40), st.data())
def test_refblock_bytes_compare_is_the_decoded_compare(width, want, data):
    """check's byte comparison of a refcount block with the walk's counts (``_holds``)
    says what comparing the decoded values says."""
    from qcowfs.image.check.compare import holds as _holds
    on = data.draw(st.sampled_from([want, [v % (1 << 8 * width) for v in want],
                                    [want[0]] * len(want), [0] * len(want)]))
    on = [v % (1 << 8 * width) for v in on]
    raw = b"".join(v.to_bytes(width, "big") for v in on)
    assert _holds(raw, array("Q", want), width) == (on == want)
