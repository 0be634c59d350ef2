"""``MILOutput`` and the ``MILModule`` LightningModule every method builds on.

A method is a pure-torch ``nn.Module`` (``Net``) mapping a :class:`~wsi_lightning.data.batch.Bag`
to a :class:`MILOutput`, plus a registered ``MILModule`` subclass naming that net. The module
adds the task loss (a weighted sum of per-target cross-entropies) to the net's named auxiliary
losses, logs every term, computes metrics, writes per-slide predictions (per case for
patient-level bags, ``data.bag_level=case``) and keeps the last output where callbacks can
read it (``module.last_output``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wsi_lightning.analysis.metrics import TaskMetrics
from wsi_lightning.data.batch import Bag

log = logging.getLogger(__name__)

# Arguments MILModule gives every net; everything else in `method:` goes to the net.
INJECTED = ("in_dim", "num_classes")


@dataclass
class TileMap:
    """Scores over a tile set with its own geometry (e.g. one HAG-MIL level), for heat-maps
    and the cascade's lesion recall.

    Attributes:
        name: the map's name in file names (``level0``).
        attention: (B, n) the scores.
        mask: (B, n) bool, the valid rows.
        coords: (B, n, 2) level-0 top-left corners of the tiles.
        extent: tile side in level-0 pixels.
        index: (B, n) each row's tile in ``Bag.levels[l]`` (-1 pad), when the map scores a
            subset of a level (HAG-MIL's top-``t_patch`` children); None otherwise.
    """

    name: str
    attention: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    extent: float
    index: torch.Tensor | None = None


@dataclass
class RoiTree:
    """The regions a zooming method (MagNets) looked at, depth 0 (the slide image) to L (the
    leaves), in level-0 pixels of the slide.

    Attributes:
        frames: per depth d, (B, N_d, 4) boxes ``x0, y0, x1, y1``.
        patches: children per parent at each layer (N_d = prod(patches[:d])).
        theta: per depth d >= 1, (B, N_d, 3) the (scale, tx, ty) that placed each box.
        levels: per depth d < L, (B, N_d) the pyramid level the region was read from.
        scale: per layer, the learned scales.
        pixels: {"processed", "sources", "read"} values touched per slide.
        leaves: (B, N_L, 3, s, s) the leaf crops the classifier saw, or None.
    """

    frames: list[torch.Tensor]
    patches: tuple[int, ...]
    theta: list[torch.Tensor] = field(default_factory=list)
    levels: list[torch.Tensor] = field(default_factory=list)
    scale: list[torch.Tensor] = field(default_factory=list)
    pixels: dict[str, Any] = field(default_factory=dict)
    leaves: torch.Tensor | None = None


@dataclass
class MILOutput:
    """What every method returns. Callbacks read only the typed fields; ``extras`` is for
    method-internal values (embeddings, per-head weights) and tests.

    Attributes:
        logits: {target: (B, C_t)} unnormalised class scores.
        attention: (B, N) per-instance weights summing to 1 over valid instances (or
            (B, H, N) for H attention maps), None when the method has no attention.
        aux_losses: named extra losses, already weighted; added to the task loss.
        tile_scores: (B, N) per-tile scores of methods without attention (CHOWDER's s_i),
            used for heat-maps and localisation when ``attention`` is None.
        cross_scale: (B, N, S) per-tile, per-scale weights (CS-MIL).
        tile_maps: score maps over tile sets of their own geometry (HAG-MIL's levels).
        roi_tree: the regions a zooming method looked at (MagNets).
        aux_logits: {head: {target: (B, C_t)}} auxiliary classifiers' outputs (MagNets'
            per-layer classifiers; the paradoxical-loss callback compares them).
        stats: per-batch scalars the module logs (pixels per slide, mean scales).
        extras: anything else (instance logits, embeddings...).
    """

    logits: dict[str, torch.Tensor]
    attention: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    tile_scores: torch.Tensor | None = None
    cross_scale: torch.Tensor | None = None
    tile_maps: list[TileMap] = field(default_factory=list)
    roi_tree: RoiTree | None = None
    aux_logits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def _mean_by_slide(ids: list[str], probs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
    """Average the probabilities of rows sharing a slide id: (B, C) -> (U, C), first-seen order."""
    uniq = list(dict.fromkeys(ids))
    group = torch.tensor([uniq.index(i) for i in ids], device=next(iter(probs.values())).device)
    first = [ids.index(u) for u in uniq]
    out_p = {t: torch.zeros(len(uniq), p.shape[1], device=p.device).index_add_(0, group, p)
             / torch.bincount(group, minlength=len(uniq)).unsqueeze(1) for t, p in probs.items()}
    return uniq, out_p, {t: y[first] for t, y in labels.items()}


ID_COLUMNS = ("slide_id", "case_id")  # the first column of a predictions CSV: what a row is


def _bag_slides(bag: Bag) -> list[str]:
    """The slides of a batch (of every case, for patient-level bags)."""
    slides = getattr(bag, "slides", None)
    return list(bag.slide_ids) if slides is None else [sid for case in slides for sid in case]


def prediction_rows(slide_ids: list[str], probs: dict[str, Any], labels: dict[str, Any],
                    class_names: dict[str, list[str]],
                    slides: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """Rows of ``{stage}_predictions.csv``, for every method (``MILModule`` and the
    ``SlideEstimator`` baselines alike): ``slide_id``, then per target ``label`` (empty when
    unknown), ``pred`` and ``prob_<class>``, prefixed ``<target>_`` when there are several.
    Patient-level bags (``slides`` given) are one row per case: ``case_id`` and ``slide_ids``
    (the case's slides joined with ``;``) instead of ``slide_id``.

    Args:
        slide_ids: the bags' ids (case ids with ``slides``).
        probs: {target: (B, C) probabilities} (tensors or arrays); labels: {target: (B,)}.
        slides: per bag, the slides of its case (``Bag.slides``); None for slide bags.
    """
    targets = list(probs)
    rows = []
    for i, sid in enumerate(slide_ids):
        row: dict[str, Any] = ({"slide_id": sid} if slides is None
                               else {"case_id": sid, "slide_ids": ";".join(slides[i])})
        for t in targets:
            pre, names = ("" if len(targets) == 1 else f"{t}_"), class_names[t]
            y = int(labels[t][i])
            row[f"{pre}label"] = names[y] if y >= 0 else ""
            row[f"{pre}pred"] = names[int(probs[t][i].argmax())]
            for c, name in enumerate(names):
                row[f"{pre}prob_{name}"] = float(probs[t][i][c])
        rows.append(row)
    return rows


def prediction_frame(rows: list[dict[str, Any]]) -> Any:
    """Prediction rows as the CSV's DataFrame, sorted by their id column (``slide_id`` or
    ``case_id``)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    key = next((c for c in ID_COLUMNS if c in df.columns), None)
    return df if key is None else df.sort_values(key)


def net_arguments(net_cls: type[nn.Module]) -> dict[str, Any]:
    """The configurable arguments of a net: {name: default} (``inspect.Parameter.empty``
    for required ones), without the injected ``in_dim`` / ``num_classes``."""
    sig = inspect.signature(net_cls.__init__)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if n != "self" and n not in INJECTED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def module_arguments(module_cls: type) -> dict[str, Any]:
    """Arguments a MILModule subclass adds beyond MILModule's own (e.g. HAG-MIL's
    ``optimizers``): {name: default}."""
    base = set(inspect.signature(MILModule.__init__).parameters)
    out = {}
    for klass in module_cls.__mro__:
        if klass is MILModule or not issubclass(klass, MILModule):
            break
        for n, p in inspect.signature(klass.__init__).parameters.items():
            if n not in base and n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                out.setdefault(n, p.default)
    return out


class SlideEstimator:
    """A registered method that is not trained by gradient descent (the two-step patch
    baselines): ``fit(train_dataset, num_classes)`` then ``predict_proba(items)``, run on a
    feature-bag DataModule by ``run.fit``, which dispatches on this class. ``evaluate`` (the
    method module's) writes the same prediction files and metrics as an ``MILModule`` run."""

    input_kind: ClassVar[str] = "bag"

    def evaluate(self, datamodule: Any, run_dir: Path) -> dict[str, float]:
        """Fit on ``datamodule``'s train split, write ``{val,test}_predictions.csv`` into
        ``run_dir`` and return ``{"val/...", "test/...": value}``."""
        raise NotImplementedError


class MILModule(L.LightningModule):
    """Base LightningModule for bag classification.

    Args:
        in_dim: instance feature size D (injected from the data).
        num_classes: {target: number of classes} (injected from the data).
        class_names: {target: ordered class names}, for prediction files.
        optim: optimiser settings (``optim:`` section of the config).
        tag_weights: {target: loss weight}; default 1 for every target.
        class_weights: {target: [C class weights]} of the target cross-entropies
            (``loss.class_weights``, computed by the build); None: unweighted.
        max_epochs: for the cosine schedule.
        predictions_dir: where ``{stage}_predictions.csv`` are written (rank 0).
        net_kwargs: the method's own arguments (``method:`` section minus ``name``).
    """

    # The method's contract, read by the build (each a class attribute with its default):
    Net: ClassVar[type[nn.Module]]
    input_kind: ClassVar[str] = "bag"  # the data it takes: bag | multiscale | quadtree | patches | slide
    find_unused_parameters: ClassVar[bool] = False  # a backward that skips parameters (DDP must know)
    auxiliary_outputs: ClassVar[bool] = False  # MILOutput.aux_logits: auxiliary classifiers (MagNets)
    # every label cross-entropy goes through target_losses, so loss.class_weights reaches all of
    # them (False where the net computes label losses of its own: the build then refuses the key)
    class_weighted: ClassVar[bool] = True
    # and Lightning's own ``automatic_optimization`` (False: the method steps its optimisers)

    def __init__(
        self,
        in_dim: int,
        num_classes: dict[str, int],
        class_names: dict[str, list[str]] | None = None,
        optim: dict | None = None,
        tag_weights: dict[str, float] | None = None,
        class_weights: dict[str, list[float]] | None = None,
        max_epochs: int = 1,
        predictions_dir: str | None = None,
        **net_kwargs: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = self.Net(in_dim=in_dim, num_classes=dict(num_classes), **net_kwargs)
        self.targets = list(num_classes)
        self.class_names = class_names or {t: [str(i) for i in range(c)] for t, c in num_classes.items()}
        self.optim_cfg = dict(optim or {"name": "adam", "lr": 2e-4, "weight_decay": 0.0})
        self.tag_weights = {t: float((tag_weights or {}).get(t, 1.0)) for t in self.targets}
        self.class_weights = {t: torch.tensor(w, dtype=torch.float32) for t, w in (class_weights or {}).items()}
        # ModuleDict keys must not clash with nn.Module attributes ("train"): suffix them.
        self.metrics = nn.ModuleDict(
            {f"{s}_metrics": TaskMetrics(dict(num_classes)) for s in ("train", "val", "test")}
        )
        self.last_output: MILOutput | None = None
        self.extra_losses: dict[str, Callable[[MILOutput, Bag], torch.Tensor]] = {}
        self._records: list[dict] = []
        self._means: dict[str, dict[str, list]] = {}  # stage -> {name: [weighted sum, slides]}
        self._prog_bar: set[str] = set()
        self._pretrained_done = False

    # ----------------------------------------------------------------- pretrained weights
    def setup(self, stage: str) -> None:
        """Nets with a ``load_pretrained()`` (end-to-end CNNs) get their ImageNet / local weights
        when fitting starts, never at construction, so building a model or loading a checkpoint
        never downloads anything."""
        load = getattr(self.net, "load_pretrained", None)
        if stage == "fit" and load is not None and not self._pretrained_done:  # before a checkpoint is restored
            load()
            self._pretrained_done = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pretrained_done = True  # trained weights: never overwrite them with ImageNet ones

    # ----------------------------------------------------------------- forward and loss
    def forward(self, bag: Bag) -> MILOutput:
        return self.net(bag)

    def register_loss(self, name: str, fn: Callable[[MILOutput, Bag], torch.Tensor]) -> None:
        """Add ``fn(out, batch)`` (an already weighted scalar) to every step's loss as ``name``
        (how a callback adds a term, e.g. ``paradoxical_loss``, MagNets' L1)."""
        self.extra_losses[name] = fn

    def remove_loss(self, name: str) -> None:
        self.extra_losses.pop(name, None)

    def task_loss(self, out: MILOutput, bag: Bag) -> dict[str, torch.Tensor]:
        """Per-target cross-entropy (unknown labels, -1, ignored), weighted, plus the
        registered loss terms."""
        return {**self.target_losses(out, bag), **{k: fn(out, bag) for k, fn in self.extra_losses.items()}}

    def target_losses(self, out: MILOutput, bag: Bag) -> dict[str, torch.Tensor]:
        """Per-target cross-entropy (unknown labels, -1, ignored), weighted."""
        losses = {}
        for t in self.targets:
            y = bag.labels[t]
            if bool((y >= 0).any()):
                w = self.class_weights.get(t)
                ce = F.cross_entropy(out.logits[t].float(), y, ignore_index=-1,
                                     weight=None if w is None else w.to(y.device))
            else:
                ce = out.logits[t].sum() * 0.0
            losses[f"loss_{t}" if len(self.targets) > 1 else "loss_task"] = self.tag_weights[t] * ce
        return losses

    def _shared_step(self, bag: Bag, stage: str) -> torch.Tensor:
        out = self(bag)
        self.last_output = out
        terms = {**self.task_loss(out, bag), **out.aux_losses}
        loss = torch.stack([v for v in terms.values()]).sum()
        bs = len(bag)
        if stage == "train":
            self.check_finite(loss, bag)
        for k, v in terms.items():
            self.log_mean(f"{stage}/{k}", v, bs)
        self.log_mean(f"{stage}/loss", loss, bs, prog_bar=True)
        for k, v in out.stats.items():
            self.log_mean(f"{stage}/{k}", v, bs)
        probs = {t: out.logits[t].detach().float().softmax(-1) for t in self.targets}
        ids, labels = bag.slide_ids, bag.labels
        if len(set(ids)) < len(ids):  # several bags of one slide (test-time bag sampling): average
            ids, probs, labels = _mean_by_slide(ids, probs, labels)
        self.metrics[f"{stage}_metrics"].update(probs, labels)  # per bag: per slide, or per case
        if stage != "train":
            slides = getattr(bag, "slides", None)  # patient-level bags: each case's slides
            if slides is not None:
                slides_of = dict(zip(bag.slide_ids, slides, strict=True))
                slides = [slides_of[i] for i in ids]
            self._record(ids, labels, probs, slides)
        return loss

    def check_finite(self, loss: torch.Tensor, bag: Bag) -> None:
        """Stop training at a NaN / Inf loss, naming the batch's slides (a NaN loss would
        otherwise train on, leaving NaN weights and a run that predicts one class)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            from wsi_lightning.errors import WSIError

            raise WSIError(
                f"non-finite training loss ({float(loss.detach().float().sum())}) at epoch "
                f"{self.current_epoch}, step {self.global_step}, on slides {_bag_slides(bag)}; "
                "check those slides' features (wsi extract rewrites them) or lower optim.lr")

    def log_mean(self, name: str, value: torch.Tensor | float, batch_size: int, prog_bar: bool = False) -> None:
        """Log a per-batch value as its slide-weighted mean over the epoch.

        Training: Lightning's on-step / on-epoch logging (ranks see equal, padded shares).
        Validation / test: the exact mean over every slide of every rank; Lightning's
        ``sync_dist`` would average the ranks' means, wrong for the unequal, unpadded shares
        (5 slides on 2 ranks: 3 and 2), and without it the value is rank 0's alone.
        """
        stage = name.split("/", 1)[0]
        if stage == "train":
            self.log(name, value.detach() if torch.is_tensor(value) else value, batch_size=batch_size,
                     prog_bar=prog_bar, on_step=name == "train/loss", on_epoch=True, sync_dist=True)
            return
        v = value.detach().double().sum() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
        total = self._means.setdefault(stage, {}).setdefault(name, [0.0, 0])
        total[0] = total[0] + v * batch_size  # a tensor: no device sync per step
        total[1] += batch_size
        if prog_bar:
            self._prog_bar.add(name)

    def _log_means(self, stage: str) -> None:
        """Log the exact epoch means of ``log_mean`` values (gathered from every rank)."""
        local = {k: (float(s), n) for k, (s, n) in self._means.pop(stage, {}).items()}
        parts = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, local)
        sums: dict[str, list[float]] = {}
        for part in parts:
            for k, (s, n) in part.items():
                acc = sums.setdefault(k, [0.0, 0])
                acc[0], acc[1] = acc[0] + s, acc[1] + n
        for k, (s, n) in sorted(sums.items()):
            # the same value on every rank: rank_zero_only=False keeps callbacks (checkpoint,
            # early stopping) consistent across ranks
            self.log(k, s / max(n, 1), prog_bar=k in self._prog_bar, sync_dist=False, rank_zero_only=False)

    def training_step(self, bag: Bag, batch_idx: int) -> torch.Tensor:
        return self._shared_step(bag, "train")

    def validation_step(self, bag: Bag, batch_idx: int) -> torch.Tensor:
        return self._shared_step(bag, "val")

    def test_step(self, bag: Bag, batch_idx: int) -> torch.Tensor:
        return self._shared_step(bag, "test")

    def predict_step(self, bag: Bag, batch_idx: int) -> MILOutput:
        return self(bag)

    # ----------------------------------------------------------------- epoch ends
    def _epoch_end(self, stage: str) -> None:
        if stage != "train":
            self._log_means(stage)
        vals = self.metrics[f"{stage}_metrics"].compute(stage)
        self.metrics[f"{stage}_metrics"].reset()
        # torchmetrics already synchronised the states across ranks: no sync_dist here.
        self.log_dict(vals, prog_bar=stage == "val")
        if stage != "train":
            self._write_records(stage)

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_start(self) -> None:
        self._records = []
        self._means.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._epoch_end("val")
        else:
            self.metrics["val_metrics"].reset()
            self._records = []
            self._means.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._records = []
        self._means.pop("test", None)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ----------------------------------------------------------------- predictions
    def _record(self, slide_ids: list[str], labels: dict[str, torch.Tensor], probs: dict[str, torch.Tensor],
                slides: list[list[str]] | None = None) -> None:
        self._records += prediction_rows(slide_ids, {t: probs[t].cpu() for t in self.targets}, labels,
                                         self.class_names, slides)

    def gathered_records(self) -> list[dict]:
        """This epoch's prediction rows from every rank (each slide once)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, self._records)
            return [r for part in parts for r in part]
        return list(self._records)

    def _write_records(self, stage: str) -> None:
        rows = self.gathered_records()
        pdir = self.hparams.get("predictions_dir")
        if not pdir or not self.trainer.is_global_zero or not rows:
            return
        path = Path(pdir) / f"{stage}_predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        prediction_frame(rows).to_csv(path, index=False)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        return self.build_optimizer(list(self.parameters()))

    def build_optimizer(self, params: list[nn.Parameter]) -> Any:
        """The ``optim:`` optimiser (and cosine schedule) over ``params``, in Lightning's form."""
        o = self.optim_cfg
        name = o.get("name", "adam")
        lr, wd = float(o.get("lr", 2e-4)), float(o.get("weight_decay", 0.0))
        params = [p for p in params if p.requires_grad]
        if name == "sgd":
            opt = torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(o.get("momentum", 0.9)))
        else:
            cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
            opt = cls(params, lr=lr, weight_decay=wd, betas=tuple(o.get("betas", (0.9, 0.999))))
        if o.get("scheduler", "none") == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, int(self.hparams.max_epochs)), eta_min=float(o.get("min_lr", 0.0))
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        return opt
