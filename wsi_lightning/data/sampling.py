"""On-the-fly slide sampling: regions read from the pyramid while training (MagNets, PT).

Methods that train end to end on pixels do not use the feature store. They read the slide while
training, at a resolution that depends on what they look at:

    choose_level        the pyramid level to read a level-0 box from for a given output size:
                        ``docs/methods.md`` 4.4 generalised to any pyramid (real level downsamples);
    RegionSampler       reads a level-0 box (may extend outside the slide, black there) at an
                        output size from that level, through the project's ``SlideReader``;
    grey_filter         the MagNets grey-pixel filter (4.7): grey pixels black + a keep flag;
    TissuePatchDataset  M random tissue patches per slide per visit (Patch Transformer, 1.2);
    SlideImageDataset   the whole slide as a small padded square image plus what a model needs
                        to read regions itself (MagNets layer 1, 4.3), collated to a
                        :class:`SlideBatch`;
    SlideSamplingDataModule  the two datasets with the manifest / split / DDP conventions of
                        :class:`~wsi_lightning.data.bags.BagDataModule`;
    (training samplers of ``(index, epoch)`` keys, :class:`~wsi_lightning.data.bags.EpochKeys`,
    seed every draw by ``(seed, slide, epoch)`` in whichever worker reads it)

Level choice. A box of ``w x h`` level-0 pixels rendered at ``W x H`` output pixels needs
``r = min(w / W, h / H)`` level-0 pixels per output pixel on its finer axis. We read the
coarsest level whose downsample is at most ``r`` (1% tolerance), so the read has at least the
output resolution and is only ever reduced. On a halving pyramid of ``n`` levels, with the output
size ``(w0, h0) / 2**n`` (half the coarsest level: ~98 px for a 50,000 px wide slide, the paper's
"about the size of the 112 px I'"), this is exactly the paper's ``m = max(m_max - max(R_h, R_w),
0)`` except at ROIs that are exact power-of-two fractions of the slide, where the paper's floor
picks the finer level (:func:`magnets_level` is the formula verbatim; tests check both).

Deviations from paper:
    - MagNets' level formula assumes halving levels; ``choose_level`` uses the slide's real
      downsamples (non-halving pyramids, scanners with missing levels).
    - Reads larger than ``max_read_px`` per side (few-level pyramids) are read in chunks and
      box-reduced on the fly (4.4 "cap the read size" [inferred]).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from wsi_lightning.data.bags import SplitDataModule, index_and_epoch
from wsi_lightning.data.batch import Bag
from wsi_lightning.manifest import Manifest, patient_split
from wsi_lightning.config import to_dict
from wsi_lightning.errors import ConfigError, ManifestError, NoTissueError, SlideError
from wsi_lightning.ids import safe_slide_id
from wsi_lightning.registry import DATAMODULES
from wsi_lightning.slides.reader import MPP_RTOL, SlideCache, SlideReader
from wsi_lightning.slides.tissue import segment_tissue

log = logging.getLogger(__name__)

MODES = ("patches", "slide")
GREY_TOL = 15  # MagNets 4.7: R, G and B pairwise closer than this (0-255) is grey
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "nearest": Image.Resampling.NEAREST}


# ----------------------------------------------------------------------------- level choice
def _pair(size: float | Sequence[float], name: str) -> tuple[float, float]:
    w, h = (size, size) if np.isscalar(size) else tuple(size)
    if not (w > 0 and h > 0):
        raise ConfigError(f"{name} must be positive, got {size}")
    return float(w), float(h)


def choose_level(
    reader_or_downsamples: SlideReader | Sequence[float],
    box_size_level0: float | tuple[float, float],
    out_size: float | tuple[float, float],
    tol: float = MPP_RTOL,
) -> int:
    """Coarsest pyramid level that still has the output's resolution.

    Args:
        reader_or_downsamples: the slide, or its level downsamples (increasing, level 0 = 1).
        box_size_level0: box side, or (w, h), in level-0 pixels.
        out_size: output side, or (W, H), in pixels.
        tol: relative slack: a level up to ``tol`` coarser than needed is still used (real
            downsamples like 4.0004 would otherwise force a 4x larger read).

    Returns:
        the largest level whose downsample is <= ``min(w / W, h / H) * (1 + tol)``; 0 when the
        output is finer than level 0 (the box is then upsampled).
    """
    ds = getattr(reader_or_downsamples, "level_downsamples", reader_or_downsamples)
    ds = [float(d) for d in ds]
    (bw, bh), (ow, oh) = _pair(box_size_level0, "box size"), _pair(out_size, "output size")
    ratio = min(bw / ow, bh / oh)  # level-0 pixels per output pixel on the finer axis
    return max([lv for lv, d in enumerate(ds) if d <= ratio * (1 + tol)], default=0)


def magnets_level(slide_size: tuple[int, int], roi_size: tuple[float, float], n_levels: int) -> int:
    """The paper's formula (``docs/methods.md`` 4.4), for a halving pyramid.

    Args:
        slide_size: (w0, h0) level-0 slide size.
        roi_size: (w_c, h_c) ROI size in level-0 pixels.
        n_levels: pyramid levels; ``m_max = n_levels - 1`` (docs/methods.md register item 19).

    Returns:
        ``m = max(m_max - max(R_h, R_w), 0)`` with ``R = floor(log2(slide / roi))``, also capped
        at ``m_max`` (an ROI larger than the slide would otherwise give a level that does not
        exist).
    """
    (w0, h0), (wc, hc) = _pair(slide_size, "slide size"), _pair(roi_size, "ROI size")
    r = max(math.floor(math.log2(h0 / hc)), math.floor(math.log2(w0 / wc)))
    return min(max(n_levels - 1 - r, 0), n_levels - 1)


def magnets_out_size(slide_size: tuple[int, int], n_levels: int) -> tuple[float, float]:
    """Output size under which :func:`choose_level` reproduces :func:`magnets_level` on a
    halving pyramid: half the coarsest level, ``(w0, h0) / 2**n_levels``."""
    return slide_size[0] / 2**n_levels, slide_size[1] / 2**n_levels


def square_box(dimensions: tuple[int, int]) -> tuple[float, float, float, float]:
    """The whole slide padded symmetrically to a square: level-0 (x, y, side, side)."""
    w, h = dimensions
    side = float(max(w, h))
    return (w - side) / 2, (h - side) / 2, side, side


# ----------------------------------------------------------------------------- grey filter
def grey_mask(image: np.ndarray | torch.Tensor, tol: int = GREY_TOL) -> np.ndarray | torch.Tensor:
    """Pixels whose R, G and B differ pairwise by less than `tol` (0-255 scale).

    Args:
        image: (H, W, 3) uint8 array, or (..., 3, H, W) float tensor in [0, 1].

    Returns:
        (H, W) bool array, or (..., H, W) bool tensor.
    """
    if isinstance(image, torch.Tensor):
        return ((image.amax(-3) - image.amin(-3)) * 255).round() < tol
    return (image.max(-1).astype(np.int16) - image.min(-1)) < tol


def grey_filter(image: np.ndarray, tol: int = GREY_TOL, max_fraction: float = 1.0,
                blacken: bool = True) -> tuple[np.ndarray, float, bool]:
    """MagNets' grey filter (docs/methods.md 4.7): background, white, smudges and black padding are grey.

    Args:
        image: (H, W, 3) uint8 RGB.
        tol: grey tolerance (0-255).
        max_fraction: the image is kept if at most this fraction of it is grey.
        blacken: set grey pixels to black (the paper, on every image); else return `image`.

    Returns:
        ((H, W, 3) uint8 filtered image, grey fraction in [0, 1], keep flag).
    """
    grey = grey_mask(image, tol)
    frac = float(grey.mean())
    if blacken and frac > 0:
        image = np.where(grey[..., None], np.uint8(0), image)
    return image, frac, frac <= max_fraction


@dataclass(frozen=True)
class GreyFilter:
    """:func:`grey_filter` settings for the samplers (``max_fraction`` < 1 rejects patches)."""

    tol: int = GREY_TOL
    max_fraction: float = 1.0
    blacken: bool = True

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float, bool]:
        return grey_filter(image, self.tol, self.max_fraction, self.blacken)


def dihedral(image: np.ndarray, k: int, hflip: bool, vflip: bool) -> np.ndarray:
    """Rotate an (H, W, C) image by ``k * 90`` degrees, then flip; returns a contiguous copy."""
    image = np.rot90(image, int(k))
    if hflip:
        image = image[:, ::-1]
    if vflip:
        image = image[::-1]
    return np.ascontiguousarray(image)


def dihedral_tensor(image: torch.Tensor, k: int, hflip: bool, vflip: bool) -> torch.Tensor:
    """:func:`dihedral` of (..., C, H, W) tensors (the same pixels as on (H, W, C) arrays)."""
    image = torch.rot90(image, int(k), dims=(-2, -1))
    if hflip:
        image = image.flip(-1)
    if vflip:
        image = image.flip(-2)
    return image


def dihedral_matrix(k: int, hflip: bool, vflip: bool) -> np.ndarray:
    """(2, 2) M with ``dihedral(I)(u) = I(M u)`` in normalised centred (x, y) coordinates.

    A crop centred at t in the transformed image is the crop centred at ``M t`` in the original
    (same scale), so boxes predicted on augmented images map back to slide coordinates.
    """
    yy, xx = np.mgrid[-1:2, -1:2]  # (3, 3) each: y down, x right, centre 0
    moved = dihedral(np.stack([xx, yy], -1), k, hflip, vflip)  # (3, 3, 2) source (x, y)
    return np.stack([moved[1, 2], moved[2, 1]], 1).astype(np.float64)  # columns M e_x, M e_y


# ----------------------------------------------------------------------------- region reads
class RegionSampler:
    """Reads level-0 boxes at an output size from the best pyramid level of one slide.

    Args:
        reader: the open slide.
        resample: ``bilinear`` (the paper's) | ``bicubic`` | ``box`` | ``nearest``; PIL
            antialiases when reducing.
        tol: level-choice slack (:func:`choose_level`).
        max_read_px: largest level read per side; beyond it the box is read in chunks and
            box-reduced by an integer factor first.
    """

    def __init__(self, reader: SlideReader, resample: str = "bilinear", tol: float = MPP_RTOL,
                 max_read_px: int = 8192) -> None:
        if resample not in RESAMPLE:
            raise ConfigError(f"resample {resample!r} is unknown; expected one of {list(RESAMPLE)}")
        self.reader, self.resample, self.tol = reader, RESAMPLE[resample], tol
        self.max_read_px = int(max_read_px)

    def level_for(self, box_size_level0: float | tuple[float, float],
                  out_size: int | tuple[int, int]) -> int:
        """The level :meth:`read` uses for this box and output size."""
        return choose_level(self.reader, box_size_level0, out_size, self.tol)

    def read(self, box: Sequence[float], out_size: int | tuple[int, int],
             level: int | None = None) -> np.ndarray:
        """Pixels of a level-0 box resized to `out_size`.

        Args:
            box: level-0 (x, y, w, h), floats allowed; may extend outside the slide.
            out_size: output side, or (W, H).
            level: pyramid level to read (default :meth:`level_for`).

        Returns:
            (H, W, 3) uint8 RGB; black (0) outside the slide.
        """
        x, y, w, h = (float(v) for v in box)
        ow, oh = (int(v) for v in _pair(out_size, "output size"))
        level = self.level_for((w, h), (ow, oh)) if level is None else level
        ds = self.reader.level_downsamples[level]
        fx, fy, fw, fh = x / ds, y / ds, w / ds, h / ds  # the box in level pixels
        ix, iy = math.floor(fx), math.floor(fy)
        cw, ch = math.ceil(fx + fw) - ix, math.ceil(fy + fh) - iy
        f = max(1, math.ceil(max(cw, ch) / self.max_read_px))  # integer pre-reduction
        canvas = self._canvas(level, ix, iy, cw, ch, f)  # (ceil(ch / f), ceil(cw / f), 3)
        sub = ((fx - ix) / f, (fy - iy) / f, (fx - ix + fw) / f, (fy - iy + fh) / f)
        if canvas.shape[:2] == (oh, ow) and np.allclose(sub, (0, 0, ow, oh), atol=1e-6):
            return canvas  # the level is the output resolution: no resampling
        return np.array(Image.fromarray(canvas).resize((ow, oh), self.resample, box=sub))

    def _canvas(self, level: int, ix: int, iy: int, cw: int, ch: int, f: int) -> np.ndarray:
        """Level box [ix, ix + cw) x [iy, iy + ch), black outside the level, reduced by `f`."""
        lw, lh = self.reader.level_dimensions[level]
        canvas = np.zeros((-(-ch // f), -(-cw // f), 3), np.uint8)
        step = self.max_read_px // f * f  # chunk side: a multiple of f, at most max_read_px
        for cy in range(iy, iy + ch, step):
            for cx in range(ix, ix + cw, step):
                x1, y1 = min(cx + step, ix + cw), min(cy + step, iy + ch)
                vx0, vy0, vx1, vy1 = max(cx, 0), max(cy, 0), min(x1, lw), min(y1, lh)
                if vx0 >= vx1 or vy0 >= vy1:
                    continue  # this chunk is outside the slide
                px = self._read_level(level, vx0, vy0, vx1 - vx0, vy1 - vy0)
                if f == 1:
                    canvas[vy0 - iy : vy1 - iy, vx0 - ix : vx1 - ix] = px
                    continue
                chunk = np.zeros((y1 - cy, x1 - cx, 3), np.uint8)
                chunk[vy0 - cy : vy1 - cy, vx0 - cx : vx1 - cx] = px
                red = np.asarray(Image.fromarray(chunk).reduce(f))
                oy, ox = (cy - iy) // f, (cx - ix) // f  # exact: chunks start at multiples of f
                canvas[oy : oy + red.shape[0], ox : ox + red.shape[1]] = red
        return canvas

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 of a box inside `level`, in level pixels: the fast path's tile reader
        when the slide has one (no sub-pixel resampling), else ``SlideReader.read_region``."""
        fast = getattr(self.reader, "_fast", None)
        if fast is None:
            ds = self.reader.level_downsamples[level]
            return self.reader.read_region((round(x * ds), round(y * ds)), level, (w, h))
        try:
            return fast.read_level(level, x, y, w, h)
        except (OSError, ValueError, RuntimeError) as err:
            raise SlideError(f"slide {self.reader.path}: reading {w}x{h} px at level {level} "
                             f"from ({x}, {y}) failed ({err}); check the file is complete") from err

    def whole_slide(self, out_size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """The slide padded symmetrically to a square (black), at `out_size` x `out_size`.

        Returns:
            ((S, S, 3) uint8 image, its level-0 box (x, y, side, side)).
        """
        box = square_box(self.reader.dimensions)
        return self.read(box, out_size), box


# ----------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class SlideRef:
    """One manifest row: what a worker needs to open the slide, and how errors name it.

    Attributes:
        slide_id: the slide.
        path: slide file (absolute).
        mpp: manifest ``mpp`` override, or None (the slide's own).
        where: ``"manifest <csv> row <n>: slide '<id>'"`` for error messages.
    """

    slide_id: str
    path: str
    mpp: float | None
    where: str


def slide_refs(manifest: Manifest) -> dict[str, SlideRef]:
    """{slide_id: SlideRef} of every manifest row (rows counted from 1, as in manifest errors)."""
    df = manifest.df
    out = {}
    rows = zip(df["slide_id"], df["path"], df["mpp"], strict=True)
    for row, (sid, path, mpp) in enumerate(rows, start=1):
        mpp = None if mpp is None or not np.isfinite(mpp) else float(mpp)
        where = f"manifest {manifest.source} row {row}: slide '{sid}'"
        if not path:
            raise ManifestError(f"{where} has no path, and on-the-fly slide sampling reads its pixels; "
                                "fill in the 'path' column")
        out[sid] = SlideRef(sid, str(path), mpp, where)
    return out


class _SlideDataset(Dataset):
    """Slides of one split, opened lazily: the ``SlideCache`` forgets inherited readers after a
    fork and pickles empty, so each DataLoader worker opens its own handles on first use.

    Indexed by ``i`` or by ``(i, epoch)`` (what :class:`EpochRandomSampler` yields); a plain
    ``i`` uses :attr:`epoch` (:meth:`set_epoch`). Every draw is seeded from ``(seed, i, epoch)``
    when training and from ``(seed, i)`` otherwise, so it does not depend on which process
    reads the item, nor on ``num_workers``.
    """

    def __init__(self, slides: Sequence[SlideRef], labels: dict[str, dict[str, int]],
                 train: bool = False, augment: bool = True, seed: int = 0,
                 grey: GreyFilter | None = None, backend: str = "auto", max_open: int = 16,
                 resample: str = "bilinear") -> None:
        self.slides, self.labels, self.train = list(slides), labels, train
        self.augment, self.seed, self.grey, self.resample = augment, seed, grey, resample
        self._slides = SlideCache(max_open=max_open, backend=backend)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.slides)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain-index reads in this process (a worker keeps its own copy: loaders
        pass ``(i, epoch)`` keys instead)."""
        self.epoch = int(epoch)

    def reader(self, i: int) -> SlideReader:
        """The open reader of slide `i` (this process's handle)."""
        ref = self.slides[i]
        return self._slides.get(ref.path, mpp=ref.mpp)

    def _rng(self, i: int, epoch: int) -> np.random.Generator:
        """Training: a fresh draw of slide `i` each epoch; evaluation: the same every epoch."""
        if not self.train:
            return np.random.default_rng([self.seed, i])
        return np.random.default_rng([self.seed, i, epoch + 1])

    def _draw_aug(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, 3) int64 (k, hflip, vflip) of :func:`dihedral`; zeros unless training + augment."""
        if not (self.train and self.augment):
            return np.zeros((n, 3), np.int64)
        return np.stack([rng.integers(0, 4, n), rng.integers(0, 2, n), rng.integers(0, 2, n)], 1)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = index_and_epoch(key, self.epoch)
        ref = self.slides[i]
        try:
            item = self._item(i, self.reader(i), self._rng(i, epoch))
        except SlideError as err:  # NoTissueError included: name the manifest row
            raise type(err)(f"{ref.where}: {err}") from err
        return {**item, "slide_id": ref.slide_id,
                "labels": {t: lab[ref.slide_id] for t, lab in self.labels.items()}}

    def _item(self, i: int, reader: SlideReader, rng: np.random.Generator) -> dict:
        raise NotImplementedError


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """N (H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)


@dataclass(frozen=True)
class TissuePositions:
    """A slide's tissue mask, bit-packed (a 100k px slide at 8 µm/px: ~1 MB instead of 8).

    Attributes:
        packed: ``np.packbits`` of the (h, w) bool mask.
        shape: (h, w).
        mpp: microns per mask pixel.
    """

    packed: np.ndarray
    shape: tuple[int, int]
    mpp: float

    @classmethod
    def from_mask(cls, mask: np.ndarray, mpp: float) -> TissuePositions:
        return cls(np.packbits(mask.ravel()), tuple(mask.shape), float(mpp))

    def mask(self) -> np.ndarray:
        """(h, w) bool."""
        n = self.shape[0] * self.shape[1]
        return np.unpackbits(self.packed, count=n).astype(bool).reshape(self.shape)


class TissuePatchDataset(_SlideDataset):
    """M random tissue patches per slide per visit (Patch Transformer, ``docs/methods.md`` 1.2).

    Patch centres are drawn uniformly over the tissue mask's pixels (uniform within the pixel);
    2M candidates are drawn and those whose box holds at least ``min_tissue`` tissue come first.
    With a ``grey`` filter whose ``max_fraction`` < 1, rejected patches are replaced by the next
    candidates (at most 2M reads); if too few pass, the least grey rejected ones fill in.

    Args:
        slides, labels: the split's slides and ``{target: {slide_id: class index}}``.
        n_patches: M.
        patch_size: output side T in pixels.
        patch_mpp: output µm/px (the patch covers ``T * patch_mpp`` µm); None: each slide's
            level-0 resolution.
        min_tissue: preferred tissue fraction of a patch box (mask resolution).
        tissue: keyword arguments of :func:`~wsi_lightning.slides.tissue.segment_tissue`.
        tissue_cache: folder of per-slide masks (written by ``prepare_data``); None keeps them
            in memory only (each worker then segments the slides it visits once).
        train, augment, seed, grey, backend, max_open, resample: see ``SlideSamplingDataModule``.

    Items: ``image`` (M, 3, T, T) float in [0, 1]; ``coords`` (M, 2) int64 level-0 top-left
    (negative for a patch centred near the slide's edge: black there); ``slide_id``;
    ``labels`` {target: class index}.
    """

    def __init__(self, slides: Sequence[SlideRef], labels: dict[str, dict[str, int]],
                 n_patches: int = 32, patch_size: int = 224, patch_mpp: float | None = 0.5,
                 min_tissue: float = 0.5, tissue: dict | None = None,
                 tissue_cache: str | os.PathLike | None = None, draws: int = 1, **kwargs) -> None:
        super().__init__(slides, labels, **kwargs)
        self.draws = 1 if self.train else int(draws)  # evaluation: R fixed draws per slide
        self.n_patches, self.patch_size, self.patch_mpp = n_patches, patch_size, patch_mpp
        self.min_tissue, self.tissue_kwargs = min_tissue, dict(tissue or {})
        self.tissue_cache = None if tissue_cache is None else Path(tissue_cache)
        self._tissue: dict[str, TissuePositions] = {}

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if self.draws == 1:
            return super().__getitem__(key)
        i, _ = index_and_epoch(key, self.epoch)
        ref, reader = self.slides[i], self.reader(i)
        labels = {t: lab[ref.slide_id] for t, lab in self.labels.items()}
        try:  # draw r of slide i is the same at every epoch
            items = [self._item(i, reader, np.random.default_rng([self.seed, i, 10_000 + r]))
                     for r in range(self.draws)]
        except SlideError as err:
            raise type(err)(f"{ref.where}: {err}") from err
        return {"repeats": [{**it, "slide_id": ref.slide_id, "labels": labels} for it in items]}

    def tissue(self, i: int) -> TissuePositions:
        """Slide `i`'s tissue mask: memory, else the cache folder, else segmented (and saved)."""
        ref = self.slides[i]
        if ref.slide_id in self._tissue:
            return self._tissue[ref.slide_id]
        path = self._cache_file(ref)
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as z:
                shape = tuple(int(v) for v in z["shape"])
                tp = TissuePositions(z["packed"], shape, float(z["mpp"]))
        else:
            tm = segment_tissue(self.reader(i), **self.tissue_kwargs)
            tp = TissuePositions.from_mask(tm.mask, tm.mpp)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, packed=tp.packed, shape=np.array(tp.shape), mpp=tp.mpp)
                os.replace(tmp, path)
        self._tissue[ref.slide_id] = tp
        return tp

    def _cache_file(self, ref: SlideRef) -> Path | None:
        if self.tissue_cache is None:
            return None
        key = json.dumps({"path": ref.path, "mpp": ref.mpp, **self.tissue_kwargs}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        sid = safe_slide_id(ref.slide_id, where=f"tissue cache {self.tissue_cache}", error=ManifestError)
        return self.tissue_cache / f"{sid}-{digest}.npz"

    def candidates(self, tp: TissuePositions, slide_mpp: float, side0: float,
                   rng: np.random.Generator) -> np.ndarray:
        """(2M, 2) float64 level-0 top-left of candidate boxes of side `side0`, best first."""
        mask = tp.mask()
        flat = np.flatnonzero(mask)
        if len(flat) == 0:
            raise NoTissueError("the tissue mask is empty; check the slide (or its mpp), or try a finer "
                                "tiling.thumb_mpp (the segmentation thumbnail)")
        k = 2 * self.n_patches
        iy, ix = np.divmod(flat[rng.integers(0, len(flat), k)], mask.shape[1])
        s = tp.mpp / slide_mpp  # level-0 pixels per mask pixel
        centres = np.stack([ix + rng.random(k), iy + rng.random(k)], 1) * s  # (2M, 2)
        top_left = centres - side0 / 2
        frac = _box_fractions(mask, top_left / s, side0 / s)  # (2M,)
        good, bad = np.flatnonzero(frac >= self.min_tissue), np.flatnonzero(frac < self.min_tissue)
        order = np.concatenate([good, bad[np.argsort(-frac[bad], kind="stable")]])
        return top_left[order]

    def _item(self, i: int, reader: SlideReader, rng: np.random.Generator) -> dict:
        t = self.patch_size
        side0 = t * (self.patch_mpp or reader.mpp) / reader.mpp  # patch side in level-0 pixels
        boxes = np.round(self.candidates(self.tissue(i), reader.mpp, side0, rng)).astype(np.int64)
        sampler = RegionSampler(reader, self.resample)
        kept, spare = [], []  # (image, coords); spare: grey-rejected, least grey first
        for x, y in boxes:
            img = sampler.read((x, y, side0, side0), t)
            if self.grey is not None:
                img, frac, keep = self.grey(img)
                if not keep:
                    spare.append((frac, len(spare), img, (x, y)))
                    continue
            kept.append((img, (x, y)))
            if len(kept) == self.n_patches:
                break
        kept += [(img, xy) for _, _, img, xy in sorted(spare)][: self.n_patches - len(kept)]
        aug = self._draw_aug(rng, self.n_patches)
        images = [dihedral(img, *a) for (img, _), a in zip(kept, aug, strict=True)]
        coords = torch.tensor([xy for _, xy in kept], dtype=torch.int64)  # (M, 2)
        return {"image": _to_tensor(images), "coords": coords}  # (M, 3, T, T)


def _box_fractions(mask: np.ndarray, top_left: np.ndarray, side: float) -> np.ndarray:
    """Tissue fraction of square boxes given in mask pixels (whole mask pixels; outside = 0).

    Args:
        mask: (h, w) bool.
        top_left: (K, 2) float (x, y) in mask pixels.
        side: box side in mask pixels.

    Returns:
        (K,) float in [0, 1].
    """
    h, w = mask.shape
    x0, y0 = np.floor(top_left).astype(np.int64).T
    x1, y1 = np.ceil(top_left + side).astype(np.int64).T
    full = np.maximum((x1 - x0) * (y1 - y0), 1)
    x0, x1, y0, y1 = np.clip(x0, 0, w), np.clip(x1, 0, w), np.clip(y0, 0, h), np.clip(y1, 0, h)
    area = [mask[a:b, c:d].sum() for a, b, c, d in zip(y0, y1, x0, x1, strict=True)]
    return np.asarray(area, np.float64) / full


class SlideImageDataset(_SlideDataset):
    """Whole slides, for end-to-end models that read regions themselves (MagNets 4.3).

    Each item is the slide padded symmetrically to a black square and resized to each of
    ``image_size`` (MagNets' I and I': 56 and 112), plus what a model needs to open the slide in
    its own process (``SlideCache().get(path, mpp)``) and map the image back to level 0.

    Items: ``image`` (3, S, S) float in [0, 1] at ``image_size[0]``, ``image_<s>`` for each
    further size; ``path`` str; ``mpp`` float manifest override (NaN: the slide's own);
    ``dimensions`` (2,) int64 level-0 (w, h); ``box`` (4,) float64 level-0 (x, y, side, side)
    of the square; ``aug`` (3,) int64 (k, hflip, vflip) for :func:`dihedral`, drawn when
    training with ``augment`` and applied to nothing here: the model applies it to every image
    it reads so that its boxes stay in slide coordinates; ``slide_id``; ``labels``.
    """

    def __init__(self, slides: Sequence[SlideRef], labels: dict[str, dict[str, int]],
                 image_size: int | Sequence[int] = 224, **kwargs) -> None:
        super().__init__(slides, labels, **kwargs)
        self.sizes = [int(image_size)] if np.isscalar(image_size) else [int(s) for s in image_size]

    def _item(self, i: int, reader: SlideReader, rng: np.random.Generator) -> dict:
        sampler, box = RegionSampler(reader, self.resample), square_box(reader.dimensions)
        out = {"path": str(self.slides[i].path),
               "mpp": float("nan") if self.slides[i].mpp is None else self.slides[i].mpp,
               "dimensions": torch.tensor(reader.dimensions, dtype=torch.int64),
               "box": torch.tensor(box, dtype=torch.float64),
               "aug": torch.from_numpy(self._draw_aug(rng, 1)[0])}
        for j, s in enumerate(self.sizes):
            img = sampler.read(box, s)
            if self.grey is not None:
                img = self.grey(img)[0]
            out["image" if j == 0 else f"image_{s}"] = _to_tensor([img])[0]  # (3, S, S)
        return out


@dataclass
class SlideBatch:
    """B whole slides (slide mode), what :class:`SlideImageDataset` items collate to.

    Attributes:
        images: (B, 3, S, S) float in [0, 1], the padded square slide at ``image_size[0]``.
        extra: {s: (B, 3, s, s)} the same at each further ``image_size``.
        paths: B slide files.
        mpp: (B,) float64 manifest mpp override; NaN: the slide's own.
        dimensions: (B, 2) int64 level-0 (w, h).
        boxes: (B, 4) float64 level-0 (x, y, side, side) of the square the images show.
        aug: (B, 3) int64 (k, hflip, vflip) of :func:`dihedral` for the model to apply to every
            image it gets or reads (zeros outside training).
        labels: {target: (B,) int64 class index}; -1 where unknown.
        slide_ids: B slide identifiers.

    ``to(device)`` moves the images and labels; the geometry stays on the CPU, where the model
    reads the slides with it.
    """

    images: torch.Tensor
    extra: dict[int, torch.Tensor]
    paths: list[str]
    mpp: torch.Tensor
    dimensions: torch.Tensor
    boxes: torch.Tensor
    aug: torch.Tensor
    labels: dict[str, torch.Tensor]
    slide_ids: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> SlideBatch:
        return SlideBatch(self.images.to(device), {s: v.to(device) for s, v in self.extra.items()},
                          self.paths, self.mpp, self.dimensions, self.boxes, self.aug,
                          {t: v.to(device) for t, v in self.labels.items()}, self.slide_ids)


def collate_patches(items: list[dict]) -> Bag:
    """Patches-mode items as a :class:`~wsi_lightning.data.batch.Bag` whose ``features`` are the
    images (B, M, 3, T, T); an evaluation item with R draws becomes R rows sharing its slide id
    (MILModule averages their predictions)."""
    flat = [r for it in items for r in (it["repeats"] if "repeats" in it else [it])]
    images = torch.stack([it["image"] for it in flat])  # (B, M, 3, T, T)
    targets = flat[0]["labels"].keys()
    return Bag(images, torch.ones(images.shape[:2], dtype=torch.bool),
               torch.stack([it["coords"] for it in flat]),
               {t: torch.tensor([int(it["labels"][t]) for it in flat]) for t in targets},
               [it["slide_id"] for it in flat])


def collate_slides(items: list[dict]) -> SlideBatch:
    """Stack :class:`SlideImageDataset` items into a :class:`SlideBatch`."""
    sizes = [int(k.split("_")[1]) for k in items[0] if k.startswith("image_")]
    targets = items[0]["labels"].keys()
    return SlideBatch(
        images=torch.stack([it["image"] for it in items]),
        extra={s: torch.stack([it[f"image_{s}"] for it in items]) for s in sizes},
        paths=[it["path"] for it in items],
        mpp=torch.tensor([float(it["mpp"]) for it in items], dtype=torch.float64),
        dimensions=torch.stack([it["dimensions"] for it in items]),
        boxes=torch.stack([it["box"] for it in items]),
        aug=torch.stack([it["aug"] for it in items]),
        labels={t: torch.tensor([int(it["labels"][t]) for it in items]) for t in targets},
        slide_ids=[it["slide_id"] for it in items])


# ----------------------------------------------------------------------------- Lightning
@DATAMODULES.register("slide_sampling")
class SlideSamplingDataModule(SplitDataModule):
    """Slides read on the fly: random tissue patches (``mode="patches"``) or whole slides for
    models that read regions themselves (``mode="slide"``).

    Splits, labels, DDP sharding and ``prepare_data`` follow :class:`BagDataModule`: a
    patient-level split, ``{target: {slide_id: class index}}`` labels, a shuffling
    ``DistributedSampler`` for training and disjoint unpadded shares for validation / test.
    One bag per slide: ``data.bag_level=case`` (patient-level bags) is refused at config time.

    Args:
        manifest: the validated slide manifest.
        mode: ``patches`` (:class:`TissuePatchDataset`) | ``slide`` (:class:`SlideImageDataset`).
        split: ``{val, test, seed, fold}`` (see :func:`patient_split`).
        batch_size: slides per batch.
        num_workers: DataLoader workers (each opens its own slide handles).
        prefetch_factor: batches each worker reads ahead (with workers only).
        n_patches, patch_size, patch_mpp, min_tissue: patches mode (:class:`TissuePatchDataset`).
        image_size: slide mode: side(s) of the whole-slide image (:class:`SlideImageDataset`);
            batches are :class:`SlideBatch` (patches mode: :class:`Bag` of images).
        augment: random flips and 90-degree rotations when training.
        grey: grey filter applied to every image (MagNets), or None.
        tissue: keyword arguments of ``segment_tissue`` (patches mode).
        tissue_cache: folder for tissue masks; ``prepare_data`` fills it (and so checks every
            slide opens and has tissue before training starts).
        backend, max_open: ``SlideCache`` settings of each process.
        resample: resize filter of :class:`RegionSampler`.
        seed: sampling / augmentation seed (and the DDP shuffle seed when ``split`` has none).
            A training draw of slide i at epoch e is seeded by ``(seed, i, e)``: the training
            sampler yields ``(i, e)`` keys (:class:`~wsi_lightning.data.bags.EpochKeys`) and Lightning sets its epoch,
            so draws are the same for any ``num_workers`` (persistent workers included) and
            differ between epochs. Outside a Trainer, call ``loader.sampler.set_epoch(e)``.
        test_draws: patches mode: random draws of ``n_patches`` per slide at validation / test
            (fixed across epochs); the method averages their predictions.
        prepare: called by ``prepare_data()`` first (e.g. writing the demo slides).
    """

    layout: ClassVar[str | None] = None  # slides are read on the fly: no feature store
    input_kinds: ClassVar[tuple[str, ...]] = ("patches", "slide")

    @classmethod
    def check_config(cls, cfg: Any, input_kind: str) -> None:
        """Any tiling: nothing is tiled or extracted for on-the-fly sampling."""

    @classmethod
    def from_config(cls, cfg: Any, manifest: Manifest, input_kind: str, root: Path) -> SlideSamplingDataModule:
        """``data.sampling`` settings; tissue masks cached under ``root/tissue``."""
        smp = to_dict(cfg.data.sampling)
        grey_tol, max_fraction = smp.pop("grey_tol"), float(smp.pop("grey_max_fraction"))
        grey = None if grey_tol is None else GreyFilter(tol=int(grey_tol), max_fraction=max_fraction)
        thumb = float(cfg.tiling.thumb_mpp)
        return cls(manifest, mode=input_kind, split=to_dict(cfg.data.split), batch_size=int(cfg.data.batch_size),
                   num_workers=int(cfg.data.num_workers), grey=grey, tissue={"thumb_mpp": thumb},
                   tissue_cache=root / "tissue" / f"{cfg.tiling.thumb_mpp}mpp", seed=int(cfg.seed), **smp)

    def __init__(self, manifest: Manifest, mode: str = "patches", split: dict | None = None,
                 batch_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2,
                 n_patches: int = 32, patch_size: int = 224, patch_mpp: float | None = 0.5,
                 min_tissue: float = 0.5, image_size: int | Sequence[int] = 224,
                 augment: bool = True, grey: GreyFilter | None = None, tissue: dict | None = None,
                 tissue_cache: str | Path | None = None, backend: str = "auto",
                 max_open: int = 16, resample: str = "bilinear", seed: int = 0, test_draws: int = 1,
                 prepare: Callable[[], object] | None = None) -> None:
        _check_args(mode=mode, batch_size=batch_size, num_workers=num_workers,
                    prefetch_factor=prefetch_factor, n_patches=n_patches, patch_size=patch_size,
                    patch_mpp=patch_mpp, min_tissue=min_tissue, image_size=image_size,
                    resample=resample)
        super().__init__(manifest, split, batch_size, num_workers, seed=seed)
        self.mode, self.prefetch_factor, self._prepare = mode, prefetch_factor, prepare
        self.tissue_cache = None if tissue_cache is None else Path(tissue_cache)
        common = dict(augment=augment, seed=seed, grey=grey, backend=backend, max_open=max_open,
                      resample=resample)
        if mode == "patches":
            self._kwargs = dict(n_patches=n_patches, patch_size=patch_size, patch_mpp=patch_mpp,
                                min_tissue=min_tissue, tissue=tissue,
                                tissue_cache=self.tissue_cache, draws=test_draws, **common)
        else:
            self._kwargs = dict(image_size=image_size, **common)

    @property
    def in_dim(self) -> int:
        """Input channels of the images an end-to-end method gets (RGB)."""
        return 3

    def _dataset(self, ids: Sequence[str], train: bool) -> _SlideDataset:
        refs = slide_refs(self.manifest)
        labels = self.manifest.labels_by_slide()
        cls = TissuePatchDataset if self.mode == "patches" else SlideImageDataset
        return cls([refs[i] for i in ids], labels, train=train, **self._kwargs)

    def prepare_data(self) -> None:
        """Run ``prepare``; in patches mode with a ``tissue_cache``, segment every slide once
        (rank 0), which also fails early, naming the manifest row, on an unreadable slide or one
        without tissue."""
        if self._prepare is not None:
            self._prepare()
        if self.mode != "patches" or self.tissue_cache is None:
            return
        from rich.progress import Progress

        ds = self._dataset(list(self.manifest.df["slide_id"]), train=False)
        with Progress(transient=True) as bar:
            task = bar.add_task("tissue masks", total=len(ds))
            for i, ref in enumerate(ds.slides):
                try:
                    ds.tissue(i)
                except SlideError as err:
                    raise type(err)(f"{ref.where}: {err}") from err
                bar.advance(task)
        ds._slides.clear()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.splits = self.split()
        if not self.splits["train"] and stage in (None, "fit"):
            raise ConfigError(f"manifest {self.manifest.source}: the split leaves no training "
                              f"slide ({ {k: len(v) for k, v in self.splits.items()} }); "
                              "lower data.split.val / data.split.test or add slides")
        for name, ids in self.splits.items():
            self.datasets[name] = self._dataset(ids, train=name == "train")
        log.info("splits (slides): %s", {k: len(v) for k, v in self.splits.items()})

    def loader_kwargs(self, split: str) -> dict:
        workers = self.num_workers > 0
        draws = getattr(self.datasets[split], "draws", 1)
        return {"batch_size": self.batch_size if draws == 1 else 1,  # R draws of one slide a batch
                "num_workers": self.num_workers, "persistent_workers": workers,
                "collate_fn": collate_slides if self.mode == "slide" else collate_patches,
                "prefetch_factor": self.prefetch_factor if workers else None,
                "pin_memory": torch.cuda.is_available()}


def _check_args(**a) -> None:
    """Fail at construction, naming the argument, rather than inside a worker."""
    problems = []
    if a["mode"] not in MODES:
        problems.append(f"mode {a['mode']!r}; expected one of {list(MODES)}")
    for key in ("batch_size", "n_patches", "patch_size", "prefetch_factor"):
        if int(a[key]) < 1:
            problems.append(f"{key}={a[key]}; must be >= 1")
    if int(a["num_workers"]) < 0:
        problems.append(f"num_workers={a['num_workers']}; must be >= 0")
    if a["patch_mpp"] is not None and not float(a["patch_mpp"]) > 0:
        problems.append(f"patch_mpp={a['patch_mpp']}; must be > 0 µm/px or null")
    if not 0 <= float(a["min_tissue"]) <= 1:
        problems.append(f"min_tissue={a['min_tissue']}; must be in [0, 1]")
    sizes = [a["image_size"]] if np.isscalar(a["image_size"]) else list(a["image_size"])
    if not sizes or min(int(s) for s in sizes) < 1:
        problems.append(f"image_size={a['image_size']}; must be >= 1 (or a list of sizes)")
    if a["resample"] not in RESAMPLE:
        problems.append(f"resample {a['resample']!r}; expected one of {list(RESAMPLE)}")
    if problems:
        raise ConfigError("SlideSamplingDataModule: " + "; ".join(problems))
