"""qcowfs: qcow2 images and their backing chains as plain raw disks.

The public library interface::

    import qcowfs
    with qcowfs.open_image("top.qcow2") as disk:
        disk.size, disk.read(offset, length), disk.snapshots
        with disk.snapshot("1") as snap:
            snap.read(0, 512)

Every problem with an image raises a subclass of :class:`ImageError`.
"""


from qcowfs.errors import (
    BackingChainError,
    CorruptionError,
    FormatError,
    HostIOError,
    ImageError,
    InvalidKeyError,
    KeyRequiredError,
    LockedError,
    ReadOnlyError,
    UnsupportedError,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from qcowfs.chain.disk import Disk, SnapshotDisk, SnapshotInfo, open_image

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
    "KeyRequiredError",
    "InvalidKeyError",
    "CorruptionError",
    "HostIOError",
]

# The disk API loads the whole image engine: only code that uses it pays for that import
# (``qcowfs umount``, ``qcowfs --help`` and the package's errors do not). PEP 562.
_LAZY = {"open_image", "Disk", "SnapshotDisk", "SnapshotInfo"}


def __getattr__(name: str):
    if name in _LAZY:
        from qcowfs.chain import disk

        value = getattr(disk, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
