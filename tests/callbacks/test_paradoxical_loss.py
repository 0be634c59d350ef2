"""MagNets' paradoxical loss callback: the formula, its effect on gradients, per-step logging."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from tests.methods.test_magnet import TINY, batch_of, datamodule, make_slides
from wsi_lightning.callbacks.paradoxical_loss import ParadoxicalLoss, paradoxical_loss
from wsi_lightning.callbacks.roi_tree import node_names
from wsi_lightning.errors import ArgumentError
from wsi_lightning.methods.magnet import MagNet

AUX = {**TINY, "aux_layers": (1, 2)}  # (2, 2) tree: coarse = layer 1, fine = layer 2


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_slides(tmp_path_factory.mktemp("paradox_slides"), n=8)


def test_formula_true_class_hinge_and_unknown_labels():
    coarse = {"y": torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5], [0.9, 0.1]]))}
    fine = {"y": torch.log(torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5], [0.2, 0.8]]))}
    y = {"y": torch.tensor([0, 1, 1, -1])}
    # true-class P1 - P3: 0.8 - 0.6 = 0.2; 0.7 - 0.9 < 0 -> 0; 0.5 - 0.5 = 0; slide 4 unknown
    torch.testing.assert_close(paradoxical_loss(coarse, fine, y), torch.tensor(0.2 / 3))
    assert paradoxical_loss(coarse, fine, {"y": torch.full((4,), -1)}) == 0
    swapped = paradoxical_loss({**coarse, "z": fine["y"]}, {**fine, "z": coarse["y"]},
                               {"y": y["y"], "z": torch.zeros(4, dtype=torch.long)})
    torch.testing.assert_close(swapped, torch.tensor(0.2 / 3 / 2))  # z: P1 <= P3 everywhere -> 0


def grads(manifest: Path, callback: ParadoxicalLoss | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MagNet(in_dim=3, num_classes={"label": 2}, **AUX).train()
    if callback is not None:
        callback.setup(None, model, "fit")
    batch = batch_of(manifest)
    batch.labels = {"label": torch.tensor([0, 1])}
    out = model(batch)
    terms = {**model.task_loss(out, batch), **out.aux_losses}
    assert ("loss_paradoxical" in terms) == (callback is not None)
    torch.stack(list(terms.values())).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_callback_changes_the_gradients(manifest):
    base, with_l1 = grads(manifest, None), grads(manifest, ParadoxicalLoss(coarse="layer1", fine="layer2"))
    changed = [n for n in base if not torch.allclose(base[n], with_l1[n])]
    assert any(n.startswith("net.aux.layer1.") for n in changed)  # both auxiliaries
    assert any(n.startswith("net.aux.layer2.") for n in changed)
    assert any(n.startswith("net.layers.0.") for n in changed)  # and the ST stacks, via the crops
    assert not any(n.startswith(("net.backbone.", "net.gru.", "net.head.")) for n in changed)
    zero = grads(manifest, ParadoxicalLoss(weight=0.0, coarse="layer1", fine="layer2"))
    assert all(torch.allclose(base[n], zero[n]) for n in base)


def test_logged_every_step_and_removed_after(manifest, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    dm = datamodule(manifest, batch_size=1)
    model = MagNet(in_dim=3, num_classes=dm.num_classes, **AUX)
    cb = ParadoxicalLoss(coarse="layer1", fine="layer2")
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, accelerator="cpu", log_every_n_steps=1,
                        logger=CSVLogger(str(tmp_path), name="", version="logs"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    trainer.fit(model, datamodule=dm)
    df = pd.read_csv(tmp_path / "logs" / "metrics.csv")
    steps = df.dropna(subset=["train/l1_paradoxical"])
    assert sorted(steps["step"]) == [0, 1, 2] and (steps["train/l1_paradoxical"] >= 0).all()
    assert "train/loss_paradoxical" in df  # the weighted term, epoch mean, with the other terms
    assert model.extra_losses == {}  # teardown removes it


def test_arguments_and_method_checked_up_front(manifest):
    with pytest.raises(ArgumentError, match="weight"):
        ParadoxicalLoss(weight=-1)
    with pytest.raises(ArgumentError, match="different"):
        ParadoxicalLoss(coarse="layer1", fine="layer1")
    from wsi_lightning.methods.abmil import ABMIL

    with pytest.raises(ArgumentError, match="no auxiliary classifiers"):
        ParadoxicalLoss().setup(None, ABMIL(in_dim=4, num_classes={"y": 2}), "fit")
    model = MagNet(in_dim=3, num_classes={"label": 2}, **AUX)
    ParadoxicalLoss().setup(None, model, "fit")  # layer3 does not exist in a 2-layer tree
    with pytest.raises(ArgumentError, match=r"\['layer3'\].*available: \['layer1', 'layer2'\]"):
        model.task_loss(model(batch_of(manifest)), batch_of(manifest))


def test_roi_node_names():
    assert node_names((3, 2, 3), 0) == ["slide"]
    assert node_names((3, 2, 3), 2) == ["1.1", "1.2", "2.1", "2.2", "3.1", "3.2"]
    assert len(node_names((3, 2, 3, 2), 4)) == 36 and node_names((3, 2, 3), 3)[-1] == "3.2.3"
