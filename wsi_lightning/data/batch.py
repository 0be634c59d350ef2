"""Batch types and collation for bags of instances (tiles)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """

    features: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    slide_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.features.shape[0]


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
