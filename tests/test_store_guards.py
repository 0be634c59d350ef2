"""Feature-store guards: finite features on read, provenance (no silent reuse or mixing of
settings), temp folders of several hosts sharing one store, and the shared slide-id check."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from wsi_lightning.data.bags import BagDataset, FeatureScaler
from wsi_lightning.errors import StoreError
from wsi_lightning.features import extract as ex
from wsi_lightning.features import store as store_mod
from wsi_lightning.features.backbones import build_backbone
from wsi_lightning.features.store import STALE_AGE_S, FeatureStore
from wsi_lightning.manifest import load_manifest

TILING = {"tile_size": 64, "mpp": 1.0, "min_tissue": 0.5, "thumb_mpp": 8.0,
          "multiscale": {"mode": "none", "context": [1, 2, 4], "levels": 3, "min_child_tissue": None}}
FEATS = {"backbone": "demo_cnn", "pretrained": False, "weights": None, "batch_size": 32,
         "num_workers": 0, "dtype": "float16", "accelerator": "cpu", "devices": 1}
DEAD_PID = 4_194_305  # above Linux's pid_max limit (2**22): never a running process


def _bag(n: int = 37, d: int = 16, dtype: type = np.float16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(dtype), rng.integers(0, 50_000, (n, 2))  # (N, D), (N, 2)


def _extracted_attrs(tiling: dict, features: dict, weights_hash: str | None = None) -> dict:
    """The attributes extraction records for a slide made with these settings (no slide needed)."""
    backbone = build_backbone(features["backbone"], pretrained=False, weights=features.get("weights"))
    attrs = {"mpp": tiling["mpp"], "tile_size": tiling["tile_size"], "level": 0,
             **ex._recorded_attrs(tiling, features, backbone)}
    if weights_hash is not None:
        attrs["weights_hash"] = weights_hash
    return attrs


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


# ----------------------------------------------------------------------------- 1. finite on read
def _chunk(store: FeatureStore, sid: str) -> Path:
    return store.path(sid) / "features" / "c" / "0" / "0"


def _assert_names_slide(err: pytest.ExceptionInfo, store: FeatureStore, sid: str) -> None:
    msg = str(err.value)
    assert f"'{sid}'" in msg and str(store.path(sid)) in msg and str(store.root) in msg
    assert "NaN or inf" in msg and "Delete" in msg and "wsi extract" in msg


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_nan_chunk_file_raises_on_read(store: FeatureStore, dtype: type) -> None:
    feats, coords = _bag(dtype=dtype)
    store.write_slide("s1", feats, coords, {})
    store.read("s1")  # metadata cached: the fast path reads the overwritten file
    _chunk(store, "s1").write_bytes(np.full(feats.shape, np.nan, dtype).tobytes())
    for read in (store.read, store.read_features):
        with pytest.raises(StoreError) as err:
            read("s1")
        _assert_names_slide(err, store, "s1")
        assert "37 of 37 rows" in str(err.value)
    np.testing.assert_array_equal(store.read_coords("s1"), coords)  # coords are not features


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_random_bytes_of_the_right_size_raise_on_read(store: FeatureStore, dtype: type) -> None:
    feats, coords = _bag(n=64, d=32, dtype=dtype)
    store.write_slide("s1", feats, coords, {})
    garbage = np.random.default_rng(1).bytes(feats.nbytes)
    assert not np.isfinite(np.frombuffer(garbage, dtype)).all()  # what garbage floats hold
    _chunk(store, "s1").write_bytes(garbage)
    with pytest.raises(StoreError) as err:
        store.read("s1")
    _assert_names_slide(err, store, "s1")


def test_single_inf_written_with_zarr_raises_on_every_read_path(store: FeatureStore, monkeypatch) -> None:
    store.write_slide("s1", *_bag(dtype=np.float32), {})
    store.write_slide("s2", *_bag(seed=2, dtype=np.float32), {})
    zarr.open_array(store.path("s1") / "features", mode="r+")[3, 5] = np.inf
    with pytest.raises(StoreError, match="1 of 37 rows") as err:
        store.read("s1")
    _assert_names_slide(err, store, "s1")
    monkeypatch.setattr(store_mod, "_fast_meta", lambda *a: None)  # the zarr API fallback
    with pytest.raises(StoreError, match="slide 's1'"):
        FeatureStore(store.root).read("s1")
    # what the data modules read through (every bag dataset and the standardiser)
    ds = BagDataset(FeatureStore(store.root), ["s2", "s1"], {"label": {"s1": 0, "s2": 1}})
    assert ds[0]["features"].shape == (37, 16)
    with pytest.raises(StoreError, match="slide 's1'"):
        ds[1]
    with pytest.raises(StoreError, match="slide 's1'"):
        FeatureScaler.fit(FeatureStore(store.root), ["s1", "s2"])


def test_finite_check_matches_isfinite() -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32, np.float64):
        a = rng.normal(size=(50, 8)).astype(dtype)
        assert store_mod._all_finite(a)
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[7, 3] = bad
            assert not store_mod._all_finite(b)
    big = np.array([[65504.0, -65504.0, 6e-8]], np.float16)  # float16 extremes are finite
    assert store_mod._all_finite(big) and store_mod._all_finite(np.zeros((0, 4), np.float16))


# ----------------------------------------------------------------------------- 2. provenance
FEATS_B = {**FEATS, "backbone": "demo_filters"}


def test_check_with_other_backbone_raises_naming_both(store: FeatureStore) -> None:
    for i in range(4):
        store.write_slide(f"s{i}", *_bag(d=128, seed=i), _extracted_attrs(TILING, FEATS))
    assert store.check_provenance(ex.expected_provenance(TILING, FEATS)) == {}
    with pytest.raises(StoreError) as err:
        store.check_provenance(ex.expected_provenance(TILING, FEATS_B))
    msg = str(err.value)
    assert str(store.root) in msg and "4 of 4 slide(s)" in msg
    assert 'features.backbone: configured "demo_filters", recorded "demo_cnn"' in msg
    assert "s0, s1, s2, ... (1 more)" in msg
    assert "data.store" in msg and "delete" in msg and "features.accept_store_mismatch=true" in msg


def test_accept_mismatch_warns_and_passes(store: FeatureStore, caplog) -> None:
    store.write_slide("s0", *_bag(d=128), _extracted_attrs(TILING, FEATS))
    with caplog.at_level(logging.WARNING, logger="wsi_lightning.features.store"):
        diffs = store.check_provenance(ex.expected_provenance(TILING, FEATS_B), accept_mismatch=True)
    assert diffs == {"backbone": {'"demo_cnn"': ["s0"]}}
    assert "demo_filters" in caplog.text and "accept_store_mismatch=true" in caplog.text
    with pytest.raises(StoreError, match="does not add slides made with other settings"):
        store.check_provenance(ex.expected_provenance(TILING, FEATS_B), accept_mismatch=True, adding=True)


@pytest.mark.parametrize(
    ("tiling", "features", "label"),
    [
        ({**TILING, "mpp": 0.5}, FEATS, "tiling.mpp: configured 0.5, recorded 1.0"),
        ({**TILING, "tile_size": 224}, FEATS, "tiling.tile_size"),
        ({**TILING, "min_tissue": 0.25}, FEATS, "tiling.min_tissue"),
        ({**TILING, "multiscale": {**TILING["multiscale"], "mode": "concentric"}}, FEATS,
         'tiling.multiscale.mode: configured "concentric", recorded "none"'),
        (TILING, {**FEATS, "pretrained": True}, "features.pretrained: configured true"),
        (TILING, {**FEATS, "weights": "/w/other.pth"}, 'features.weights: configured "/w/other.pth"'),
    ],
)
def test_other_tiling_or_weights_raise(store: FeatureStore, tiling: dict, features: dict, label: str) -> None:
    store.write_slide("s0", *_bag(d=128), _extracted_attrs(TILING, FEATS))
    with pytest.raises(StoreError) as err:
        store.check_provenance(ex.expected_provenance(tiling, features))
    assert label in str(err.value)


def test_settings_that_do_not_change_features_are_not_compared(store: FeatureStore) -> None:
    store.write_slide("s0", *_bag(d=128), _extracted_attrs(TILING, FEATS))
    # multiscale keys of another mode, the stored dtype, loader settings
    tiling = {**TILING, "multiscale": {"mode": "none", "context": [1, 3], "levels": 5}}
    features = {**FEATS, "dtype": "float32", "batch_size": 7, "num_workers": 3, "devices": 2}
    assert store.check_provenance(ex.expected_provenance(tiling, features)) == {}
    # an explicit weights file overrides `pretrained`: only the file is compared then
    attrs = _extracted_attrs(TILING, FEATS)
    attrs["extraction"]["weights"] = "/w/a.pth"
    store.write_slide("s0", *_bag(d=128), attrs)
    w = {**FEATS, "weights": "/w/a.pth", "pretrained": True}
    assert store.check_provenance(ex.expected_provenance(TILING, w)) == {}


def test_imported_slides_are_not_checked_but_never_extended(store: FeatureStore) -> None:
    store.write_slide("imp", *_bag(d=1024), {"backbone": None, "extraction": {"source": "clam_h5"}})
    assert store.check_provenance(ex.expected_provenance(TILING, FEATS_B)) == {}
    with pytest.raises(StoreError, match=r"1 imported slide\(s\) \(imp\).*Import the missing slides"):
        store.check_provenance(ex.expected_provenance(TILING, FEATS), adding=True)


def test_mixed_feature_dims_always_raise(store: FeatureStore) -> None:
    store.write_slide("a", *_bag(d=128), _extracted_attrs(TILING, FEATS))
    store.write_slide("b", *_bag(d=512), _extracted_attrs(TILING, FEATS))
    with pytest.raises(StoreError, match=r"mixes feature dimensions \(128-d: 1 slide\(s\) \(a\); 512-d"):
        store.check_provenance(ex.expected_provenance(TILING, FEATS), accept_mismatch=True)


@pytest.fixture(scope="module")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_lightning.demo.dataset import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_slides=3, seed=3, workers=1, size_um=768.0)


def _first(manifest: Path, n: int):
    """The manifest of the first ``n`` slides (with every class of the full one)."""
    df, out = pd.read_csv(manifest), manifest.with_name(f"first{n}.csv")  # relative paths hold
    df.head(n).to_csv(out, index=False)
    return load_manifest(out, classes=sorted(df["label"].unique()))


def test_extraction_refuses_to_add_slides_made_otherwise(demo_manifest: Path, tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "store")
    tiles = tmp_path / "tiles"
    two = _first(demo_manifest, 2)
    assert len(ex.extract_features(two, store, TILING, FEATS, tiles_dir=tiles)) == 2
    # what extraction records is what expected_provenance says it records
    attrs = store.attrs(two.df["slide_id"][0])
    for key, value in store_mod._flatten(ex.expected_provenance(TILING, FEATS, build_backbone("demo_cnn"))).items():
        found, got = store_mod._lookup(attrs, key)
        assert found and store_mod._same(got, store_mod._jsonable(value)), key
    assert store.check_provenance(ex.expected_provenance(TILING, FEATS)) == {}
    full = load_manifest(demo_manifest)
    third = full.df["slide_id"][2]
    for tiling, features, match in [(TILING, FEATS_B, "features.backbone"),
                                    ({**TILING, "mpp": 2.0}, FEATS, "tiling.mpp")]:
        with pytest.raises(StoreError, match=match) as err:
            ex.extract_features(full, store, tiling, features, tiles_dir=tiles)
        assert "Extraction does not add slides" in str(err.value)
        assert not store.path(third).exists() and not (tiles / f"{third}.npz").exists()  # before tiling
    assert ex.extract_features(full, store, TILING, FEATS, tiles_dir=tiles) == [third]  # same settings: fine


def test_extraction_checks_the_weights_hash(demo_manifest: Path, tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "store")
    store.write_slide("old", *_bag(d=128), _extracted_attrs(TILING, FEATS, weights_hash="0" * 16))
    m = _first(demo_manifest, 1)
    with pytest.raises(StoreError, match=r'weights hash \(features.weights / features.pretrained\): configured "'):
        ex.extract_features(m, store, TILING, FEATS, tiles_dir=tmp_path / "tiles")
    assert store.complete_slides() == ["old"]


def test_writer_refuses_another_feature_dim(demo_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """Last line of defence when a store records too little to compare (older versions)."""
    store = FeatureStore(tmp_path / "store")
    store.write_slide("old", *_bag(d=16), _extracted_attrs(TILING, FEATS))
    monkeypatch.setattr(FeatureStore, "check_provenance", lambda self, *a, **k: {})
    m = _first(demo_manifest, 1)
    with pytest.raises(StoreError, match=r"has 128-d features but the store's slides are 16-d"):
        ex.extract_features(m, store, TILING, FEATS, tiles_dir=tmp_path / "tiles")
    assert store.complete_slides() == ["old"]


# ----------------------------------------------------------------------------- 3. several hosts
def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_temp_names_carry_the_host(store: FeatureStore, monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a.cluster")
    seen: list[str] = []
    real = store_mod._write_group

    def spy(path: Path, *args) -> None:
        seen.append(path.name)
        real(path, *args)

    monkeypatch.setattr(store_mod, "_write_group", spy)
    store.write_slide("my-slide", *_bag(), {})
    assert seen[0].startswith(f".tmp-my-slide-@node_a.cluster-{os.getpid()}-")
    assert store_mod._temp_owner(seen[0]) == ("node_a.cluster", os.getpid())
    assert store_mod._temp_owner(f".tmp-my-slide-{DEAD_PID}-abcd1234.zarr") == (None, DEAD_PID)


def test_clean_partial_keeps_other_hosts_writes_until_stale(store: FeatureStore) -> None:
    store.write_slide("done", *_bag(), {})
    root, me = store.root, store_mod._host()
    other_young = root / f".tmp-s1-@othernode-{DEAD_PID}-abcd1234.zarr"
    other_old = root / f".tmp-s2-@othernode-{DEAD_PID}-abcd1234.zarr"
    other_trash_old = root / f".trash-s3-@othernode-{os.getppid()}-abcd1234.zarr"
    mine_dead = root / f".tmp-s4-@{me}-{DEAD_PID}-abcd1234.zarr"
    mine_alive = root / f".tmp-s5-@{me}-{os.getppid()}-abcd1234.zarr"
    for p in (other_young, other_old, other_trash_old, mine_dead, mine_alive):
        p.mkdir()
    _age(other_young, STALE_AGE_S / 2)
    _age(other_old, STALE_AGE_S + 60)
    _age(other_trash_old, STALE_AGE_S + 60)  # a PID alive here says nothing about another host
    _age(mine_alive, STALE_AGE_S + 60)  # alive: kept however old
    removed = store.clean_partial()
    assert sorted(removed) == sorted([other_old.name, other_trash_old.name, mine_dead.name])
    assert other_young.exists() and mine_alive.exists() and store.complete_slides() == ["done"]
    # the age limit is configurable, per store or per call
    assert FeatureStore(root, stale_age_s=60).clean_partial() == [other_young.name]


def test_clean_partial_age_limit_per_call(store: FeatureStore) -> None:
    store.write_slide("done", *_bag(), {})
    tmp = store.root / f".tmp-s1-@othernode-{DEAD_PID}-abcd1234.zarr"
    tmp.mkdir()
    _age(tmp, 120)
    assert store.clean_partial() == [] and tmp.exists()
    assert store.clean_partial(stale_age_s=60) == [tmp.name]


# ----------------------------------------------------------------------------- 4. slide ids
@pytest.mark.parametrize("slide_id", ["a:b", " s1", "s1 ", "", ".hidden", "a/b", "..", "x\\y", "n\0ul"])
def test_slide_ids_use_the_shared_check(store: FeatureStore, slide_id: str) -> None:
    with pytest.raises(StoreError, match="invalid slide id") as err:
        store.write_slide(slide_id, *_bag(), {})
    assert f"feature store {store.root}" in str(err.value) and "slide_id column" in str(err.value)
    assert not store.root.exists() or not list(store.root.iterdir())
