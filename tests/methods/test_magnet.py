"""MagNets on tiny pyramidal slides: the tree, its reads, gradients, fitting and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from tests.methods_helpers import CONTRACT_KWARGS
from wsi_lightning.data.sampling import (
    RegionSampler,
    SlideBatch,
    SlideSamplingDataModule,
    dihedral,
    magnets_level,
)
from wsi_lightning.errors import ConfigError
from wsi_lightning.manifest import load_manifest
from wsi_lightning.methods.magnet import MagNet, MagNetNet
from wsi_lightning.methods.magnet.magnify import pixel_count, tree_counts
from wsi_lightning.slides.pyramid import write_pyramid_tiff
from wsi_lightning.slides.reader import SlideReader

TINY = dict(CONTRACT_KWARGS["magnet"])  # (2, 2) tree, 16 px images, demo_cnn backbones
TREE = {**TINY, "patches": (3, 2, 3), "aux_layers": (1, 3)}  # the paper's tree at tiny sizes


def slide_image(seed: int, h: int = 384, w: int = 512) -> np.ndarray:
    """Smooth coloured tissue on white glass (smooth, so two-step and direct reads agree)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(20, 40, 2)
    img = np.stack([150 + 60 * np.sin(xx / a), 90 + 50 * np.cos(yy / b), 160 + 40 * np.sin((xx + yy) / 50)], -1)
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    tissue = ((xx - cx) / (0.4 * w)) ** 2 + ((yy - cy) / (0.4 * h)) ** 2 < 1
    return np.where(tissue[..., None], img, 240).clip(0, 255).astype(np.uint8)


