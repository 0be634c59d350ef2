"""FeatureStore: round trips, fast path == zarr API, atomic writes, partial entries, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_lightning.errors import StoreError
from wsi_lightning.features import store as store_mod
from wsi_lightning.features.store import CALLER_ATTRS, STORE_ATTRS, FeatureStore

ATTRS = {
    "mpp": 0.5,
    "tile_size": 112,
    "tile_size_um": 56.0,
    "level": 0,
    "extent_level0": 112,
    "backbone": "demo_cnn",
    "weights_hash": "0123456789abcdef",
    "extraction": {"batch_size": 64},
}
DEAD_PID = 4_194_305  # above Linux's pid_max limit (2**22): never a running process


def _bag(n: int = 37, d: int = 16, dtype: type = np.float16, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(dtype)  # (N, D)
    coords = rng.integers(0, 50_000, (n, 2))  # (N, 2)
    return feats, coords


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_round_trip(store: FeatureStore, dtype: type) -> None:
    feats, coords = _bag(dtype=dtype)
    store.write_slide("s1", feats, coords, ATTRS)
    out_f, out_c = store.read("s1")
    assert out_f.dtype == dtype and out_f.shape == feats.shape
    np.testing.assert_array_equal(out_f, feats)
    assert out_c.dtype == np.int64
    np.testing.assert_array_equal(out_c, coords)
    np.testing.assert_array_equal(store.read_features("s1"), feats)
    np.testing.assert_array_equal(store.read_coords("s1"), coords)
    attrs = store.attrs("s1")
    assert set(CALLER_ATTRS) | set(STORE_ATTRS) <= set(attrs)
    assert attrs["complete"] is True and attrs["num_instances"] == 37 and attrs["feature_dim"] == 16
    assert attrs["mpp"] == 0.5 and attrs["extraction"] == {"batch_size": 64}
    assert store.num_instances("s1") == 37 and store.feature_dim() == 16
    assert store.complete_slides() == ["s1"] and store.is_complete("s1")
    assert store.path("s1") == store.root / "s1.zarr"


def test_fast_path_matches_zarr_api(store: FeatureStore) -> None:
    feats, coords = _bag(n=101, d=24, dtype=np.float32)
    store.write_slide("s1", feats, coords, ATTRS)
    out_f, out_c = store.read("s1")
    meta = store._meta["s1"]
    assert meta.features is not None and meta.coords is not None  # fast path taken
    assert meta.features.path.endswith(os.path.join("features", "c", "0", "0"))
    np.testing.assert_array_equal(
        out_f, zarr.open_array(store.path("s1") / "features", mode="r")[...]
    )
    np.testing.assert_array_equal(
        out_c, zarr.open_array(store.path("s1") / "coords", mode="r")[...]
    )
    group = zarr.open_group(store.path("s1"), mode="r")
    assert group.attrs["complete"] is True


def test_all_zero_features_chunk_written(store: FeatureStore) -> None:
    feats = np.zeros((5, 4), np.float16)
    store.write_slide("z", feats, np.zeros((5, 2), np.int64), ATTRS)
    np.testing.assert_array_equal(store.read_features("z"), feats)
    assert store._meta["z"].features is not None


def test_other_layouts_fall_back_to_zarr(store: FeatureStore) -> None:
    """A group written by another tool (compressed, chunked) is read through zarr."""
    feats, coords = _bag(n=50, d=8, dtype=np.float32)
    group = zarr.open_group(store.path("ext"), mode="w", attributes={"complete": True})
    group.create_array("features", data=feats, chunks=(16, 8))  # default zstd, several chunks
    group.create_array("coords", data=coords.astype(np.int64), chunks=(50, 2))
    out_f, out_c = store.read("ext")
    np.testing.assert_array_equal(out_f, feats)
    np.testing.assert_array_equal(out_c, coords)
    assert store._meta["ext"].features is None  # not fast-readable
    assert store.num_instances("ext") == 50 and store.feature_dim() == 8


def test_big_endian_falls_back_to_zarr(store: FeatureStore) -> None:
    feats, coords = _bag(n=9, d=3, dtype=np.float32)
    group = zarr.open_group(store.path("be"), mode="w", attributes={"complete": True})
    for name, data in (("features", feats), ("coords", coords.astype(np.int64))):
        group.create_array(
            name, data=data, chunks=data.shape, compressors=None,
            serializer=zarr.codecs.BytesCodec(endian="big"),
        )  # fmt: skip
    out_f, out_c = store.read("be")
    assert store._meta["be"].features is None
    np.testing.assert_array_equal(out_f, feats)
    np.testing.assert_array_equal(out_c, coords)


def test_corrupt_chunk_is_an_error_not_garbage(store: FeatureStore) -> None:
    store.write_slide("s1", *_bag(), ATTRS)
    store.read("s1")  # metadata cached
    with open(store.path("s1") / "features" / "c" / "0" / "0", "ab") as fh:
        fh.write(b"\0" * 10)
    with pytest.raises(StoreError, match="cannot read array 'features' of slide 's1'"):
        store.read("s1")


def test_overwrite_replaces_and_invalidates_caches(store: FeatureStore) -> None:
    other = FeatureStore(store.root)  # a second reader with its own metadata cache
    store.write_slide("s1", *_bag(n=10, d=4), ATTRS)
    other.read("s1")
    feats, coords = _bag(n=20, d=4, seed=1)
    store.write_slide("s1", feats, coords, ATTRS)
    np.testing.assert_array_equal(store.read_features("s1"), feats)
    np.testing.assert_array_equal(other.read_features("s1"), feats)
    assert sorted(p.name for p in store.root.iterdir()) == ["s1.zarr"]


def test_failed_write_leaves_previous_slide(store: FeatureStore, monkeypatch) -> None:
    feats, coords = _bag()
    store.write_slide("s1", feats, coords, ATTRS)

    def crash(path: Path, *args) -> None:
        zarr.open_group(path, mode="w", attributes={"mpp": 0.5})  # partially written
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_write_group", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_slide("s1", *_bag(seed=3), ATTRS)
    with pytest.raises(KeyboardInterrupt):
        store.write_slide("s2", *_bag(seed=3), ATTRS)
    assert sorted(p.name for p in store.root.iterdir()) == ["s1.zarr"]
    np.testing.assert_array_equal(store.read_features("s1"), feats)


def test_complete_written_last(store: FeatureStore, monkeypatch) -> None:
    """The group is complete only after both arrays are in."""
    seen: list[bool] = []
    real = zarr.Group.create_array

    def spy(self, name, **kwargs):
        seen.append(bool(dict(self.attrs).get("complete")))
        return real(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", spy)
    store.write_slide("s1", *_bag(), ATTRS)
    assert seen == [False, False] and store.is_complete("s1")


def test_clean_partial(store: FeatureStore) -> None:
    store.write_slide("done", *_bag(), ATTRS)
    root = store.root
    zarr.open_group(root / "half.zarr", mode="w", attributes={"mpp": 0.5})  # no 'complete'
    (root / f".tmp-dead-{DEAD_PID}-abcd1234.zarr").mkdir()
    (root / f".trash-old-{DEAD_PID}-abcd1234.zarr").mkdir()
    alive = root / f".tmp-busy-{os.getppid()}-abcd1234.zarr"  # another process still writing
    alive.mkdir()
    (root / "tiles").mkdir()  # unrelated folders are left alone
    assert not store.is_complete("half")
    with pytest.raises(StoreError, match="incomplete.*interrupted extraction.*rerun"):
        store.read("half")
    removed = store.clean_partial()
    assert sorted(removed) == sorted(
        ["half.zarr", f".tmp-dead-{DEAD_PID}-abcd1234.zarr", f".trash-old-{DEAD_PID}-abcd1234.zarr"]
    )
    assert alive.exists() and (root / "tiles").exists()
    assert store.complete_slides() == ["done"]
    assert FeatureStore(root / "nothing").clean_partial() == []


def test_missing_slide_error(store: FeatureStore) -> None:
    store.write_slide("s1", *_bag(), ATTRS)
    with pytest.raises(StoreError) as err:
        store.read("nope")
    msg = str(err.value)
    assert "'nope'" in msg and str(store.path("nope")) in msg
    assert "wsi extract" in msg and "wsi import-features" in msg
    for call in (store.attrs, store.num_instances, store.read_features):
        with pytest.raises(StoreError, match="no features for slide 'nope'"):
            call("nope")
    assert not store.is_complete("nope")


def test_feature_dim_empty_store(store: FeatureStore) -> None:
    with pytest.raises(StoreError, match="no complete slides"):
        store.feature_dim()
    assert store.complete_slides() == []


@pytest.mark.parametrize(
    ("feats", "coords", "match"),
    [
        (
            np.ones((5, 4), np.float16),
            np.ones((4, 2)),
            r"coords must have shape \(N, 2\) = \(5, 2\)",
        ),
        (np.ones((5, 0), np.float16), np.ones((5, 2)), "N > 0 and D > 0"),
        (np.ones((0, 4), np.float16), np.ones((0, 2)), "N > 0 and D > 0"),
        (np.ones(5, np.float16), np.ones((5, 2)), r"shape \(N, D\)"),
        (np.array([[1.0, np.nan], [1, 1]], np.float32), np.ones((2, 2)), "NaN or inf in 1 of 2"),
        (np.array([[1.0, np.inf]], np.float32), np.ones((1, 2)), "NaN or inf"),
        (np.ones((2, 2), np.int32), np.ones((2, 2)), "float16 or float32"),
        (np.ones((2, 2), np.float32), np.full((2, 2), 0.5), "integer"),
    ],
)
def test_write_validation(store: FeatureStore, feats, coords, match: str) -> None:
    with pytest.raises(StoreError, match=match) as err:
        store.write_slide("bad_slide", feats, coords, ATTRS)
    assert "'bad_slide'" in str(err.value)
    assert not store.path("bad_slide").exists()


@pytest.mark.parametrize("slide_id", ["", ".hidden", "a/b", "..", "x\\y"])
def test_invalid_slide_id(store: FeatureStore, slide_id: str) -> None:
    with pytest.raises(StoreError, match="invalid slide id"):
        store.write_slide(slide_id, *_bag(), ATTRS)


def test_attrs_are_made_json(store: FeatureStore) -> None:
    attrs = {**ATTRS, "mpp": np.float32(0.25), "level": np.int64(1), "shape": (3, 4),
             "path": Path("/x"), "complete": False, "num_instances": -1}  # fmt: skip
    store.write_slide("s1", *_bag(), attrs)
    out = store.attrs("s1")
    assert out["mpp"] == 0.25 and out["level"] == 1 and out["shape"] == [3, 4]
    assert out["path"] == "/x" and out["complete"] is True and out["num_instances"] == 37
    with open(store.path("s1") / "zarr.json") as fh:
        assert json.load(fh)["attributes"]["format_version"] == store_mod.FORMAT_VERSION
    with pytest.raises(StoreError, match="attribute 'bad' is not JSON-serialisable"):
        store.write_slide("s2", *_bag(), {"bad": object()})


def test_float64_stored_as_float32(store: FeatureStore) -> None:
    feats, coords = _bag(dtype=np.float64)
    store.write_slide("s1", feats, coords.astype(np.float64), ATTRS)
    out = store.read_features("s1")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, feats, rtol=1e-6)


def test_metadata_cache_is_bounded(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, cache_size=3)
    for i in range(5):
        store.write_slide(f"s{i}", *_bag(n=3, d=2), ATTRS)
        store.read(f"s{i}")
    assert list(store._meta) == ["s2", "s3", "s4"]
