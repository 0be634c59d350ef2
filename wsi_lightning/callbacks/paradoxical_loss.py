"""MagNets' paradoxical loss L1 (Dimitriou et al., 2024; ``docs/methods.md`` 4.6), as a callback.

Finer, deeper crops should classify a slide at least as well as coarse ones::

    L1 = (1/M) Σ_i max(P1_i - P3_i, 0)

where P1_i, P3_i are the probabilities the coarse (layer-1) and fine (layer-3) auxiliary
classifiers give slide i's true class and M is the number of slides in the batch. Both
auxiliaries get its gradient, and through the sampled crops so do the magnifying layers.

Listing ``{name: paradoxical_loss}`` in an experiment's ``callbacks:`` switches it on (dropping
it is Table 1's "without L1"). The callback needs a method that accepts extra loss terms
(``MILModule.register_loss(name, fn)``; ``auxiliary_outputs`` methods, e.g. ``magnet``) and whose ``MILOutput.aux_logits``
holds ``{head name: {target: (B, C) logits}}``. The weighted term joins the step's loss as
``loss_paradoxical`` (epoch means ``{stage}/loss_paradoxical``), and its unweighted value is
logged at every training step as ``train/l1_paradoxical`` (written by the loggers every
``trainer.log_every_n_steps`` steps; the MagNet experiments set 1).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from wsi_lightning.errors import ArgumentError
from wsi_lightning.registry import CALLBACKS


def paradoxical_loss(coarse: dict[str, torch.Tensor], fine: dict[str, torch.Tensor],
                     labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean hinge of the true-class probability drop from the coarse to the fine classifier.

    Args:
        coarse: {target: (B, C)} logits of the coarse (layer-1) auxiliary classifier.
        fine: {target: (B, C)} logits of the fine (layer-3) auxiliary classifier.
        labels: {target: (B,)} class indices; -1 (unknown) rows are left out.

    Returns:
        () the mean over targets of ``mean_i max(P1_i - P3_i, 0)``; 0 without known labels.
    """
    terms = []
    for t, y in labels.items():
        keep = y >= 0
        if t not in coarse or not bool(keep.any()):
            continue
        idx = y[keep][:, None]  # (M, 1)
        p1 = coarse[t][keep].float().softmax(-1).gather(1, idx)[:, 0]  # (M,) true-class prob.
        p3 = fine[t][keep].float().softmax(-1).gather(1, idx)[:, 0]
        terms.append((p1 - p3).clamp_min(0).mean())
    if not terms:
        return next(iter(coarse.values())).sum() * 0.0
    return torch.stack(terms).mean()


@CALLBACKS.register("paradoxical_loss")
class ParadoxicalLoss(L.Callback):
    """Add MagNets' L1 to the training objective of a method with auxiliary classifiers.

    Args:
        weight: multiplier of L1 in the loss (the paper's total is unweighted: 1).
        coarse: ``MILOutput.aux_logits`` key of the coarse classifier (``layer1``).
        fine: key of the fine classifier (``layer3``).
    """

    name = "loss_paradoxical"

    def __init__(self, weight: float = 1.0, coarse: str = "layer1", fine: str = "layer3") -> None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ArgumentError(f"paradoxical_loss: weight={weight!r}; expected a number >= 0")
        for key, val in (("coarse", coarse), ("fine", fine)):
            if not isinstance(val, str) or not val:
                raise ArgumentError(f"paradoxical_loss: {key}={val!r}; expected an auxiliary "
                                    "classifier name such as 'layer1'")
        if coarse == fine:
            raise ArgumentError(f"paradoxical_loss: coarse and fine are both {coarse!r}; they must "
                                "name two different auxiliary classifiers")
        self.weight, self.coarse, self.fine = float(weight), coarse, fine

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not getattr(type(pl_module), "auxiliary_outputs", False) or not callable(getattr(pl_module, "register_loss", None)):
            raise ArgumentError(f"paradoxical_loss: {type(pl_module).__name__} has no auxiliary "
                                "classifiers to compare (MILModule.auxiliary_outputs); use it with a "
                                "method that has them (magnet) or drop it from callbacks")

        def loss(out: Any, batch: Any) -> torch.Tensor:
            aux = getattr(out, "aux_logits", None) or {}
            missing = [k for k in (self.coarse, self.fine) if k not in aux]
            if missing:
                raise ArgumentError(f"paradoxical_loss: the method's outputs have no auxiliary "
                                    f"classifier(s) {missing}; available: {sorted(aux)} (set "
                                    "coarse / fine, or method.aux_layers)")
            value = paradoxical_loss(aux[self.coarse], aux[self.fine], batch.labels)
            if trainer is not None and pl_module.training:
                pl_module.log("train/l1_paradoxical", value.detach(), batch_size=len(batch),
                              on_step=True, on_epoch=False)
            return self.weight * value

        pl_module.register_loss(self.name, loss)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        remove = getattr(pl_module, "remove_loss", None)
        if callable(remove):
            remove(self.name)
