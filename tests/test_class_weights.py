"""loss.class_weights: the balanced rule, explicit weights, the checks, and the weighted loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_lightning import build, config
from wsi_lightning.data.batch import Bag
from wsi_lightning.errors import ConfigError
from wsi_lightning.methods.base import MILOutput
from wsi_lightning.registry import METHODS


def test_balanced_is_n_over_classes_times_count():
    labels = {"label": np.array([0, 0, 0, 0, 1, -1, 2, 2]), "tag": np.array([1, 1, 1, 1, 1, 0, 0, 0])}
    w = build.class_weights("balanced", {"label": 4, "tag": 2}, labels)
    # 7 labelled slides (the -1 is unknown): 7 / (4 * 4), 7 / (4 * 1), 7 / (4 * 2); class 3 has none -> 1
    assert w["label"] == pytest.approx([7 / 16, 7 / 4, 7 / 8, 1.0], abs=1e-6)
    assert w["tag"] == pytest.approx([8 / 6, 8 / 10], abs=1e-6)
    assert build.class_weights(None, {"label": 2}, None) is None


@pytest.mark.parametrize(("spec", "match"), [
    ({"nope": [1.0, 2.0]}, r"unknown target\(s\) \['nope'\]"),
    ({"label": [1.0]}, r"loss.class_weights.label=\[1.0\]; expected 2 weights"),
    ({"label": [1.0, -1.0]}, "expected 2 weights >= 0"),
    ("inverse", "expected null, balanced"),
])
def test_bad_specs_name_the_key(spec, match):
    with pytest.raises(ConfigError, match=match):
        build.class_weights(spec, {"label": 2}, {"label": np.array([0, 1])})
    assert build.class_weights({"label": [1, 3]}, {"label": 2}, None) == {"label": [1.0, 3.0]}


def test_methods_with_losses_of_their_own_refuse_the_key():
    build.method_kwargs(config.load("abmil", ["loss.class_weights=balanced"]))  # accepted
    for exp in ("hag_mil", "dsmil", "magnet_3layer", "patch_lr"):
        with pytest.raises(ConfigError, match="loss.class_weights=.*set loss.class_weights=null"):
            build.method_kwargs(config.load(exp, ["loss.class_weights=balanced"]))


def test_the_target_loss_is_the_weighted_cross_entropy():
    cls = METHODS.get("abmil")
    w = [0.25, 4.0]
    model = cls(in_dim=4, num_classes={"label": 2}, class_weights={"label": w})
    plain = cls(in_dim=4, num_classes={"label": 2})
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    bag = Bag(features=torch.zeros(3, 2, 4), mask=torch.ones(3, 2, dtype=torch.bool),
              coords=torch.zeros(3, 2, 2, dtype=torch.int64), labels={"label": y},
              slide_ids=["a", "b", "c"])
    out = MILOutput({"label": logits})
    got = model.target_losses(out, bag)["loss_task"]
    want = F.cross_entropy(logits, y, weight=torch.tensor(w))
    assert got == pytest.approx(float(want), abs=1e-6)
    assert float(want) != pytest.approx(float(plain.target_losses(out, bag)["loss_task"]), abs=1e-3)
    # the weights travel in the checkpoint's hyper-parameters
    assert model.hparams["class_weights"] == {"label": w}
