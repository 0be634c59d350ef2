from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_lightning.data.bags import BagDataModule, UnpaddedDistributedSampler
from wsi_lightning.manifest import load_manifest
from wsi_lightning.errors import StoreError
from wsi_lightning.features.store import FeatureStore


def dm_for(bag_data: Path, **kw) -> BagDataModule:
    m = load_manifest(bag_data, "label", check_files=False)
    dm = BagDataModule(m, bag_data.parent / "store", split={"val": 0.25, "test": 0.25}, **kw)
    dm.setup()
    return dm


def test_padded_batches_with_masks(bag_data: Path):
    dm = dm_for(bag_data, batch_size=3)
    store = FeatureStore(bag_data.parent / "store")
    bag = next(iter(dm.test_dataloader()))
    assert bag.features.shape[0] == 3 and bag.mask.shape == bag.features.shape[:2]
    for i, sid in enumerate(bag.slide_ids):
        feats, coords = store.read(sid)
        n = len(feats)
        assert int(bag.mask[i].sum()) == n
        torch.testing.assert_close(bag.features[i, :n], torch.from_numpy(feats).float())
        assert (bag.features[i, n:] == 0).all() and (bag.coords[i, n:] == -1).all()
        assert (bag.coords[i, :n].numpy() == coords).all()
    assert dm.in_dim == 16 and dm.num_classes == {"label": 2}


def test_max_bag_size_only_in_training(bag_data: Path):
    dm = dm_for(bag_data, batch_size=1, max_bag_size=10)
    assert all(b.features.shape[1] <= 10 for b in dm.train_dataloader())
    assert max(b.features.shape[1] for b in dm.val_dataloader()) > 10


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (1, 2)])
def test_unpadded_sampler_partitions(n: int, world: int):
    shards = [list(UnpaddedDistributedSampler(n, r, world)) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))


def test_missing_store_is_a_clear_error(bag_data: Path, tmp_path: Path):
    m = load_manifest(bag_data, "label", check_files=False)
    dm = BagDataModule(m, tmp_path / "empty_store")
    with pytest.raises(StoreError, match="wsi extract"):
        dm.setup()


def test_standardize_uses_training_slides_only(bag_data: Path):
    import numpy as np

    dm = dm_for(bag_data, batch_size=1, standardize=True)
    store = FeatureStore(bag_data.parent / "store")
    train = np.concatenate([np.asarray(store.read_features(s), np.float64) for s in dm.splits["train"]])
    np.testing.assert_allclose(dm.scaler.mean, train.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dm.scaler.std, train.std(0), rtol=1e-4, atol=1e-5)
    # the training instances come out zero-mean, unit-variance; a test bag uses the same map
    got = torch.cat([b.features[0] for b in dm.train_dataloader()]).double()
    torch.testing.assert_close(got.mean(0), torch.zeros(got.shape[1], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.std(0, unbiased=False), torch.ones(got.shape[1], dtype=torch.float64),
                               atol=1e-3, rtol=0)
    bag = next(iter(dm.test_dataloader()))
    raw = np.asarray(store.read_features(bag.slide_ids[0]), np.float32)
    torch.testing.assert_close(bag.features[0], torch.from_numpy((raw - dm.scaler.mean) / dm.scaler.std))
    assert dm_for(bag_data).scaler is None  # off by default: features as stored


def test_scaler_travels_with_the_checkpoint(bag_data: Path):
    """The training statistics are the datamodule's state: restored before or after setup()
    (Lightning restores after), a datamodule over another split uses them instead of refitting."""
    import numpy as np

    trained = dm_for(bag_data, standardize=True)
    state = trained.state_dict()
    assert len(state["scaler"]["mean"]) == trained.in_dim
    m = load_manifest(bag_data, "label", check_files=False)
    other = {"val": 0.25, "test": 0.25, "seed": 7}
    before = BagDataModule(m, bag_data.parent / "store", split=other, standardize=True)
    before.load_state_dict(state)
    before.setup()
    after = BagDataModule(m, bag_data.parent / "store", split=other, standardize=True)
    after.setup()
    assert not np.allclose(after.scaler.mean, trained.scaler.mean)  # its own training slides differ
    after.load_state_dict(state)
    for dm in (before, after):
        np.testing.assert_allclose(dm.scaler.mean, trained.scaler.mean)
        assert all(ds.scaler is dm.scaler for ds in dm.datasets.values())
    bad = {"scaler": {"mean": [0.0] * 3, "std": [1.0] * 3}}
    with pytest.raises(StoreError, match="3-d but store"):
        after.load_state_dict(bad)
