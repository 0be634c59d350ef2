"""MagNets' reads of the slide pyramid inside ``forward`` (docs/methods.md 4.3 step 6): the I' image
of every tree node, a square level-0 frame rendered from the pyramid level its size chooses,
black outside its content. Built on :class:`~wsi_lightning.data.sampling.RegionSampler`."""

from __future__ import annotations

import numpy as np

from wsi_lightning.data.sampling import GreyFilter, RegionSampler, magnets_level
from wsi_lightning.errors import ConfigError
from wsi_lightning.slides.reader import SlideReader

LEVEL_RULES = ("paper", "resolution")


def read_frames(reader: SlideReader, frames: np.ndarray, contents: np.ndarray, size: int,
                level_rule: str = "paper", grey: GreyFilter | None = None,
                resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MagNets' I' reads (4.3 step 6): square frames rendered at ``size`` x ``size``.

    Each frame is read from the pyramid level its side chooses, resized, and black wherever it
    is not ``content`` (outside the slide, or outside its parent's content), then grey-filtered.

    Args:
        reader: the open slide.
        frames: (K, 4) float level-0 square frames ``(x0, y0, x1, y1)``.
        contents: (K, 4) the part of each frame to show (``clip_boxes(frame, parent content)``).
        size: output side (112 for I').
        level_rule: ``paper``: :func:`magnets_level` of the frame side (m_max = levels - 1);
            ``resolution``: :func:`choose_level`, the coarsest level with the output's resolution.
        grey: grey filter applied to each image, or None.
        resample: :class:`RegionSampler` resize filter.

    Returns:
        ((K, size, size, 3) uint8 images, (K,) int64 levels read, (K,) int64 pixels read from
        the pyramid per channel (the content's area at that level)).
    """
    if level_rule not in LEVEL_RULES:
        raise ConfigError(f"level_rule {level_rule!r} is unknown; expected one of {list(LEVEL_RULES)}")
    sampler = RegionSampler(reader, resample)
    frames, contents = np.asarray(frames, np.float64), np.asarray(contents, np.float64)
    out = np.zeros((len(frames), size, size, 3), np.uint8)
    levels, read_px = np.zeros(len(frames), np.int64), np.zeros(len(frames), np.int64)
    centres = (np.arange(size) + 0.5) / size  # (size,) pixel centres, fraction of the side
    for k, ((x0, y0, x1, _), (cx0, cy0, cx1, cy1)) in enumerate(zip(frames, contents, strict=True)):
        side = x1 - x0
        if level_rule == "paper":
            level = magnets_level(reader.dimensions, (side, side), reader.level_count)
        else:
            level = sampler.level_for(side, size)
        img = sampler.read((x0, y0, side, side), size, level)  # (size, size, 3), black off-slide
        xs, ys = x0 + centres * side, y0 + centres * side  # (size,) level-0 pixel centres
        keep = ((ys >= cy0) & (ys < cy1))[:, None] & ((xs >= cx0) & (xs < cx1))[None]
        img = np.where(keep[..., None], img, np.uint8(0))
        out[k] = img if grey is None else grey(img)[0]
        ds = reader.level_downsamples[level]
        levels[k], read_px[k] = level, round((cx1 - cx0) * (cy1 - cy0) / ds**2)
    return out, levels, read_px
