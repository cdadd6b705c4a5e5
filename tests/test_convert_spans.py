"""convert's zero detection (``data_spans``) cuts out exactly the all-zero blocks of the
guest's 4 KiB grid that a byte-by-byte scan cuts out, wherever the chunk starts; and
``convert -c`` compresses on a thread pool yet stores clusters in guest order, as qemu-img
reads them back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qcowfs.chain.convert import data_spans

BLOCK = 4096


def naive_spans(data: bytes, pos: int, block: int) -> list[tuple[int, int]]:
    """Block by block, merging neighbouring data blocks: the reference."""
    spans: list[list[int]] = []
    i = 0
    while i < len(data):
        step = min(block - (pos + i) % block, len(data) - i)
        if any(data[i:i + step]):
            if spans and spans[-1][1] == i:
                spans[-1][1] = i + step
            else:
                spans.append([i, i + step])
        i += step
    return [(a, b) for a, b in spans]


@st.composite
def chunks(draw):
    """A chunk as a guest sees it: runs of zeros and of data, of lengths around the block
    size, starting anywhere on the 512-byte grid."""
    pos = draw(st.integers(0, 16)) * 512
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        n = draw(st.sampled_from([1, 7, 511, 512, 4095, 4096, 4097, 8191, 8192, 12288, 20000]))
        if draw(st.booleans()):
            parts.append(bytes(n))
        else:
            parts.append(bytes(n - 1) + b"\x01" if draw(st.booleans()) else b"\x01" * n)
    return b"".join(parts), pos


@settings(max_examples=400, deadline=None)
@given(chunks())
def test_data_spans_cut_exactly_the_zero_blocks(chunk):
    data, pos = chunk
    assert data_spans(data, pos, BLOCK) == naive_spans(data, pos, BLOCK)


def test_all_zero_and_all_data():
    assert data_spans(bytes(1 << 20), 0) == []
    assert data_spans(b"\x01" * (1 << 20), 0) == [(0, 1 << 20)]
    # a long zero run between data is followed in doubling steps, to the block
    data = b"\x01" * 4096 + bytes(1 << 20) + b"\x01"
    assert data_spans(data, 0) == [(0, 4096), (4096 + (1 << 20), len(data))]
