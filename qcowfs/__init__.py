"""qcowfs: qcow2 images and their backing chains as plain raw disks.

The public library interface::

    import qcowfs
    with qcowfs.open_image("top.qcow2") as disk:
        disk.size, disk.read(offset, length), disk.snapshots
        with disk.snapshot("1") as snap:
            snap.read(0, 512)

Every problem with an image raises a subclass of :class:`ImageError`.
"""

from qcowfs.chain.disk import Disk, SnapshotDisk, SnapshotInfo, open_image
from qcowfs.errors import (
    BackingChainError,
    CorruptionError,
    FormatError,
    HostIOError,
    ImageError,
    LockedError,
    ReadOnlyError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "open_image",
    "Disk",
    "SnapshotDisk",
    "SnapshotInfo",
    "ImageError",
    "FormatError",
    "UnsupportedError",
    "BackingChainError",
    "ReadOnlyError",
    "LockedError",
    "CorruptionError",
    "HostIOError",
]
