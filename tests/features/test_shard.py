"""``wsi extract --shard I/N`` (job arrays into one store) and ``wsi extract --check``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_lightning import cli
from wsi_lightning.features.store import FeatureStore

OVER = ["tiling.tile_size=64", "tiling.mpp=1.0", "features.backbone=demo_cnn", "features.pretrained=false",
        "features.num_workers=0"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_lightning.demo.dataset import make_demo_dataset

    root = tmp_path_factory.mktemp("shard")
    manifest = make_demo_dataset(root / "demo", n_slides=5, seed=3, workers=1, size_um=512.0)
    df = pd.read_csv(manifest, dtype=str)
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "slide_id": "gone", "case_id": "gone", "path": "slides/gone.tiff"}
    df.to_csv(root / "demo" / "with_missing.csv", index=False)
    return manifest


def extract(manifest: Path, store: Path, *extra: str) -> int:
    return cli.main(["extract", str(manifest), "--store", str(store), *OVER, *extra])


def test_shards_fill_one_store_like_a_single_process(slides: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with_missing = slides.parent / "with_missing.csv"
    assert extract(slides, tmp_path / "single") == 0
    shards = tmp_path / "sharded"
    assert extract(with_missing, shards, "--shard", "0/2", "--skip-errors") == 0
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert extract(with_missing, shards, "--check") == 1  # shard 1 has not run
    # sorted ids: shard 0 holds demo_000, _002, _004; shard 1 demo_001, _003 and 'gone'
    assert any("3 of 6 slides complete, 0 failed, 3 not extracted yet" in r.getMessage() for r in caplog.records)
    assert extract(with_missing, shards, "--shard", "1/2", "--skip-errors") == 0
    one, two = FeatureStore(tmp_path / "single"), FeatureStore(shards)
    assert sorted(two.complete_slides()) == sorted(one.complete_slides())  # 'gone' failed in its shard
    for sid in one.complete_slides():
        np.testing.assert_array_equal(two.read_coords(sid), one.read_coords(sid))
        np.testing.assert_array_equal(two.read_features(sid), one.read_features(sid))
    reports = sorted(p.name for p in shards.glob("errors*.csv"))
    assert len(reports) == 1 and reports[0].startswith("errors.shard")  # the shard that held 'gone'
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert extract(with_missing, shards, "--check") == 1
    assert any("5 of 6 slides complete, 1 failed, 0 not extracted yet" in r.getMessage() for r in caplog.records)
    assert extract(slides, shards, "--check") == 0


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/3"])
def test_bad_shard_is_named(slides: Path, tmp_path: Path, shard: str, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert extract(slides, tmp_path / "s", f"--shard={shard}") == 2
    assert any(f"--shard {shard}" in r.getMessage() or f"--shard '{shard}'" in r.getMessage() for r in caplog.records)
