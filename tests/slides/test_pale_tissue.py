"""Tissue segmentation keeps pale tissue: real stained pixels on glass, at the default settings.

scikit-image's bundled IHC image (colon glands, DAB-brown epithelium in pale blue-white stroma
that is nearly the glass colour) is pasted twice on a glass canvas of its own background colour:
a 1 mm block (the image mirrored 4 x 4, so the tissue continues across the copies) and one copy
alone (256 µm). The slide is written as a pyramidal SVS-like TIFF at 0.5 µm/px. An H&E-like pale
version (the same image's haematoxylin and DAB re-stained as haematoxylin and eosin at 50-60%
strength, by colour deconvolution) and glass with an illumination gradient are checked too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import color, data

from wsi_lightning.slides import SlideReader, segment_tissue, write_pyramid_tiff

MPP = 0.5
H, W = 3072, 4096


def _pale_he(ihc: np.ndarray) -> np.ndarray:
    """(512, 512, 3) uint8 IHC -> H&E-like pale image (haematoxylin 0.6x, DAB -> eosin 0.5x)."""
    hed = color.rgb2hed(ihc)
    stains = np.stack([hed[..., 0] * 0.6, hed[..., 2] * 0.5, np.zeros_like(hed[..., 0])], -1)
    return (np.clip(color.hed2rgb(stains), 0, 1) * 255).round().astype(np.uint8)


def _slide(path: Path, image: np.ndarray, gradient: float) -> np.ndarray:
    """Write the slide; returns the (H, W) bool truth (True inside the pasted blocks)."""
    glass = image[350, 20].astype(np.float32)  # the image's own lumen: its scanner's glass colour
    ramp = np.linspace(-gradient, gradient, W, dtype=np.float32)[None, :, None]  # (1, W, 1)
    noise = np.random.default_rng(0).normal(0, 1.5, (H, W, 3)).astype(np.float32)
    canvas = np.clip(glass + ramp + noise, 0, 255).astype(np.uint8)
    row = np.concatenate([image, image[:, ::-1]], 1)  # mirrored: continuous tissue
    block = np.tile(np.concatenate([row, row[::-1]], 0), (2, 2, 1))  # (2048, 2048, 3)
    truth = np.zeros((H, W), bool)
    canvas[512:2560, 512:2560], truth[512:2560, 512:2560] = block, True
    canvas[1280:1792, 3072:3584], truth[1280:1792, 3072:3584] = image, True
    write_pyramid_tiff(path, canvas, MPP, n_levels=6)
    return truth


@pytest.fixture(scope="module", params=[("ihc", 0.0), ("ihc", 4.0), ("pale_he", 0.0)],
                ids=["ihc", "ihc-uneven-glass", "pale-he"])
def pale_slide(request, tmp_path_factory) -> tuple[Path, np.ndarray]:
    name, gradient = request.param
    image = data.immunohistochemistry()
    image = _pale_he(image) if name == "pale_he" else image
    path = tmp_path_factory.mktemp("pale") / f"{name}.tiff"
    return path, _slide(path, image, gradient)


def _kept_and_glass(mask: np.ndarray, mask_mpp: float, truth: np.ndarray) -> tuple[float, float]:
    """Fraction of the tissue blocks marked tissue, fraction of the glass marked tissue."""
    s = mask_mpp / MPP  # level-0 px per mask px
    ys = np.minimum(((np.arange(mask.shape[0]) + 0.5) * s).astype(int), H - 1)
    xs = np.minimum(((np.arange(mask.shape[1]) + 0.5) * s).astype(int), W - 1)
    inside = truth[np.ix_(ys, xs)]  # truth at each mask pixel's centre
    return float(mask[inside].mean()), float(mask[~inside].mean())


def test_defaults_keep_pale_tissue_and_leave_the_glass(pale_slide):
    path, truth = pale_slide
    with SlideReader(path) as reader:
        tissue = segment_tissue(reader)
    kept, glass = _kept_and_glass(tissue.mask, tissue.mpp, truth)
    assert kept >= 0.97, f"only {kept:.1%} of the tissue blocks kept"
    assert glass <= 0.02, f"{glass:.1%} of the glass marked as tissue"


def test_otsu_alone_loses_the_pale_stroma(pale_slide):
    """Without the glass-relative rule the same slide loses pale tissue (what the rule fixes)."""
    path, truth = pale_slide
    with SlideReader(path) as reader:
        kept, _ = _kept_and_glass(*_mask(segment_tissue(reader, pale_grey=None)), truth)
    assert kept < 0.9


def _mask(tissue) -> tuple[np.ndarray, float]:
    return tissue.mask, tissue.mpp
