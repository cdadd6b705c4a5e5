"""``info`` over one image or its whole backing chain."""

from __future__ import annotations

from qcowfs.image.info import full_backing_filename, image_info
from qcowfs.image.qcow2 import Qcow2Image

from .locks import lock_chain
from .resolve import open_chain, open_layer


def describe(path: str, fmt: str | None = None, *, backing_chain: bool = False,
             force_share: bool = False) -> list[dict]:
    """qemu-img ``info`` objects: the image alone, or (``backing_chain``) every image of its
    chain, top first. Without ``backing_chain`` the backing file need not exist. Unless
    ``force_share``, an image another process writes is refused (LockedError)."""
    if not backing_chain:
        layer = open_layer(path, fmt, open_data_file=False)
        try:
            if not force_share:
                lock_chain([layer])
            return [image_info(layer, path)]
        finally:
            layer.close()
    layers = open_chain(path, fmt=fmt)
    try:
        if not force_share:
            lock_chain(layers)
        out = []
        name = path
        for layer in layers:
            out.append(image_info(layer, name))
            if isinstance(layer, Qcow2Image) and layer.header.backing_file:
                name = full_backing_filename(name, layer.header.backing_file)
        return out
    finally:
        for layer in layers:
            layer.close()
