"""Small bag builders shared by method tests."""

from __future__ import annotations

import torch

from wsi_lightning.data.batch import Bag


def tiny_bag(d: int, b: int = 2, n: int = 10, seed: int = 0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n - 3:] = False
    feats = torch.randn(b, n, d, generator=g).masked_fill(~mask[..., None], 0.0)
    return Bag(feats, mask, torch.zeros(b, n, 2, dtype=torch.long), {}, [f"s{i}" for i in range(b)])
