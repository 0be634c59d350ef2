"""Importers: tiny CLAM/TRIDENT-like .h5 and CLAM .pt files into a FeatureStore."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi_lightning.errors import StoreError
from wsi_lightning.features.importers import import_features, read_feature_file
from wsi_lightning.features.store import FeatureStore


def _arrays(n: int = 12, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)  # (N, D)
    coords = (rng.integers(0, 100, (n, 2)) * 256).astype(np.int64)  # (N, 2)
    return feats, coords


def _clam_h5(path: Path, feats: np.ndarray | None, coords: np.ndarray, **coord_attrs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if feats is not None:
            f.create_dataset("features", data=feats)
        dset = f.create_dataset("coords", data=coords)
        for key, value in coord_attrs.items():
            dset.attrs[key] = value
    return path


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


def test_clam_h5(tmp_path: Path, store: FeatureStore) -> None:
    feats, coords = _arrays()
    path = _clam_h5(tmp_path / "h5_files" / "slide_a.h5", feats, coords, patch_level=1,
                    patch_size=256, downsample=np.array([4.0, 4.0]), name=b"slide_a")  # fmt: skip
    assert import_features(path, store) == ["slide_a"]
    out_f, out_c = store.read("slide_a")
    np.testing.assert_array_equal(out_f, feats)
    np.testing.assert_array_equal(out_c, coords)
    attrs = store.attrs("slide_a")
    assert attrs["level"] == 1 and attrs["tile_size"] == 256 and attrs["extent_level0"] == 1024
    assert attrs["mpp"] is None  # not in CLAM files: pass attrs={"mpp": ...}
    assert attrs["source_attrs"]["name"] == "slide_a"
    assert attrs["extraction"]["source"] == "clam_h5"


def test_trident_h5(tmp_path: Path, store: FeatureStore) -> None:
    feats, coords = _arrays(d=6)
    path = _clam_h5(tmp_path / "features_uni_v1" / "slide_t.h5", feats, coords.astype(np.int32),
                    patch_size=224, patch_size_level0=448, target_magnification=20,
                    level0_magnification=40, overlap=0)  # fmt: skip
    import_features([path], store, attrs={"backbone": "uni_v1"})
    attrs = store.attrs("slide_t")
    assert attrs["extraction"]["source"] == "trident_h5"  # auto-detected
    assert attrs["tile_size"] == 224 and attrs["extent_level0"] == 448
    assert attrs["mpp"] == pytest.approx(0.5) and attrs["tile_size_um"] == pytest.approx(112.0)
    assert attrs["backbone"] == "uni_v1"
    assert attrs["source_attrs"]["level0_magnification"] == 40
    np.testing.assert_array_equal(store.read_features("slide_t"), feats)
    assert store.read_coords("slide_t").dtype == np.int64


def test_user_attrs_override_derived(tmp_path: Path, store: FeatureStore) -> None:
    path = _clam_h5(tmp_path / "s.h5", *_arrays(), patch_level=0, patch_size=256)
    import_features(path, store, fmt="clam_h5", attrs={"mpp": 0.25, "tile_size": 512})
    attrs = store.attrs("s")
    assert attrs["mpp"] == 0.25 and attrs["tile_size"] == 512 and attrs["extent_level0"] == 256


def test_clam_pt_with_coords_dir(tmp_path: Path, store: FeatureStore) -> None:
    feats, coords = _arrays()
    (tmp_path / "pt_files").mkdir()
    torch.save(torch.from_numpy(feats).half(), tmp_path / "pt_files" / "p1.pt")
    _clam_h5(tmp_path / "patches" / "p1.h5", None, coords, patch_level=0, patch_size=256)
    ids = import_features(tmp_path / "pt_files", store, coords_dir=tmp_path / "patches")
    assert ids == ["p1"]
    out_f, out_c = store.read("p1")
    assert out_f.dtype == np.float16
    np.testing.assert_array_equal(out_f, feats.astype(np.float16))
    np.testing.assert_array_equal(out_c, coords)
    assert store.attrs("p1")["tile_size"] == 256


def test_clam_pt_dict_with_coords(tmp_path: Path, store: FeatureStore) -> None:
    feats, coords = _arrays()
    path = tmp_path / "d.pt"
    torch.save(
        {"features": torch.from_numpy(feats)[None], "coords": torch.from_numpy(coords)}, path
    )
    import_features(path, store)  # (1, N, D) squeezed to (N, D)
    np.testing.assert_array_equal(store.read_features("d"), feats)


def test_clam_pt_needs_coords(tmp_path: Path, store: FeatureStore) -> None:
    path = tmp_path / "p2.pt"
    torch.save(torch.zeros(4, 3), path)
    with pytest.raises(StoreError, match="--coords-dir") as err:
        import_features(path, store)
    assert str(path) in str(err.value)
    with pytest.raises(StoreError, match="p2.h5' with a 'coords' dataset"):
        import_features(path, store, coords_dir=tmp_path / "patches")
    _clam_h5(tmp_path / "patches" / "p2.h5", None, np.zeros((5, 2), np.int64))
    with pytest.raises(StoreError, match="4 feature rows but 5 coordinates"):
        import_features(path, store, coords_dir=tmp_path / "patches")
    assert store.complete_slides() == []


def test_skip_complete_unless_overwrite(tmp_path: Path, store: FeatureStore) -> None:
    path = _clam_h5(tmp_path / "s.h5", *_arrays())
    assert import_features(path, store) == ["s"]
    assert import_features(path, store) == []
    new_feats, coords = _arrays(seed=1)
    _clam_h5(path, new_feats, coords)
    assert import_features(path, store, overwrite=True) == ["s"]
    np.testing.assert_array_equal(store.read_features("s"), new_feats)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: _clam_h5(p, None, np.zeros((3, 2))), r"missing dataset\(s\) \['features'\]"),
        (
            lambda p: _clam_h5(p, np.zeros((3, 4)), np.zeros((2, 2))),
            "features have 3 rows but coords have 2",
        ),
        (
            lambda p: _clam_h5(p, np.zeros((3, 4)), np.zeros((3, 3))),
            r"coords must have shape \(N, 2\)",
        ),
        (lambda p: _clam_h5(p, np.zeros(4), np.zeros((3, 2))), "slide-level embeddings"),
        (lambda p: p.write_bytes(b"not hdf5"), "not a readable HDF5 file"),
    ],
)
def test_bad_h5_files(tmp_path: Path, store: FeatureStore, make, match: str) -> None:
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(StoreError, match=match) as err:
        import_features(path, store)
    assert str(path) in str(err.value)


def test_bad_inputs(tmp_path: Path, store: FeatureStore) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        import_features(tmp_path / "missing.h5", store)
    with pytest.raises(StoreError, match="unknown feature format"):
        import_features(tmp_path, store, fmt="npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no .h5/.hdf5/.pt/.pth feature files"):
        import_features(tmp_path / "empty", store)
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot tell the feature format"):
        read_feature_file(tmp_path / "x.npy")
    torch.save({"feats": torch.zeros(2, 2)}, tmp_path / "k.pt")
    with pytest.raises(StoreError, match="without a 'features' key"):
        import_features(tmp_path / "k.pt", store)
    a = _clam_h5(tmp_path / "a" / "dup.h5", *_arrays())
    b = _clam_h5(tmp_path / "b" / "dup.h5", *_arrays())
    with pytest.raises(StoreError, match="two files give slide id 'dup'"):
        import_features([a, b], store)
