"""Read-only refcount lookups on an open qcow2 image (for reporting, not for allocation)."""

from __future__ import annotations

from collections import OrderedDict

from qcowfs.errors import FormatError
from qcowfs.format.tables import (
    REFT_OFFSET_MASK,
    decode_refblock,
    decode_u64_table,
    refblock_entries,
)
from qcowfs.image.qcow2 import Qcow2Image

_CACHED_BLOCKS = 64


class RefcountReader:
    """The on-disk refcount of each host cluster, reading refblocks on demand."""

    def __init__(self, image: Qcow2Image):
        self.image = image
        h = image.header
        self.per_block = refblock_entries(h.cluster_bits, h.refcount_order)
        size = h.refcount_table_clusters * image.cluster_size
        if h.refcount_table_offset + size > image.file.size:
            raise FormatError(image.path, "reference count table runs past the end of the file")
        self.table = decode_u64_table(
            image.file.read_exact(h.refcount_table_offset, size, "reference count table"))
        self._blocks: OrderedDict[int, list[int]] = OrderedDict()

    def refcount(self, cluster: int) -> int:
        """The refcount of host cluster number ``cluster`` (0 where no refblock covers it)."""
        index, within = divmod(cluster, self.per_block)
        if index >= len(self.table):
            return 0
        offset = self.table[index] & REFT_OFFSET_MASK
        if not offset:
            return 0
        block = self._blocks.get(offset)
        if block is None:
            block = self._load(offset)
        else:
            self._blocks.move_to_end(offset)
        return block[within]

    def _load(self, offset: int) -> list[int]:
        img = self.image
        cs = img.cluster_size
        if offset % cs:
            raise FormatError(img.path, f"refcount block at unaligned offset {offset}")
        if offset + cs > img.file.size:
            raise FormatError(img.path, f"refcount block at offset {offset} lies past the end "
                                        f"of the file")
        block = decode_refblock(img.file.read_exact(offset, cs, "refcount block"),
                                img.header.refcount_order)
        self._blocks[offset] = block
        if len(self._blocks) > _CACHED_BLOCKS:
            self._blocks.popitem(last=False)
        return block


def looks_metadata_preallocated(image: Qcow2Image, allocated_bytes: int) -> bool:
    """QEMU's heuristic for "metadata was preallocated": clearly more host clusters carry a
    refcount than the host file system has allocated. Where it holds, QEMU asks the file
    system about holes under data clusters (so ``map`` reports them as zero)."""
    cs = image.cluster_size
    real_clusters = allocated_bytes // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = (image.file.size + cs - 1) // cs
    reader = RefcountReader(image)
    count = 0
    for i in range(end_cluster):
        if count >= threshold:
            break
        if reader.refcount(i):
            count += 1
    return count >= threshold
