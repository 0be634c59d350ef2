"""``wsi view``: a run's slides, heat-maps, lesion outlines and predictions in a browser.

A static folder (``index.html`` + Deep Zoom tiles + OpenSeadragon) that opens from ``file://``
with no server and no network: :func:`build_viewer` (``site.py``), the pyramids
(``deepzoom.py``), OpenSeadragon's files (``assets.py``), the page (``static/``).
"""

from wsi_lightning.viewer.site import build_viewer

__all__ = ["build_viewer"]
