"""A table spec run end to end on tiny data; resume skips complete runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import feature_cfg_overrides
from wsi_lightning import reproduce
from wsi_lightning.errors import ConfigError


def _spec(tmp_path: Path, bag_data: Path) -> Path:
    over = [o for o in feature_cfg_overrides(bag_data, tmp_path / "unused", **{"trainer.max_epochs": 1})
            if not o.startswith("paths.runs")]
    spec = {
        "title": "Tiny table",
        "seeds": [0, 1],
        "datasets": {"tiny": over},
        "compare_to": "ABMIL",
        "columns": {"auc": {"metric": "test/auroc", "label": "AUC"}, "acc": {"metric": "test/acc"},
                    # a metric no row logs (as HAG-MIL's recall on a baseline): an empty cell, never a redo
                    "recall": {"metric": "test/not_logged_here"}},
        "rows": [{"name": "ABMIL", "experiment": "abmil", "paper": {"auc": 0.9}},
                 {"name": "Mean pool", "experiment": "mean_pool", "overrides": ["method.embed_dim=32"],
                  "dataset_overrides": {"tiny": ["method.embed_dim=16"]}}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_table_end_to_end_and_resume(bag_data: Path, tmp_path: Path):
    spec = _spec(tmp_path, bag_data)
    md = reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "runs", results=tmp_path / "results")
    assert md == tmp_path / "results" / "tiny.tiny.md"
    text = md.read_text()
    assert "| ABMIL (`abmil`) |" in text and "/ 0.900" in text and "Dataset: **tiny**" in text
    csv = pd.read_csv(tmp_path / "results" / "tiny.tiny.csv")
    assert len(csv) == 6 and (csv["n_seeds"] == 2).all()
    assert csv[csv.column == "recall"]["mean"].isna().all()
    runs = sorted((tmp_path / "runs" / "reproduce" / "tiny" / "tiny").glob("*/seed*/metrics.json"))
    assert len(runs) == 4
    resolved = (runs[0].parent.parent.parent / "Mean_pool" / "seed0" / "config.resolved.yaml").read_text()
    assert "embed_dim: 16" in resolved  # the row's overrides for this dataset come after its own
    assert "group: table/tiny/tiny" in resolved and "job_type: Mean pool" in resolved  # one W&B group a table
    auc = csv[(csv.row == "ABMIL") & (csv.column == "auc")].iloc[0]
    vals = [float(v) for v in auc["values"].split()]
    assert auc["mean"] == pytest.approx(sum(vals) / 2)
    assert (tmp_path / "results" / "tiny.tiny_roc.png").exists()
    assert "## Tests against ABMIL" in text
    # a row without paper p-values shows '-', only the reference row says 'Ref.'
    assert [ln.rsplit("|", 2)[1].strip() for ln in text.splitlines() if ln.startswith("| Mean pool |")] == ["- / -"]
    assert [ln.rsplit("|", 2)[1].strip() for ln in text.splitlines() if ln.startswith("| ABMIL |")] == ["Ref. / Ref."]
    tests = pd.read_csv(tmp_path / "results" / "tiny.tiny_tests.csv", index_col=0)
    assert pd.isna(tests.loc["ABMIL", "p_delong"]) and 0 <= tests.loc["Mean pool", "p_delong"] <= 1
    stamps = [p.stat().st_mtime_ns for p in runs]
    reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "runs", results=tmp_path / "results",
                        extra_overrides=["trainer.num_threads=1"])  # how it runs, not what it computes
    assert [p.stat().st_mtime_ns for p in runs] == stamps, "complete runs must be skipped"
    # a changed spec redoes the runs it changes, and only those
    changed = yaml.safe_load(spec.read_text())
    changed["rows"][1]["dataset_overrides"]["tiny"] = ["method.embed_dim=8"]
    spec.write_text(yaml.safe_dump(changed))
    reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "runs", results=tmp_path / "results")
    redone = [p.stat().st_mtime_ns != s for p, s in zip(runs, stamps, strict=True)]
    assert redone == ["Mean_pool" in str(p) for p in runs]
    # a row interrupted mid-fit (a last.ckpt, no metrics.json) continues in its folder
    interrupted = runs[0].parent
    (interrupted / "metrics.json").unlink()
    (interrupted / "marker").write_text("kept")
    reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "runs", results=tmp_path / "results")
    assert (interrupted / "marker").exists() and (interrupted / "metrics.json").exists()


def test_spec_errors(bag_data: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown table"):
        reproduce.load_spec("nope")
    spec = yaml.safe_load(_spec(tmp_path, bag_data).read_text())
    spec["rows"][0]["paper"] = {"f1": 0.5}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"unknown column\(s\) \['f1'\]"):
        reproduce.load_spec(str(bad))
    spec["rows"][0]["paper"] = {}
    spec["rows"][0]["dataset_overrides"] = {"camelyon16": ["seed=1"]}
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"dataset_overrides for unlisted dataset\(s\) \['camelyon16'\]"):
        reproduce.load_spec(str(bad))
    with pytest.raises(ConfigError, match="dataset 'camelyon16' not listed"):
        reproduce.run_table(str(_spec(tmp_path, bag_data)), dataset="camelyon16", runs=tmp_path / "r")


def test_unquoted_yaml_override_is_named(bag_data: Path, tmp_path: Path):
    """`- callbacks=[{name: mechanism}]` unquoted is a YAML mapping, not an override string."""
    bad = tmp_path / "bad.yaml"
    text = _spec(tmp_path, bag_data).read_text().replace("datasets:\n  tiny:\n",
                                                         "datasets:\n  tiny:\n  - callbacks=[{name: mechanism}]\n")
    bad.write_text(text)
    assert isinstance(yaml.safe_load(text)["datasets"]["tiny"][0], dict)
    with pytest.raises(ConfigError, match=r"datasets.tiny has override .*not a 'key=value' string .*; quote"):
        reproduce.load_spec(str(bad))
    spec = yaml.safe_load(_spec(tmp_path, bag_data).read_text())
    spec["rows"][1]["overrides"] = [{"callbacks=[{name": "mechanism}]"}]
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"rows\[1\] \(Mean pool\) overrides has override"):
        reproduce.load_spec(str(bad))


def test_repository_tables_load():
    for name in reproduce.list_tables():
        spec = reproduce.load_spec(name)
        assert "demo" in spec["datasets"]


def test_cell_numbers():
    assert reproduce._num(2803584.0) == "2,803,584"  # pixel counts read as counts
    assert reproduce._num(0.8924) == "0.892" and reproduce._num(1000.5) == "1000.500"


def test_parallel_jobs_give_the_same_table(bag_data: Path, tmp_path: Path):
    """--jobs 2: rows x seeds in two worker processes; the same numbers as one at a time."""
    spec = _spec(tmp_path, bag_data)
    one = reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "one", results=tmp_path / "r1",
                              extra_overrides=["trainer.num_threads=1"])
    two = reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "two", results=tmp_path / "r2",
                              extra_overrides=["trainer.num_threads=1"], jobs=2)
    a, b = (pd.read_csv(p.with_suffix(".csv")) for p in (one, two))
    pd.testing.assert_frame_equal(a.drop(columns=["values"]), b.drop(columns=["values"]))
    assert list(a["values"]) == list(b["values"])
    with pytest.raises(ConfigError, match="--jobs 0"):
        reproduce.run_table(str(spec), dataset="tiny", runs=tmp_path / "two", jobs=0)
