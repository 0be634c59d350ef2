"""Mechanism metrics: hand-made cases with known answers for every pure function, the callback on
a minimal trainer / module for each method family, DDP gathering, and one real tiny fit whose
metrics reach metrics.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.methods_helpers import CONTRACT_KWARGS
from wsi_lightning.analysis import mechanism as mech
from wsi_lightning.analysis.interpret import localisation_auc
from wsi_lightning.callbacks.mechanism import Mechanism
from wsi_lightning.data.batch import Bag, LevelSet
from wsi_lightning.errors import ConfigError
from wsi_lightning.methods.base import MILOutput, RoiTree, TileMap
from wsi_lightning.slides.annotations import Lesion
from wsi_lightning.slides.multiscale import CHILD_OFFSETS

LOGGER = "wsi_lightning.callbacks.mechanism"


def square(x0: float, y0: float, side: float) -> Lesion:
    return Lesion(np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float))


def geojson(path: Path, boxes: list[tuple[float, float, float, float]], name: str = "Tumor") -> None:
    feats = [{"type": "Feature", "properties": {"classification": {"name": name}},
              "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}
             for x0, y0, x1, y1 in boxes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


# ----------------------------------------------------------------------------- pure functions
def test_box_lesion_fraction_on_off_and_half():
    les = [square(100, 100, 100)]
    boxes = np.array([[100, 100, 200, 200], [300, 300, 400, 400], [50, 100, 150, 200], [0, 0, 400, 400]])
    np.testing.assert_allclose(mech.box_lesion_fraction(boxes, les), [1.0, 0.0, 0.5, 1 / 16])
    assert mech.box_lesion_fraction(boxes, []).tolist() == [0.0] * 4


def test_lesion_area_fraction_on_a_mask_and_the_slide_fallback():
    les = [Lesion(np.array([[0, 0], [50, 0], [50, 100], [0, 100]], float))]  # left half of [0, 100]^2
    mask = np.ones((10, 10), bool)  # 10 level-0 px a mask pixel
    assert mech.lesion_area_fraction(mask, 10.0, les) == pytest.approx(0.5)
    mask[:, 5:] = False  # tissue only where the lesion is
    assert mech.lesion_area_fraction(mask, 10.0, les) == pytest.approx(1.0)
    assert mech.lesion_area_fraction(mask, 10.0, []) == 0.0
    assert np.isnan(mech.lesion_area_fraction(np.zeros((3, 3), bool), 1.0, les))
    full, px = mech.slide_mask(1000, 500, max_side=100)
    assert full.shape == (50, 100) and px == 10.0
    assert mech.lesion_area_fraction(full, px, [square(0, 0, 500)]) == pytest.approx(0.5)


def test_roi_record_per_depth():
    les = [square(0, 0, 100)]
    frames = [np.array([[0, 0, 400, 400]]),  # depth 0: the slide
              np.array([[0, 0, 100, 100], [200, 200, 300, 300]]),  # one ROI on, one off: 0.5
              np.array([[0, 0, 50, 50], [50, 50, 100, 100]])]  # both leaves on the lesion: 1
    assert mech.roi_record(frames, les) == {"roi_in_lesion_d1": 0.5, "roi_in_lesion_d2": 1.0}


def two_level_slide() -> tuple[list[np.ndarray], list[float], Lesion]:
    """Two coarse tiles of 128 px at x = 0, 128 and their 8 children (HAG-MIL order); the lesion
    is the first coarse tile."""
    coarse = np.array([[0, 0], [128, 0]])
    fine = (coarse[:, None] + CHILD_OFFSETS[None] * 64).reshape(-1, 2)  # (8, 2)
    return [coarse, fine], [128.0, 64.0], square(0, 0, 128)


def test_cascade_recall_keeping_every_or_no_lesion_child():
    coords, extents, les = two_level_slide()
    keep = mech.cascade_record(coords, extents, [np.arange(2), np.arange(4)], [les])
    assert keep["lesion_tiles_l1"] == 4 and keep["lesion_scored_l1"] == 4 and keep["scored_l1"] == 4
    miss = mech.cascade_record(coords, extents, [np.arange(2), np.arange(4, 8)], [les])
    assert miss["lesion_scored_l1"] == 0 and miss["tiles_l1"] == 8
    recs = [{"slide_id": "a", "lesions": 1, **keep}]
    assert mech.summarise(recs)["lesion_recall_l1"] == 1.0
    recs = [{"slide_id": "b", "lesions": 1, **miss}]
    assert mech.summarise(recs)["lesion_recall_l1"] == 0.0
    normal = mech.cascade_record(coords, extents, [np.arange(2), np.arange(4)], [])
    out = mech.summarise([{"slide_id": "a", "lesions": 1, **keep}, {"slide_id": "b", "lesions": 1, **miss},
                          {"slide_id": "n", "lesions": 0, **normal}])
    assert out == {"lesion_recall_l1": 0.5, "lesion_recall_min": 0.5,  # pooled: 4 of 8 lesion tiles
                   "tiles_scored_finest": 4.0, "tiles_finest_all": 8.0}  # all 3 slides


def test_roc_auc_hand_made_and_against_sklearn():
    y = np.array([1, 1, 0, 0, 0], bool)
    assert mech.roc_auc(np.array([5, 4, 3, 2, 1]), y) == 1.0
    assert mech.roc_auc(np.array([1, 2, 3, 4, 5]), y) == 0.0
    assert mech.roc_auc(np.ones(5), y) == 0.5
    assert np.isnan(mech.roc_auc(np.ones(3), np.zeros(3, bool)))
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.random(200) < 0.3
        s = np.round(gt * 0.4 + rng.random(200), 1)  # ties
        assert mech.roc_auc(s, gt) == pytest.approx(roc_auc_score(gt, s))
        assert mech.roc_auc(s, gt) == pytest.approx(localisation_auc([s], [gt]))


def test_localisation_summary_pooled_and_per_slide():
    a = mech.attention_record(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0], bool))  # perfect
    b = mech.attention_record(np.array([10.0, 30.0, 20.0]), np.array([0, 1, 0], bool))  # perfect
    c = mech.attention_record(np.array([0.1, 0.5]), np.array([1, 0], bool))  # reversed
    assert (a["loc_auc"], b["loc_auc"], c["loc_auc"]) == (1.0, 1.0, 0.0)
    normal = {"slide_id": "n", "lesions": 0, "loc_auc": float("nan"), "tiles": 5, "lesion_tiles": 0}
    recs = [{"slide_id": s, "lesions": 1, **r} for s, r in zip("abc", (a, b, c), strict=True)] + [normal]
    out = mech.summarise(recs)
    assert out["loc_auc_slide"] == pytest.approx(2 / 3)
    pooled = np.concatenate([mech.minmax(x) for x in ([0.9, 0.8, 0.1, 0.2], [10, 30, 20], [0.1, 0.5])])
    gt = np.array([1, 1, 0, 0, 0, 1, 0, 1, 0])
    assert out["loc_auc"] == pytest.approx(roc_auc_score(gt, pooled))
    assert set(out) == {"loc_auc", "loc_auc_slide"}  # no other family applies


def test_cross_scale_and_roi_summaries():
    w = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    rec = mech.cross_scale_record(w, np.array([1, 1, 0, 0], bool))
    assert rec["cs_weight_s0_in"] == pytest.approx(0.8) and rec["cs_weight_s1_out"] == pytest.approx(0.7)
    other = mech.cross_scale_record(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 0], bool))
    out = mech.summarise([{"slide_id": "a", "lesions": 2, **rec}, {"slide_id": "b", "lesions": 1, **other}])
    assert out["cs_weight_s0_in"] == pytest.approx((0.9 + 0.7 + 0.0) / 3)  # pooled over tiles
    assert out["cs_weight_s1_out"] == pytest.approx((0.8 + 0.6 + 0.0) / 3)
    roi = [{"slide_id": "a", "lesions": 1, "roi_in_lesion_d1": 0.5, "roi_in_lesion_d2": 0.6, "lesion_area_fraction": 0.2},
           {"slide_id": "b", "lesions": 1, "roi_in_lesion_d1": 0.3, "roi_in_lesion_d2": 0.2, "lesion_area_fraction": 0.1},
           {"slide_id": "n", "lesions": 0, "roi_in_lesion_d1": 0.0, "roi_in_lesion_d2": 0.0}]
    out = mech.summarise(roi)
    assert out["roi_in_lesion"] == out["roi_in_lesion_d2"] == pytest.approx(0.4)
    assert out["lesion_area_fraction"] == pytest.approx(0.15)
    assert out["roi_in_lesion_ratio"] == pytest.approx(0.4 / 0.15)
    nothing = mech.summarise([r | {"lesions": 0} for r in roi])  # no tumour slide: NaN, keys kept
    assert set(nothing) == set(out) and all(np.isnan(v) for v in nothing.values())


# ----------------------------------------------------------------------------- HAG-MIL extras
def test_hag_mil_maps_index_the_scored_tiles_of_each_level():
    from tests.methods_helpers import quadtree_bag
    from wsi_lightning.methods.hag_mil import HAGMILNet

    torch.manual_seed(0)
    net = HAGMILNet(8, {"label": 2}, n_levels=3, t_patch=1, v_patch=2, **CONTRACT_KWARGS["hag_mil"]).eval()
    bag = quadtree_bag(8, b=2, n0=4, pad_to=5)
    with torch.no_grad():
        maps = net(bag).tile_maps
    for lv, m in zip(bag.levels, maps, strict=True):
        idx = m.index  # (B, n)
        assert idx.dtype == torch.int64 and torch.equal(idx >= 0, m.mask)
        for b in range(2):
            valid = idx[b][idx[b] >= 0]
            assert bool(lv.mask[b][valid].all()) and len(set(valid.tolist())) == len(valid)
            assert torch.equal(m.coords[b][idx[b] >= 0], lv.coords[b][valid])
    assert (maps[1].index >= 0).sum(1).tolist() == [8, 8]  # v_patch=2 parents: 8 children a bag


# ----------------------------------------------------------------------------- callback
@pytest.mark.parametrize("kwargs, match", [
    ({"metrics": ["roi", "attention"]}, r"metrics=\['roi', 'attention'\]; expected a non-empty list of"),
    ({"metrics": []}, r"metrics=\[\]"),
    ({"tile_rule": "area"}, r"tile_rule='area'; expected one of \['centre', 'overlap'\]"),
    ({"min_overlap": 0}, r"min_overlap=0; expected a number in \(0, 1\]"),
    ({"min_overlap": True}, r"min_overlap=True"),
    ({"grid": 1}, r"grid=1; expected an integer >= 2"),
    ({"attention_map": 0.5}, r"attention_map=0.5"),
    ({"tissue_mpp": -1}, r"tissue_mpp=-1"),
    ({"write_csv": "yes"}, r"write_csv='yes'; expected true or false"),
])
def test_arguments_are_validated_up_front(kwargs: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        Mechanism(**kwargs)


def test_registered_and_built_from_an_experiment_config(tmp_path: Path):
    from wsi_lightning import build, config
    from wsi_lightning.registry import CALLBACKS

    build.import_registered()
    assert CALLBACKS.get("mechanism") is Mechanism
    cfg = config.load("abmil", ["callbacks=[{name: mechanism, tile_rule: overlap, metrics: [localisation]}]"])
    cb = [c for c in build.build_callbacks(cfg, tmp_path) if isinstance(c, Mechanism)]
    assert len(cb) == 1 and cb[0].families == ("localisation",) and cb[0].tile_rule == "overlap"


class FakeModule(SimpleNamespace):
    """What the callback touches: ``last_output`` and ``log``."""

    def log(self, name: str, value: float, **kwargs: object) -> None:
        assert kwargs == {"rank_zero_only": True}
        self.logged[name] = value


def fake_run(tmp_path: Path, slides: dict[str, list | None], extent: int = 100,
             paths: dict[str, str] | None = None) -> SimpleNamespace:
    """A trainer whose datamodule has a manifest (annotations written for slides with a box
    list; None: no annotation file) and a store with the tile extent."""
    rows = []
    for sid, boxes in slides.items():
        if boxes is not None:
            geojson(tmp_path / "annotations" / f"{sid}.geojson", boxes)
        rows.append({"slide_id": sid, "path": (paths or {}).get(sid, str(tmp_path / f"{sid}.tiff")), "mpp": 0.5})
    manifest = SimpleNamespace(df=pd.DataFrame(rows), source=tmp_path / "manifest.csv")
    store = SimpleNamespace(attrs=lambda sid: {"extent_level0": extent})
    return SimpleNamespace(is_global_zero=True, world_size=1, default_root_dir=str(tmp_path),
                           datamodule=SimpleNamespace(manifest=manifest, store=store))


def run_callback(cb: Mechanism, trainer: SimpleNamespace, batches: list[tuple[object, MILOutput]]) -> dict:
    module = FakeModule(last_output=None, logged={})
    cb.on_test_epoch_start(trainer, module)
    for i, (batch, out) in enumerate(batches):
        module.last_output = out
        cb.on_test_batch_end(trainer, module, None, batch, i)
    cb.on_test_epoch_end(trainer, module)
    return module.logged


def row_bag(ids: list[str], n: int, tile: int = 100) -> Bag:
    """B bags of n tiles on a row (x = 0, tile, 2 tile...), all valid."""
    xy = torch.stack([torch.arange(n) * tile, torch.zeros(n, dtype=torch.int64)], 1)
    return Bag(torch.zeros(len(ids), n, 4), torch.ones(len(ids), n, dtype=torch.bool),
               xy.expand(len(ids), -1, -1).clone(), {}, ids)


def test_attention_lesion_tiles_first_gives_auc_1_and_the_csv(tmp_path: Path):
    trainer = fake_run(tmp_path, {"t1": [(0, 0, 200, 100)], "t2": [(300, 0, 400, 100)], "n1": []})
    bag = row_bag(["t1", "t2", "n1"], 4)
    att = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25] * 4])  # lesion tiles first
    logged = run_callback(Mechanism(), trainer, [(bag, MILOutput({}, attention=att))])
    assert logged == {"test/loc_auc": 1.0, "test/loc_auc_slide": 1.0}
    logged = run_callback(Mechanism(), trainer, [(bag, MILOutput({}, attention=1 - att))])
    assert logged == {"test/loc_auc": 0.0, "test/loc_auc_slide": 0.0}
    df = pd.read_csv(tmp_path / "mechanism.csv")
    assert df["slide_id"].tolist() == ["n1", "t1", "t2"] and df["lesions"].tolist() == [0, 1, 1]
    assert df["annotation"].tolist() == ["annotated"] * 3 and df["lesion_tiles"].tolist() == [0, 2, 1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # CHOWDER-style tile scores (no attention), and (B, H, N) attention's chosen map
    logged = run_callback(Mechanism(), trainer, [(bag, MILOutput({}, tile_scores=att))])
    assert logged["test/loc_auc"] == 1.0
    multi = torch.stack([1 - att, att], 1)  # (B, 2, N): the last map is the good one
    assert run_callback(Mechanism(), trainer, [(bag, MILOutput({}, attention=multi))])["test/loc_auc"] == 1.0
    assert run_callback(Mechanism(attention_map=0), trainer, [(bag, MILOutput({}, attention=multi))])["test/loc_auc"] == 0.0


def test_cross_scale_in_and_out_with_merged_test_bags(tmp_path: Path):
    trainer = fake_run(tmp_path, {"t1": [(0, 0, 100, 100)], "n1": []})
    bag = row_bag(["t1", "t1", "n1"], 3)  # two sampled bags of t1 in one batch
    bag.coords[1] = bag.coords[1].flip(0)  # the second bag holds the same tiles in another order
    r = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]],
                      [[0.4, 0.6], [0.2, 0.8], [0.7, 0.3]],  # tile 0 at row 2: weight (0.7, 0.3)
                      [[0.5, 0.5]] * 3])
    out = MILOutput({}, attention=torch.full((3, 3), 1 / 3), cross_scale=r)
    logged = run_callback(Mechanism(metrics=["cross_scale"]), trainer, [(bag, out)])
    assert logged["test/cs_weight_s0_in"] == pytest.approx(0.8)  # tile 0: mean of 0.9 and 0.7
    assert logged["test/cs_weight_s1_out"] == pytest.approx(((0.8 + 0.8) / 2 + (0.7 + 0.6) / 2) / 2)
    assert set(logged) == {f"test/cs_weight_s{k}_{s}" for k in (0, 1) for s in ("in", "out")}


def quadtree_batch(ids: list[str], scored: list[list[int]]) -> tuple[Bag, MILOutput]:
    """Bags of the two-level slide, level 1 scored at the given indices (-1-padded)."""
    (coarse, fine), extents, _ = two_level_slide()
    b = len(ids)
    sets = []
    for xy, ext in zip((coarse, fine), extents, strict=True):
        n = len(xy)
        sets.append(LevelSet(torch.zeros(b, n, 4), torch.ones(b, n, dtype=torch.bool),
                             torch.from_numpy(xy).expand(b, -1, -1).clone(), torch.full((b, n), -1), int(ext), 1.0))
    width = max(map(len, scored))
    idx1 = torch.tensor([s + [-1] * (width - len(s)) for s in scored])
    maps = [TileMap(f"level{lvl}", torch.zeros(i.shape), i >= 0, torch.zeros(*i.shape, 2), ext, i)
            for lvl, (i, ext) in enumerate(zip((torch.arange(2).expand(b, -1), idx1), extents, strict=True))]
    fin = sets[-1]
    return Bag(fin.features, fin.mask, fin.coords, {}, ids, sets), MILOutput({}, tile_maps=maps)


def test_hag_mil_recall_and_tiles_scored(tmp_path: Path):
    trainer = fake_run(tmp_path, {"a": [(0, 0, 128, 128)], "b": [(0, 0, 128, 128)], "n": []})
    bag, out = quadtree_batch(["a", "b", "n"], [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1]])
    logged = run_callback(Mechanism(), trainer, [(bag, out)])
    assert logged == {"test/lesion_recall_l1": 0.5, "test/lesion_recall_min": 0.5,
                      "test/tiles_scored_finest": pytest.approx(10 / 3), "test/tiles_finest_all": 8.0}


def test_ddp_records_are_gathered_each_slide_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch.distributed as dist

    trainer = fake_run(tmp_path, {"a": [(0, 0, 128, 128)], "b": [(0, 0, 128, 128)]})
    trainer.world_size = 2
    other_rank = [{"slide_id": "b", "annotation": "annotated", "lesions": 1,
                   **mech.cascade_record(*two_level_slide()[:2], [np.arange(2), np.arange(4, 8)],
                                         [two_level_slide()[2]])},
                  {"slide_id": "a", "annotation": "annotated", "lesions": 1, "tiles_l0": 99}]  # a repeat

    def all_gather_object(parts: list, obj: list) -> None:
        parts[0], parts[1] = obj, other_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    bag, out = quadtree_batch(["a"], [[0, 1, 2, 3]])
    logged = run_callback(Mechanism(), trainer, [(bag, out)])
    assert logged["test/lesion_recall_l1"] == 0.5  # a (4 of 4) from this rank, b (0 of 4) from the other
    df = pd.read_csv(tmp_path / "mechanism.csv")
    assert df["slide_id"].tolist() == ["a", "b"] and df["tiles_l0"].tolist() == [2, 2]


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 x 512 px at 0.5 µm/px: glass, with tissue (pink) on the left half."""
    from wsi_lightning.slides.pyramid import write_pyramid_tiff

    img = np.full((512, 512, 3), 245, np.uint8)
    img[:, :256] = (200, 80, 150)
    path = tmp_path_factory.mktemp("tissue") / "t1.tiff"
    write_pyramid_tiff(path, img, 0.5, n_levels=2, tile=256)
    return path


