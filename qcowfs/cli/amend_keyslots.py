"""``amend -o encrypt.state=...``: the key-slot options of qemu-img amend, read into a
:class:`qcowfs.image.luks_slots.KeySlotChange` (kept apart from amend's other options)."""

from __future__ import annotations

from .main import CommandError

KEY_SLOT_OPTIONS = ("encrypt.state", "encrypt.new-secret", "encrypt.old-secret",
                    "encrypt.keyslot", "encrypt.iter-time")


def key_slot_change(opts: dict[str, str], secrets: dict[str, bytes]):
    """Take the key-slot options out of ``opts``; None when there are none. Secrets are
    looked up by id among the ``--object secret`` definitions."""
    given = {k: opts.pop(k) for k in KEY_SLOT_OPTIONS if k in opts}
    if not given:
        return None
    from qcowfs.image.luks_slots import KeySlotChange

    if "encrypt.state" not in given:
        raise CommandError("Parameter 'state' is missing")
    state = given["encrypt.state"]
    if state not in ("active", "inactive"):
        raise CommandError(f"Parameter 'state' does not accept value '{state}'")

    def secret(key: str):
        sid = given.get(key)
        if sid is None:
            return None

        def lookup() -> bytes:
            if sid not in secrets:
                raise CommandError(f"No secret with id '{sid}'")
            return secrets[sid]
        return lookup

    def number(key: str) -> int | None:
        text = given.get(key)
        if text is None:
            return None
        try:
            return int(text, 0)
        except ValueError:
            raise CommandError(f"Parameter '{key}' expects a number") from None

    return KeySlotChange(state, new_secret=secret("encrypt.new-secret"),
                         old_secret=secret("encrypt.old-secret"),
                         keyslot=number("encrypt.keyslot"),
                         iter_time_ms=number("encrypt.iter-time"))
