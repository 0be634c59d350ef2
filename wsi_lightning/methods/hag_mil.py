"""HAG-MIL: hierarchical attention-guided MIL with the Integrated Attention Transformer
(Xiong et al., "Diagnose like a pathologist: transformer-enabled hierarchical attention-guided
multiple instance learning for whole slide image classification", IJCAI 2023; docs/methods.md §2).

One :class:`~wsi_lightning.nn.iat.IATModel` per quadtree level (coarsest first). A slide is
classified as a cascade (docs/methods.md §2.3): the coarsest level scores all its tiles; the ``t_patch`` tiles
with the highest raw attention of the last IAM block are expanded to their children at the next
level (found through the explicit parent indices of the quadtree bag, in parent-rank then
HAG-MIL child order), which the next model scores, and so on down to the finest level, whose
softmax is the prediction. Training steps each level's model on its own loss before the next
level runs (Lightning manual optimisation): ``bag_weight * CE(+label smoothing above the finest
level) + inst_weight * instance-clustering loss``. The selection is a detached top-k of indices,
so no gradient crosses levels; memory is bounded by ``t_patch`` (at most 4 * t_patch tiles below
the coarsest level), not by the slide.

Input: quadtree bags (``tiling.multiscale.mode=quadtree``, ``Bag.levels``).

Deviations from paper (and from its code):
    - Optimisers: one Adam per level by default (``optimizers=per_level``). The official code
      has one Adam over all three models and zeroes gradients to zeros between level steps, so
      each step also applies weight decay and stale momentum to the other two models (register
      item 7); ``optimizers=shared`` reproduces that (zero_grad with ``set_to_none=False``).
    - Admin residual: ω computed for 8 residual layers as admin-torch's default O(log n) setting
      (``admin=false`` gives the plain residual the spec allows, docs/methods.md register item 9).
    - Bags are padded batches (the code runs one slide at a time); a selection never includes
      padding, and ``t_patch`` / ``v_patch`` apply per bag.
    - Multi-target tasks (not in the paper): every extra target gets its own linear head on
      each level's combined slide vector; the instance loss uses the first target's labels.
    - ``select=blocks`` (not in the paper; the demo's setting): a level's tiles are ranked for
      the next level by the mean of every IAM block's softmax attention, not by the last
      block's raw attention, and that mean is the level's map. The classifier reads all the
      blocks' pooled vectors, and nothing makes the last block's attention the one that finds
      the lesions: on the zoom demo (validation slides, seeds 0-2, paper instance loss) the
      last block ranked the coarsest level's lesion tiles at AUC 0.42 / 0.42 / 0.87, the mean
      over blocks at 0.98 / 0.87 / 0.95. ``select=last`` (the default) is the paper.
    - Validation/test loss: finest-level terms only, as the code; during training the logged
      ``train/loss`` is the sum of the levels' losses.
    - The finest level's attention is returned over all of its tiles (0 for tiles the cascade
      did not select), and every level's attention over its scored tiles is in
      ``MILOutput.tile_maps`` (level-0 coordinates), so the attention logger draws a heat-map per
      level; each map's ``index`` ((B, n) int64, -1 at padding) gives the scored tiles' rows in
      ``bag.levels[l]``, from which the ``mechanism`` callback measures the cascade's recall of
      lesion tiles.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.errors import ConfigError
from wsi_lightning.methods.base import MILModule, MILOutput, TileMap
from wsi_lightning.nn.iat import IATModel
from wsi_lightning.registry import METHODS

OPTIMIZERS = ("per_level", "shared")
SELECT = ("last", "blocks")


def select_children(scores: torch.Tensor, index: torch.Tensor, child_parent: torch.Tensor,
                    keep: int) -> torch.Tensor:
    """HAG-MIL's selection: the children of the ``keep`` best-scored tiles of each bag.

    Args:
        scores: (B, M) raw attention of the scored tiles (any value at padding).
        index: (B, M) int64 index of each scored tile within its level; -1 at padding.
        child_parent: (B, N_next) int64 parent index (within the scored level) of every tile of
            the next level; -1 at padding.
        keep: number of parents kept per bag (all when the bag has fewer).

    Returns:
        (B, K) int64 indices into the next level, -1-padded: children of the best parent first,
        each parent's children in their stored (HAG-MIL) order.
    """
    b = child_parent.shape[0]
    out = []
    for i in range(b):
        valid = index[i] >= 0
        order = torch.argsort(scores[i][valid].detach(), descending=True, stable=True)[:keep]
        parents = index[i][valid][order]  # (k,) best first
        cp = child_parent[i]  # (N_next,)
        size = int(torch.maximum(cp.max(), index[i].max()).clamp(min=0)) + 1
        never = len(parents)  # rank of a parent that was not selected
        rank = torch.full((size,), never, dtype=torch.int64, device=index.device)
        rank[parents] = torch.arange(len(parents), device=index.device)
        child_rank = torch.where(cp >= 0, rank[cp.clamp(min=0)], never)  # (N_next,)
        picked = torch.argsort(child_rank, stable=True)[: int((child_rank < never).sum())]
        out.append(picked)
    width = max(1, max(len(p) for p in out))
    result = torch.full((b, width), -1, dtype=torch.int64, device=index.device)
    for i, p in enumerate(out):
        result[i, : len(p)] = p
    return result


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) rows at index (B, K) (-1 -> row 0, to be masked): (B, K, ...)."""
    idx = index.clamp(min=0).view(*index.shape, *([1] * (x.dim() - 2)))
    return torch.gather(x, 1, idx.expand(-1, -1, *x.shape[2:]))


