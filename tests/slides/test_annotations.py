"""Annotation classes: which GeoJSON features are lesions, regions by class, point tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_lightning.errors import WSIError
from wsi_lightning.slides.annotations import (
    Lesion,
    in_lesions,
    is_lesion_class,
    load_lesions,
    load_regions,
    tile_labels,
)


def _square(x0: float, y0: float, side: float) -> list[list[float]]:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def _feature(ring: list, name: str | None = None, plain: bool = False) -> dict:
    props = {} if name is None else {"classification": name if plain else {"name": name, "color": [1, 2, 3]}}
    return {"type": "Feature", "properties": props, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def _write(tmp_path: Path, features: list[dict]) -> Path:
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.mark.parametrize("name, lesion", [
    (None, True), ("", True), ("Tumor", True), ("tumour", True), ("Metastasis", True), ("Macro", True),
    ("Decoy-architecture", False), ("Decoy-cells", False), ("decoy", False), ("Candidate", False),
    ("candidate ", False), ("Ignore*", False), ("Region*", False), ("Stroma", False), ("Other", False),
    ("Necrosis", False), ("Immune cells", False), ("Exclusion", False), ("Tissue", False),
])
def test_lesion_classes(name: str | None, lesion: bool):
    assert is_lesion_class(name) is lesion


def test_decoys_and_candidates_are_not_lesions_but_can_be_loaded_by_class(tmp_path: Path):
    path = _write(tmp_path, [
        _feature(_square(0, 0, 100), "Tumor"),
        _feature(_square(200, 0, 100)),  # unclassified: a lesion
        _feature(_square(400, 0, 100), "metastasis", plain=True),  # classification as a plain string
        _feature(_square(0, 200, 100), "Decoy-architecture"),
        _feature(_square(200, 200, 100), "Decoy-cells"),
        _feature(_square(400, 200, 100), "Candidate"),
        _feature(_square(600, 200, 100), "Region*"),
    ])
    lesions = load_lesions(path)
    assert sorted(les.exterior[0].tolist() for les in lesions) == [[0, 0], [200, 0], [400, 0]]
    cands = load_regions(path, "candidate")
    assert [c.exterior[0].tolist() for c in cands] == [[400, 200]]
    decoys = load_regions(path, ["Decoy-architecture", "DECOY-CELLS"])
    assert sorted(d.exterior[0].tolist() for d in decoys) == [[0, 200], [200, 200]]
    assert [r.exterior[0].tolist() for r in load_regions(path, "")] == [[200, 0]]
    # tiles on decoys / candidates are not lesion tiles
    y = tile_labels(np.array([[0, 0], [0, 200], [400, 200]]), 100, lesions, "centre")
    assert y.tolist() == [True, False, False]


def _typed(feature: dict, object_type: str, key: str = "objectType") -> dict:
    return {**feature, "properties": {**feature["properties"], key: object_type}}


@pytest.mark.parametrize("shape", ["collection", "array"])
def test_detections_are_not_lesions(tmp_path: Path, shape: str):
    """QuPath detections (tiles of a ``wsi export-qupath`` file, cells...) are skipped in every
    export shape, so a file holding lesions and detections yields its lesions only."""
    feats = [
        _typed(_feature(_square(0, 0, 100), "Tumor"), "annotation"),
        _feature(_square(200, 0, 100), "Tumor"),  # no objectType: QuPath reads it as an annotation
        _typed(_feature(_square(0, 200, 100), "Tumor"), "detection"),  # unclassified-like tiles too
        _typed(_feature(_square(200, 200, 100)), "detection"),
        _typed(_feature(_square(400, 200, 100), "Tumor"), "cell"),
        _typed(_feature(_square(600, 200, 100), "Tumor"), "tile"),
        _typed(_feature(_square(800, 200, 100), "Tumor"), "Detection", key="object_type"),  # QuPath < 0.3
        {**_feature(_square(1000, 200, 100), "Tumor"), "id": "PathDetectionObject"},  # QuPath 0.2
        _typed(_feature(_square(0, 400, 300), "Tissue"), "annotation"),  # the export's outline
    ]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(feats if shape == "array" else {"type": "FeatureCollection", "features": feats}))
    assert sorted(les.exterior[0].tolist() for les in load_lesions(path)) == [[0, 0], [200, 0]]
    assert [r.exterior[0].tolist() for r in load_regions(path, "tissue")] == [[0, 400]]
    assert load_regions(path, "") == []  # the unclassified detection is not a region either


def test_camelyon16_converted_annotations_keep_working(tmp_path: Path):
    from wsi_lightning.data.camelyon16 import to_geojson

    tumour = np.array(_square(0, 0, 300)[:-1], float)
    inner = np.array(_square(100, 100, 100)[:-1], float)  # an exclusion inside: a hole
    loose = np.array(_square(500, 500, 100)[:-1], float)  # an exclusion in no tumour: its own feature
    gj, n_holes, n_loose = to_geojson([tumour], [inner, loose])
    assert (n_holes, n_loose) == (1, 1)
    path = tmp_path / "tumor_001.geojson"
    path.write_text(json.dumps(gj))
    lesions = load_lesions(path)
    assert len(lesions) == 1 and len(lesions[0].holes) == 1
    y = tile_labels(np.array([[0, 0], [100, 100], [500, 500]]), 100, lesions, "centre")
    assert y.tolist() == [True, False, False]


def test_in_lesions_matches_a_plain_polygon_test_and_unreadable_files_name_the_file(tmp_path: Path):
    rng = np.random.default_rng(0)
    tri = Lesion(np.array([[0, 0], [0, 200], [200, 200]], float))
    ring = Lesion(np.array(_square(300, 300, 100)[:-1], float), [np.array(_square(325, 325, 50)[:-1], float)])
    pts = rng.uniform(-50, 450, size=(2000, 2))
    expected = tri.contains(pts) | ring.contains(pts)
    np.testing.assert_array_equal(in_lesions(pts, [tri, ring]), expected)
    assert not in_lesions(pts, []).any()
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(WSIError, match="bad.geojson: cannot read GeoJSON"):
        load_lesions(bad)


def test_every_qupath_export_shape_is_read(tmp_path: Path):
    """FeatureCollection, QuPath's bare JSON array of features, one Feature and a bare geometry give
    the same lesions; anything else is a clear error (a bare array once crashed the attention
    logger with an AttributeError)."""
    tumour, stroma = _feature(_square(0, 0, 10), "Tumor"), _feature(_square(50, 50, 10), "Stroma")
    shapes = {"collection": {"type": "FeatureCollection", "features": [tumour, stroma]},
              "array": [tumour, stroma], "feature": tumour, "geometry": tumour["geometry"]}
    got = {}
    for name, obj in shapes.items():
        (tmp_path / f"{name}.geojson").write_text(json.dumps(obj))
        lesions = load_lesions(tmp_path / f"{name}.geojson")
        got[name] = [les.exterior.tolist() for les in lesions]
    assert all(v == got["collection"] for v in got.values()) and len(got["collection"]) == 1
    for bad, match in ((42, "top level: 'int'"), ([tumour, 7], "entry 1 of its features is a int"),
                       ({"type": "Point", "coordinates": [1, 2]}, "top level: 'Point'")):
        (tmp_path / "bad.geojson").write_text(json.dumps(bad))
        with pytest.raises(WSIError, match=match):
            load_lesions(tmp_path / "bad.geojson")