def roi_output(ids: list[str]) -> MILOutput:
    b = len(ids)
    frames = [torch.tensor([[[0.0, 0.0, 512.0, 512.0]]]).expand(b, -1, -1),
              torch.tensor([[[0.0, 0.0, 128.0, 128.0], [300.0, 0.0, 428.0, 128.0]]]).expand(b, -1, -1),
              torch.tensor([[[0.0, 0.0, 64.0, 64.0], [64.0, 64.0, 128.0, 128.0]] * 2]).expand(b, -1, -1)]
    return MILOutput({}, roi_tree=RoiTree(frames, (2, 2)))


def test_magnet_rois_against_tissue_chance_and_the_slide_area_fallback(tmp_path: Path, tissue_slide: Path,
                                                                      caplog: pytest.LogCaptureFixture):
    lesion = [(0, 0, 128, 512)]  # half of the tissue, a quarter of the slide
    trainer = fake_run(tmp_path, {"t1": lesion, "n1": []}, paths={"t1": str(tissue_slide)})
    batch = SimpleNamespace(slide_ids=["t1", "n1"], paths=[str(tissue_slide), "missing.tiff"],
                            mpp=torch.tensor([float("nan")] * 2, dtype=torch.float64),
                            dimensions=torch.tensor([[512, 512]] * 2))
    logged = run_callback(Mechanism(tissue_mpp=4.0), trainer, [(batch, roi_output(["t1", "n1"]))])
    assert logged["test/roi_in_lesion_d1"] == 0.5 and logged["test/roi_in_lesion"] == 1.0
    assert logged["test/roi_in_lesion_d2"] == 1.0
    assert logged["test/lesion_area_fraction"] == pytest.approx(0.5, abs=0.05)  # of the tissue
    assert logged["test/roi_in_lesion_ratio"] == pytest.approx(2.0, rel=0.1)
    assert pd.read_csv(tmp_path / "mechanism.csv").set_index("slide_id").loc["t1", "area"] == "tissue"
    batch.paths = None  # no slide file: the manifest's path does not exist either -> slide area
    trainer.datamodule.manifest.df["path"] = str(tmp_path / "missing.tiff")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        logged = run_callback(Mechanism(), trainer, [(batch, roi_output(["t1", "n1"]))])
    assert logged["test/lesion_area_fraction"] == pytest.approx(0.25)
    assert [r.getMessage() for r in caplog.records if "uses the slide area" in r.getMessage()]
    assert pd.read_csv(tmp_path / "mechanism.csv").set_index("slide_id").loc["t1", "area"] == "slide"


