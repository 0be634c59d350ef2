"""Piece-wise interpretability (Pirovano et al., iMIMIC 2020; ``docs/methods.md`` section 5).

Works on any net with the piece-wise interface of CHOWDER / attention MIL:

* ``tile_logits(d, mask) -> (B, N)``: per-tile score before any normalisation over the slide
  (each tile's logit depends on its own features only);
* ``tile_scores(d, mask) -> (B, N)``: the scores ``s_ij`` the aggregator uses;
* ``aggregate(s, d, mask) -> (descriptor (B, M), descriptor_tiles (B, M) or None)``;
* ``classify(descriptor) -> {target: (B, C)}``.

Q1: ``A_c = sum_{i predicted c} |dP_ic / dD_i|``, top-L positions ``K_c``.
Q2: tiles ``J_c`` behind those positions; ``a_c = sum_{(i,j) in J_c} |ds_ij / dd_ij|`` (or
gradient x input), top-l features ``k_c``.
Heat-map: ``H_c,ij = mean_{k in k_c} (d_ijk - min_k) / (max_k - min_k)`` with min / max over all
evaluated tiles; localisation AUC of H (and of the model's tile scores) against tile ground
truth. Because the attributions are absolute values, a selected feature may carry its evidence
as a *low* activation, which inverts H; the "oriented" heat-map flips such features (those
lower on the selected tiles J_c than on average) and is reported beside the paper's.

Choices where the paper is silent (docs/methods.md register items 22-24), all options:
    - ``gradient``: ``grad_x_input`` (default) or ``grad``. For CHOWDER's linear scorer the plain
      gradient is the weight vector for every tile, so ``k_c`` would not depend on ``J_c``.
    - ``tile_selection``: ``extremes`` (the tiles whose scores fill the positions K_c, CHOWDER;
      replaces the paper's hand-set thresholds -5 / 11), ``contribution`` (per slide, the tiles
      contributing most to D_i[K_c], i.e. largest ``s_ij * sum_k |d_ijk|``), or ``attention``
      (highest s_ij). ``auto`` = extremes when the aggregator reports tile indices, else
      contribution.
    - For softmax-normalised scores the local derivative ``ds_j/dd_j = s_j (1 - s_j) da_j/dd_j``
      is used (the coupling through the other tiles' normaliser is left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

GRADIENTS = ("grad_x_input", "grad")
SELECTIONS = ("auto", "extremes", "contribution", "attention")


@dataclass
class SlideEval:
    """Per-slide results of the forward pass (first target)."""

    slide_id: str
    features: torch.Tensor  # (N, D)
    coords: np.ndarray  # (N, 2)
    label: int
    scores: np.ndarray  # (N,) s_ij
    probs: np.ndarray  # (C,)
    pred: int
    desc_grad: np.ndarray  # (M,) |dP_pred / dD|
    desc_tiles: np.ndarray | None  # (M,) tile index behind each descriptor entry


def is_piecewise(net: torch.nn.Module) -> bool:
    return all(hasattr(net, a) for a in ("tile_logits", "tile_scores", "aggregate", "classify"))


def evaluate_slides(net: torch.nn.Module, bags: list[tuple[str, torch.Tensor, np.ndarray, int]],
                    target: str) -> list[SlideEval]:
    """Forward every slide and take ``|dP_{pred} / dD|`` (Q1's per-slide term).

    Args:
        bags: (slide_id, features (N, D), coords (N, 2), label index) per slide.
    """
    out = []
    for sid, d, coords, label in bags:
        d = d.float()[None]  # (1, N, D)
        mask = torch.ones(d.shape[:2], dtype=torch.bool)
        with torch.no_grad():
            s = net.tile_scores(d, mask)  # (1, N)
            desc, tiles = net.aggregate(s, d, mask)  # (1, M)
        desc = desc.detach().requires_grad_(True)
        probs = net.classify(desc)[target].softmax(-1)[0]  # (C,)
        pred = int(probs.argmax())
        (g,) = torch.autograd.grad(probs[pred], desc)
        out.append(SlideEval(sid, d[0], coords, label, s[0].numpy(), probs.detach().numpy(), pred,
                             g[0].abs().numpy(), None if tiles is None else tiles[0].numpy()))
    return out


def descriptor_attribution(evals: list[SlideEval], c: int) -> np.ndarray:
    """Q1: ``A_c`` (M,), summed over slides predicted as class c (zeros if none)."""
    rows = [e.desc_grad for e in evals if e.pred == c]
    return np.sum(rows, 0) if rows else np.zeros_like(evals[0].desc_grad)


def select_tiles(evals: list[SlideEval], c: int, positions: np.ndarray, mode: str = "auto",
                 tiles_per_slide: int = 10) -> list[tuple[int, int]]:
    """Q2's ``J_c``: (slide index, tile index) pairs from slides predicted as c."""
    if mode not in SELECTIONS:
        raise ValueError(f"tile_selection '{mode}'; expected one of {list(SELECTIONS)}")
    if mode == "auto":
        mode = "extremes" if evals and evals[0].desc_tiles is not None else "contribution"
    out: list[tuple[int, int]] = []
    for i, e in enumerate(evals):
        if e.pred != c:
            continue
        if mode == "extremes":
            if e.desc_tiles is None:
                raise ValueError("tile_selection=extremes needs an aggregator that reports tile indices (CHOWDER)")
            tiles = np.unique(e.desc_tiles[positions])
        else:
            if mode == "attention":
                rank = e.scores
            else:
                rank = e.scores * e.features[:, torch.as_tensor(positions)].abs().sum(1).numpy()
            tiles = np.argsort(-rank)[:tiles_per_slide]
        out += [(i, int(t)) for t in tiles]
    return out


def tile_attribution(net: torch.nn.Module, evals: list[SlideEval], pairs: list[tuple[int, int]],
                     gradient: str = "grad_x_input") -> np.ndarray:
    """Q2: ``a_c`` (D,) = mean over J_c of |ds_ij / dd_ij| (times d_ij for grad_x_input)."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient '{gradient}'; expected one of {list(GRADIENTS)}")
    dim = evals[0].features.shape[1]
    total, count = np.zeros(dim), 0
    by_slide: dict[int, list[int]] = {}
    for i, j in pairs:
        by_slide.setdefault(i, []).append(j)
    for i, tiles in by_slide.items():
        d = evals[i].features[None].clone().requires_grad_(True)  # (1, N, D)
        mask = torch.ones(d.shape[:2], dtype=torch.bool)
        logits = net.tile_logits(d, mask)[0]  # (N,)
        (g,) = torch.autograd.grad(logits[tiles].sum(), d)  # row j = da_j / dd_j
        g = g[0, tiles]  # (T, D)
        with torch.no_grad():
            s = net.tile_scores(d, mask)[0, tiles]  # (T,)
            if getattr(net, "normalised_scores", False):  # softmax over tiles: chain rule
                g = g * (s * (1 - s))[:, None]
            if gradient == "grad_x_input":
                g = g * d[0, tiles]
        total += g.abs().sum(0).numpy()
        count += len(tiles)
    return total / max(count, 1)


def feature_heatmaps(evals: list[SlideEval], features: np.ndarray,
                     signs: np.ndarray | None = None) -> list[np.ndarray]:
    """``H`` per slide: mean over ``features`` of per-feature min-max normalised activations,
    min / max over every tile of every evaluated slide. Returns one (N_i,) array per slide.

    ``signs`` (K,) of +-1 flips features whose evidence is a *low* activation (1 - normalised);
    None is the paper's heat-map (every feature counts by its activation).
    """
    k = torch.as_tensor(features)
    acts = [e.features[:, k].numpy() for e in evals]  # (N_i, K)
    allv = np.concatenate(acts, 0)
    lo, hi = allv.min(0), allv.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    flip = np.zeros(len(features), bool) if signs is None else np.asarray(signs) < 0
    return [np.where(flip, 1.0 - (a - lo) / span, (a - lo) / span).mean(1) for a in acts]


def feature_orientation(evals: list[SlideEval], pairs: list[tuple[int, int]],
                        features: np.ndarray) -> np.ndarray:
    """(K,) +1 where a feature is higher on the selected tiles J_c than on all tiles, else -1.

    The attributions are absolute values, so they say *which* features matter, not in which
    direction; this orients each feature by the tiles that drove the class."""
    k = torch.as_tensor(features)
    sel = np.stack([evals[i].features[j, k].numpy() for i, j in pairs]) if pairs else None
    allv = np.concatenate([e.features[:, k].numpy() for e in evals], 0)
    if sel is None:
        return np.ones(len(features))
    return np.where(sel.mean(0) >= allv.mean(0), 1.0, -1.0)


def localisation_auc(pred: list[np.ndarray], gt: list[np.ndarray]) -> float:
    """ROC AUC of tile predictions pooled over slides; NaN when only one class is present."""
    y = np.concatenate(gt).astype(int) if gt else np.zeros(0, int)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.concatenate(pred)))
