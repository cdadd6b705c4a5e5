"""The write path's zero detection (``image.write.is_zero``): all-zero writes become zero
clusters, so it must be exact at every length and position, past its 2 MiB compare step too.
(That zero writes become zero clusters as QEMU maps them is tests/test_write_interop.py.)"""

from __future__ import annotations

import pytest

from qcowfs.image.write import is_zero

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
