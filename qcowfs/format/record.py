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


def _make(cls, frozen: bool, slots: bool):
    names = tuple(cls.__dict__.get("__annotations__", {}))
    env: dict[str, object] = {"_object": object, "_MISSING": _MISSING}
    params, body = [], []
    for name in names:
        if name in cls.__dict__:
            default = cls.__dict__[name]
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
    methods = {k: env[k] for k in ("__init__", "__repr__", "__eq__")}
    methods["__hash__"] = env["__hash__"] if frozen else None
    if frozen:
        methods["__setattr__"] = _frozen_setattr
        methods["__delattr__"] = _frozen_delattr
    if slots:
        ns = {k: v for k, v in cls.__dict__.items()
              if k not in names and k not in ("__dict__", "__weakref__")}
        ns["__slots__"] = names
        ns.update(methods)
        ns["__record_fields__"] = names
        new = type(cls)(cls.__name__, cls.__bases__, ns)
        new.__qualname__ = cls.__qualname__
        for name in methods:
            fn = getattr(new, name)
            if fn is not None:
                fn.__qualname__ = f"{cls.__qualname__}.{name}"
        return new
    for name, fn in methods.items():
        if fn is not None:
            fn.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, fn)
    cls.__record_fields__ = names
    return cls
