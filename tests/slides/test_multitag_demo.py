"""Demo data task 'multitag': manifest, class counts, correlations, determinism, visible tags."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wsi_lightning.demo import dataset as demo
from wsi_lightning.demo import make_demo_dataset, multitag, paint
from wsi_lightning.demo.dataset import DEFAULTS, spec_hash
from wsi_lightning.demo.synthetic import render
from wsi_lightning.manifest import load_manifest, patient_split
from wsi_lightning.slides import SlideReader

SMALL = {"size_um": 384.0, "n_levels": 3, "task": "multitag"}  # 768 px slides
N = multitag.DEMO_DEFAULTS["n_slides"]
COLUMNS = ["slide_id", "case_id", "path", "label", "mpp", "stain", "species", "organ"]


def test_class_counts_follow_table1_with_a_floor():
    counts = multitag.class_counts(N)
    for tag, classes in multitag.CLASSES.items():
        assert list(counts[tag]) == list(classes)
        assert sum(counts[tag].values()) == N
        assert min(counts[tag].values()) >= multitag.MIN_PER_CLASS
    stain, species, organ = counts["stain"], counts["species"], counts["organ"]
    assert stain["he"] > stain["ihc_dab"] > stain["special"]  # 2803 / 1672 / 445
    assert species["mouse"] > N / 2 and species["human"] > species["rat"] > species["pig"]
    assert max(organ, key=organ.get) == "liver" and organ["liver"] >= 3 * min(organ.values())
    tiny = multitag.class_counts(20)  # too few slides for the floor: still sums up
    assert all(sum(c.values()) == 20 for c in tiny.values())


def test_plan_is_deterministic_with_exact_counts():
    plan = multitag.plan_slides(N, 0, DEFAULTS)
    assert plan == multitag.plan_slides(N, 0, DEFAULTS)
    other = multitag.plan_slides(N, 1, DEFAULTS)
    assert [r["organ"] for r in plan] != [r["organ"] for r in other]
    for rows in (plan, other):
        for tag in multitag.TAGS:
            assert Counter(r[tag] for r in rows) == Counter(multitag.class_counts(N)[tag])
        assert all(r["label"] == r["organ"] for r in rows)
        by_case: dict[str, set] = {}
        for r in rows:
            by_case.setdefault(r["case_id"], set()).add(r["species"])
        assert all(len(s) == 1 for s in by_case.values())  # a case is one animal / patient
        assert len(by_case) < len(rows)  # some cases have two slides


@pytest.mark.parametrize("seed", range(5))
def test_plan_tags_are_correlated(seed):
    rows = multitag.plan_slides(N, seed, DEFAULTS)

    def share(species, tag, value):
        sel = [r[tag] == value for r in rows if r["species"] == species]
        return sum(sel) / len(sel)

    assert share("zebrafish", "stain", "he") >= 0.8  # most of one species share one stain
    assert share("rat", "stain", "he") >= 0.7
    assert share("human", "stain", "ihc_dab") >= 0.5 > share("mouse", "stain", "ihc_dab")
    zebrafish_organs = {r["organ"] for r in rows if r["species"] == "zebrafish"}
    assert not zebrafish_organs & {"lung", "breast", "colon"}
    human_skin_breast = share("human", "organ", "skin") + share("human", "organ", "breast")
    assert human_skin_breast > share("mouse", "organ", "skin") + share("mouse", "organ", "breast")


def test_default_split_holds_every_class_in_train_and_test(tmp_path):
    """The default patient-level split (data.split, stratified by the first tag) of the default
    demo set has every class of every tag in train and in test."""
    path = tmp_path / "manifest.csv"
    demo._write_manifest(path, multitag.plan_slides(N, 0, DEFAULTS), multitag.TAGS)
    manifest = load_manifest(path, list(multitag.TAGS), check_files=False)
    split = patient_split(manifest, val=0.15, test=0.3, seed=0)
    df = manifest.df.set_index("slide_id")
    for part in ("train", "test"):
        for tag, classes in multitag.CLASSES.items():
            assert set(df.loc[split[part], tag]) == set(classes), (part, tag)


class _Planned(Exception):
    pass


def test_default_size_of_the_task(monkeypatch, tmp_path):
    """No n_slides / size_um given: 360 slides of 1024 µm for multitag, 80 of 1536 µm else."""
    seen = {}

    def stop(n_slides, seed, options):
        seen.update(n=n_slides, size=options["size_um"])
        raise _Planned

    for task, module in (("multitag", multitag), ("lesion", demo)):
        monkeypatch.setattr(module, "plan_slides", stop)
        with pytest.raises(_Planned):
            make_demo_dataset(tmp_path / task, task=task)
        assert (seen["n"], seen["size"]) == ((360, 1024.0) if task == "multitag" else (80, 1536.0))


@pytest.fixture(scope="module")
def multitag_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("multitag")
    return make_demo_dataset(out, n_slides=4, seed=2, workers=1, **SMALL)


def test_manifest_columns_and_classes(multitag_demo):
    rows = list(csv.DictReader(open(multitag_demo)))
    assert list(rows[0]) == COLUMNS and len(rows) == 4
    for row in rows:
        assert row["label"] == row["organ"]
        for tag, classes in multitag.CLASSES.items():
            assert row[tag] in classes
        assert SlideReader(multitag_demo.parent / row["path"]).dimensions == (768, 768)
        geo = multitag_demo.parent / "annotations" / f"{row['slide_id']}.geojson"
        assert json.loads(geo.read_text())["features"] == []
    manifest = load_manifest(multitag_demo, list(multitag.TAGS))
    assert manifest.targets == list(multitag.TAGS)


def test_same_seed_same_multitag_bytes(multitag_demo, tmp_path):
    again = make_demo_dataset(tmp_path, n_slides=4, seed=2, workers=1, **SMALL)
    for name in ("manifest.csv", "slides/demo_000.tiff", "slides/demo_003.tiff"):
        assert (again.parent / name).read_bytes() == (multitag_demo.parent / name).read_bytes()
    digest = spec_hash(4, 2, {**DEFAULTS, **SMALL})
    assert (again.parent / ".spec").read_text() == digest
    assert digest != spec_hash(4, 2, {**DEFAULTS, **SMALL, "task": "lesion"})


def _random_patches(spec, image: np.ndarray, n: int, size: int, rng) -> list[np.ndarray]:
    """`n` patches of `size` px centred well inside the slide's tissue outline."""
    field, threshold = paint.tissue_field(spec.tissue, spec.width_um, spec.height_um, spec.seed)
    inside = ndimage.binary_erosion(field > threshold, iterations=3)  # 24 µm from the edge
    cells = np.argwhere(inside)[rng.choice(int(inside.sum()), n)]
    centres = ((cells + 0.5) * paint.CELL_UM / spec.mpp).astype(int) - size // 2
    top_left = np.clip(centres, 0, np.array(image.shape[:2]) - size)
    return [image[y : y + size, x : x + size] for y, x in top_left]


