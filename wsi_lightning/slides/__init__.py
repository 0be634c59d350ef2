"""Whole-slide images: reading (OpenSlide or direct JPEG tiles), tissue masks, tiling by mpp,
synthetic demo slides."""

from wsi_lightning.slides.reader import MPP_RTOL, SlideCache, SlideReader
from wsi_lightning.slides.synthetic import (
    SlideSpec,
    make_demo_dataset,
    render,
    sample_spec,
    write_pyramid_tiff,
)
from wsi_lightning.slides.tiling import TileGrid, tile_slide
from wsi_lightning.slides.tissue import TissueMask, save_tissue_png, segment_tissue

__all__ = [
    "MPP_RTOL",
    "SlideCache",
    "SlideReader",
    "SlideSpec",
    "TileGrid",
    "TissueMask",
    "make_demo_dataset",
    "render",
    "sample_spec",
    "save_tissue_png",
    "segment_tissue",
    "tile_slide",
    "write_pyramid_tiff",
]
