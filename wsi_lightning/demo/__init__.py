"""The built-in synthetic demo data: H&E-like whole-slide pyramids with known lesions.

Reading real slides needs none of this (``wsi_lightning.slides`` imports nothing from here);
only the build and the CLI do, when no manifest is configured (``wsi demo-data``).

    specs        the frozen dataclasses a slide is drawn from
    paint        the lesion and multiscale tasks' painters (stain concentrations on a canvas)
    multitag     task "multitag": stain, species and organ tags
    zoom         task "zoom": candidate regions at low magnification, the cue at high
    synthetic    sample_spec (draw a slide) and render (paint it)
    dataset      make_demo_dataset: pyramids + annotations + manifest, resumable, in parallel
    gigapixel    realistic-size slides (100k x 80k px) drawn tile by tile, for benchmarks
"""

from wsi_lightning.demo.dataset import make_demo_dataset
from wsi_lightning.demo.specs import SlideSpec
from wsi_lightning.demo.synthetic import render, sample_spec

__all__ = ["SlideSpec", "make_demo_dataset", "render", "sample_spec"]
