"""AttentionLogger: argument checks, a real tiny fit on demo slides, no-attention methods,
features without slides, multi-map attention with padding, and DDP (each slide once)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from tests.conftest import REPO, feature_cfg_overrides, make_feature_bags
from wsi_lightning import build, config, run
from wsi_lightning.callbacks.attention_logger import AttentionLogger
from wsi_lightning.data.batch import Bag
from wsi_lightning.errors import ConfigError
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest
from wsi_lightning.methods.base import MILOutput
from wsi_lightning.registry import CALLBACKS

TILING = {"tile_size": 64, "mpp": 1.0, "min_tissue": 0.5, "thumb_mpp": 8.0}
FEATS = {"backbone": "demo_cnn", "pretrained": False, "weights": None, "batch_size": 32,
         "num_workers": 0, "dtype": "float16", "accelerator": "cpu", "devices": 1}
LOGGER = "wsi_lightning.callbacks.attention_logger"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """7 tiny demo slides and their demo_cnn feature store. With 4 slides, val/test 0.25 of
    2 cases per label both round to 0; with 3-4 per label each holds one case per label."""
    from wsi_lightning.demo.dataset import make_demo_dataset
    from wsi_lightning.features.extract import extract_features

    root = tmp_path_factory.mktemp("attn_demo")
    manifest = make_demo_dataset(root / "demo", n_slides=7, seed=3, workers=1, size_um=768.0)
    extract_features(load_manifest(manifest), FeatureStore(root / "store"), TILING, FEATS)
    return manifest, root / "store"


def demo_overrides(manifest: Path, store: Path, runs: Path, callbacks: str) -> list[str]:
    return feature_cfg_overrides(manifest, runs, **{
        "data.store": store, "tiling.tile_size": 64, "tiling.mpp": 1.0,
        "features.backbone": "demo_cnn", "features.pretrained": "false", "trainer.max_epochs": 1,
        "callbacks": callbacks})


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"normalisation": "zscore"},
     r"normalisation='zscore'; expected one of \['raw', 'softmax', 'minmax', 'percentile'\]"),
    ({"top_k": -1}, r"top_k=-1; expected an integer >= 0"),
    ({"bottom_k": 2.5}, r"bottom_k=2.5"),
    ({"max_slides": -3}, r"max_slides=-3; expected an integer >= 0 or null"),
    ({"thumb_max_size": 4}, r"thumb_max_size=4; expected an integer >= 16"),
    ({"top_k": True}, r"top_k=True"),
    ({"out_dir": " "}, r"out_dir=' '"),
    ({"log_images": "yes"}, r"log_images='yes'; expected true or false"),
    ({"cmap": "nope"}, r"cmap='nope' is not a matplotlib colormap"),
    ({"alpha": 1.5}, r"alpha=1.5; expected a number in \[0, 1\]"),
    ({"montage_cols": 0}, r"montage_cols=0"),
])
def test_arguments_are_validated_up_front(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match) as err:
        AttentionLogger(**kwargs)
    assert isinstance(err.value, ConfigError)  # the CLI prints it without a traceback


def test_registered_and_built_from_an_experiment_config(tmp_path: Path):
    build.import_registered()
    assert CALLBACKS.get("attention_logger") is AttentionLogger
    cfg = config.load("abmil", ["callbacks=[{name: attention_logger, normalisation: minmax, top_k: 2}]"])
    cbs = [c for c in build.build_callbacks(cfg, tmp_path) if isinstance(c, AttentionLogger)]
    assert len(cbs) == 1 and cbs[0].normalisation == "minmax" and cbs[0].top_k == 2
    bad = config.load("abmil", ["callbacks=[{name: attention_logger, normalization: minmax}]"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['normalization'\].*'normalisation'"):
        build.build_callbacks(bad, tmp_path)


# ----------------------------------------------------------------------------- end to end
def test_abmil_fit_writes_maps_for_every_test_slide(demo: tuple[Path, Path], tmp_path: Path):
    manifest, store = demo
    cb = "[{name: attention_logger, top_k: 4, bottom_k: 3, normalisation: percentile}]"
    res = run.fit(config.load("abmil", demo_overrides(manifest, store, tmp_path / "runs", cb)))
    out = res.run_dir / "attention"
    test_ids = sorted(pd.read_csv(res.run_dir / "test_predictions.csv")["slide_id"])
    assert len(test_ids) == 2
    for sid in test_ids:
        for kind in ("heatmap", "topk", "bottomk"):
            assert Image.open(out / f"{sid}_{kind}.png").format == "PNG", (sid, kind)
    df = pd.read_csv(out / "attention.csv")
    assert list(df.columns) == ["slide_id", "map", "tile", "x", "y", "extent", "attention", "normalised"]
    assert sorted(df["slide_id"].unique()) == test_ids and (df["map"] == 0).all()
    assert (df["extent"] == FeatureStore(store).attrs(test_ids[0])["extent_level0"]).all()  # 64 px at 1 um/px
    np.testing.assert_allclose(df.groupby("slide_id")["attention"].sum(), 1.0, atol=1e-4)
    for sid, g in df.groupby("slide_id"):
        coords = FeatureStore(store).read_coords(sid)  # tile = row in the store, all tiles once
        np.testing.assert_array_equal(g[["x", "y"]].to_numpy(), coords[g["tile"].to_numpy()])
        assert sorted(g["tile"]) == list(range(len(coords)))
        assert g["normalised"].min() == 0.0 and g["normalised"].max() == 1.0  # percentile
    assert not list(out.glob(".*")), "temp files left behind"


def test_method_without_attention_warns_once_and_writes_nothing(demo: tuple[Path, Path], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture):
    manifest, store = demo
    over = demo_overrides(manifest, store, tmp_path / "runs", "[{name: attention_logger}]")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = run.fit(config.load("mean_pool", over))
    assert not (res.run_dir / "attention").exists()
    warned = [r for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "gives no attention and no tile scores" in warned[0].getMessage()


def test_tile_scores_are_the_map_of_a_method_without_attention(demo: tuple[Path, Path], tmp_path: Path):
    """CHOWDER has no attention: its per-tile scores s_i are what the CSV and heat-maps show."""
    manifest, store = demo
    over = demo_overrides(manifest, store, tmp_path / "runs", "[{name: attention_logger, normalisation: raw}]")
    res = run.fit(config.load("chowder", over))
    df = pd.read_csv(res.run_dir / "attention" / "attention.csv")
    test_ids = sorted(pd.read_csv(res.run_dir / "test_predictions.csv")["slide_id"])
    assert sorted(df["slide_id"].unique()) == test_ids
    for sid, g in df.groupby("slide_id"):
        assert sorted(g["tile"]) == list(range(FeatureStore(store).num_instances(sid)))
    assert df["attention"].std() > 0  # scores, not the padding's zeros
    assert (res.run_dir / "attention" / f"{test_ids[0]}_heatmap.png").exists()


def test_features_without_slides_write_the_csv_only(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    manifest = make_feature_bags(tmp_path / "bags", n_slides=12)  # slide files do not exist
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "trainer.max_epochs": 1, "callbacks": "[{name: attention_logger, normalisation: raw}]"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = run.fit(config.load("abmil", over))
    out = res.run_dir / "attention"
    test_ids = sorted(pd.read_csv(res.run_dir / "test_predictions.csv")["slide_id"])
    df = pd.read_csv(out / "attention.csv")
    assert sorted(df["slide_id"].unique()) == test_ids
    np.testing.assert_allclose(df["normalised"], df["attention"])  # raw: values as given
    assert not list(out.glob("*.png"))
    warned = [r for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "no images for" in warned[0].getMessage()


def test_case_bags_are_split_back_into_per_slide_maps(demo: tuple[Path, Path], tmp_path: Path):
    """data.bag_level=case: one bag per patient; attention.csv, heat-maps, montages and the
    mechanism records are per slide, each on its own slide's tiles and lesions."""
    manifest, store_dir = demo
    df = pd.read_csv(manifest)
    df["path"] = [str(manifest.parent / p) for p in df["path"]]
    # two 2-slide test cases (one per label); one training slide per label; one validation slide
    cases = {"demo_000": "case_000", "demo_001": "case_000", "demo_002": "case_001", "demo_003": "case_001",
             "demo_004": "case_003", "demo_005": "case_004", "demo_006": "case_005"}
    split = {"case_000": "test", "case_001": "test", "case_003": "train", "case_005": "train", "case_004": "val"}
    df["case_id"] = df["slide_id"].map(cases)
    df["split"] = df["case_id"].map(split)
    df["annotation"] = [str(manifest.parent / "annotations" / f"{s}.geojson") for s in df["slide_id"]]
    assert df.groupby("case_id")["label"].nunique().max() == 1
    df.to_csv(tmp_path / "manifest.csv", index=False)
    cb = "[{name: attention_logger, top_k: 2, bottom_k: 2}, {name: mechanism}]"
    over = demo_overrides(tmp_path / "manifest.csv", store_dir, tmp_path / "runs", cb) + ["data.bag_level=case"]
    res = run.fit(config.load("abmil", over))
    pred = pd.read_csv(res.run_dir / "test_predictions.csv")
    assert list(pred["case_id"]) == ["case_000", "case_001"]
    assert list(pred["slide_ids"]) == ["demo_000;demo_001", "demo_002;demo_003"]
    test_slides = ["demo_000", "demo_001", "demo_002", "demo_003"]
    out, store = res.run_dir / "attention", FeatureStore(store_dir)
    att = pd.read_csv(out / "attention.csv")
    assert sorted(att["slide_id"].unique()) == test_slides
    for sid, g in att.groupby("slide_id"):
        assert (g["case_id"] == cases[sid]).all()
        coords = store.read_coords(sid)
        assert list(g["tile"]) == list(range(len(coords)))
        np.testing.assert_array_equal(g[["x", "y"]].to_numpy(), coords)
        for kind in ("heatmap", "topk", "bottomk"):
            assert Image.open(out / f"{sid}_{kind}.png").format == "PNG", (sid, kind)
    assert not list(out.glob("case_*"))  # nothing drawn per case
    np.testing.assert_allclose(att.groupby("case_id")["attention"].sum(), 1.0, atol=1e-4)
    mech = pd.read_csv(res.run_dir / "mechanism.csv")
    assert sorted(mech["slide_id"]) == test_slides and (mech["case_id"] == mech["slide_id"].map(cases)).all()
    tumour = set(df.loc[df["label"] == "tumor", "slide_id"]) & set(test_slides)
    assert set(mech.loc[mech["lesions"] > 0, "slide_id"]) == tumour  # each slide's own lesions
    assert "test/loc_auc" in res.metrics


