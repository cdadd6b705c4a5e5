"""qcowfs.format.record, the stand-in for dataclasses on the CLI's import path: what the
modules rely on behaves as a dataclass would."""

from __future__ import annotations

import copy
import pickle

import pytest

from qcowfs.format.record import FrozenInstanceError, field, fields, record, replace


@record
class Plain:
    a: int
    b: str = "x"
    c: list[int] = field(default_factory=list)


@record(frozen=True)
class Frozen:
    a: int
    b: bytes = b""


@record(slots=True)
class Slotted:
    """Kept docstring."""

    a: int
    b: int = 0

    def total(self) -> int:
        return self.a + self.b


def test_plain():
    p, q = Plain(1), Plain(1)
    assert (p.a, p.b, p.c) == (1, "x", []) and p.c is not q.c
    assert p == q and p != Plain(1, "y") and Plain(a=2, c=[3]).c == [3]
    assert repr(Plain(1, "y", [2])) == "Plain(a=1, b='y', c=[2])"
    assert fields(Plain) == ("a", "b", "c")
    assert replace(p, b="z") == Plain(1, "z")
    p.b = "w"
    assert p.b == "w"
    with pytest.raises(TypeError):
        hash(p)
    with pytest.raises(TypeError):
        Plain()
    assert copy.copy(p) == p and pickle.loads(pickle.dumps(p)) == p


def test_frozen():
    f = Frozen(1, b"q")
    with pytest.raises(FrozenInstanceError):
        f.a = 2
    assert hash(f) == hash(Frozen(1, b"q")) and {f, Frozen(1, b"q")} == {f}
    assert replace(f, a=3) == Frozen(3, b"q")


def test_slots():
    s = Slotted(2, b=3)
    assert s.total() == 5 and not hasattr(s, "__dict__") and Slotted.__doc__ == "Kept docstring."
    assert Slotted(1) == Slotted(1, 0) and repr(s) == "Slotted(a=2, b=3)"
    with pytest.raises(AttributeError):
        s.other = 1
    assert copy.copy(s) == s
