"""convert's data path: its zero detection (``data_spans``) cuts out exactly the all-zero blocks
of the guest's 4 KiB grid that a byte-by-byte scan cuts out, wherever the chunk starts; and a
read that fails on the read-ahead thread ends the command with its one-line error. (That the
output reads back as the source, with -c too, is tests/test_cli_convert.py, against qemu-img.)"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cli_helpers import qcowfs_subprocess
from hypothesis import given, settings
from hypothesis import strategies as st
from qemutools import convert, create, map_json, poke, qemu_img, qemu_io

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


def _corrupt_compressed(tmp_path: Path) -> Path:
    """A qemu-img compressed image whose second compressed stream is overwritten."""
    src = create(tmp_path / "src.raw", "8M", fmt="raw")
    qemu_io(src, "write -P 5 0 8M", fmt="raw")
    p = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(p))
    entry = map_json(p)[0]
    assert entry["data"] and "offset" not in entry  # compressed: no host offset to show
    with open(p, "rb") as f:
        f.seek(struct.unpack(">Q", f.read(48)[40:48])[0])
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8)
        host = struct.unpack(">Q", f.read(8))[0] & ((1 << 54) - 1)
    poke(p, host, b"\xff" * 64)
    return p


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["-O", "raw"], ["-O", "qcow2"], ["-c", "-O", "qcow2"]])
def test_a_read_error_on_the_read_ahead_thread_is_one_error_line(tmp_path, args):
    """The source is read on its own thread: what fails there reaches the command's error."""
    p = _corrupt_compressed(tmp_path)
    assert qemu_img("convert", "-O", "raw", str(p), str(tmp_path / "q.raw"),
                    check=False).returncode == 1
    r = qcowfs_subprocess("convert", *args, p, tmp_path / "out.img")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("qcowfs: convert: ") and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_parallel_decompression_reads_what_qemu_reads(tmp_path, monkeypatch, ctype):
    """A compressed image with some clusters rewritten (normal among compressed) and a zero
    range: every read through the decompression pool (``decompress_ahead``, streams read in
    runs) returns qemu-img's bytes, and the same bytes as the inline path."""
    import random

    import qcowfs
    from qcowfs.chain.pipeline import parallel_decompression

    rng = random.Random(3)
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(rng.randbytes(4096) * 4 if i % 3 else bytes(4096) + b"x" * 12288
                             for i in range(256)))
    p = convert(src, tmp_path / "c.qcow2", compress=True, compression_type=ctype)
    qemu_io(p, "write -P 7 192k 128k", "write -z 1M 64k", "write -P 9 2M 4k")
    want = qemu_img_raw(p, tmp_path / "want.raw")
    from qcowfs.image.qcow2 import Qcow2Image
    started = []
    real = Qcow2Image.decompress_ahead
    monkeypatch.setattr(Qcow2Image, "decompress_ahead",
                        lambda self, extents: started.append(real(self, extents)) or started[-1])
    with qcowfs.open_image(str(p)) as disk:
        inline = disk.read(0, disk.size)
        for _ in range(2):  # the second pass meets the clusters cached by the first
            with parallel_decompression(disk):
                pooled = b"".join(disk.read(pos, 640 * 1024)
                                  for pos in range(0, disk.size, 640 * 1024))
            assert pooled == want
    assert inline == want
    assert sum(len(f) for f in started) > 100  # the pool did decompress


def qemu_img_raw(image: Path, out: Path) -> bytes:
    qemu_img("convert", "-O", "raw", str(image), str(out))
    return out.read_bytes()