# ----------------------------------------------------------------------------- minimal module
class RecordingWandbLogger(WandbLogger):
    """A WandbLogger that records ``log_image`` calls instead of starting a W&B run."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, list, list]] = []

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs: list) -> None:
        assert all(Path(p).exists() for p in images)
        self.calls.append((key, images, kwargs["caption"]))


def test_multi_map_attention_with_padding(demo: tuple[Path, Path], tmp_path: Path):
    """(B, H, N) attention on a padded batch: valid tiles only, one heat-map per map."""
    manifest, store_dir = demo
    store = FeatureStore(store_dir)
    ids = ["demo_000", "demo_001"]
    coords = [torch.from_numpy(store.read_coords(s)) for s in ids]
    n = [len(c) for c in coords]
    mask = torch.zeros(2, max(n), dtype=torch.bool)
    xy = torch.full((2, max(n), 2), -1, dtype=torch.int64)
    for i, c in enumerate(coords):
        mask[i, : n[i]], xy[i, : n[i]] = True, c
    scores = torch.randn(2, 2, max(n)).masked_fill(~mask[:, None], float("-inf"))
    att = scores.softmax(-1)  # (B, H, N), 0 on padding
    bag = Bag(torch.zeros(2, max(n), 4), mask, xy, {}, ids)
    wandb = RecordingWandbLogger(save_dir=str(tmp_path), offline=True)
    trainer = SimpleNamespace(is_global_zero=True, world_size=1, global_step=0,
                              default_root_dir=str(tmp_path),
                              datamodule=SimpleNamespace(manifest=load_manifest(manifest), store=store),
                              progress_bar_callback=None, loggers=[wandb])
    module = SimpleNamespace(last_output=MILOutput(logits={}, attention=att))
    cb = AttentionLogger(normalisation="minmax", top_k=2, bottom_k=0, max_slides=1, out_dir="maps")
    cb.on_test_epoch_start(trainer, module)
    cb.on_test_batch_end(trainer, module, None, bag, 0)
    cb.on_test_batch_end(trainer, module, None, bag, 1)  # a repeated slide is kept once
    cb.on_test_epoch_end(trainer, module)
    df = pd.read_csv(tmp_path / "maps" / "attention.csv")
    assert df.groupby(["slide_id", "map"]).size().to_dict() == {
        (s, h): n[i] for i, s in enumerate(ids) for h in (0, 1)}
    np.testing.assert_allclose(df.groupby(["slide_id", "map"])["attention"].sum(), 1.0, atol=1e-5)
    pngs = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert pngs == ["demo_000_map0_heatmap.png", "demo_000_map0_topk.png",
                    "demo_000_map1_heatmap.png", "demo_000_map1_topk.png"]  # max_slides=1
    assert [(k, len(v)) for k, v, _ in wandb.calls] == [("maps/heatmap", 2), ("maps/topk", 2)]
    assert wandb.calls[0][2] == ["demo_000/demo_000_map0_heatmap", "demo_000/demo_000_map1_heatmap"]


# ----------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import sys
from wsi_lightning import config, run
res = run.fit(config.load(sys.argv[1], sys.argv[2:]))
print("RUN_DIR", res.run_dir, flush=True)
"""


