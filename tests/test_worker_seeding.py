"""Training draws are seeded by (seed, slide, epoch): the same for any ``num_workers``.

Each test fits a recorder module (it only keeps what every training batch holds) for a few
epochs with ``num_workers=2`` (real worker processes, persistent as in training) and with
``num_workers=0``, then checks that (1) no epoch repeats a slide's draw and (2) both runs drew
the same thing for every (epoch, slide). Before draws were seeded by the epoch, each worker
counted its own visits, so a slide visited by the other worker in the previous epoch got that
epoch's draw again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from wsi_lightning.data.multiscale import ClusterSampling, MultiScaleBagDataModule
from wsi_lightning.data.sampling import SlideSamplingDataModule
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest
from wsi_lightning.slides.pyramid import write_pyramid_tiff

EPOCHS = 4
TISSUE = {"thumb_mpp": 4.0, "min_area_um2": 2_000.0}  # the slides are 160 µm wide


@pytest.fixture(scope="module")
def slide_manifest(tmp_path_factory) -> Path:
    """4 tiny slides (320 x 256 px at 0.5 µm/px): glass with a textured pink disc of tissue."""
    root = tmp_path_factory.mktemp("seeding_slides")
    yy, xx = np.mgrid[0:256, 0:320]
    rows = []
    for i in range(4):
        rng = np.random.default_rng(i)
        img = np.full((256, 320, 3), 236.0) + rng.normal(0, 2, (256, 320, 1))
        inside = (xx - 160 - 10 * i) ** 2 + (yy - 128) ** 2 < 90**2
        img[inside] = (np.array([200, 110, 160]) + rng.normal(0, 15, (256, 320, 1)))[inside]
        write_pyramid_tiff(root / f"s{i}.tiff", img.clip(0, 255).astype(np.uint8), 0.5, n_levels=2)
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i}", "path": f"s{i}.tiff",
                     "label": ["normal", "tumor"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def ms_manifest(tmp_path_factory) -> Path:
    """6 multi-scale slides (3 scales of 4 dims, 300-400 rows: K-means runs on several chunks)."""
    root = tmp_path_factory.mktemp("seeding_ms")
    rng = np.random.default_rng(0)
    store = FeatureStore(root / "store")
    rows = []
    for i in range(6):
        n = int(rng.integers(300, 400))
        x = rng.normal(size=(n, 3 * 4)).astype(np.float32)
        coords = np.stack([np.arange(n) * 100, np.zeros(n)], 1).astype(np.int64)
        store.write_slide(f"m{i}", x, coords,
                          {"mpp": 0.5, "tile_size": 100, "tile_size_um": 50.0, "level": 0, "extent_level0": 100,
                           "backbone": "synthetic", "weights_hash": "-", "extraction": {}, "scales": 3})
        rows.append({"slide_id": f"m{i}", "case_id": f"c{i}", "path": "x.tiff", "label": ["a", "b"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


class Recorder(L.LightningModule):
    """Keeps (features, coords, mask) of every slide of every training batch, by (epoch, slide)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        for b, sid in enumerate(batch.slide_ids):
            key = (self.current_epoch, sid)
            assert key not in self.seen, f"slide {sid} twice in epoch {self.current_epoch}"
            self.seen[key] = (batch.features[b].clone(), batch.coords[b].clone(), batch.mask[b].clone())
        return self.w * 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_draws(make_dm, num_workers: int) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
    """Every training draw of an EPOCHS-epoch fit, keyed by (epoch, slide id)."""
    L.seed_everything(0, verbose=False)
    dm = make_dm(num_workers)
    model = Recorder()
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    return model.seen


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def check_draws(make_dm) -> None:
    with_workers, inline = fit_draws(make_dm, 2), fit_draws(make_dm, 0)
    slides = sorted({sid for _, sid in inline})
    assert sorted(with_workers) == sorted(inline) and len(inline) == EPOCHS * len(slides)
    for sid in slides:  # (1) no epoch repeats an earlier epoch's draw of the slide
        draws = [with_workers[(e, sid)] for e in range(EPOCHS)]
        repeats = [(e, f) for e in range(EPOCHS) for f in range(e) if same(draws[e], draws[f])]
        assert not repeats, f"slide {sid}: epochs (later, earlier) {repeats} drew the same"
    differ = sorted(k for k in inline if not same(with_workers[k], inline[k]))
    assert not differ, f"num_workers=2 and 0 drew differently at (epoch, slide) {differ}"  # (2)


def test_slide_sampling_draws_independent_of_workers(slide_manifest: Path):
    def make_dm(num_workers: int) -> SlideSamplingDataModule:
        return SlideSamplingDataModule(load_manifest(slide_manifest), split={"val": 0.0, "test": 0.0},
                                       batch_size=1, num_workers=num_workers, n_patches=3, patch_size=16,
                                       patch_mpp=2.0, tissue=TISSUE, seed=5)

    check_draws(make_dm)


def test_multiscale_cluster_bags_independent_of_workers(ms_manifest: Path):
    def make_dm(num_workers: int) -> MultiScaleBagDataModule:
        return MultiScaleBagDataModule(load_manifest(ms_manifest, check_files=False), ms_manifest.parent / "store",
                                       split={"val": 0.0, "test": 0.0}, batch_size=1, num_workers=num_workers,
                                       sampling=ClusterSampling(k=4, per_cluster=3), seed=5)

    check_draws(make_dm)


def test_multiscale_evaluation_bags_fixed_across_epochs(ms_manifest: Path):
    """test_bags=1 with cluster sampling: one fixed bag per slide, whatever was read before."""
    dm = MultiScaleBagDataModule(load_manifest(ms_manifest, check_files=False), ms_manifest.parent / "store",
                                 split={"val": 0.5, "test": 0.0}, batch_size=1,
                                 sampling=ClusterSampling(k=4, per_cluster=3), test_bags=1, seed=5)
    dm.setup()
    first = [(b.features.clone(), b.mask.clone()) for b in dm.val_dataloader()]
    again = [(b.features.clone(), b.mask.clone()) for b in dm.val_dataloader()]
    assert len(first) == len(dm.splits["val"]) > 0
    assert all(same(a, b) for a, b in zip(first, again, strict=True))


def test_max_bag_size_subsets_are_the_same_in_any_worker_and_new_each_epoch(bag_data):
    """BagDataset drew its max_bag_size subset with torch.randperm on each worker's own random
    state, so the subset depended on num_workers."""
    from wsi_lightning.data.bags import BagDataset
    from wsi_lightning.features.store import FeatureStore
    from wsi_lightning.manifest import load_manifest

    m = load_manifest(bag_data, check_files=False)
    store = FeatureStore(bag_data.parent / "store")
    ids = list(m.df["slide_id"])[:4]
    ds = BagDataset(store, ids, m.labels_by_slide(), max_bag_size=3, seed=7)
    keys = [(i, e) for e in range(2) for i in range(len(ids))]

    def draws(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(ds, sampler=keys, batch_size=None, num_workers=workers)
        return [item["coords"] for item in loader]

    one, two = draws(0), draws(2)
    assert all(len(c) == 3 for c in one)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True)), "subsets depend on num_workers"
    n = len(ids)
    assert not all(torch.equal(one[i], one[n + i]) for i in range(n)), "the same subsets every epoch"
