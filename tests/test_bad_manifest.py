"""Bad manifests fail at load with a ManifestError naming the file, row and column and saying the
fix, and slide ids never write files outside their output folders."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, feature_cfg_overrides
from wsi_lightning.callbacks.attention_logger import AttentionLogger
from wsi_lightning.callbacks.roi_tree import ROITree
from wsi_lightning.cli import main
from wsi_lightning.errors import ManifestError, NoTissueError
from wsi_lightning.manifest import load_manifest, patient_split
from wsi_lightning.slides import SlideReader, segment_tissue, tile_slide, write_pyramid_tiff
from wsi_lightning.slides.tiling import tile_file, write_tile_file
from wsi_lightning.slides.tissue import TissueMask, tissue_qc_path


def write(tmp_path: Path, rows: list[dict], name: str = "m.csv") -> Path:
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def rows(n: int = 8, **extra: object) -> list[dict]:
    return [{"slide_id": f"s{i}", "case_id": f"c{i}", "path": f"s{i}.tiff",
             "label": "tumor" if i % 2 else "normal", **extra} for i in range(n)]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- labels
def test_empty_label_names_file_row_column_and_fix(tmp_path: Path):
    r = rows()
    r[3]["label"] = ""  # pandas writes an empty cell; read back as NaN
    p = write(tmp_path, r)
    with pytest.raises(ManifestError, match=r"row 4: slide 's3' has empty 'label'") as err:
        load_manifest(p, check_files=False)
    assert str(p) in str(err.value) and "fill in the label" in str(err.value).lower()


def test_multitag_empty_tag_is_unknown_but_not_every_tag(tmp_path: Path):
    """Multi-tag slides may lack a tag: index -1 (what the loss and metrics ignore), never the
    int64 minimum; a row with every tag empty is an error."""
    r = [{"slide_id": f"s{i}", "case_id": f"c{i}", "path": "p", "stain": ["he", "ihc"][i % 2],
          "organ": ["liver", "lung", ""][i % 3]} for i in range(6)]
    m = load_manifest(write(tmp_path, r), ["stain", "organ"], check_files=False)
    np.testing.assert_array_equal(m.label_index("organ"), [0, 1, -1, 0, 1, -1])
    assert m.labels_by_slide()["organ"]["s2"] == -1
    with pytest.raises(ManifestError, match=r"row 3: slide 's2' has empty 'organ'"):  # opted out
        load_manifest(write(tmp_path, r), ["stain", "organ"], check_files=False, allow_missing=False)
    r[2]["stain"] = ""
    with pytest.raises(ManifestError, match=r"row 3: slide 's2' has every label column empty"):
        load_manifest(write(tmp_path, r), ["stain", "organ"], check_files=False)


# ----------------------------------------------------------------------------- splits
@pytest.mark.parametrize("col, value", [("split", "train"), ("fold", 1)])
def test_partly_filled_split_or_fold_column_names_the_blank_rows(tmp_path: Path, col: str, value: object):
    r = rows(10, **{col: value})
    for i in (2, 5, 6, 7, 8, 9):
        r[i][col] = None
    with pytest.raises(ManifestError, match=rf"column '{col}' is empty in row\(s\) \[3, 6, 7, 8, 9, \.\.\. \(6 in all\)\]") as err:
        load_manifest(write(tmp_path, r), check_files=False)
    assert "fill it in on every row, or drop the column" in str(err.value)
    for x in r:
        x[col] = None  # an all-empty column is no column
    assert len(patient_split(load_manifest(write(tmp_path, r), check_files=False))["train"])


def test_class_only_in_test_split_is_refused_unless_configured(tmp_path: Path):
    r = rows(10, split="train")
    r[8].update(label="other", split="test")
    r[9].update(split="test")
    p = write(tmp_path, r)
    with pytest.raises(ManifestError, match=r"label 'other' has no training slide .*\[s8\], split \['test'\]") as err:
        load_manifest(p, check_files=False)
    assert "data.classes" in str(err.value)
    m = load_manifest(p, classes=["normal", "other", "tumor"], check_files=False)
    assert patient_split(m, val=0.2)["test"] == ["s8", "s9"]
    r[8]["split"] = "val"  # val only is never trained on either
    with pytest.raises(ManifestError, match=r"label 'other' has no training slide"):
        load_manifest(write(tmp_path, r), check_files=False)


def test_class_only_in_the_test_fold_is_refused_at_split(tmp_path: Path):
    r = rows(10)
    for i, x in enumerate(r):
        x["fold"] = i % 5
    r[4]["label"] = "other"  # fold 4 only
    m = load_manifest(write(tmp_path, r), check_files=False)
    with pytest.raises(ManifestError, match=r"label 'other' has no training slide under data.split.fold=4"):
        patient_split(m, fold=4)
    assert patient_split(m, fold=0)["train"]  # fold 4 is train there
    m = load_manifest(write(tmp_path, r), classes=["normal", "other", "tumor"], check_files=False)
    assert patient_split(m, fold=4)["test"] == ["s4", "s9"]


# ----------------------------------------------------------------------------- mpp
def test_unparsable_mpp_names_row_and_value_empty_is_the_slides_own(tmp_path: Path):
    r = rows(mpp=0.5)
    r[1]["mpp"] = ""
    m = load_manifest(write(tmp_path, r), check_files=False)
    assert np.isnan(m.df["mpp"][1]) and m.df["mpp"][0] == 0.5
    for bad in ("abc", "-0.25", "0"):
        r[2]["mpp"] = bad
        with pytest.raises(ManifestError, match=rf"row 3: slide 's2' has mpp '?{re.escape(bad)}'?; expected a positive number") as err:
            load_manifest(write(tmp_path, r), check_files=False)
        assert "empty cell to use the slide's own mpp" in str(err.value)


# ----------------------------------------------------------------------------- file
def test_non_utf8_names_the_line_of_the_first_bad_byte(tmp_path: Path):
    p = tmp_path / "latin1.csv"
    text = "slide_id,case_id,path,label\n" + "".join(f"s{i},c{i},s{i}.tiff,{'ab'[i % 2]}\n" for i in range(5))
    text += "s5,c5,caf\u00e9.tiff,a\n"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError, match=r"line 7 .*not UTF-8.*save it as UTF-8") as err:
        load_manifest(p, check_files=False)
    assert str(p) in str(err.value)
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a BOM is fine
    assert list(load_manifest(p, check_files=False).df["slide_id"])[-1] == "s5"


@pytest.mark.parametrize("content", [b"", b"\n", b"slide_id,case_id,path,label\n"])
def test_empty_manifest_says_so(tmp_path: Path, content: bytes):
    p = tmp_path / "empty.csv"
    p.write_bytes(content)
    with pytest.raises(ManifestError, match=r"empty.csv is empty \(no slide rows\)"):
        load_manifest(p, check_files=False)


# ----------------------------------------------------------------------------- slide ids
@pytest.mark.parametrize("sid", ["../../x", "/abs/x", ".hidden", "a/b"])
def test_unsafe_slide_id_is_refused_naming_the_row(tmp_path: Path, sid: str):
    r = rows()
    r[1]["slide_id"] = sid
    with pytest.raises(ManifestError, match=r"m.csv row 2: invalid slide id"):
        load_manifest(write(tmp_path, r), check_files=False)


def test_tile_and_qc_files_never_leave_their_folder(tmp_path: Path):
    tiles = tmp_path / "run" / "tiles"
    coords = np.zeros((3, 2), np.int64)
    for sid in ("../../x", str(tmp_path / "abs"), "..", ""):
        with pytest.raises(ManifestError, match="invalid slide id"):
            write_tile_file(tiles, sid, coords=coords)
        with pytest.raises(ManifestError, match="invalid slide id"):
            tissue_qc_path(tiles, sid)
    assert files_under(tmp_path) == set()
    path = write_tile_file(tiles, "s_1", coords=coords)
    assert path == tile_file(tiles, "s_1") == tiles / "s_1.npz"
    np.testing.assert_array_equal(np.load(path)["coords"], coords)
    assert files_under(tmp_path) == {path}  # no temporary file left
    assert tissue_qc_path(tiles, "s_1") == tiles / "qc" / "s_1.png"


@pytest.fixture
def tiny_slide(tmp_path: Path) -> Path:
    path = tmp_path / "slides" / "t.tiff"
    path.parent.mkdir()
    image = np.full((256, 256, 3), 235, np.uint8)
    image[64:192, 64:192] = (170, 60, 140)
    write_pyramid_tiff(path, image, 0.5, n_levels=1)
    return path


def _trainer(root: Path, datamodule: object = None) -> SimpleNamespace:
    return SimpleNamespace(world_size=1, is_global_zero=True, default_root_dir=str(root),
                           datamodule=datamodule, progress_bar_callback=None, loggers=[])


def test_attention_logger_writes_no_image_outside_its_folder(tmp_path: Path, tiny_slide: Path):
    run = tmp_path / "a" / "run"
    ids = ["../../x", str(tmp_path / "y"), "ok"]
    df = pd.DataFrame({"slide_id": ids, "path": [str(tiny_slide)] * 3, "mpp": [np.nan] * 3})
    dm = SimpleNamespace(manifest=SimpleNamespace(df=df, source=tmp_path / "m.csv"),
                         store=SimpleNamespace(attrs=lambda sid: {"extent_level0": 64, "tile_size": 64, "mpp": 0.5}))
    cb = AttentionLogger(top_k=1, bottom_k=0, log_images=False, annotations=False, thumb_max_size=64)
    before = files_under(tmp_path)
    cb._slides = [{"slide_id": s, "attention": np.array([[0.3, 0.7]]), "coords": np.array([[64, 64], [128, 64]])}
                  for s in ids]
    cb.on_test_epoch_end(_trainer(run, dm), None)
    out = run / "attention"
    new = files_under(tmp_path) - before
    assert new and all(out in p.parents for p in new), sorted(map(str, new))
    assert {p.name for p in new} == {"attention.csv", "ok_heatmap.png", "ok_topk.png"}


def test_roi_tree_writes_no_figure_outside_its_folder(tmp_path: Path, tiny_slide: Path):
    run = tmp_path / "a" / "run"
    ids = ["../../x", str(tmp_path / "y"), "ok"]
    cb = ROITree(max_slides=None, log_images=False, annotations=False, thumb_max_size=64)
    cb._slides = [{"slide_id": s, "patches": (), "frames": [np.array([[0.0, 0.0, 256.0, 256.0]])], "theta": [],
                   "levels": [], "leaves": None, "path": str(tiny_slide), "mpp": None} for s in ids]
    before = files_under(tmp_path)
    cb.on_test_epoch_end(_trainer(run), None)
    new = files_under(tmp_path) - before
    assert {p.relative_to(run / "roi_tree").as_posix() for p in new} == {"rois.csv", "ok.png"}


# ----------------------------------------------------------------------------- no tissue
def test_no_tissue_messages_name_real_config_keys(tmp_path: Path):
    base = yaml.safe_load((REPO / "experiments" / "_base.yaml").read_text())
    path = tmp_path / "blank.tiff"
    glass = (244 + np.random.default_rng(0).integers(-3, 4, (512, 512, 3))).astype(np.uint8)
    write_pyramid_tiff(path, glass, 0.5)
    reader = SlideReader(path)
    with pytest.raises(NoTissueError) as err:
        segment_tissue(reader)
    msg = str(err.value)
    named = {"tiling.thumb_mpp", "features.skip_errors"}
    assert all(k in msg for k in named), msg
    for key in named:
        section, name = key.split(".")
        assert name in base[section], key
    assert "not config keys" in msg  # min_saturation / min_area_um2 are Python arguments only
    speck = np.zeros((32, 32), bool)
    speck[0, 0] = True  # one 8 µm mask pixel: no 32 µm tile reaches 50%
    mask = TissueMask(mask=speck, mpp=8.0, thumbnail=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(NoTissueError) as err:
        tile_slide(reader, 64, 0.5, tissue=mask)
    for key in ("tiling.min_tissue", "tiling.tile_size"):
        assert key in str(err.value)
        assert key.split(".")[1] in base["tiling"]


# ----------------------------------------------------------------------------- CLI
def test_cli_fit_reports_an_empty_label_without_traceback(bag_data: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture):
    df = pd.read_csv(bag_data)
    df.loc[5, "label"] = None
    df.to_csv(bag_data, index=False)
    with caplog.at_level(logging.ERROR):
        assert main(["fit", "abmil", *feature_cfg_overrides(bag_data, tmp_path / "runs")]) == 2
    assert "row 6: slide 's005' has empty 'label'" in caplog.text