def test_tags_are_visible_in_random_tissue_patches():
    """48 slides with balanced, independent tags; 6 random 160 px patches each. Out-of-slide
    nearest centroid (4 slide-grouped folds) on standardised statistics: colour gives the
    stain, nuclei the species, texture the organ, each far above chance."""
    n, rng = 48, np.random.default_rng(0)
    tags = {t: np.resize(np.array(c), n)[rng.permutation(n)] for t, c in multitag.CLASSES.items()}
    patches, rows = [], []
    for i in range(n):
        row = {"slide_id": f"s{i}", **{t: str(tags[t][i]) for t in multitag.TAGS}}
        spec = multitag.sample_spec(np.random.default_rng([1, i]), row, 384.0, 0.5)
        image, _ = render(spec)
        patches += _random_patches(spec, image, 6, 160, rng)
        rows += [row] * 6
    x = multitag.patch_statistics(np.stack(patches))
    slide = np.array([r["slide_id"] for r in rows])
    groups = {
        "stain": (multitag.COLOUR_FEATURES, 0.95),
        "species": (multitag.NUCLEUS_FEATURES, 0.4),  # chance 1/6
        "organ": (multitag.TEXTURE_FEATURES, 0.3),  # chance 1/12
    }
    for tag, (columns, floor) in groups.items():
        y = np.array([r[tag] for r in rows])
        pred = np.empty(len(y), object)
        for train, test in GroupKFold(4).split(x, y, slide):
            model = make_pipeline(StandardScaler(), NearestCentroid())
            pred[test] = model.fit(x[train][:, columns], y[train]).predict(x[test][:, columns])
        assert balanced_accuracy_score(y, pred.astype(str)) >= floor, tag
