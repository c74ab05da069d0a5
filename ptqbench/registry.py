"""One registry class for formats, methods, models and metrics.

Entries are registered with a decorator, as lazy ``"module:object"`` strings, or by other
packages through an entry-point group (e.g. ``ptqbench.methods``), so a new method is one
file and one registration. Duplicate names raise; unknown names raise a
:class:`~ptqbench.errors.UserError` that suggests the closest registered names.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from ptqbench.errors import UserError

T = TypeVar("T")


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named entries of one kind.

    ``builtins`` are modules imported on first use (they register themselves);
    ``group`` is the entry-point group scanned once for plugins.
    """

    def __init__(self, kind: str, group: str | None = None, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self._builtins = builtins
        self._entries: dict[str, T | str] = {}
        self._loaded = False

    def register(self, name: str, obj: T | str | None = None) -> Any:
        """Register ``obj`` (or a ``"module:object"`` string) under ``name``.

        Without ``obj`` it returns a decorator. For a registration from outside the built-ins'
        package the built-ins are loaded first, so a name they hold is a duplicate even before the
        registry's first lookup (a built-in's own registration does not load the others: it may run
        while they are being imported).
        """
        if obj is None:
            def decorator(target: T) -> T:
                self.register(name, target)
                return target
            return decorator
        if not self._is_builtin(obj):
            self._load()
        current = self._entries.get(name)
        # A lazy entry (entry point) may be replaced by the registration its import performs.
        if current is not None and not (isinstance(current, str) and not isinstance(obj, str)):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def _is_builtin(self, obj: object) -> bool:
        module = getattr(obj, "__module__", None) or ""
        return module.partition(".")[0] in {b.partition(".")[0] for b in self._builtins}

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtins:
            importlib.import_module(module)
        self._scan_plugins()

    def _scan_plugins(self) -> None:
        """Add entry points of ``group`` not registered yet (plugins installed after start-up too)."""
        if self.group:
            for ep in entry_points(group=self.group):
                self._entries.setdefault(ep.name, ep.value)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def suggest(self, name: str, n: int = 3) -> list[str]:
        return difflib.get_close_matches(name, self.names(), n=n, cutoff=0.4)

    def unknown(self, name: str, where: str = "") -> UserError:
        """The error for an unknown name: what was asked, the closest names, all names."""
        close = self.suggest(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        prefix = f"{where}: " if where else ""
        return UserError(
            f"{prefix}unknown {self.kind} {name!r}{hint} (registered: {', '.join(self.names())})"
        )

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            self._scan_plugins()
        if name not in self._entries:
            raise self.unknown(name)
        entry = self._entries[name]
        if isinstance(entry, str):
            obj = _resolve(entry)
            current = self._entries[name]  # the import may have registered the real object
            entry = obj if isinstance(current, str) else current
            self._entries[name] = entry
        return entry

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def describe(obj: Any) -> str:
    """First line of an entry's docstring, for ``ptqbench list``."""
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
