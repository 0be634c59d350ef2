"""Flat name -> object registries (timm style).

Registration happens where the object is defined, by decorator; ``build.py`` imports the
modules that hold registered objects, so no hand-kept list of names exists anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from wsi_lightning.errors import ConfigError


class Registry:
    """A named mapping from string keys to classes or factories.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register("abmil")
        ... class ABMIL: ...
        >>> METHODS.get("abmil")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; registered {self.kind}s: {sorted(self._items)}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


METHODS = Registry("method")
DATAMODULES = Registry("datamodule")
CALLBACKS = Registry("callback")
BACKBONES = Registry("backbone")
