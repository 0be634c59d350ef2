"""Slide identifiers that become file names.

A slide id names files under the output folders (``<store>/<id>.zarr``, ``tiles/<id>.npz``,
``tiles/<id>_qc.png``, per-slide heat-maps...). :func:`safe_slide_id` is the one check every
such place runs, so an id like ``../../x`` or ``/abs/path`` can never write outside them.
"""

from __future__ import annotations

import os

from wsi_lightning.errors import WSIError

_FORBIDDEN = ("/", "\\", "\0", ":")


def safe_slide_id(slide_id: object, where: str = "", error: type[WSIError] = WSIError) -> str:
    """Return ``slide_id`` if it is safe as a file name, else raise ``error``.

    Safe: a non-empty string, not ``.``-leading (no hidden files, no ``..``), without path
    separators, NUL or ``:`` (a drive / stream on Windows), without leading or trailing spaces.

    Args:
        slide_id: The id (normally a manifest's ``slide_id`` cell).
        where: What the id belongs to, for the message (``"manifest m.csv row 3"``).
        error: The ``WSIError`` subclass raised (``ManifestError``, ``StoreError``...).
    """
    ok = (isinstance(slide_id, str) and slide_id != "" and not slide_id.startswith(".")
          and slide_id == slide_id.strip() and not any(c in slide_id for c in (*_FORBIDDEN, os.sep)))
    if not ok:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}invalid slide id {slide_id!r}; slide ids become file names, so they "
                    "must be non-empty, must not start with '.' or a space and must not contain "
                    "'/', '\\', ':' or NUL (fix the manifest's slide_id column)")
    return slide_id
