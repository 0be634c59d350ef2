from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from wsi_lightning.errors import ManifestError
from wsi_lightning.manifest import check_slide_files, load_manifest, patient_split


def write(tmp_path: Path, rows: list[dict], name: str = "m.csv") -> Path:
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def rows(n: int = 40, per_case: int = 2) -> list[dict]:
    return [{"slide_id": f"s{i}", "case_id": f"c{i // per_case}", "path": f"s{i}.tiff",
             "label": "tumor" if (i // per_case) % 2 else "normal"} for i in range(n)]


def test_unknown_label_names_row_and_expected(tmp_path: Path):
    r = rows(6)
    r[4]["label"] = "Tumour"
    p = write(tmp_path, r)
    with pytest.raises(ManifestError, match=r"row 5: slide 's4' has label 'Tumour'; expected one of \['normal', 'tumor'\]"):
        load_manifest(p, "label", classes=["normal", "tumor"], check_files=False)


def test_missing_columns_and_empty_cells(tmp_path: Path):
    p = write(tmp_path, [{"slide_id": "a", "path": "a.tiff", "label": "x"}])
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['case_id'\]"):
        load_manifest(p, check_files=False)
    r = rows(4)
    r[2]["case_id"] = ""
    with pytest.raises(ManifestError, match="row 3: empty 'case_id'"):
        load_manifest(write(tmp_path, r), check_files=False)
    r = rows(4)
    r[3]["slide_id"] = "s0"
    with pytest.raises(ManifestError, match="duplicate slide_id"):
        load_manifest(write(tmp_path, r), check_files=False)


def test_missing_slide_file_names_row(tmp_path: Path):
    p = write(tmp_path, rows(4))
    (tmp_path / "s0.tiff").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"row 2: slide 's1' file .*s1.tiff does not exist"):
        load_manifest(p)
    m = load_manifest(p, check_files=False)
    check_slide_files(m, skip={"s1", "s2", "s3"})
    assert Path(m.df["path"][0]).is_absolute()


def test_bad_split_value(tmp_path: Path):
    r = rows(4)
    for x in r:
        x["split"] = "train"
    r[1]["split"] = "training"
    with pytest.raises(ManifestError, match="row 2: split 'training'"):
        load_manifest(write(tmp_path, r), check_files=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_patient_leakage_and_stratified(tmp_path: Path, seed: int):
    m = load_manifest(write(tmp_path, rows(60, per_case=3)), check_files=False)
    s = patient_split(m, val=0.2, test=0.3, seed=seed)
    case = dict(zip(m.df["slide_id"], m.df["case_id"], strict=True))
    cases = {k: {case[i] for i in v} for k, v in s.items()}
    assert not cases["train"] & cases["val"] and not cases["train"] & cases["test"] and not cases["val"] & cases["test"]
    assert sorted(sum(s.values(), [])) == sorted(m.df["slide_id"])
    label = dict(zip(m.df["slide_id"], m.df["label"], strict=True))
    for k in ("train", "val", "test"):
        labs = {label[i] for i in s[k]}
        assert labs == {"normal", "tumor"}, f"{k} not stratified"


def test_split_column_with_leak_is_rejected(tmp_path: Path):
    r = rows(8, per_case=2)
    for i, x in enumerate(r):
        x["split"] = ["train", "val", "test", "train"][i % 4]
    with pytest.raises(ManifestError, match="case 'c0' has slides in both"):
        patient_split(load_manifest(write(tmp_path, r), check_files=False))


def test_fold_column(tmp_path: Path):
    r = rows(30, per_case=1)
    for i, x in enumerate(r):
        x["fold"] = i % 5
    m = load_manifest(write(tmp_path, r), check_files=False)
    s = patient_split(m, fold=4)
    assert s["test"] == sorted(f"s{i}" for i in range(30) if i % 5 == 4)
    assert s["val"] == sorted(f"s{i}" for i in range(30) if i % 5 == 0)
    with pytest.raises(ManifestError, match="folds present"):
        patient_split(m, fold=9)


def test_split_column_without_val_carves_val_from_train(tmp_path: Path):
    r = rows(40, per_case=1)
    for i, x in enumerate(r):
        x["split"] = "test" if i >= 30 else "train"
    m = load_manifest(write(tmp_path, r), check_files=False)
    s = patient_split(m, val=0.2, seed=0)
    assert s["test"] == sorted(f"s{i}" for i in range(30, 40))
    assert len(s["val"]) == 6 and not set(s["val"]) & set(s["train"])
    assert sorted(s["train"] + s["val"]) == sorted(f"s{i}" for i in range(30))
