"""One file per paper: a pure-torch net and its registered MILModule.

Importing this package registers every method (``build.py`` does it); the list of modules is
discovered from the folder, so adding a paper means adding one file here.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
