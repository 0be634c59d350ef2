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


def quadtree_bag(d: int, b: int = 2, n0: int = 3, levels: int = 3, pad_to: int | None = None,
                 seed: int = 0) -> Bag:
    """B quadtree bags (every parent has 4 children, HAG-MIL order); bag i has ``n0 - i``
    coarse tiles. Valid features depend on (seed, bag, level) only, so a padded copy
    (``pad_to`` coarse rows, padding filled with large garbage) holds the same bags."""
    from wsi_lightning.data.batch import LevelSet

    sets = []
    for lvl in range(levels):
        n_max = (pad_to or n0) * 4**lvl
        feats = torch.full((b, n_max, d), 0.0)
        mask = torch.zeros(b, n_max, dtype=torch.bool)
        parent = torch.full((b, n_max), -1, dtype=torch.long)
        coords = torch.full((b, n_max, 2), -1, dtype=torch.long)
        for i in range(b):
            n = (n0 - i) * 4**lvl
            g = torch.Generator().manual_seed(seed * 1000 + i * 10 + lvl)
            feats[i, :n] = torch.randn(n, d, generator=g)
            if pad_to:
                feats[i, n:] = 1e3 * torch.randn(n_max - n, d, generator=g)
            mask[i, :n] = True
            coords[i, :n, 0] = torch.arange(n) * 64
            if lvl:
                parent[i, :n] = torch.arange(n) // 4
        extent = 64 * 2 ** (levels - 1 - lvl)
        sets.append(LevelSet(feats * mask[..., None] if not pad_to else feats, mask, coords, parent,
                             extent, 0.5 * 2 ** (levels - 1 - lvl)))
    fin = sets[-1]
    return Bag(fin.features, fin.mask, fin.coords, {}, [f"s{i}" for i in range(b)], sets)


# Test settings of the registered methods (never production code): the same code at small
# widths (paper widths take minutes on CPU) ...
CONTRACT_KWARGS: dict[str, dict] = {
    "gcn": {"hidden_dims": (16, 16)},
    "hag_mil": {"hidden_dims": (32, 48, 16, 32), "final_dim": 32, "attn_dim": 16, "gate_dim": 8, "heads": 2},
    "transmil": {"embed_dim": 32, "heads": 4},
    "end_to_end": {"backbone": "demo_cnn", "pretrained": False, "resize": None, "crop": 24, "mil": "abmil"},
    "magnet": {"patches": (2, 2), "in_size": 16, "source_size": 32, "last_source_size": 32, "leaf_size": 32, "backbone": "demo_cnn", "aux_backbone": "demo_cnn", "pretrained": False, "aux_layers": (1, 2), "gru_hidden": 16, "mlp": (16, 8), "lin_samples": 4, "grey_tol": None},
    "patch_transformer": {"attn_dim": 8},
    "two_branches": {"embed_dim": 16, "attn_dim": 8},
}
# ... and parameters whose gradient is 0 by design: the bias of an attention score feeds only
# a softmax (shift-invariant)
ZERO_GRAD_PARAMS: dict[str, tuple[str, ...]] = {
    "hag_mil": (".score.c.bias",),
    "clam_sb": (".score.c.bias",),
}