class HAGMILNet(nn.Module):
    """Args:
        in_dim: feature size D of every level.
        num_classes: {target: C}.
        n_levels: quadtree levels (3 in the paper).
        t_patch: parents expanded per level in training (7000).
        v_patch: parents expanded per level at validation / test (10000).
        bag_weight / inst_weight: weights of the bag CE and the instance loss (0.5 / 0.5).
        label_smoothing: CE label smoothing above the finest level (0.1).
        hidden_dims, final_dim, dropout, k_sample, gated, admin, attn_dim, gate_dim, heads,
            num_landmarks, inst_loss: per-level :class:`IATModel` settings.
        select: which attention ranks a level's tiles for the next level and is its map:
            ``last`` (the last IAM block's, the paper and code) or ``blocks`` (the mean of every
            block's softmax attention, the blocks whose vectors the classifier combines).
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], n_levels: int = 3,
                 t_patch: int = 7000, v_patch: int = 10000, bag_weight: float = 0.5,
                 inst_weight: float = 0.5, label_smoothing: float = 0.1,
                 hidden_dims: tuple[int, ...] = (1024, 1536, 512, 1024), final_dim: int = 1024,
                 dropout: float = 0.25, k_sample: int = 8, gated: bool = True, admin: bool = True,
                 attn_dim: int = 512, gate_dim: int = 256, heads: int = 8,
                 num_landmarks: int | None = None, inst_loss: str = "svm", select: str = "last") -> None:
        super().__init__()
        if select not in SELECT:
            raise ConfigError(f"hag_mil: select={select!r}; expected one of {list(SELECT)}")
        if n_levels < 1 or t_patch < 1 or v_patch < 1:
            raise ConfigError(f"hag_mil: n_levels={n_levels}, t_patch={t_patch}, v_patch={v_patch}; "
                              "expected integers >= 1")
        self.targets = list(num_classes)
        first = num_classes[self.targets[0]]
        self.models = nn.ModuleList(
            IATModel(in_dim, tuple(hidden_dims), final_dim=final_dim, n_classes=first, dropout=dropout,
                     k_sample=k_sample, gated=gated, admin=admin, attn_dim=attn_dim, gate_dim=gate_dim,
                     heads=heads, num_landmarks=num_landmarks, inst_loss=inst_loss)
            for _ in range(n_levels))
        self.extra_heads = nn.ModuleList(
            nn.ModuleDict({t: nn.Linear(final_dim, c) for t, c in list(num_classes.items())[1:]})
            for _ in range(n_levels))
        self.n_levels, self.t_patch, self.v_patch, self.select = n_levels, t_patch, v_patch, select
        self.bag_weight, self.inst_weight, self.label_smoothing = bag_weight, inst_weight, label_smoothing

    # ------------------------------------------------------------------ one level
    def level(self, lvl: int, bag: Bag, index: torch.Tensor | None) -> dict[str, Any]:
        """Score the tiles ``index`` (B, K) of level ``lvl`` (None = all): logits, attention,
        the level's loss terms (when labels are known) and the tiles' coordinates."""
        lv = bag.levels[lvl]
        if index is None:
            index = torch.where(lv.mask, torch.arange(lv.mask.shape[1], device=lv.mask.device), -1)
            x, mask, coords = lv.features, lv.mask, lv.coords
        else:
            mask = index >= 0
            x = _gather(lv.features, index) * mask[..., None]  # (B, K, D)
            coords = _gather(lv.coords, index)
        y = bag.labels.get(self.targets[0]) if bag.labels else None
        out = self.models[lvl](x, mask, labels=y)
        logits = {self.targets[0]: out.logits}
        for t, head in self.extra_heads[lvl].items():
            logits[t] = head(out.embedding)
        terms = {}
        if bag.labels:
            smooth = self.label_smoothing if lvl < self.n_levels - 1 else 0.0
            ce = [F.cross_entropy(logits[t].float(), bag.labels[t], ignore_index=-1, label_smoothing=smooth)
                  for t in self.targets if bool((bag.labels[t] >= 0).any())]
            if ce:
                terms["bag"] = self.bag_weight * torch.stack(ce).sum()
            if out.instance_loss is not None:
                terms["inst"] = self.inst_weight * out.instance_loss
        if self.select == "blocks":  # (B, n_blocks, K) -> (B, K), still summing to 1
            attention = out.block_attention.mean(1)
            scores = attention.masked_fill(~mask, float("-inf"))
        else:
            attention, scores = out.attention, out.attention_raw
        return {"logits": logits, "scores": scores, "attention": attention,
                "index": index, "mask": mask, "coords": coords, "terms": terms}

    def cascade(self, bag: Bag, keep: int, after_level=None) -> list[dict[str, Any]]:
        """Run every level, coarsest first; ``after_level(lvl, result)`` is called after each
        (training steps the level's optimiser there, before the next level runs)."""
        if bag.levels is None or len(bag.levels) != self.n_levels:
            have = "no levels" if bag.levels is None else f"{len(bag.levels)} levels"
            raise ConfigError(f"hag_mil needs quadtree bags with {self.n_levels} levels, got {have}; "
                              "set tiling.multiscale.mode=quadtree and tiling.multiscale.levels="
                              f"{self.n_levels} (and data.quadtree.level=null)")
        results, index = [], None
        for lvl in range(self.n_levels):
            res = self.level(lvl, bag, index)
            if after_level is not None:
                after_level(lvl, res)
            results.append(res)
            if lvl < self.n_levels - 1:
                with torch.no_grad():
                    index = select_children(res["scores"], res["index"],
                                            bag.levels[lvl + 1].parent, keep)
        return results

    def forward(self, bag: Bag) -> MILOutput:
        results = self.cascade(bag, self.t_patch if self.training else self.v_patch)
        last = results[-1]
        # finest-level attention over all of its tiles (0 where the cascade did not look)
        full = torch.zeros(bag.mask.shape, dtype=last["attention"].dtype, device=bag.mask.device)
        full.scatter_add_(1, last["index"].clamp(min=0), last["attention"] * last["mask"])
        aux = {"inst": last["terms"]["inst"]} if "inst" in last["terms"] else {}
        if self.training:  # the coarser levels' own losses (each reaches only its own model)
            for lvl, res in enumerate(results[:-1]):
                for k, v in res["terms"].items():
                    aux[f"level{lvl}_{k}"] = v
        maps = [TileMap(f"level{lvl}", r["attention"].detach(), r["mask"], r["coords"], bag.levels[lvl].extent,
                        r["index"]) for lvl, r in enumerate(results)]  # index: (B, n) rows in the level, -1 pad
        return MILOutput(last["logits"], full, aux, tile_maps=maps)


@METHODS.register("hag_mil")
class HAGMIL(MILModule):
    """HAG-MIL with Lightning manual optimisation: one optimiser step per level per batch.

    Args (beyond the net's): optimizers: ``per_level`` (default) or ``shared`` (the code).
    """

    Net = HAGMILNet
    input_kind = "quadtree"
    class_weighted = False  # each level's CE is the net's own
    find_unused_parameters = True  # each level's backward reaches one model (DDP must know)
    automatic_optimization = False  # one optimiser step per level per batch (training_step)
    def __init__(self, *args: Any, optimizers: str = "per_level", **kwargs: Any) -> None:
        if optimizers not in OPTIMIZERS:
            raise ConfigError(f"hag_mil: optimizers={optimizers!r}; expected one of {list(OPTIMIZERS)}")
        super().__init__(*args, **kwargs)
        self.optimizers_mode = optimizers

    def target_losses(self, out: MILOutput, bag: Bag) -> dict[str, torch.Tensor]:
        return {k: self.net.bag_weight * v for k, v in super().target_losses(out, bag).items()}

    def training_step(self, bag: Bag, batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        total: list[torch.Tensor] = []

        def step(lvl: int, res: dict[str, Any]) -> None:
            if not res["terms"]:
                return
            loss = torch.stack(list(res["terms"].values())).sum()
            self.check_finite(loss, bag)
            opt = opts[lvl] if self.optimizers_mode == "per_level" else opts[0]
            opt.zero_grad(set_to_none=self.optimizers_mode == "per_level")
            self.manual_backward(loss)
            opt.step()
            total.append(loss.detach())
            bs = len(bag)
            for k, v in res["terms"].items():
                self.log_mean(f"train/level{lvl}_{k}", v, bs)

        results = self.net.cascade(bag, self.net.t_patch, after_level=step)
        loss = torch.stack(total).sum() if total else torch.zeros((), device=self.device)
        self.log("train/loss", loss, batch_size=len(bag), prog_bar=True, on_step=True, on_epoch=True,
                 sync_dist=True)
        probs = {t: v.detach().float().softmax(-1) for t, v in results[-1]["logits"].items()}
        self.metrics["train_metrics"].update(probs, bag.labels)
        return loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        scheds = self.lr_schedulers()
        for s in scheds if isinstance(scheds, list) else ([scheds] if scheds is not None else []):
            s.step()

    def configure_optimizers(self) -> Any:
        if self.optimizers_mode == "shared":
            return self.build_optimizer(list(self.parameters()))
        groups = [list(m.parameters()) + list(h.parameters())
                  for m, h in zip(self.net.models, self.net.extra_heads, strict=True)]
        built = [self.build_optimizer(g) for g in groups]
        opts = [b["optimizer"] if isinstance(b, dict) else b for b in built]
        scheds = [b["lr_scheduler"] for b in built if isinstance(b, dict)]
        return (opts, scheds) if scheds else opts