def test_no_annotations_warn_once_and_log_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    trainer = fake_run(tmp_path, {"a": None, "b": None})
    bag = row_bag(["a", "b"], 3)
    cb = Mechanism()
    out = MILOutput({}, attention=torch.full((2, 3), 1 / 3))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        logged = run_callback(cb, trainer, [(bag, out)])
        run_callback(cb, trainer, [(bag, out)])
    assert logged == {}  # nothing to measure against: no NaN columns in metrics.json
    warned = [r for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "none of the 2 test slides has a lesion annotation" in warned[0].getMessage()
    assert run_callback(Mechanism(), trainer, [(bag, MILOutput({}))]) == {}  # nothing applies: nothing


def test_real_fit_reaches_metrics_json(tmp_path: Path):
    """A tiny ABMIL fit: the callback's test/ metrics land in metrics.json, beside mechanism.csv."""
    from tests.conftest import feature_cfg_overrides, make_feature_bags
    from wsi_lightning import config, run

    manifest = make_feature_bags(tmp_path / "bags", n_slides=12)
    df = pd.read_csv(manifest)
    for sid, label in zip(df["slide_id"], df["label"], strict=True):  # coords: x = 112 i, y = 0
        geojson(manifest.parent / "annotations" / f"{sid}.geojson", [(0, 0, 336, 112)] if label == "class1" else [])
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "trainer.max_epochs": 1, "callbacks": "[{name: mechanism}]"})
    res = run.fit(config.load("abmil", over))
    saved = json.loads((res.run_dir / "metrics.json").read_text())["metrics"]
    per_slide = pd.read_csv(res.run_dir / "mechanism.csv")
    test_ids = sorted(pd.read_csv(res.run_dir / "test_predictions.csv")["slide_id"])
    assert per_slide["slide_id"].tolist() == test_ids
    assert {"test/loc_auc", "test/loc_auc_slide"} <= set(saved)
    tumour = per_slide[per_slide["lesions"] > 0]
    assert len(tumour) >= 1  # seed 0: one class-1 slide among the 2 test slides
    assert saved["test/loc_auc_slide"] == pytest.approx(tumour["loc_auc"].mean())


