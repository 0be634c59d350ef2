"""Batch types and collation for bags of instances (tiles)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LevelSet:
    """One quadtree level of B padded bags.

    Attributes:
        features: (B, N_l, D); zero at padding.
        mask: (B, N_l) bool.
        coords: (B, N_l, 2) int64 level-0 top-left; -1 at padding.
        parent: (B, N_l) int64 index of each tile's parent in level l-1 of the same bag; -1 at
            the coarsest level and at padding.
        extent: side of this level's tiles in level-0 pixels.
        mpp: µm/px the level was read at.
    """

    features: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    parent: torch.Tensor
    extent: int
    mpp: float

    def to(self, device: torch.device) -> LevelSet:
        return LevelSet(self.features.to(device), self.mask.to(device), self.coords.to(device),
                        self.parent.to(device), self.extent, self.mpp)


@dataclass
class Bag:
    """A batch of B padded bags.

    Attributes:
        features: (B, N, D) instance features, or (B, N, S, D) for S aligned scales; padded
            rows are zero.
        mask: (B, N) bool, True for real instances.
        coords: (B, N, 2) int64 level-0 (x, y) of each instance, in its own slide's frame;
            -1 for padding.
        labels: {target: (B,) int64 class index}; -1 where unknown.
        slide_ids: B bag identifiers: slide ids, or case ids for patient-level bags
            (``data.bag_level=case``; then ``slides`` names their slides).
        levels: quadtree bags only (:mod:`wsi_lightning.data.quadtree`): one
            :class:`LevelSet` per level, coarsest first; ``features`` etc. are then the finest
            level's.
        slides: patient-level bags only: per bag, the ids of its case's slides (None: every
            bag is one slide, ``slide_ids``).
        slide_index: patient-level bags only: (B, N) int64, each instance's slide as an index
            into ``slides[b]``; -1 at padding.
    """

    features: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    slide_ids: list[str] = field(default_factory=list)
    levels: list[LevelSet] | None = None
    slides: list[list[str]] | None = None
    slide_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str) -> Bag:
        """The same bags on ``device`` (quadtree levels included)."""
        levels = None if self.levels is None else [lv.to(device) for lv in self.levels]
        index = None if self.slide_index is None else self.slide_index.to(device)
        return Bag(self.features.to(device), self.mask.to(device), self.coords.to(device),
                   {t: v.to(device) for t, v in self.labels.items()}, self.slide_ids, levels,
                   self.slides, index)


def slide_parts(batch: Any) -> dict[str, list[tuple[int, torch.Tensor | None]]]:
    """Where each slide of a batch lies: ``{slide id: [(row, instances), ...]}``, slides in
    first-seen order.

    A slide bag's row is one slide (several rows hold one slide with test-time bag sampling):
    ``instances`` is None, meaning the row's valid instances (``batch.mask[row]``). A
    patient-level bag's row holds every slide of its case: ``instances`` is the (N,) bool mask
    of that slide's valid instances (from ``Bag.slide_index``). Works on any batch with
    ``slide_ids`` (:class:`Bag`, the slide-sampling batches).
    """
    out: dict[str, list[tuple[int, torch.Tensor | None]]] = {}
    slides, index = getattr(batch, "slides", None), getattr(batch, "slide_index", None)
    for b, bag_id in enumerate(batch.slide_ids):
        if slides is None or index is None:
            out.setdefault(str(bag_id), []).append((b, None))
            continue
        for k, sid in enumerate(slides[b]):
            out.setdefault(str(sid), []).append((b, batch.mask[b] & (index[b] == k)))
    return out


def collate_bags(items: list[dict]) -> Bag:
    """Pad a list of bags to the longest one.

    Args:
        items: dicts with ``features`` (N_i, D) or (N_i, S, D) tensor, ``coords`` (N_i, 2) tensor,
            ``labels`` {target: int} and ``slide_id`` str (the bag's id); patient-level bags
            also ``slides`` (the case's slide ids) and ``slide_index`` (N_i,) int64 tensor.
    """
    n_max = max(int(it["features"].shape[0]) for it in items)
    rest = tuple(items[0]["features"].shape[1:])  # (D,) or (S, D) for multi-scale bags
    b = len(items)
    feats = torch.zeros(b, n_max, *rest, dtype=torch.float32)
    mask = torch.zeros(b, n_max, dtype=torch.bool)
    coords = torch.full((b, n_max, 2), -1, dtype=torch.int64)
    for i, it in enumerate(items):
        n = int(it["features"].shape[0])
        feats[i, :n] = it["features"].float()
        coords[i, :n] = it["coords"]
        mask[i, :n] = True
    targets = items[0]["labels"].keys()
    labels = {t: torch.tensor([int(it["labels"][t]) for it in items]) for t in targets}
    bag = Bag(feats, mask, coords, labels, [it["slide_id"] for it in items])
    if "slide_index" in items[0]:  # patient-level bags: which slide each instance is from
        bag.slides = [list(it["slides"]) for it in items]
        bag.slide_index = torch.full((b, n_max), -1, dtype=torch.int64)
        for i, it in enumerate(items):
            bag.slide_index[i, : len(it["slide_index"])] = it["slide_index"]
    return bag
