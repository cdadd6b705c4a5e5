"""Adding and erasing the key slots of an open LUKS qcow2: ``qemu-img amend -o
encrypt.state=active|inactive,...`` with qemu-img 7.2's rules and messages.

The master key never changes, so the data stays as it is; only the LUKS header and one slot's
key material are rewritten, in place inside the encryption header clusters. Adding writes the
slot's material before the header names it active, so a crash leaves at worst an unused slot
(or, overwriting an active slot with --force, that slot unusable); erasing writes the header
first (the slot inactive) and then overwrites the material with random bytes, so no crash
leaves a header pointing at destroyed material.
"""

from __future__ import annotations

from collections.abc import Callable

from qcowfs.errors import ImageError
from qcowfs.format import header as hdr
from qcowfs.format import luks
from qcowfs.format.record import record

from . import crypto
from .qcow2 import Qcow2Image

#: qemu-img's default for encrypt.iter-time
DEFAULT_ITER_TIME_MS = 2000


@record
class KeySlotChange:
    """What ``-o encrypt.*`` asks for. A secret is a callable giving the password's bytes,
    called only where qemu-img looks the secret up (so an unknown id is reported in the same
    order as qemu-img reports it)."""

    state: str  # "active" or "inactive"
    new_secret: Callable[[], bytes] | None = None
    old_secret: Callable[[], bytes] | None = None
    keyslot: int | None = None
    iter_time_ms: int | None = None


class KeySlotRefused(ImageError):
    """A key-slot change qemu-img refuses (the message is qemu-img's)."""


def _refuse(message: str) -> KeySlotRefused:
    return KeySlotRefused(None, message)


class _Area:
    """Reads and writes inside the image's encryption header clusters."""

    def __init__(self, image: Qcow2Image):
        ext = image.header.crypto
        self.file, self.offset, self.length = image.file, ext.offset, ext.length

    def read(self, pos: int, n: int) -> bytes:
        return self.file.read_exact(self.offset + pos, n, "LUKS header")

    def write(self, pos: int, data: bytes) -> None:
        self.file.write(self.offset + pos, data)
        self.file.sync()


def amend_key_slots(image: Qcow2Image, change: KeySlotChange, force: bool = False) -> list[int]:
    """Apply ``change`` to ``image`` (open writable, unlocked with its key); returns the key
    slots it made active or erased. ``force`` allows what qemu-img's --force allows:
    overwriting an active slot, erasing an inactive one or the last active one."""
    if image.header.crypt_method == hdr.CRYPT_NONE:
        raise _refuse("Can't amend encryption options - encryption not present")
    if image.header.crypt_method != hdr.CRYPT_LUKS:
        raise _refuse("Only LUKS encryption options can be amended")
    image.require_key()
    area = _Area(image)
    header = crypto.read_luks_header(area.read, area.length)
    if change.state == "active":
        return [_add(area, header, image.crypto.master_key, change, force)]
    if change.state == "inactive":
        return _erase(area, header, change, force)
    raise _refuse(f"Parameter 'state' does not accept value '{change.state}'")


def _active_count(header: luks.LuksHeader) -> int:
    return sum(s.enabled for s in header.slots)


def _add(area: _Area, header: luks.LuksHeader, master: bytes, change: KeySlotChange,
         force: bool) -> int:
    if change.new_secret is None:
        raise _refuse("'new-secret' is required to activate a keyslot")
    if change.old_secret is not None:
        raise _refuse("'old-secret' must not be given when activating keyslots")
    if change.keyslot is not None:
        index = change.keyslot
        if not 0 <= index < luks.NUM_SLOTS:
            raise _refuse(f"Invalid keyslot {index % (1 << 32)} specified, must be between 0 "
                          f"and {luks.NUM_SLOTS - 1}")
    else:
        free = [i for i, s in enumerate(header.slots) if not s.enabled]
        if not free:
            raise _refuse("Can't add a keyslot - all keyslots are in use")
        index = free[0]
    if not force and header.slots[index].enabled:
        raise _refuse(f"Refusing to overwrite active keyslot {index} - please erase it first")
    iter_time = DEFAULT_ITER_TIME_MS if change.iter_time_ms is None else change.iter_time_ms
    password = change.new_secret()
    material = crypto.fill_key_slot(header, index, master, password, iter_time)
    luks.validate(header, area.length)
    area.write(header.slots[index].key_offset * luks.SECTOR, material)
    area.write(0, luks.pack_header(header))
    return index


def _erase(area: _Area, header: luks.LuksHeader, change: KeySlotChange,
           force: bool) -> list[int]:
    if change.new_secret is not None:
        raise _refuse("'new-secret' must not be given when erasing keyslots")
    if change.iter_time_ms is not None:
        raise _refuse("'iter-time' must not be given when erasing keyslots")
    old = change.old_secret() if change.old_secret is not None else None
    if change.keyslot is not None:
        index = change.keyslot
        if not 0 <= index < luks.NUM_SLOTS:
            raise _refuse(f"Invalid keyslot {index} specified, must be between 0 and "
                          f"{luks.NUM_SLOTS - 1}")
        if old is not None and crypto.slot_master_key(area.read, header, index, old) is None:
            raise _refuse(f"Given keyslot {index} doesn't contain the given old password for "
                          f"erase operation")
        if not force and not header.slots[index].enabled:
            raise _refuse(f"Given keyslot {index} is already erased (inactive) ")
        if not force and _active_count(header) == 1:
            raise _refuse(f"Attempt to erase the only active keyslot {index} which will erase "
                          f"all the data in the image irreversibly - refusing operation")
        chosen = [index]
    elif old is not None:
        chosen = [i for i in range(luks.NUM_SLOTS)
                  if crypto.slot_master_key(area.read, header, i, old) is not None]
        if not chosen:
            raise _refuse("No keyslots match given (old) password for erase operation")
        if not force and len(chosen) == _active_count(header):
            raise _refuse("All the active keyslots match the (old) password that was given "
                          "and erasing them will erase all the data in the image irreversibly "
                          "- refusing operation")
    else:
        raise _refuse("To erase keyslot(s), either explicit keyslot index or the password "
                      "currently contained in them must be given")
    for index in chosen:
        _erase_slot(area, header, index)
    return chosen


def _erase_slot(area: _Area, header: luks.LuksHeader, index: int) -> None:
    """The slot marked inactive in the header (durable), then its material overwritten."""
    slot = header.slots[index]
    slot.active = luks.SLOT_DISABLED
    slot.iterations = 0
    slot.salt = bytes(luks.SALT_LEN)
    area.write(0, luks.pack_header(header))
    length = header.key_bytes * slot.stripes
    area.write(slot.key_offset * luks.SECTOR, crypto.random_bytes(length))
