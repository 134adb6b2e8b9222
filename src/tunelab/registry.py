"""One registry type and one ``module:name`` loader for every pluggable part of tunelab.

Methods, recipes, preference losses, merge rules, reward functions, metrics and exporters each keep a
:class:`Registry` of their entries. An entry is registered by its own module (a class or function
decorator, or an explicit call), declares its capabilities as plain attributes or in ``capabilities``,
and is found by name with a "did you mean" on a typo. A registry may know the modules that register its
entries (``modules``) and import them on first use, so listing names does not import every entry at
import time of the package, and no caller imports an entry module for its side effect.

An entry may also be *declared* before its module is imported (:meth:`Registry.declare`): its name, the
module that registers it and the capabilities a caller reads without running it. ``names``, ``in`` and
``capabilities`` then answer from the declaration, and only ``get`` imports the module. That is how loading a
config reads a method's options class without importing torch (``tunelab.methods``, ``tunelab.resolve``).

:func:`load_object` is the one place a user's ``package.module:name`` string becomes a Python object
(custom metrics, reward functions, environments); it says which part of the string is wrong.

Written here because the field's registries are tied to their frameworks (peft's ``register_peft_method``,
mergekit's ``@merge_method``, torchtune's component paths); this is the small common part of them.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from tunelab.errors import TunelabError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: What an entry is, in messages (``"method"``, ``"recipe"``, ``"merge rule"``).
        modules: Modules whose import registers the entries, imported once on the first lookup.
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind, self.modules = kind, modules
        self._entries: dict[str, T] = {}
        self._declared: dict[str, str] = {}  # name -> module that registers it, for names declared ahead
        self._capabilities: dict[str, dict[str, Any]] = {}
        self._loaded = not modules

    def register(self, name: str, entry: T, **capabilities: Any) -> T:
        """Add ``entry`` under ``name`` with its capabilities (added to those declared); a name registered twice is a bug."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        declared = self._capabilities.get(name, {})
        clash = sorted(k for k in capabilities if k in declared and capabilities[k] != declared[k])
        if clash:
            raise ValueError(f"{self.kind} {name!r} registers {', '.join(clash)} other than it was declared with")
        self._entries[name] = entry
        self._capabilities[name] = {**declared, **capabilities}
        return entry

    def declare(self, name: str, module: str, **capabilities: Any) -> None:
        """Name an entry that importing ``module`` registers, with the capabilities callers read before it runs.

        ``names``, ``in`` and ``capabilities`` answer from the declaration; ``get`` imports ``module`` on the
        first lookup of ``name``.
        """
        if name in self._declared or name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._declared[name] = module
        self._capabilities[name] = dict(capabilities)

    def decorator(self, name: str, **capabilities: Any) -> Callable[[T], T]:
        """``@registry.decorator("name", flag=True)`` registers the decorated function or class."""

        def decorate(entry: T) -> T:
            return self.register(name, entry, **capabilities)

        return decorate

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first, so a module that looks itself up while registering does not recurse
            for module in self.modules:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        """The entry called ``name``.

        Raises:
            KeyError: with a message naming the close matches and every name.
        """
        self._load()
        if name not in self._entries and name in self._declared:
            importlib.import_module(self._declared[name])
            if name not in self._entries:
                raise LookupError(f"{self.kind} {name!r}: module {self._declared[name]} was declared to register it "
                                  "and does not")
        if name not in self._entries:
            raise KeyError(self.unknown(name))
        return self._entries[name]

    def find(self, name: str) -> T | None:
        """The entry called ``name``, or None."""
        return self.get(name) if name in self else None

    def unknown(self, name: str) -> str:
        """The message for a name that is not registered: close matches first, then every name."""
        self._load()
        close = difflib.get_close_matches(str(name), self.names(), n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return f"unknown {self.kind} {name!r}; {hint}choose one of: {', '.join(self.names())}"

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted({*self._entries, *self._declared})

    def capabilities(self, name: str) -> dict[str, Any]:
        """What ``name`` declared or registered with (a copy); a declared entry's module is not imported.

        Raises:
            KeyError: as :meth:`get`.
        """
        if name not in self:
            raise KeyError(self.unknown(name))
        return dict(self._capabilities[name])

    def items(self) -> Iterator[tuple[str, T]]:
        """Every (name, entry), sorted; imports the modules of declared entries."""
        return iter([(name, self.get(name)) for name in self.names()])

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries or name in self._declared


def load_object(spec: str, *, what: str = "object") -> Any:
    """The object a ``package.module:name`` string names (``name`` may be dotted: ``mod:Class.method``).

    Args:
        spec: The reference, as a user wrote it in a config.
        what: What it should be, in messages (``"metric function"``, ``"reward function"``).

    Raises:
        TunelabError: the string has no ``:``, the module cannot be imported (whatever its import raised), or it
            has no such name.
    """
    module_name, sep, attribute = (part.strip() for part in str(spec).partition(":"))
    if not sep or not module_name or not attribute:
        raise TunelabError(f"{what} {spec!r}: write it as 'package.module:name' (for example my_metrics:exact)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure while importing user code is the user's to fix
        raise TunelabError(f"{what} {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); make "
                           "sure it is installed or on PYTHONPATH (the directory you run tunelab from is not searched "
                           f"unless it is) and defines {attribute!r}") from exc
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise TunelabError(f"{what} {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                               f"attribute {attribute!r}; check the spelling of 'module:name'")
        found = getattr(found, part)
    return found
