"""User-facing errors.

Every error a researcher can cause (a bad slide, manifest row, config key...) is a ``WSIError``:
the CLI prints its message without a traceback. Messages name the file, row or key and say what
to do about it.
"""

from __future__ import annotations


class WSIError(Exception):
    """An error caused by input or configuration, with a message meant for a person."""


class ConfigError(WSIError):
    """Unknown or invalid configuration key or value."""


class ArgumentError(ConfigError, ValueError):
    """A bad argument of a callback or other configured object (also a ValueError)."""


class ManifestError(WSIError):
    """A manifest CSV that is missing columns or has a bad row."""


class SlideError(WSIError):
    """A slide that cannot be opened or read (missing, truncated, corrupt, no mpp)."""


class NoTissueError(SlideError):
    """Tissue segmentation found no tissue on a slide."""


class StoreError(WSIError):
    """A feature store entry that is missing, partial or inconsistent."""
