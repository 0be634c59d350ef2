"""Multi-scale bags: scale views, CS-MIL cluster sampling, test-time bag averaging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import feature_cfg_overrides
from wsi_lightning import config, run
from wsi_lightning.manifest import load_manifest
from wsi_lightning.data.multiscale import ClusterSampling, MultiScaleBagDataModule
from wsi_lightning.features.store import FeatureStore

S, D = 3, 6


@pytest.fixture
def ms_data(tmp_path: Path) -> Path:
    """20 slides; tumour slides carry a signal only where scale 0 AND scale 2 are both raised."""
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path / "store")
    rows = []
    for i in range(20):
        tumour = i % 2 == 1
        n = int(rng.integers(30, 60))
        x = rng.normal(size=(n, S, D)).astype(np.float32)
        k = 6
        x[:k, 0, 0] += 3.0  # every slide: some tiles raised at the finest scale...
        x[k:2 * k, 2, 1] += 3.0  # ...and some at the coarsest, at other places
        if tumour:
            x[2 * k:3 * k, 0, 0] += 3.0  # only tumour: both at the same location
            x[2 * k:3 * k, 2, 1] += 3.0
        coords = np.stack([np.arange(n) * 100, np.zeros(n)], 1).astype(np.int64)
        store.write_slide(f"s{i:02d}", x.reshape(n, S * D), coords,
                          {"mpp": 0.5, "tile_size": 100, "tile_size_um": 50.0, "level": 0, "extent_level0": 100,
                           "backbone": "synthetic", "weights_hash": "-", "extraction": {}, "scales": S})
        rows.append({"slide_id": f"s{i:02d}", "case_id": f"c{i}", "path": "x.tiff",
                     "label": "tumor" if tumour else "normal"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def _dm(ms_data: Path, **kw) -> MultiScaleBagDataModule:
    m = load_manifest(ms_data, check_files=False)
    dm = MultiScaleBagDataModule(m, ms_data.parent / "store", split={"val": 0.2, "test": 0.2}, **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("mode,shape,dim", [("stack", (S, D), D), ("select", (D,), D), ("flatten", (D,), D),
                                            ("sum", (D,), D), ("concat", (S * D,), S * D)])
def test_scale_views(ms_data: Path, mode: str, shape: tuple, dim: int):
    dm = _dm(ms_data, mode=mode, scale=2, batch_size=2)
    bag = next(iter(dm.val_dataloader()))
    assert tuple(bag.features.shape[2:]) == shape and dm.in_dim == dim
    store = FeatureStore(ms_data.parent / "store")
    x = torch.from_numpy(store.read(bag.slide_ids[0])[0]).float().view(-1, S, D)
    n = len(x)
    expect = {"stack": x, "select": x[:, 2], "flatten": x.reshape(-1, D), "sum": x.sum(1),
              "concat": x.reshape(n, -1)}[mode]
    torch.testing.assert_close(bag.features[0, : len(expect)], expect)
    assert int(bag.mask[0].sum()) == len(expect)


def test_cluster_sampling_draws_per_cluster_with_placeholders():
    smp = ClusterSampling(k=4, per_cluster=3)
    labels = np.array([0, 0, 1, 1, 1, 3])  # cluster sizes 2, 3, 0, 1
    idx = smp.draw(labels, np.random.default_rng(0))
    drawn = idx[idx >= 0]
    # min(per_cluster, |cluster|) draws per cluster (with replacement), one placeholder for cluster 2
    assert [(labels[drawn] == c).sum() for c in (0, 1, 3)] == [2, 3, 1] and (idx == -1).sum() == 1
    code = ClusterSampling(k=4, per_cluster=None, mean_len=2, var_len=0)  # the code's N(mean, var) length
    assert len(code.draw(labels, np.random.default_rng(0))) == 2 + 2 + 1 + 1


def test_sampled_bags_mask_placeholders_and_repeat_at_test(ms_data: Path):
    dm = _dm(ms_data, sampling=ClusterSampling(k=8, per_cluster=2), test_bags=5, batch_size=4)
    train = next(iter(dm.train_dataloader()))
    assert train.features.shape[1] <= 8 * 2 and train.features.dim() == 4
    pad = ~train.mask
    assert (train.features[pad] == 0).all()
    test = next(iter(dm.test_dataloader()))
    assert len(test.slide_ids) == 5 and len(set(test.slide_ids)) == 1  # R bags of one slide


def test_cs_mil_learns_only_the_joint_signal(ms_data: Path, tmp_path: Path):
    over = feature_cfg_overrides(ms_data, tmp_path / "runs", **{
        "tiling.multiscale.mode": "concentric", "data.multiscale.mode": "stack",
        "data.multiscale.sampling.enabled": True, "data.multiscale.sampling.per_cluster": 4,
        "data.multiscale.test_bags": 4, "data.split.val": 0.2, "data.split.test": 0.3,
        "method.dropout": 0.0, "optim.lr": 3e-3, "trainer.max_epochs": 3})
    res = run.fit(config.load("cs_mil", over))
    pred = pd.read_csv(res.run_dir / "test_predictions.csv")
    assert pred["slide_id"].is_unique and len(pred) == 6  # 4 bags per slide averaged into one row
    assert 0.0 <= res.metrics["test/auroc"] <= 1.0
