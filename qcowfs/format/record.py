"""Plain data classes for the CLI's modules, without the ``dataclasses`` module.

``import dataclasses`` loads ``inspect``, which loads ``ast``, ``dis``, ``tokenize`` (whose
regular expressions are compiled at import) and ``linecache``: 10 to 40 ms of every CLI
start on the bench machine (``python -X importtime``), more than ``info`` of a small image
does. :func:`record` gives what qcowfs uses of a dataclass and nothing more: an ``__init__``
taking the annotated fields in order (a class attribute is the default; :func:`field` with
``default_factory`` a fresh default per instance), ``__repr__``, ``__eq__`` over the fields,
``frozen`` (no assignment after ``__init__``, and a ``__hash__``) and ``slots``. The methods
are made once per class, as source, so an instance costs what a hand-written one does.
"""

from __future__ import annotations


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record."""


class field:  # noqa: N801 (spelled like dataclasses.field, which it replaces)
    """A field whose default is made afresh for every instance."""

    __slots__ = ("default_factory",)

    def __init__(self, *, default_factory):
        self.default_factory = default_factory


_MISSING = object()


def _frozen_setattr(self, name, value):
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def record(cls=None, /, *, frozen: bool = False, slots: bool = False):
    """``@record``, ``@record(frozen=True)``, ``@record(slots=True)``: see the module."""
    def wrap(cls):
        return _make(cls, frozen, slots)
    return wrap if cls is None else wrap(cls)


def fields(obj_or_cls) -> tuple[str, ...]:
    """The field names of a record (class or instance), in order."""
    return obj_or_cls.__record_fields__


def replace(obj, **changes):
    """A copy of record ``obj`` with ``changes``."""
    values = {name: getattr(obj, name) for name in obj.__record_fields__}
    values.update(changes)
    return type(obj)(**values)


_METHODS = ("__init__", "__repr__", "__eq__", "__hash__")


def _make(cls, frozen: bool, slots: bool):
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    methods: dict[str, object] = {name: _lazy(name) for name in _METHODS}
    if not frozen:
        methods["__hash__"] = None  # mutable and compared by value, as a dataclass
    else:
        methods["__setattr__"] = _frozen_setattr
        methods["__delattr__"] = _frozen_delattr
    methods["__record_fields__"] = names
    methods["__record_spec__"] = (names, defaults, frozen)
    if slots:
        ns = {k: v for k, v in cls.__dict__.items()
              if k not in names and k not in ("__dict__", "__weakref__")}
        ns["__slots__"] = names
        ns.update(methods)
        new = type(cls)(cls.__name__, cls.__bases__, ns)
        new.__qualname__ = cls.__qualname__
        return new
    for name, value in methods.items():
        setattr(cls, name, value)
    return cls


def _lazy(name: str):
    """A stand-in for method ``name`` that makes the class's real methods at its first call
    (most records of a module are never used by a given command: their source is never
    compiled), then runs the real one."""
    def stub(self, *args, **kwargs):
        cls = type(self)
        _install(cls)
        return getattr(cls, name)(self, *args, **kwargs)
    stub.__name__ = name
    return stub


def _install(cls) -> None:
    names, defaults, frozen = cls.__record_spec__
    env: dict[str, object] = {"_object": object, "_MISSING": _MISSING}
    params, body = [], []
    for name in names:
        if name in defaults:
            default = defaults[name]
            if isinstance(default, field):
                env[f"_factory_{name}"] = default.default_factory
                params.append(f"{name}=_MISSING")
                value = f"_factory_{name}() if {name} is _MISSING else {name}"
            else:
                env[f"_default_{name}"] = default
                params.append(f"{name}=_default_{name}")
                value = name
        else:
            params.append(name)
            value = name
        body.append(f"    _object.__setattr__(self, {name!r}, {value})" if frozen
                    else f"    self.{name} = {value}")
    values = "".join(f"self.{n}, " for n in names)
    shown = ", ".join(f"{n}={{self.{n}!r}}" for n in names)
    source = "\n".join([
        f"def __init__(self, {', '.join(params)}):",
        *(body or ["    pass"]),
        "def __repr__(self):",
        f"    return f\"{{type(self).__qualname__}}({shown})\"",
        "def __eq__(self, other):",
        "    if other.__class__ is not self.__class__:",
        "        return NotImplemented",
        f"    return ({values}) == ({''.join(f'other.{n}, ' for n in names)})",
        "def __hash__(self):",
        f"    return hash(({values}))",
    ])
    exec(source, env)  # noqa: S102 (source made above from the class's own field names)
    for name in _METHODS:
        if name == "__hash__" and not frozen:
            continue
        fn = env[name]
        fn.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, fn)
