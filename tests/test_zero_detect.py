"""Zero detection (``format.zeros.is_zero``, the write path's and convert's): all-zero writes become zero
clusters, so it must be exact at every length and position, past its 2 MiB compare step too.
(That zero writes become zero clusters as QEMU maps them is tests/test_write_interop.py.)"""

from __future__ import annotations

import pytest

from qcowfs.format.zeros import is_zero

STEP = 1 << 21


@pytest.mark.parametrize("n", [0, 1, 2, 511, 4096, 65536, STEP - 1, STEP, STEP + 1, 2 * STEP + 7])
def test_zero_buffers_are_zero(n):
    assert is_zero(memoryview(bytearray(n)))


@pytest.mark.parametrize("n", [1, 2, 511, 4096, STEP, STEP + 1, 2 * STEP + 7])
def test_one_nonzero_byte_anywhere_is_seen(n):
    for at in sorted({0, 1 % n, n // 2, n - 1, min(n - 1, STEP - 1), min(n - 1, STEP),
                      min(n - 1, STEP + 3)}):
        buf = bytearray(n)
        buf[at] = 0x80
        assert not is_zero(memoryview(buf)), (n, at)


def test_bytes_and_views_of_bytes():
    assert is_zero(memoryview(bytes(8192))[4096:])
    assert not is_zero(memoryview(b"\0" * 100 + b"\1" + b"\0" * 100))


def test_bounds():
    data = b"\1" * 10 + bytes(5000) + b"\1"
    assert is_zero(data, 10, 5010) and not is_zero(data, 9, 5010) and not is_zero(data, 10, 5011)
    assert is_zero(data, 7, 7)
