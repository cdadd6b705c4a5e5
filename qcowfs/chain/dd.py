"""``dd``: copy a byte range of a guest disk into a new image, as ``qemu-img dd`` does.

Unlike convert, every byte is written, zeros included: the raw output is fully allocated and
every cluster of a qcow2 output holds data, which is what qemu-img dd leaves.
"""

from __future__ import annotations

from qcowfs.image.create import QcowOptions, create_qcow2, create_raw
from qcowfs.image.hostfile import HostFile

from .disk import Disk, open_image

CHUNK = 1 << 20


def copy_range(src: Disk, start: int, end: int, dst: str, out_format: str,
               out_size: int) -> None:
    """Create ``dst`` (``out_size`` bytes, rounded up to a sector) and write the guest bytes
    ``[start, end)`` of ``src`` at its offset 0."""
    if out_format == "raw":
        create_raw(dst, out_size)
        out = HostFile(dst, writable=True)
        write = out.write
    else:
        create_qcow2(dst, QcowOptions(size=out_size))
        out = open_image(dst, writable=True, format="qcow2", zero_detect=False)
        write = out.write
    try:
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            write(pos - start, src.read(pos, n))
            pos += n
        if out_format == "raw":
            out.sync()
    finally:
        out.close()