@pytest.mark.ddp
def test_ddp_every_test_slide_appears_once(demo: tuple[Path, Path], tmp_path: Path):
    manifest, store = demo
    df = pd.read_csv(manifest)  # fixed split: 3 test slides, an uneven shard over 2 ranks
    df["path"] = [str(manifest.parent / p) for p in df["path"]]
    # per label: 1st case test (a two-slide case for seed 3), 2nd train, 3rd val (each rank
    # needs a val slide, so val holds 2)
    nth = df.groupby("label")["case_id"].rank(method="dense").astype(int)
    df["split"] = np.where(nth == 1, "test", np.where(nth == 2, "train", "val"))
    df.to_csv(tmp_path / "manifest.csv", index=False)
    over = demo_overrides(tmp_path / "manifest.csv", store, tmp_path / "runs",
                          "[{name: attention_logger, top_k: 2, bottom_k: 0}]")
    over += ["trainer.devices=2", "trainer.strategy=ddp"]
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "WSI_RUN_DIR")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(script), "abmil", *over], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("RUN_DIR")))
    test_ids = sorted(pd.read_csv(run_dir / "test_predictions.csv")["slide_id"])
    assert test_ids == sorted(df.loc[df["split"] == "test", "slide_id"]) and len(test_ids) == 3
    df = pd.read_csv(run_dir / "attention" / "attention.csv")
    assert sorted(df["slide_id"].unique()) == test_ids
    store_n = {s: len(FeatureStore(store).read_coords(s)) for s in test_ids}
    assert df.groupby("slide_id").size().to_dict() == store_n, "each slide's tiles exactly once"
    for sid in test_ids:
        assert (run_dir / "attention" / f"{sid}_heatmap.png").exists()
