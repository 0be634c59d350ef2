"""Batch types and collation for bags of instances (tiles)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        coords: (B, N, 2) int64 level-0 (x, y) of each instance; -1 for padding.
        labels: {target: (B,) int64 class index}; -1 where unknown.
        slide_ids: B slide identifiers.
        levels: quadtree bags only (:mod:`wsi_lightning.data.quadtree`): one
            :class:`LevelSet` per level, coarsest first; ``features`` etc. are then the finest
            level's.
    """

    features: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    slide_ids: list[str] = field(default_factory=list)
    levels: list[LevelSet] | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str) -> Bag:
        """The same bags on ``device`` (quadtree levels included)."""
        levels = None if self.levels is None else [lv.to(device) for lv in self.levels]
        return Bag(self.features.to(device), self.mask.to(device), self.coords.to(device),
                   {t: v.to(device) for t, v in self.labels.items()}, self.slide_ids, levels)


def collate_bags(items: list[dict]) -> Bag:
    """Pad a list of bags to the longest one.

    Args:
        items: dicts with ``features`` (N_i, D) or (N_i, S, D) tensor, ``coords`` (N_i, 2) tensor,
            ``labels`` {target: int} and ``slide_id`` str.
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
    return Bag(feats, mask, coords, labels, [it["slide_id"] for it in items])
