"""Camelyon16 manifest builder on a tiny fake CAMELYON16 tree (placeholder .tif files, never opened)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import zipfile
from pathlib import Path

import pytest

from wsi_lightning.data.camelyon16 import build_camelyon16_manifest, parse_asap_xml
from wsi_lightning.manifest import load_manifest
from wsi_lightning.errors import ManifestError

# tumor_001: a square tumour written with its vertices out of document order, an exclusion inside
# it (-> hole), a second (triangle) tumour, and an exclusion outside both (-> 'Exclusion' feature)
TUMOR_001 = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="_0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="1000.5" Y="1000" />
        <Coordinate Order="0" X="100.25" Y="100" />
        <Coordinate Order="3" X="100.25" Y="1000" />
        <Coordinate Order="1" X="1000.5" Y="100" />
      </Coordinates>
    </Annotation>
    <Annotation Name="_1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="300" Y="300" />
        <Coordinate Order="1" X="400" Y="300" />
        <Coordinate Order="2" X="350" Y="450.75" />
      </Coordinates>
    </Annotation>
    <Annotation Name="_2" Type="Spline" PartOfGroup="_1" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="2000" Y="2000" />
        <Coordinate Order="1" X="2500" Y="2000" />
        <Coordinate Order="2" X="2250" Y="2400" />
      </Coordinates>
    </Annotation>
    <Annotation Name="_3" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="5000" Y="5000" />
        <Coordinate Order="1" X="5100" Y="5000" />
        <Coordinate Order="2" X="5100" Y="5100" />
      </Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
    <Group Name="_1" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
    <Group Name="_2" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def _asap(group: str, x0: float, name: str = "Annotation 0") -> str:
    """One square annotation of side 50 at (x0, x0)."""
    pts = [(x0, x0), (x0 + 50, x0), (x0 + 50, x0 + 50), (x0, x0 + 50)]
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(pts))
    return (f'<ASAP_Annotations><Annotations><Annotation Name="{name}" Type="Polygon" '
            f'PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'
            "</Annotations></ASAP_Annotations>")


# Tumor / Exclusion group names (as in the test-set XMLs), plus a dot that must be skipped
TEST_001 = """<ASAP_Annotations><Annotations>
  <Annotation Name="A" Type="Polygon" PartOfGroup="Tumor"><Coordinates>
    <Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="100" Y="0" />
    <Coordinate Order="2" X="100" Y="100" /><Coordinate Order="3" X="0" Y="100" />
    <Coordinate Order="4" X="0" Y="0" />
  </Coordinates></Annotation>
  <Annotation Name="B" Type="Polygon" PartOfGroup="Exclusion"><Coordinates>
    <Coordinate Order="0" X="10" Y="10" /><Coordinate Order="1" X="20" Y="10" />
    <Coordinate Order="2" X="20" Y="20" />
  </Coordinates></Annotation>
  <Annotation Name="C" Type="Dot" PartOfGroup="Tumor"><Coordinates>
    <Coordinate Order="0" X="500" Y="500" />
  </Coordinates></Annotation>
