"""One registry helper: classes chosen by name, each a dataclass whose fields are its options.

The pruning criteria (``staterank.prune.channels``, ``staterank.prune.heads``) register here, and the
method lists and help texts (``staterank prune --help``) come from these registries::

    CHANNEL_CRITERIA = Registry("channel criterion", CriterionError)

    @CHANNEL_CRITERIA.register
    @dataclass
    class RRQRCriterion(ChannelCriterion):
        '''Strong rank-revealing QR ...'''           # the first line is the method's help
        name = "rrqr"
        f: float = 1.5                               # an option: ``get("rrqr", f=2.0)``

        def __post_init__(self) -> None:             # the class checks its own option values
            ...

A lookup refuses unknown names (listing the registered ones), unknown options (listing the class's
fields) and values of the wrong type (for ``bool``, ``int``, ``float`` and ``str`` fields) with the
registry's error class; ranges are the class's own ``__post_init__`` checks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import Field, fields, is_dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
C = TypeVar("C", bound=type)

#: The field types whose values a lookup checks, and what a message calls them.
_CHECKED_TYPES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


class Registry(Generic[T]):
    """Name -> class, in registration order; read like a dict (``in``, ``[name]``, iteration, ``items()``)."""

    def __init__(self, kind: str, error: Callable[[str], Exception]) -> None:
        self.kind = kind  # what an entry is, for messages: "channel criterion"
        self.error = error  # raised for unknown names, unknown options and mistyped values
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: C) -> C:
        """Class decorator: make ``cls`` available under ``cls.name`` (a name taken twice is a ValueError)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a class attribute 'name'; {cls.__qualname__} has none")
        if not is_dataclass(cls):
            raise ValueError(f"{self.kind} {name!r}: {cls.__qualname__} must be a dataclass, its fields its options")
        if name in self._classes:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice: {self._classes[name].__qualname__} and {cls.__qualname__}"
            )
        self._classes[name] = cls
        return cls

    def get(self, name: str, /, **options: Any) -> T:
        """An instance of the class registered as ``name`` with ``options`` set, checked before it is built."""
        if name not in self._classes:
            raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._classes))}")
        cls = self._classes[name]
        known = self.options(name)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise self.error(
                f"{self.kind} {name!r} has no option {', '.join(unknown)}; its options: {', '.join(known) or 'none'}"
            )
        for field in fields(cls):
            if field.name in options:
                self._check_type(name, field, options[field.name])
        return cls(**options)

    def options(self, name: str) -> list[str]:
        """The option names of an entry: its dataclass fields that the constructor takes."""
        return [field.name for field in fields(self._classes[name]) if field.init]

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._classes)

    def help(self, name: str) -> str:
        """An entry's one-line help: the first line of its class docstring."""
        doc = inspect.cleandoc(self._classes[name].__doc__ or "")
        return doc.splitlines()[0] if doc else ""

    def describe(self) -> str:
        """Every entry with its one-line help, in registration order: ``"l1: Weight magnitude...; pca: ..."``."""
        return "; ".join(f"{name}: {self.help(name).rstrip('.')}" for name in self._classes)

    def _check_type(self, name: str, field: Field, value: Any) -> None:
        # ``from __future__ import annotations`` makes the annotation a string
        kind = next((k for k in _CHECKED_TYPES if field.type in (k, k.__name__)), None)
        if kind is None:
            return
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise self.error(f"{self.kind} {name!r}: option {field.name} takes {_CHECKED_TYPES[kind]}, got {value!r}")

    # --- read like a dict -----------------------------------------------------------------

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def items(self) -> list[tuple[str, type[T]]]:
        return list(self._classes.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._classes)})"
