"""Registries: the only place recipe names turn into code.

A recipe names methods ("drop_layers", "wanda", "perplexity"); each name maps to
a ``"module:attribute"`` string for the implementation and one for its config
schema, both written in this package's source. Config can choose among the
entries but can never point at arbitrary code (no Hydra ``_target_``).
Implementations import lazily, so listing or validating never loads torch.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from slimforge.errors import ConfigError

# Which subpackage registers the methods of each kind.
KIND_PACKAGES = {
    "student": "slimforge.distill",
    "prune": "slimforge.prune",
    "distill": "slimforge.distill",
    "quantize": "slimforge.quantize",
    "eval": "slimforge.eval",
}


def load_object(spec: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class Entry:
    """One registered method: a name, its implementation and its config schema."""

    name: str
    target: str
    schema: str
    summary: str

    def load(self) -> Any:
        return load_object(self.target)

    def load_schema(self) -> type:
        return load_object(self.schema)


class Registry:
    """Name -> :class:`Entry` for one kind of thing (a stage kind or eval task type)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: str, schema: str, summary: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} method {name!r} is registered twice")
        self._entries[name] = Entry(name, target, schema, summary)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        """The entry for ``name``; an unknown name raises a ConfigError listing valid ones."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} method {name!r}.{hint} "
                f"Valid {self.kind} methods: {', '.join(self.names())}"
            )
        return self._entries[name]


_REGISTRIES: dict[str, Registry] = {}


def registry(kind: str) -> Registry:
    """The registry for ``kind``, populated by importing the subpackage that owns it."""
    if kind not in KIND_PACKAGES:
        raise ConfigError(
            f"unknown stage kind {kind!r}; valid kinds: {', '.join(sorted(KIND_PACKAGES))}"
        )
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind)
        importlib.import_module(KIND_PACKAGES[kind])
    return _REGISTRIES[kind]


def register(kind: str, name: str, target: str, schema: str, summary: str) -> None:
    """Called by subpackages at import time to declare their methods."""
    reg = _REGISTRIES.setdefault(kind, Registry(kind))
    reg.register(name, target, schema, summary)