</Annotations></ASAP_Annotations>
"""

REFERENCE = "test_001,Tumor,Macro,Primary\ntest_002,Normal\ntest_049,Normal\ntest_114,Tumor,Micro\n"


@pytest.fixture
def c16(tmp_path: Path) -> Path:
    """3 normal + 3 tumour training slides, 4 test slides (incl. test_049 and test_114)."""
    root = tmp_path / "CAMELYON16"
    for folder, ids in (("training/normal", ["normal_001", "normal_002", "normal_003"]),
                        ("training/tumor", ["tumor_001", "tumor_002", "tumor_003"]),
                        ("testing/images", ["test_001", "test_002", "test_049", "test_114"])):
        (root / folder).mkdir(parents=True)
        for sid in ids:
            (root / folder / f"{sid}.tif").write_bytes(b"II*\x00placeholder")
    train_ann = root / "training" / "lesion_annotations"
    train_ann.mkdir()
    (train_ann / "tumor_001.xml").write_text(TUMOR_001)
    (train_ann / "tumor_002.xml").write_text(_asap("_0", 10))
    (train_ann / "tumor_003.xml").write_text(_asap("Tumor", 20))
    test_ann = root / "testing" / "lesion_annotations"
    test_ann.mkdir()
    (test_ann / "test_001.xml").write_text(TEST_001)
    (test_ann / "test_114.xml").write_text(_asap("_0", 30))
    (root / "testing" / "reference.csv").write_text(REFERENCE)
    return root


def _rows(manifest: Path) -> dict[str, dict]:
    return {r["slide_id"]: r for r in csv.DictReader(open(manifest))}


def test_manifest_rows_labels_splits_paths(c16):
    out = build_camelyon16_manifest(c16)
    assert out == c16 / "camelyon16_manifest.csv"
    rows = _rows(out)
    assert list(rows) == ["normal_001", "normal_002", "normal_003", "tumor_001", "tumor_002",
                          "tumor_003", "test_001", "test_002", "test_114"]  # test_049 dropped
    assert list(next(iter(rows.values()))) == ["slide_id", "case_id", "path", "label", "split",
                                               "annotation", "exclude_localisation", "duplicate"]
    for sid, r in rows.items():
        assert r["case_id"] == sid
        assert r["split"] == ("test" if sid.startswith("test") else "train")
        assert not Path(r["path"]).is_absolute() and (out.parent / r["path"]).is_file()
        assert r["duplicate"] == "false"
    labels = {sid: r["label"] for sid, r in rows.items()}
    assert labels == {"normal_001": "normal", "normal_002": "normal", "normal_003": "normal",
                      "tumor_001": "tumor", "tumor_002": "tumor", "tumor_003": "tumor",
                      "test_001": "tumor", "test_002": "normal", "test_114": "tumor"}
    assert rows["tumor_002"]["path"] == "training/tumor/tumor_002.tif"
    annotated = {sid for sid, r in rows.items() if r["annotation"]}
    assert annotated == {"tumor_001", "tumor_002", "tumor_003", "test_001", "test_114"}
    assert rows["test_001"]["annotation"] == "annotations/test_001.geojson"
    assert all((out.parent / rows[s]["annotation"]).is_file() for s in annotated)
    assert {s for s, r in rows.items() if r["exclude_localisation"] == "true"} == {"test_114"}
    assert not list(c16.rglob("*.tmp"))


def test_manifest_loads_with_check_files(c16):
    m = load_manifest(build_camelyon16_manifest(c16), classes=["normal", "tumor"], check_files=True)
    assert len(m.df) == 9 and m.classes == {"label": ["normal", "tumor"]}
    assert set(m.df["split"]) == {"train", "test"}
    assert m.df.set_index("slide_id")["exclude_localisation"]["test_114"]


def test_keep_duplicates_flags_test_049(c16):
    rows = _rows(build_camelyon16_manifest(c16, keep_duplicates=True))
    assert rows["test_049"]["duplicate"] == "true" and rows["test_049"]["label"] == "normal"
    assert sum(r["duplicate"] == "true" for r in rows.values()) == 1


def test_normal_086_is_tumor_111(c16, caplog):
    (c16 / "training/normal/normal_086.tif").write_bytes(b"II*\x00")
    with caplog.at_level(logging.WARNING):
        assert "normal_086" not in _rows(build_camelyon16_manifest(c16))
    assert "normal_086" in caplog.text and "tumor_111" in caplog.text
    r = _rows(build_camelyon16_manifest(c16, keep_duplicates=True))["normal_086"]
    assert (r["label"], r["case_id"], r["duplicate"]) == ("tumor", "tumor_111", "true")


def test_test_049_without_image_is_ignored(c16):
    (c16 / "testing/images/test_049.tif").unlink()
    assert "test_049" not in _rows(build_camelyon16_manifest(c16, keep_duplicates=True))


def test_xml_to_geojson_exact_with_hole(c16):
    build_camelyon16_manifest(c16)
    geo = json.loads((c16 / "annotations" / "tumor_001.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    feats = geo["features"]
    assert [f["properties"]["classification"]["name"] for f in feats] == ["Tumor", "Tumor", "Exclusion"]
    assert all(f["properties"]["objectType"] == "annotation" for f in feats)
    assert all(f["geometry"]["type"] == "Polygon" for f in feats)
    square = [[100.25, 100.0], [1000.5, 100.0], [1000.5, 1000.0], [100.25, 1000.0], [100.25, 100.0]]
    hole = [[300.0, 300.0], [400.0, 300.0], [350.0, 450.75], [300.0, 300.0]]
    assert feats[0]["geometry"]["coordinates"] == [square, hole]
    assert feats[1]["geometry"]["coordinates"] == [
        [[2000.0, 2000.0], [2500.0, 2000.0], [2250.0, 2400.0], [2000.0, 2000.0]]]
    assert feats[2]["geometry"]["coordinates"] == [
        [[5000.0, 5000.0], [5100.0, 5000.0], [5100.0, 5100.0], [5000.0, 5000.0]]]


def test_named_groups_already_closed_ring_and_dot(c16, caplog):
    with caplog.at_level(logging.WARNING):
        build_camelyon16_manifest(c16)
    feats = json.loads((c16 / "annotations" / "test_001.geojson").read_text())["features"]
    assert len(feats) == 1  # the dot is skipped, the exclusion is a hole
    outer, hole = feats[0]["geometry"]["coordinates"]
    assert outer == [[0.0, 0.0], [100.0, 0.0], [100.0, 100.0], [0.0, 100.0], [0.0, 0.0]]
    assert hole == [[10.0, 10.0], [20.0, 10.0], [20.0, 20.0], [10.0, 10.0]]
    assert "fewer than 3 vertices" in caplog.text


def test_annotations_from_zip_match_folder(c16, tmp_path):
    build_camelyon16_manifest(c16)
    expected = (c16 / "annotations" / "tumor_001.geojson").read_text()
    shutil.rmtree(c16 / "annotations")
    folder = c16 / "training" / "lesion_annotations"
    with zipfile.ZipFile(c16 / "training" / "lesion_annotations.zip", "w") as zf:
        for xml in folder.iterdir():
            zf.write(xml, f"lesion_annotations/{xml.name}")
    shutil.rmtree(folder)
    out = build_camelyon16_manifest(c16, tmp_path / "elsewhere" / "c16.csv", tmp_path / "geo")
    assert (tmp_path / "geo" / "tumor_001.geojson").read_text() == expected
    rows = _rows(out)
    assert rows["tumor_001"]["annotation"] == str(tmp_path / "geo" / "tumor_001.geojson")
    assert Path(rows["tumor_001"]["path"]).is_absolute()  # manifest outside root: absolute paths
    load_manifest(out, check_files=True)


def test_reference_variants(c16):
    (c16 / "testing" / "reference.csv").unlink()
    (c16 / "testing" / "evaluation").mkdir()
    (c16 / "testing" / "evaluation" / "Reference.csv").write_text(
        "image;type;size\nTest_001.tif;Tumour;Macro\ntest_002;NORMAL\ntest_114;tumor\n")
    rows = _rows(build_camelyon16_manifest(c16))
    assert [rows[s]["label"] for s in ("test_001", "test_002", "test_114")] == ["tumor", "normal", "tumor"]


def test_missing_reference_csv(c16):
    (c16 / "testing" / "reference.csv").unlink()
    with pytest.raises(ManifestError, match=r"testing/reference\.csv not found"):
        build_camelyon16_manifest(c16)


def test_test_slide_absent_from_reference(c16):
    (c16 / "testing" / "reference.csv").write_text("test_001,Tumor\ntest_114,Tumor\n")
    with pytest.raises(ManifestError, match=r"reference.*reference\.csv.*no label.*'test_002'"):
        build_camelyon16_manifest(c16)


def test_bad_reference_label_names_row(c16):
    (c16 / "testing" / "reference.csv").write_text("test_001,Tumor\ntest_002,Maybe\n")
    with pytest.raises(ManifestError, match=r"reference\.csv row 2: slide 'test_002'.*'Maybe'"):
        build_camelyon16_manifest(c16)


def test_malformed_xml_names_file(c16):
    (c16 / "training" / "lesion_annotations" / "tumor_002.xml").write_text("<ASAP_Annotations><Annot")
    with pytest.raises(ManifestError, match=r"tumor_002\.xml: malformed XML"):
        build_camelyon16_manifest(c16)


def test_bad_coordinate_and_unknown_group_name_file(c16):
    xml = c16 / "training" / "lesion_annotations" / "tumor_003.xml"
    xml.write_text(_asap("_0", 0).replace('X="50"', 'X="abc"', 1))
    with pytest.raises(ManifestError, match=r"tumor_003\.xml: annotation 'Annotation 0' coordinate 1"):
        build_camelyon16_manifest(c16)
    xml.write_text(_asap("Lymphocytes", 0))
    with pytest.raises(ManifestError, match=r"tumor_003\.xml.*PartOfGroup 'Lymphocytes'"):
        build_camelyon16_manifest(c16)


def test_missing_folders_are_named(c16):
    shutil.rmtree(c16 / "training" / "lesion_annotations")
    with pytest.raises(ManifestError, match=r"lesion_annotations.*convert_annotations=False"):
        build_camelyon16_manifest(c16)
    rows = _rows(build_camelyon16_manifest(c16, convert_annotations=False))
    assert not any(r["annotation"] for r in rows.values())
    assert {s for s, r in rows.items() if r["exclude_localisation"] == "true"} == {
        "tumor_001", "tumor_002", "tumor_003", "test_001", "test_114"}
    shutil.rmtree(c16 / "training" / "normal")
    with pytest.raises(ManifestError, match=r"training/normal not found; expected the normal"):
        build_camelyon16_manifest(c16)


def test_parse_orders_vertices_by_order_attribute():
    tumours, exclusions, skipped = parse_asap_xml(TUMOR_001.encode(), "x.xml")
    assert tumours[0].tolist() == [[100.25, 100], [1000.5, 100], [1000.5, 1000], [100.25, 1000]]
    assert len(tumours) == 2 and len(exclusions) == 2 and skipped == 0


def test_summary_logged(c16, caplog):
    with caplog.at_level(logging.INFO, logger="wsi_lightning.data.camelyon16"):
        build_camelyon16_manifest(c16)
    assert "9 slides (test/normal=1, test/tumor=2, train/normal=3, train/tumor=3)" in caplog.text
    assert "5 XML converted (6 tumour polygons, 2 exclusion holes, 1 stand-alone exclusions, 1 skipped)" in caplog.text
    assert "test_049" in caplog.text


def test_test_slides_directly_in_testing(c16):
    for tif in (c16 / "testing" / "images").iterdir():
        tif.rename(c16 / "testing" / tif.name)
    (c16 / "testing" / "images").rmdir()
    rows = _rows(build_camelyon16_manifest(c16))
    assert rows["test_001"]["path"] == "testing/test_001.tif"
