"""Demo data task 'zoom': regions independent of the label, cue placement, annotations, and
which magnification shows what."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from wsi_lightning.demo import make_demo_dataset, paint
from wsi_lightning.demo.dataset import DEFAULTS, spec_hash
from wsi_lightning.demo.synthetic import render, sample_spec
from wsi_lightning.demo.zoom import ZOOM
from wsi_lightning.slides import SlideReader
from wsi_lightning.slides.annotations import load_lesions

SIZE_UM = 1024.0  # 2048 px at 0.5 µm/px: room for the three regions, quick to render


def _spec(seed: int, label: str = "tumor", size_um: float = SIZE_UM):
    return sample_spec(np.random.default_rng(seed), label, f"s{seed}", size_um, task="zoom")


def _centres(regions) -> list[tuple[float, float]]:
    return sorted(r.center_um for r in regions)


@pytest.mark.parametrize("seed", range(8))
def test_regions_do_not_depend_on_the_label(seed):
    tumour, normal = _spec(seed, "tumor"), _spec(seed, "normal")
    assert ZOOM.lesions[0] <= len(tumour.lesions) <= ZOOM.lesions[1]
    assert len(normal.lesions) == 0
    assert len(tumour.lesions) + len(tumour.candidates) == ZOOM.n_candidates
    # the same regions on both: only which of them carry the cue differs
    assert _centres(tumour.lesions + tumour.candidates) == _centres(normal.candidates)


def test_regions_inside_the_slide_and_apart():
    spec = _spec(3)
    regions = spec.lesions + spec.candidates
    for r in regions:
        x, y = r.outline_um().T
        assert x.min() > 0 and y.min() > 0 and x.max() < SIZE_UM and y.max() < SIZE_UM
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            gap = np.hypot(a.center_um[0] - b.center_um[0], a.center_um[1] - b.center_um[1])
            assert gap >= a.max_radius_um + b.max_radius_um


def test_render_is_deterministic():
    a, polys_a = render(_spec(5))
    b, polys_b = render(_spec(5))
    np.testing.assert_array_equal(a, b)
    assert len(polys_a) == len(_spec(5).lesions)
    assert all(np.array_equal(p, q) for p, q in zip(polys_a, polys_b, strict=True))


def _mask(spec, regions) -> np.ndarray:
    width, height = spec.size_px
    return paint.polygon_mask(paint.Canvas.empty(height, width, spec.mpp),
                              [r.outline_um() for r in regions])


def _od(image: np.ndarray, factor: int) -> np.ndarray:
    """(H/f, W/f) optical density summed over RGB after box-reducing by `factor`."""
    low = np.asarray(Image.fromarray(image).reduce(factor)).astype(float)
    return -np.log(np.clip(low, 1, 255) / 255).sum(-1)


def test_candidates_are_dark_at_thumbnail_resolution():
    """At 8 µm/px (a 128 px thumbnail of a 1 mm slide) every candidate is darker than the tissue
    around it."""
    spec = _spec(6, "normal")
    image, _ = render(spec)
    od = _od(image, 16)
    for region in spec.candidates:
        inside = _mask(spec, [region])[8::16, 8::16]
        ring = _mask(spec, [replace(region, radius_um=region.radius_um * 1.8)])[8::16, 8::16]
        around = ring & ~inside & (od > 0.3)  # tissue just outside
        assert od[inside].mean() > 1.3 * od[around].mean()


def test_cue_shows_at_high_magnification_only():
    """The same slide with a lesion turned into a plain candidate: at 4 µm/px the region's
    colour is unchanged, at 0.5 µm/px its texture is not."""
    spec = _spec(7, "tumor")
    lesion = spec.lesions[0]
    plain = replace(spec, lesions=spec.lesions[1:], candidates=(lesion, *spec.candidates))
    with_cue, _ = render(spec)
    without, _ = render(plain)
    inside = _mask(spec, [lesion])
    low = [_od(im, 8) for im in (with_cue, without)]
    low_inside = inside[4::8, 4::8]
    assert abs(low[0][low_inside].mean() - low[1][low_inside].mean()) < 0.03 * low[1][low_inside].mean()
    fine = [np.abs(np.diff(im.astype(float), axis=1))[inside[:, 1:]].mean() for im in (with_cue, without)]
    assert fine[0] > 1.2 * fine[1]
    # nothing else changes (nuclei on the outline reach a few microns past it)
    outside = ~_mask(spec, [replace(lesion, radius_um=lesion.radius_um * 1.15)])
    np.testing.assert_array_equal(with_cue[outside], without[outside])


@pytest.fixture(scope="module")
def zoom_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoom")
    return make_demo_dataset(out, n_slides=4, seed=1, workers=1, task="zoom", size_um=SIZE_UM,
                             n_levels=3)


def test_manifest_and_geojson(zoom_demo):
    rows = list(csv.DictReader(open(zoom_demo)))
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumor", "tumor"]
    for row in rows:
        reader = SlideReader(zoom_demo.parent / row["path"])
        assert reader.dimensions == (2048, 2048)
        path = zoom_demo.parent / "annotations" / f"{row['slide_id']}.geojson"
        names = [f["properties"]["classification"]["name"]
                 for f in json.loads(path.read_text())["features"]]
        n_tumour = names.count("Tumor")
        assert (n_tumour >= 1) == (row["label"] == "tumor")
        assert n_tumour + names.count("Candidate") == ZOOM.n_candidates
        assert len(load_lesions(path)) == n_tumour  # candidates are not lesions
    assert (zoom_demo.parent / ".spec").read_text() == spec_hash(
        4, 1, {**DEFAULTS, "task": "zoom", "size_um": SIZE_UM, "n_levels": 3})


def test_default_size_is_two_millimetres(tmp_path):
    spec = sample_spec(np.random.default_rng(0), "tumor", "s", 2048.0, task="zoom")
    assert spec.size_px == (4096, 4096)
    from wsi_lightning.demo.dataset import TASK_DEFAULTS

    assert TASK_DEFAULTS["zoom"]["size_um"] == 2048.0
