"""Whole-slide images: reading (OpenSlide or direct JPEG tiles), tissue masks, tiling by mpp,
pyramid writing. The synthetic demo slides are a package of their own (``wsi_lightning.demo``),
which nothing here imports."""

from wsi_lightning.slides.pyramid import write_pyramid_tiff
from wsi_lightning.slides.reader import MPP_RTOL, SlideCache, SlideReader
from wsi_lightning.slides.tiling import TileGrid, tile_slide
from wsi_lightning.slides.tissue import TissueMask, save_tissue_png, segment_tissue

__all__ = [
    "MPP_RTOL",
    "SlideCache",
    "SlideReader",
    "TileGrid",
    "TissueMask",
    "save_tissue_png",
    "segment_tissue",
    "tile_slide",
    "write_pyramid_tiff",
]