def make_slides(root: Path, n: int = 8) -> Path:
    """n slides of 512 x 384 px, 3 halving levels, two labels; returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / f"m{i}.tiff"
        write_pyramid_tiff(path, slide_image(i), 0.5, n_levels=3)
        rows.append({"slide_id": f"m{i}", "case_id": f"c{i}", "path": str(path),
                     "label": ["normal", "tumor"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_slides(tmp_path_factory.mktemp("magnet_slides"))


def datamodule(manifest: Path, image_size: int = 16, **kw) -> SlideSamplingDataModule:
    args = dict(mode="slide", split={"val": 0.25, "test": 0.25}, batch_size=2, image_size=image_size)
    dm = SlideSamplingDataModule(load_manifest(manifest), **{**args, **kw})
    dm.setup()
    return dm


def batch_of(manifest: Path, aug: list[list[int]] | None = None, image_size: int = 16) -> SlideBatch:
    batch = next(iter(datamodule(manifest, image_size).val_dataloader()))
    if aug is not None:
        batch.aug = torch.tensor(aug)
    return batch


def test_tree_shapes_frozen_patch_scales_and_pixel_counts(manifest):
    torch.manual_seed(0)
    net = MagNetNet(3, {"label": 2}, **TREE).eval()
    batch = batch_of(manifest)
    with torch.no_grad():
        out = net(batch)
    assert out.logits["label"].shape == (2, 2) and torch.isfinite(out.logits["label"]).all()
    tree = out.roi_tree
    n_in, n_leaves = tree_counts((3, 2, 3))
    assert [f.shape[1] for f in tree.frames] == [1, 3, 6, 18]
    assert [lv.shape[1] for lv in tree.levels] == n_in  # one I' read per layer input
    assert out.roi_tree.leaves.shape == (2, n_leaves, 3, 32, 32)
    assert set(out.aux_logits) == {"layer1", "layer3"}
    # frozen patch: child 0 of every layer-2 node re-reads its parent's whole frame
    torch.testing.assert_close(tree.frames[2][:, ::2], tree.frames[1])
    assert (tree.theta[1][:, ::2] == torch.tensor([1.0, 0, 0], dtype=torch.float64)).all()
    for theta in tree.theta:
        assert (theta[..., 0] >= 0.05 - 1e-6).all() and (theta[..., 0] <= 1 + 1e-6).all()
    # frames nest: every child inside its parent's frame (up to the 0.05 scale floor)
    for d in range(1, 4):
        parent = tree.frames[d - 1].repeat_interleave((3, 2, 3)[d - 1], 1)
        side = parent[..., 2] - parent[..., 0]
        assert (tree.frames[d][..., :2] >= parent[..., :2] - 0.03 * side[..., None]).all()
        assert (tree.frames[d][..., 2:] <= parent[..., 2:] + 0.03 * side[..., None]).all()
    stats = out.stats
    assert stats["pixels_per_slide"] == pixel_count((3, 2, 3), in_size=16, leaf_size=32)
    assert stats["source_pixels_per_slide"] == 3 * sum(n_in) * 32**2
    assert stats["pyramid_pixels_per_slide"] > 0


@pytest.mark.parametrize("patches, n_in", [((3, 2, 3), 10), ((3, 2, 3, 2), 28)])
def test_pixels_at_the_paper_sizes(manifest, patches, n_in):
    """56 / 112 / 224 px (tiny backbones: the counts do not depend on them)."""
    net = MagNetNet(3, {"label": 2}, patches=patches, backbone="demo_cnn", aux_backbone="demo_cnn",
                    pretrained=False, gru_hidden=8, mlp=(8,)).eval()
    batch = batch_of(manifest, image_size=56)
    with torch.no_grad():
        outputs, tree = net.magnify(batch)
    assert outputs[-1].shape[1:] == (math.prod(patches), 3, 224, 224)
    pixels = tree.pixels
    assert pixels["processed"] == {10: 2_803_584, 28: 5_682_432}[n_in]  # the paper's ~3 / ~6 M
    assert pixels["sources"] == n_in * 37_632  # the 112x112 I' reads, reported apart


def test_levels_follow_the_paper_formula(manifest):
    net = MagNetNet(3, {"label": 2}, **TREE).eval()
    batch = batch_of(manifest)
    with torch.no_grad():
        tree = net(batch).roi_tree
    for d, levels in enumerate(tree.levels):
        for b in range(2):
            dims = tuple(batch.dimensions[b].tolist())
            for f, lv in zip(tree.frames[d][b], levels[b], strict=True):
                side = float(f[2] - f[0])
                assert int(lv) == magnets_level(dims, (side, side), 3)
    assert (tree.levels[0] == 2).all()  # the whole slide: the coarsest level


@pytest.mark.parametrize("aug", [[0, 0, 0], [1, 1, 0], [3, 0, 1]])
def test_patches_show_their_level0_frames_under_augmentation(manifest, aug):
    """Each leaf equals a direct read of its tracked level-0 frame, seen through the same
    flip / rotation: the tree is tracked in slide coordinates whatever the augmentation."""
    torch.manual_seed(1)
    net = MagNetNet(3, {"label": 2}, **{**TREE, "grey_tol": None}).eval()
    batch = batch_of(manifest, aug=[aug, aug])
    with torch.no_grad():
        out = net(batch)
    frames, leaves = out.roi_tree.frames[-1], out.roi_tree.leaves
    reader = SlideReader(batch.paths[0])
    errors = []
    for k in range(frames.shape[1]):
        x0, y0, x1, y1 = frames[0, k].tolist()
        direct = RegionSampler(reader).read((x0, y0, x1 - x0, y1 - y0), 32, level=0)
        direct = dihedral(direct, *aug).astype(np.float32) / 255
        errors.append(np.abs(leaves[0, k].permute(1, 2, 0).numpy() - direct).mean())
    assert np.median(errors) < 0.04, errors  # two resamplings vs one, on a smooth slide


def test_every_parameter_gets_a_gradient(manifest):
    torch.manual_seed(0)
    model = MagNet(in_dim=3, num_classes={"label": 2}, **TREE).train()
    batch = batch_of(manifest)
    batch.labels = {"label": torch.tensor([0, 1])}
    out = model(batch)
    loss = torch.stack(list(model.task_loss(out, batch).values()) + list(out.aux_losses.values())).sum()
    loss.backward()
    assert set(out.aux_losses) == {"loss_aux_layer1", "loss_aux_layer3"}
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_detach_leaves_keeps_the_classifier_loss_off_the_magnifying_layers(manifest):
    batch = batch_of(manifest)
    batch.labels = {"label": torch.tensor([0, 1])}
    for detach in (False, True):
        model = MagNet(in_dim=3, num_classes={"label": 2}, **{**TREE, "detach_leaves": detach}).train()
        out = model(batch)
        model.task_loss(out, batch)["loss_task"].backward()
        st = [p.grad for p in model.net.layers.parameters()]
        assert all(g is None for g in st) == detach


def test_config_errors_name_the_key(manifest):
    with pytest.raises(ConfigError, match="aux_layers"):
        MagNetNet(3, {"label": 2}, **{**TINY, "aux_layers": (1, 3)})
    with pytest.raises(ConfigError, match="level_rule"):
        MagNetNet(3, {"label": 2}, **{**TINY, "level_rule": "nearest"})
    with pytest.raises(ConfigError, match="frozen_patch"):
        MagNetNet(3, {"label": 2}, **{**TINY, "patches": (2, 1)})
    with pytest.raises(ConfigError, match=r"data\.sampling\.image_size=16"):
        MagNetNet(3, {"label": 2}, **TINY)(batch_of(manifest, image_size=24))


def test_pretrained_weights_load_at_fit_start_only(monkeypatch):
    model = MagNet(in_dim=3, num_classes={"label": 2}, **{**TINY, "pretrained": True})
    calls = []
    monkeypatch.setattr(model.net, "load_pretrained", lambda: calls.append(1))
    model.setup("test")
    assert not calls
    model.setup("fit")
    model.setup("fit")
    assert calls == [1]
    again = MagNet(in_dim=3, num_classes={"label": 2}, **{**TINY, "pretrained": True})
    monkeypatch.setattr(again.net, "load_pretrained", lambda: calls.append(2))
    again.on_load_checkpoint({})  # a checkpoint's weights are never overwritten
    again.setup("fit")
    assert calls == [1]


def test_fast_dev_run_roi_figures_and_checkpoint_round_trip(manifest, tmp_path):
    from wsi_lightning.callbacks.paradoxical_loss import ParadoxicalLoss
    from wsi_lightning.callbacks.roi_tree import ROITree

    dm = datamodule(manifest)
    model = MagNet(in_dim=dm.in_dim, num_classes=dm.num_classes, class_names=dm.class_names, **TREE)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ParadoxicalLoss(), ROITree(max_slides=1)])
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    rois = pd.read_csv(tmp_path / "roi_tree" / "rois.csv")
    assert len(rois) == rois.slide_id.nunique() * (1 + 3 + 6 + 18)
    assert rois.loc[rois.depth == 3, "level"].isna().all() and (rois.loc[rois.depth < 3, "level"] >= 0).all()
    assert {"1", "3.2", "3.2.3"} <= set(rois.node) and len(list((tmp_path / "roi_tree").glob("*.png"))) == 1
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    again = MagNet.load_from_checkpoint(ckpt, map_location="cpu").eval()
    model.eval()
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        a, b = model(batch), again(batch)
    torch.testing.assert_close(a.logits["label"], b.logits["label"])
