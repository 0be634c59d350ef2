"""Demo data task 'multiscale': default task unchanged, determinism, annotations, balance, cues."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from wsi_lightning.demo import make_demo_dataset, paint
from wsi_lightning.demo.dataset import DEFAULTS, spec_hash
from wsi_lightning.demo.synthetic import DECOY_CLASSES, render, sample_spec
from wsi_lightning.errors import ConfigError
from wsi_lightning.slides import SlideReader

SMALL = {"size_um": 768.0, "n_levels": 3, "task": "multiscale"}  # 1536 px slides

# sha256 of the pixels of tiny default-task slides, taken before the multiscale task existed
DEFAULT_PIXELS = {
    ("normal", 0): "b2fcc383300bd3c5457220815de0472ca4c8e84a89cb94c672f7dcc9ef7dbb28",
    ("tumor", 0): "a47cc9bf34491cbc3c12abfcc2fb238cf869db8613c94338a17e0541a6f255a3",
    ("tumor", 2): "0f8d5e2a8d8934df5d85ab4dcd61c1f644c92572b49cacd88790921c2c82c524",
}
DEFAULT_SPEC_HASH = "cffba7d10f58aa17"  # spec_hash(80, 0, DEFAULTS) before tasks existed


@pytest.mark.parametrize(("label", "seed"), sorted(DEFAULT_PIXELS))
def test_default_task_pixels_unchanged(label, seed):
    image, _ = render(sample_spec(np.random.default_rng(seed), label, size_um=256.0))
    assert hashlib.sha256(image.tobytes()).hexdigest() == DEFAULT_PIXELS[(label, seed)]


def test_spec_hash_default_unchanged_and_task_dependent():
    assert DEFAULTS["task"] == "lesion"
    assert spec_hash(80, 0, DEFAULTS) == DEFAULT_SPEC_HASH  # old demo folders still resume
    assert spec_hash(80, 0, {**DEFAULTS, "task": "multiscale"}) != DEFAULT_SPEC_HASH
    with pytest.raises(ConfigError, match="multiscale"):
        make_demo_dataset("unused", n_slides=4, task="multi")


def _spec(seed: int, label: str = "tumor", **kw):
    return sample_spec(np.random.default_rng(seed), label, f"s{seed}", task="multiscale", **kw)


def test_multiscale_render_is_deterministic():
    spec = _spec(3, size_um=512.0)
    a, polys_a = render(spec)
    b, polys_b = render(_spec(3, size_um=512.0))
    np.testing.assert_array_equal(a, b)
    assert len(polys_a) == 2 and all(np.array_equal(p, q) for p, q in zip(polys_a, polys_b, strict=True))
    other, _ = render(_spec(4, size_um=512.0))
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 5


@pytest.mark.parametrize("seed", range(6))
def test_cue_counts_do_not_depend_on_label(seed):
    for label in ("normal", "tumor"):
        spec = _spec(seed, label)
        n_lesions = len(spec.lesions)
        assert n_lesions == 2 * (label == "tumor")
        assert n_lesions + len(spec.arch_decoys) == 2  # regions with the architecture cue
        assert n_lesions + len(spec.cell_decoys) == 2  # regions with the atypia cue


def _area_um2(region) -> float:
    x, y = region.outline_um().T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))  # shoelace


def test_cue_area_and_tissue_do_not_depend_on_label():
    """Per seed, a tumour slide's lesions are exactly the normal slide's architecture decoys
    (same tissue); over 40 seeds each cue's mean area matches between the classes (measured
    gap 2-4%; task version 2 placed fewer regions on tumour slides: +32-40%)."""
    area = {label: np.zeros(2) for label in ("normal", "tumor")}
    for seed in range(40):
        normal, tumour = _spec(seed, "normal"), _spec(seed, "tumor")
        assert tumour.lesions == normal.arch_decoys and tumour.tissue == normal.tissue
        for label, spec in (("normal", normal), ("tumor", tumour)):
            for k, decoys in enumerate((spec.arch_decoys, spec.cell_decoys)):
                area[label][k] += sum(_area_um2(r) for r in spec.lesions + decoys)
    ratio = area["tumor"] / area["normal"]  # (architecture, atypia)
    assert np.all(np.abs(ratio - 1) < 0.1), ratio


@pytest.fixture(scope="module")
def multiscale_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiscale")
    return make_demo_dataset(out, n_slides=4, seed=2, workers=1, **SMALL)


def test_manifest_balanced_and_readable(multiscale_demo):
    rows = list(csv.DictReader(open(multiscale_demo)))
    assert list(rows[0]) == ["slide_id", "case_id", "path", "label", "mpp"]
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumor", "tumor"]
    for row in rows:
        assert SlideReader(multiscale_demo.parent / row["path"]).dimensions == (1536, 1536)


def test_geojson_lesions_only_in_tumours_decoys_separate(multiscale_demo):
    for row in csv.DictReader(open(multiscale_demo)):
        path = multiscale_demo.parent / "annotations" / f"{row['slide_id']}.geojson"
        names = [
            f["properties"]["classification"]["name"]
            for f in json.loads(path.read_text())["features"]
        ]
        tumour = row["label"] == "tumor"
        assert names.count("Tumor") == 2 * tumour
        for decoy in ("Decoy-architecture", "Decoy-cells"):
            assert names.count(decoy) == (0 if tumour else 2)
        assert set(names) <= {"Tumor", *DECOY_CLASSES.values()}


def test_same_seed_same_multiscale_bytes(multiscale_demo, tmp_path):
    again = make_demo_dataset(tmp_path, n_slides=4, seed=2, workers=1, **SMALL)
    for name in ("demo_000.tiff", "demo_001.tiff"):
        assert (again.parent / "slides" / name).read_bytes() == (
            multiscale_demo.parent / "slides" / name
        ).read_bytes()
    assert (again.parent / ".spec").read_text() == spec_hash(4, 2, {**DEFAULTS, **SMALL})


def _region_mask(spec, *regions):
    width, height = spec.size_px
    canvas = paint.Canvas.empty(height, width, spec.mpp)
    return paint.polygon_mask(canvas, [r.outline_um() for r in regions])


def test_atypia_shows_at_high_magnification_only():
    """Same slide without / with an atypia region: inside it, 2 µm/px colours match, 0.5 µm/px
    texture does not."""
    spec = _spec(5, "normal", size_um=768.0)
    region = spec.cell_decoys[0]
    plain, _ = render(replace(spec, cell_decoys=()))
    atypical, _ = render(spec)
    inside = _region_mask(spec, region) & (plain.min(-1) < 220)  # tissue in the region
    low = [np.asarray(Image.fromarray(im).reduce(4)).astype(float) for im in (plain, atypical)]
    low_inside = inside[::4, ::4]
    assert np.abs(low[0][low_inside].mean(0) - low[1][low_inside].mean(0)).max() < 4
    fine = [
        np.abs(np.diff(im.astype(float), axis=1))[inside[:, 1:]].mean() for im in (plain, atypical)
    ]
    assert fine[1] > 1.5 * fine[0]


def test_architecture_keeps_the_nuclear_density():
    """Same slides without / with their architecture regions: as much nuclear area inside."""
    blue = np.zeros(2)
    for seed in (6, 7, 8):
        spec = _spec(seed, "normal", size_um=768.0)
        inside = _region_mask(spec, *spec.arch_decoys)
        for k, s in enumerate((replace(spec, arch_decoys=()), spec)):
            image, _ = render(s)
            blue[k] += ((image[..., 2].astype(int) - image[..., 0]) > 0)[inside].mean()
    assert abs(blue[1] - blue[0]) < 0.1 * blue[0]
