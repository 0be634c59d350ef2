"""Lightning callbacks, registered by name for the ``callbacks:`` list of an experiment.

Callbacks rely only on ``MILOutput`` (``module.last_output``), never on a concrete method.
Importing this package's modules registers them (``build.py`` does it).
"""

from __future__ import annotations

import importlib
import pkgutil


def import_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
