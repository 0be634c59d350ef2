"""HAG-MIL: the cascade's selection, no gradient across levels, per-level optimisers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from tests.conftest import make_quadtree_bags
from tests.methods_helpers import CONTRACT_KWARGS, quadtree_bag
from wsi_lightning.data.quadtree import QuadtreeBagDataModule
from wsi_lightning.errors import ConfigError
from wsi_lightning.manifest import load_manifest
from wsi_lightning.methods.hag_mil import HAGMIL, HAGMILNet, select_children
from wsi_lightning.nn.iat import IATOutput

D = 8
SMALL = CONTRACT_KWARGS["hag_mil"]


class Scorer(nn.Module):
    """Stand-in level model: raw attention = feature 0; records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(D, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, h, mask, labels=None):
        self.seen.append(h.detach().clone())
        raw = h[..., 0].masked_fill(~mask, float("-inf"))
        att = raw.softmax(-1)
        z = (att[..., None] * h).sum(1)
        return IATOutput(self.w(z), raw, att, None, torch.zeros(h.shape[0], 4))


def test_select_children_hand_made():
    scores = torch.tensor([[0.1, 5.0, 3.0, -1.0], [9.0, 1.0, 0.0, 0.0]])
    index = torch.tensor([[0, 1, 2, 3], [0, 1, -1, -1]])  # bag 1 has 2 tiles
    child_parent = torch.tensor([list(range(4)) * 0 + [p for p in range(4) for _ in range(4)],
                                 [0, 0, 0, 0, 1, 1, 1, 1] + [-1] * 8])
    out = select_children(scores, index, child_parent, keep=2)
    assert out[0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # children of parent 1, then parent 2
    assert out[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # both parents: never padding
    # scores at padded positions are ignored even when huge
    scores[1, 2:] = 1e9
    assert select_children(scores, index, child_parent, keep=1)[1].tolist()[:4] == [0, 1, 2, 3]


def test_cascade_feeds_each_level_exactly_the_children_of_its_top_parents():
    net = HAGMILNet(D, {"label": 2}, n_levels=3, t_patch=2, v_patch=2, **SMALL)
    net.models = nn.ModuleList(Scorer() for _ in range(3))
    bag = quadtree_bag(D, b=1, n0=5)
    bag.levels[0].features[0, :, 0] = torch.tensor([0.0, 4.0, -2.0, 9.0, 1.0])  # top-2: tiles 3, 1
    level1 = bag.levels[1].features[0]
    level1[:, 0] = torch.arange(20.0)  # within 3's children (12..15), 15 and 14 are best
    net.eval()(bag)
    seen1 = net.models[1].seen[0][0]
    torch.testing.assert_close(seen1, level1[[12, 13, 14, 15, 4, 5, 6, 7]])
    seen2 = net.models[2].seen[0][0]
    torch.testing.assert_close(seen2, bag.levels[2].features[0][list(range(60, 64)) + list(range(56, 60))])


def test_no_gradient_crosses_levels():
    torch.manual_seed(0)
    net = HAGMILNet(D, {"label": 2}, n_levels=3, t_patch=3, **SMALL).train()
    bag = quadtree_bag(D, b=2, n0=4)
    bag.labels = {"label": torch.tensor([0, 1])}
    grads = {}

    def after(lvl, res):
        net.zero_grad(set_to_none=True)
        torch.stack(list(res["terms"].values())).sum().backward()
        grads[lvl] = {i for i, m in enumerate(net.models) if any(p.grad is not None for p in m.parameters())}

    net.cascade(bag, 3, after_level=after)
    assert grads == {0: {0}, 1: {1}, 2: {2}}


def _module(optimizers: str = "per_level") -> HAGMIL:
    return HAGMIL(in_dim=D, num_classes={"label": 2}, optimizers=optimizers, t_patch=4, v_patch=4, **SMALL)


def test_per_level_optimisers_own_disjoint_parameters():
    m = _module()
    opts = m.configure_optimizers()
    assert len(opts) == 3
    for lvl, opt in enumerate(opts):
        own = {id(p) for p in m.net.models[lvl].parameters()}
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        assert own <= params and not params & {id(p) for i, mm in enumerate(m.net.models) if i != lvl
                                               for p in mm.parameters()}
    shared = _module("shared").configure_optimizers()
    assert isinstance(shared, torch.optim.Optimizer)
    with pytest.raises(ConfigError, match="optimizers"):
        _module("one")


def test_training_step_steps_each_level_with_its_own_optimiser(tmp_path: Path):
    manifest = make_quadtree_bags(tmp_path, n_slides=8, dim=D)
    dm = QuadtreeBagDataModule(load_manifest(manifest, "label", check_files=False), tmp_path / "store",
                               split={"val": 0.25, "test": 0.25})
    model = _module()
    before = [[p.detach().clone() for p in mm.parameters()] for mm in model.net.models]
    stepped = []
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu",
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    orig = HAGMIL.configure_optimizers

    def spy(self):
        opts = orig(self)
        for lvl, opt in enumerate(opts):
            step = opt.step

            def wrapped(*a, _lvl=lvl, _step=step, **k):
                stepped.append(_lvl)
                return _step(*a, **k)
            opt.step = wrapped
        return opts

    HAGMIL.configure_optimizers = spy
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        HAGMIL.configure_optimizers = orig
    assert stepped == [0, 1, 2, 0, 1, 2]  # coarsest first, one step per level per slide
    for lvl, mm in enumerate(model.net.models):
        changed = any(not torch.equal(a, b) for a, b in zip(before[lvl], mm.parameters(), strict=True))
        assert changed, f"level {lvl} did not train"
    assert "train/level0_bag" in trainer.logged_metrics and "val/loss" in trainer.logged_metrics


class TwoBlockScorer(Scorer):
    """Stand-in with two blocks: block 0 attends feature 0, block 1 (the last) feature 1."""

    def forward(self, h, mask, labels=None):
        self.seen.append(h.detach().clone())
        maps = torch.stack([h[..., j].masked_fill(~mask, float("-inf")).softmax(-1) for j in (0, 1)], 1)
        raw = h[..., 1].masked_fill(~mask, float("-inf"))
        z = (maps[:, 1, :, None] * h).sum(1)
        return IATOutput(self.w(z), raw, maps[:, 1], None, torch.zeros(h.shape[0], 4), maps)


@pytest.mark.parametrize("select", ["last", "blocks"])
def test_select_ranks_by_the_last_block_or_the_mean_of_blocks(select):
    net = HAGMILNet(D, {"label": 2}, n_levels=2, t_patch=1, v_patch=1, select=select, **SMALL)
    net.models = nn.ModuleList(TwoBlockScorer() for _ in range(2))
    bag = quadtree_bag(D, b=1, n0=3, levels=2)
    f = bag.levels[0].features[0]
    f[:, 0] = torch.tensor([0.0, 6.0, 0.0])  # block 0 wants tile 1 (strongly)
    f[:, 1] = torch.tensor([0.0, 0.0, 1.0])  # the last block wants tile 2 (weakly)
    res = net.eval().cascade(bag, keep=1)
    want = 2 if select == "last" else 1  # mean of softmaxes: tile 1 ~ (1 + 0.21) / 2 > tile 2
    assert res[1]["index"][0].tolist() == [4 * want + i for i in range(4)]
    maps = torch.stack([f[:, j].softmax(-1) for j in (0, 1)])
    torch.testing.assert_close(res[0]["attention"][0], maps[1] if select == "last" else maps.mean(0))
    torch.testing.assert_close(res[0]["attention"][0].sum(), torch.tensor(1.0))


def test_unknown_select_is_a_config_error():
    with pytest.raises(ConfigError, match="select='top'"):
        HAGMILNet(D, {"label": 2}, select="top", **SMALL)


def test_plain_bags_are_rejected_with_the_fix():
    net = HAGMILNet(D, {"label": 2}, **SMALL)
    bag = quadtree_bag(D)
    bag.levels = None
    with pytest.raises(ConfigError, match="tiling.multiscale.mode=quadtree"):
        net(bag)


def test_fit_hag_mil_end_to_end_with_level_attention_maps(tmp_path: Path):
    """`wsi fit hag_mil` on a quadtree store: metrics, predictions and one map per level."""
    import pandas as pd

    from tests.conftest import feature_cfg_overrides
    from wsi_lightning import config, run

    manifest = make_quadtree_bags(tmp_path, n_slides=12, dim=16)
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "tiling.multiscale.mode": "quadtree", "method.t_patch": 2, "method.v_patch": 3,
        "method.hidden_dims": "[32,48,16,32]", "method.final_dim": 32, "method.attn_dim": 16,
        "method.gate_dim": 8, "method.heads": 2, "optim.lr": 1e-3})
    res = run.fit(config.load("hag_mil", over))
    assert 0.0 <= res.metrics["test/auroc"] <= 1.0
    att = pd.read_csv(res.run_dir / "attention" / "attention.csv")
    assert set(att["map"]) == {"level0", "level1", "level2"}
    per_slide = att.groupby(["slide_id", "map"]).size().unstack()
    assert (per_slide["level1"] <= 4 * 3).all() and (per_slide["level2"] <= 4 * 3 * 4).all()
    # every level's attention sums to 1 over the tiles it scored
    sums = att.groupby(["slide_id", "map"])["attention"].sum()
    assert ((sums - 1).abs() < 1e-4).all()
