"""Synthetic slides: pyramid writer, renderer, demo dataset (determinism, annotations, resume)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import openslide
import pytest
from PIL import Image, ImageDraw

from wsi_lightning.demo import make_demo_dataset
from wsi_lightning.demo.dataset import DEFAULTS, plan_slides
from wsi_lightning.demo.synthetic import render, sample_spec
from wsi_lightning.errors import ConfigError, WSIError
from wsi_lightning.slides import SlideReader, segment_tissue, write_pyramid_tiff

TINY = {"size_um": 512.0, "n_levels": 3}  # 1024 px slides


@pytest.mark.parametrize(("mpp", "mag"), [(0.5, "20"), (0.25, "40")])
def test_pyramid_is_an_aperio_slide_for_openslide(tmp_path, pattern_image, mpp, mag):
    path = tmp_path / "p.tiff"
    write_pyramid_tiff(path, pattern_image, mpp, n_levels=3)
    slide = openslide.OpenSlide(path)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == mpp
    assert slide.properties["openslide.objective-power"] == mag
    assert slide.level_dimensions == ((1700, 1280), (850, 640), (425, 320))
    assert slide.level_downsamples == (1.0, 2.0, 4.0)
    assert slide.properties["openslide.level[1].tile-width"] == "256"
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


def test_render_is_deterministic_and_resolution_independent():
    spec = sample_spec(np.random.default_rng(3), "tumor", size_um=256.0, mpp=0.5)
    a, polys_a = render(spec)
    b, polys_b = render(sample_spec(np.random.default_rng(3), "tumor", size_um=256.0, mpp=0.5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (512, 512, 3) and a.dtype == np.uint8
    fine, polys_fine = render(spec.__class__(**{**spec.__dict__, "mpp": 0.25}))
    assert fine.shape == (1024, 1024, 3)
    np.testing.assert_allclose(polys_fine[0], 2 * polys_a[0])
    # same tissue: the 2x reduction of the fine render looks like the coarse one
    small = np.asarray(Image.fromarray(fine).reduce(2)).astype(float)
    assert np.abs(small.mean((0, 1)) - a.mean((0, 1))).max() < 6


def _lesion_mask(polys, shape):
    img = Image.new("1", shape[::-1], 0)
    for poly in polys:
        ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=1)
    return np.asarray(img)


def test_lesions_look_different():
    """Lesion cells are darker and bluer than the rest of the tissue, on every slide."""
    for seed in range(4):
        spec = sample_spec(np.random.default_rng(seed), "tumor", size_um=512.0)
        image, polys = render(spec)
        lesion = _lesion_mask(polys, image.shape[:2])
        rgb = image.astype(float)
        tissue = (rgb.max(-1) - rgb.min(-1) > 25) & ~lesion
        lesion_mean, tissue_mean = rgb[lesion].mean(0), rgb[tissue].mean(0)
        assert lesion_mean.mean() < tissue_mean.mean() - 40  # much darker
        assert lesion_mean[0] - lesion_mean[2] < tissue_mean[0] - tissue_mean[2] - 20  # bluer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(out, n_slides=4, seed=1, workers=1, **TINY)


def test_manifest(demo):
    rows = list(csv.DictReader(open(demo)))
    assert list(rows[0]) == ["slide_id", "case_id", "path", "label", "mpp"]
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumor", "tumor"]
    for row in rows:
        assert not os.path.isabs(row["path"])
        reader = SlideReader(demo.parent / row["path"], mpp=float(row["mpp"]))
        assert reader.dimensions == (1024, 1024) and reader.vendor == "aperio"
        assert reader.mpp == float(row["mpp"]) == float(reader.properties["openslide.mpp-x"])
    assert (demo.parent / ".complete").read_text() == (demo.parent / ".spec").read_text()


def test_annotations_inside_slide_and_tissue(demo):
    for row in csv.DictReader(open(demo)):
        geo = json.loads((demo.parent / "annotations" / f"{row['slide_id']}.geojson").read_text())
        assert geo["type"] == "FeatureCollection"
        assert (len(geo["features"]) > 0) == (row["label"] == "tumor")
        reader = SlideReader(demo.parent / row["path"])
        tissue = segment_tissue(reader)
        for feature in geo["features"]:
            assert feature["properties"]["objectType"] == "annotation"
            assert feature["properties"]["classification"]["name"] == "Tumor"
            ring = np.array(feature["geometry"]["coordinates"][0])
            assert feature["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all()
            assert (ring >= 0).all() and (ring < 1024).all()
            cells = np.floor(ring * reader.mpp / tissue.mpp).astype(int)
            assert tissue.mask[cells[:, 1], cells[:, 0]].all()


def test_same_seed_same_bytes_and_resume(demo, tmp_path, caplog):
    again = make_demo_dataset(tmp_path, n_slides=4, seed=1, workers=2, **TINY)
    for name in ("demo_000.tiff", "demo_003.tiff"):
        assert (again.parent / "slides" / name).read_bytes() == (
            demo.parent / "slides" / name
        ).read_bytes()
    assert again.read_text() == demo.read_text()
    slides = sorted((tmp_path / "slides").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in slides}
    make_demo_dataset(tmp_path, n_slides=4, seed=1, workers=1, **TINY)  # complete: no work
    assert {p: p.stat().st_mtime_ns for p in slides} == stamps
    # an interrupted run: one slide and the completion marker are missing
    (tmp_path / ".complete").unlink()
    slides[1].unlink()
    make_demo_dataset(tmp_path, n_slides=4, seed=1, workers=1, **TINY)
    assert slides[1].read_bytes() == (demo.parent / "slides" / slides[1].name).read_bytes()
    assert slides[0].stat().st_mtime_ns == stamps[slides[0]]
    with pytest.raises(WSIError, match="different settings"):
        make_demo_dataset(tmp_path, n_slides=4, seed=2, workers=1, **TINY)


def test_other_seed_other_pixels(demo, tmp_path):
    other = make_demo_dataset(tmp_path, n_slides=2, seed=5, workers=1, **TINY)
    a = SlideReader(other.parent / "slides" / "demo_000.tiff").read_region((0, 0), 2, (256, 256))
    b = SlideReader(demo.parent / "slides" / "demo_000.tiff").read_region((0, 0), 2, (256, 256))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_plan_pairs_cases_with_one_label():
    plan = plan_slides(40, 0, {**DEFAULTS, "frac_40x": 0.25})
    assert sum(p["label"] == "tumor" for p in plan) == 20
    assert sum(p["mpp"] == 0.25 for p in plan) == 10
    cases: dict[str, list[str]] = {}
    for p in plan:
        cases.setdefault(p["case_id"], []).append(p["label"])
    pairs = [labels for labels in cases.values() if len(labels) > 1]
    assert len(pairs) == 3 and all(len(set(labels)) == 1 for labels in pairs)
    assert max(len(labels) for labels in cases.values()) == 2
    assert plan == plan_slides(40, 0, {**DEFAULTS, "frac_40x": 0.25})


def test_unknown_option():
    with pytest.raises(ConfigError, match="size_um"):
        make_demo_dataset("unused", n_slides=4, sizeum=3)
