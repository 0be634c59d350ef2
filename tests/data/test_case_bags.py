"""Patient-level bags (``data.bag_level=case``): one bag per case from all its slides, labels that
must agree within a case, the whole case subsampled, standardisation and splits as for slides,
unpadded DDP shares of cases, and the DataModules that refuse case bags at config time."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import feature_cfg_overrides, make_case_bags
from wsi_lightning import build, config
from wsi_lightning.data.bags import BagDataModule
from wsi_lightning.errors import ConfigError, ManifestError
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.manifest import load_manifest

SPLIT = {"val": 0.25, "test": 0.25}


@pytest.fixture
def case_data(tmp_path: Path) -> Path:
    return make_case_bags(tmp_path, n_cases=12)


def case_dm(manifest: Path, **kw) -> BagDataModule:
    m = load_manifest(manifest, "label", check_files=False)
    dm = BagDataModule(m, manifest.parent / "store", split=SPLIT, bag_level="case", **kw)
    dm.setup()
    return dm


def test_one_bag_per_case_with_every_slide_and_its_slide_index(case_data: Path):
    dm = case_dm(case_data, batch_size=3)
    store, df = FeatureStore(case_data.parent / "store"), pd.read_csv(case_data)
    slides_of = df.groupby("case_id")["slide_id"].apply(list).to_dict()
    label_of = df.groupby("case_id")["label"].first().map({"class0": 0, "class1": 1}).to_dict()
    for split in ("train", "val", "test"):  # the patient-level split: every slide of a case in one split
        assert sorted(dm.cases[split]) == sorted(df.loc[df["slide_id"].isin(dm.splits[split]), "case_id"].unique())
        assert sorted(s for c in dm.cases[split] for s in slides_of[c]) == sorted(dm.splits[split])
    seen = []
    for bag in dm.test_dataloader():
        assert bag.slides is not None and bag.slide_index.shape == bag.mask.shape
        for b, cid in enumerate(bag.slide_ids):
            seen.append(cid)
            assert bag.slides[b] == slides_of[cid] and len(slides_of[cid]) in (2, 3)
            assert int(bag.labels["label"][b]) == label_of[cid]
            n = int(bag.mask[b].sum())
            assert (bag.slide_index[b, n:] == -1).all() and (bag.coords[b, n:] == -1).all()
            for k, sid in enumerate(slides_of[cid]):  # each slide's rows, in store order
                feats, coords = store.read(sid)
                rows = (bag.slide_index[b] == k).nonzero().flatten()
                assert len(rows) == len(feats) and bool(bag.mask[b, rows].all())
                torch.testing.assert_close(bag.features[b, rows], torch.from_numpy(feats).float())
                np.testing.assert_array_equal(bag.coords[b, rows].numpy(), coords)  # its own frame
    assert sorted(seen) == sorted(dm.cases["test"])


def test_max_bag_size_subsamples_the_whole_case_in_training_only(case_data: Path):
    dm = case_dm(case_data, batch_size=1, max_bag_size=12)
    ds = dm.datasets["train"]
    across = 0
    for i in range(len(ds)):
        item = ds[(i, 0)]
        assert len(item["features"]) == 12 == len(item["slide_index"]) == len(item["coords"])
        across += len(set(item["slide_index"].tolist())) > 1  # drawn from the whole case
        again = ds[(i, 0)]  # (seed, case, epoch): the same draw in any worker
        torch.testing.assert_close(item["features"], again["features"])
        assert not torch.equal(ds[(i, 1)]["features"], item["features"])  # a new draw each epoch
    assert across == len(ds)
    assert min(int(b.mask.sum()) for b in dm.test_dataloader()) > 12  # evaluation: every instance


def test_a_slide_the_store_lacks_leaves_its_case_with_the_others(case_data: Path, tmp_path: Path):
    df = pd.read_csv(case_data)
    lost = df[df["case_id"] == "c002"].iloc[[0]].assign(slide_id="c002_s9")  # no features in the store
    path = tmp_path / "lost.csv"
    pd.concat([df, lost]).to_csv(path, index=False)
    dm = case_dm(path)
    split = next(k for k, v in dm.left_out.items() if v)
    assert dm.left_out[split] == ["c002_s9"]
    ds = dm.datasets[split]
    assert ds.cases["c002"] == list(df.loc[df["case_id"] == "c002", "slide_id"])


def test_standardisation_is_the_training_slides_as_for_slide_bags(case_data: Path):
    cases = case_dm(case_data, standardize=True)
    m = load_manifest(case_data, "label", check_files=False)
    slides = BagDataModule(m, case_data.parent / "store", split=SPLIT, standardize=True)
    slides.setup()
    assert slides.splits == cases.splits
    np.testing.assert_array_equal(cases.scaler.mean, slides.scaler.mean)
    np.testing.assert_array_equal(cases.scaler.std, slides.scaler.std)
    assert cases.state_dict() == slides.state_dict()


def test_unpadded_ddp_shares_cover_every_case_once(case_data: Path):
    dm = case_dm(case_data, batch_size=1)
    world = 3
    assert len(dm.cases["test"]) % world, "want an uneven shard"
    shares = []
    for rank in range(world):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        shares.append([cid for bag in dm.test_dataloader() for cid in bag.slide_ids])
    dm.trainer = None
    everyone = [cid for share in shares for cid in share]
    assert sorted(everyone) == sorted(dm.cases["test"]), "each case on exactly one rank"


def _relabel(manifest: Path, out: Path, changes: dict[str, str]) -> Path:
    df = pd.read_csv(manifest)
    for sid, label in changes.items():
        df.loc[df["slide_id"] == sid, "label"] = label
    df.to_csv(out, index=False)
    return out


def test_disagreeing_labels_within_a_case_are_a_manifest_error(case_data: Path, tmp_path: Path):
    bad = _relabel(case_data, tmp_path / "bad.csv", {"c003_s1": "class0"})  # c003 is class1
    m = load_manifest(bad, "label", check_files=False)
    with pytest.raises(ManifestError) as err:
        BagDataModule(m, case_data.parent / "store", split=SPLIT, bag_level="case")
    msg = str(err.value)
    assert "case 'c003' has slides with different label labels" in msg and str(bad) in msg
    assert "'c003_s0' (row" in msg and "'class1'" in msg and "'c003_s1' (row" in msg and "'class0'" in msg
    assert "data.bag_level=slide" in msg
    BagDataModule(m, case_data.parent / "store", split=SPLIT).setup()  # slide bags: no constraint


def test_disagreeing_labels_fail_through_the_cli_before_any_data_work(case_data: Path, tmp_path: Path,
                                                                      monkeypatch, caplog):
    from wsi_lightning.cli import main
    from wsi_lightning.data.bags import FeatureScaler

    bad = _relabel(case_data, tmp_path / "bad.csv", {"c000_s0": "class1"})
    monkeypatch.setattr(FeatureScaler, "fit", classmethod(lambda *a, **k: pytest.fail("data work started")))
    args = feature_cfg_overrides(bad, tmp_path / "runs", **{"data.store": case_data.parent / "store",
                                                            "data.bag_level": "case"})
    with caplog.at_level(logging.ERROR):
        assert main(["fit", "abmil", *args]) == 2
    assert "case 'c000' has slides with different label labels" in caplog.text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_multitag_case_labels_per_tag_ignore_empty_cells(tmp_path: Path):
    rows = [("a1", "A", "he", "liver"), ("a2", "A", "", "liver"), ("a3", "A", "he", ""),
            ("b1", "B", "ihc", ""), ("b2", "B", "ihc", ""),  # B: organ unknown on every slide
            ("c1", "C", "he", "lung"), ("c2", "C", "ihc", "lung")]
    path = tmp_path / "tags.csv"
    pd.DataFrame(rows, columns=["slide_id", "case_id", "stain", "organ"]).to_csv(path, index=False)
    m = load_manifest(path, ["stain", "organ"], check_files=False)
    with pytest.raises(ManifestError, match=r"case 'C' has slides with different stain labels: 'c1' \(row 6\) "
                                            r"'he', 'c2' \(row 7\) 'ihc'"):
        m.labels_by_case()
    m.df = m.df[m.df["case_id"] != "C"]
    he, liver = m.classes["stain"].index("he"), m.classes["organ"].index("liver")
    assert m.labels_by_case() == {"stain": {"A": he, "B": m.classes["stain"].index("ihc")},
                                  "organ": {"A": liver, "B": -1}}


def test_bag_level_value_is_checked_when_the_config_is_loaded():
    with pytest.raises(ConfigError, match=r"config key 'data.bag_level' = 'patient'; expected one of "
                                          r"\['slide', 'case'\]"):
        config.load("abmil", ["data.bag_level=patient"])
    assert config.load("abmil").data.bag_level == "slide"


@pytest.mark.parametrize("exp, overrides, datamodule", [
    ("cs_mil", [], r"MultiScaleBagDataModule \(tiling.multiscale.mode=concentric stores\)"),
    ("abmil", ["tiling.multiscale.mode=concentric", "data.multiscale.mode=select"],
     r"MultiScaleBagDataModule \(tiling.multiscale.mode=concentric stores\)"),
    ("hag_mil", [], r"QuadtreeBagDataModule \(tiling.multiscale.mode=quadtree stores\)"),
    ("magnet_3layer", [], r"SlideSamplingDataModule \(on-the-fly slide sampling\)"),
    ("pt_3head_mta", [], r"SlideSamplingDataModule \(on-the-fly slide sampling\)"),
])
def test_datamodules_without_case_bags_refuse_them_at_config_time(exp: str, overrides: list[str],
                                                                  datamodule: str):
    cfg = config.load(exp, [*overrides, "data.bag_level=case"])
    with pytest.raises(ConfigError, match=rf"data.bag_level=case: {datamodule} builds one bag per slide "
                                          r"only; .*Set data.bag_level=slide"):
        build.method_kwargs(cfg)
    build.method_kwargs(config.load(exp, overrides))  # the same config with slide bags is fine


def test_unsupported_case_bags_fail_through_the_cli_before_any_data_work(tmp_path: Path, monkeypatch, caplog):
    from wsi_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "build_datamodule", lambda *a, **k: pytest.fail("data work started"))
    with caplog.at_level(logging.ERROR):
        assert main(["fit", "cs_mil", "data.bag_level=case", f"paths.runs={tmp_path / 'runs'}"]) == 2
    assert "data.bag_level=case: MultiScaleBagDataModule" in caplog.text
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_datamodule_without_case_bags_refuses_them_when_built_directly(case_data: Path):
    from wsi_lightning.data.multiscale import MultiScaleBagDataModule
    from wsi_lightning.data.quadtree import QuadtreeBagDataModule

    m = load_manifest(case_data, "label", check_files=False)
    for cls in (MultiScaleBagDataModule, QuadtreeBagDataModule):
        with pytest.raises(ConfigError, match=rf"data.bag_level=case: {cls.__name__}"):
            cls(m, case_data.parent / "store", bag_level="case")