DDP_SCRIPT = """
import sys
from wsi_lightning import config, run
res = run.fit(config.load(sys.argv[1], sys.argv[2:]))
print("RUN_DIR", res.run_dir, flush=True)
"""


@pytest.mark.ddp
def test_ddp_fit_measures_each_test_slide_once(tmp_path: Path):
    """2 ranks, 3 test slides (an uneven shard): every slide once in mechanism.csv, metrics in
    metrics.json (logged from rank 0)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, feature_cfg_overrides, make_feature_bags

    manifest = make_feature_bags(tmp_path / "bags", n_slides=12)
    df = pd.read_csv(manifest)
    # cases c000-c003 own s000-s007 (two slides each); test: 3 single-slide cases; val: both labels
    df["split"] = ["val", "val"] + ["train"] * 6 + ["test", "test", "test", "val"]
    df.to_csv(manifest, index=False)
    for sid, label in zip(df["slide_id"], df["label"], strict=True):
        geojson(manifest.parent / "annotations" / f"{sid}.geojson", [(0, 0, 336, 112)] if label == "class1" else [])
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "trainer.max_epochs": 1, "callbacks": "[{name: mechanism}]"})
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
    per_slide = pd.read_csv(run_dir / "mechanism.csv")
    assert per_slide["slide_id"].tolist() == ["s008", "s009", "s010"]
    saved = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    tumour = per_slide[per_slide["lesions"] > 0]
    assert len(tumour) == 1 and saved["test/loc_auc_slide"] == pytest.approx(tumour["loc_auc"].mean())
