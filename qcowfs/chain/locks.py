"""Taking QEMU's image locks on every file of a chain, the way QEMU does for the same job."""

from __future__ import annotations

import os

from qcowfs.image import locking
from qcowfs.image.hostfile import HostFile
from qcowfs.image.qcow2 import Qcow2Image

from .resolve import Layer


def lock_chain(layers: list[Layer], *, write_top: bool = False) -> None:
    """Lock the top image for reading (or writing) and every backing file for reading.
    Raises LockedError when another process (QEMU, a qcowfs mount) conflicts."""
    for i, layer in enumerate(layers):
        mode = locking.LockMode.WRITE if write_top and i == 0 else locking.LockMode.READ
        locking.acquire(layer.file.fd, layer.path, mode)
        if isinstance(layer, Qcow2Image) and layer.data_file is not layer.file:
            locking.acquire(layer.data_file.fd, layer.data_file.path, mode)


def refuse_if_in_use(path: str) -> None:
    """Before replacing the file at ``path``: refuse when another process (QEMU, a mount) has
    it open, which would destroy it under them."""
    if not os.path.exists(path):
        return
    f = HostFile(path)
    try:
        locking.acquire(f.fd, path, locking.LockMode.WRITE)
    finally:
        f.close()
