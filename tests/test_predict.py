"""``wsi predict``: a trained run scores slides without labels exactly as its test did, for
feature bags, quadtree bags and end-to-end slide sampling; resumes; extracts new slides into
the run's store; refuses overrides that change the model; ``--skip-errors``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import feature_cfg_overrides, make_feature_bags, make_quadtree_bags
from wsi_lightning import cli, config, run
from wsi_lightning.errors import WSIError
from wsi_lightning.features.store import FeatureStore

PROB = "prob_class1"


def unlabelled_copy(manifest: Path, slide_ids: list[str], out: Path, drop: tuple[str, ...] = ("label", "split")) -> Path:
    """The manifest rows of ``slide_ids`` without their labels (paths made absolute)."""
    df = pd.read_csv(manifest, dtype=str)
    df = df[df["slide_id"].isin(slide_ids)].drop(columns=[c for c in drop if c in df.columns])
    df["path"] = [str((manifest.parent / p).resolve()) for p in df["path"]]
    df.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def abmil_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, run.RunResult]:
    root = tmp_path_factory.mktemp("predict_bags")
    manifest = make_feature_bags(root, n_slides=24)
    res = run.fit(config.load("abmil", feature_cfg_overrides(manifest, root / "runs", **{"trainer.max_epochs": 3})))
    return manifest, res


def test_predict_without_labels_gives_the_fits_test_probabilities(abmil_run, tmp_path: Path):
    manifest, res = abmil_run
    test = pd.read_csv(res.run_dir / "test_predictions.csv", dtype={"slide_id": str})
    new = unlabelled_copy(manifest, list(test["slide_id"]), tmp_path / "new.csv")
    assert cli.main(["predict", str(res.run_dir), str(new), "--out", str(tmp_path / "pred")]) == 0
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype={"slide_id": str})
    assert list(pred["slide_id"]) == sorted(test["slide_id"])
    both = test.merge(pred, on="slide_id", suffixes=("_fit", "_pred"))
    np.testing.assert_allclose(both[f"{PROB}_pred"], both[f"{PROB}_fit"], atol=1e-6)
    assert (both["pred_pred"] == both["pred_fit"]).all()
    assert pred["label"].isna().all()  # unknown, not guessed
    assert set(pred["checkpoint"]) == {str((res.run_dir / "checkpoints" / "best.ckpt").resolve())}
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())["metrics"]
    assert "test/auroc" not in metrics and not any(k.startswith("test/loss") for k in metrics)
    att = pd.read_csv(tmp_path / "pred" / "attention" / "attention.csv", dtype={"slide_id": str})
    assert sorted(att["slide_id"].unique()) == sorted(test["slide_id"])  # the maps, every slide
    assert (tmp_path / "pred" / "config.resolved.yaml").is_file()


def test_labelled_slides_get_metrics(abmil_run, tmp_path: Path):
    manifest, res = abmil_run
    test = pd.read_csv(res.run_dir / "test_predictions.csv", dtype={"slide_id": str})
    new = unlabelled_copy(manifest, list(test["slide_id"]), tmp_path / "new.csv", drop=("split",))
    out = run.predict(res.run_dir, new, out=tmp_path / "pred")
    assert out.metrics["test/auroc"] == pytest.approx(res.metrics["test/auroc"])


def test_predict_resumes_and_keeps_earlier_rows(abmil_run, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    manifest, res = abmil_run
    ids = sorted(pd.read_csv(manifest, dtype=str)["slide_id"])
    half = unlabelled_copy(manifest, ids[:10], tmp_path / "half.csv")
    full = unlabelled_copy(manifest, ids, tmp_path / "full.csv")
    run.predict(res.run_dir, half, out=tmp_path / "pred")
    first = pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype={"slide_id": str})
    with caplog.at_level(logging.INFO, logger="wsi_lightning.run"):
        run.predict(res.run_dir, full, out=tmp_path / "pred")
    assert any("10 of 24 slides already predicted" in r.getMessage() for r in caplog.records)
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype={"slide_id": str})
    att = pd.read_csv(tmp_path / "pred" / "attention" / "attention.csv", dtype={"slide_id": str})
    assert list(pred["slide_id"]) == ids and sorted(att["slide_id"].unique()) == ids
    pd.testing.assert_frame_equal(pred[pred["slide_id"].isin(ids[:10])].reset_index(drop=True), first)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wsi_lightning.run"):
        run.predict(res.run_dir, full, out=tmp_path / "pred")
    assert any("all 24 slides" in r.getMessage() for r in caplog.records)


def test_shards_give_the_predictions_of_one_pass(abmil_run, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """--shard I/N: disjoint shards into OUT/shardIofN/, merged by the last to finish into the
    predictions, attention maps and metrics one unsharded pass gives; --check says what is missing."""
    manifest, res = abmil_run
    ids = sorted(pd.read_csv(manifest, dtype=str)["slide_id"])
    new = unlabelled_copy(manifest, ids, tmp_path / "new.csv", drop=("split",))  # labelled: metrics too
    one = run.predict(res.run_dir, new, out=tmp_path / "one")
    two = tmp_path / "two"

    def predict(*extra: str) -> int:
        return cli.main(["predict", str(res.run_dir), str(new), "--out", str(two), *extra])

    assert predict("--shard", "0/2") == 0
    assert not (two / "predictions.csv").exists()  # shard 1 has not run
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert predict("--check") == 1
    assert any("0 of 24 slides predicted" in r.getMessage() and "shards missing" in r.getMessage()
               for r in caplog.records)
    assert predict("--shard", "1/2") == 0
    shards = [pd.read_csv(two / f"shard{k}of2" / "predictions.csv", dtype={"slide_id": str}) for k in (0, 1)]
    assert [list(s["slide_id"]) for s in shards] == [ids[0::2], ids[1::2]]  # as wsi extract --shard splits
    a = pd.read_csv(tmp_path / "one" / "predictions.csv", dtype={"slide_id": str})
    b = pd.read_csv(two / "predictions.csv", dtype={"slide_id": str})
    assert list(b["slide_id"]) == ids and list(b.columns) == list(a.columns)
    np.testing.assert_allclose(b[PROB], a[PROB], atol=1e-6)
    assert (b["pred"] == a["pred"]).all() and (b["checkpoint"] == a["checkpoint"]).all()
    att = [pd.read_csv(d / "attention" / "attention.csv", dtype={"slide_id": str}).sort_values(["slide_id", "tile"])
           for d in (tmp_path / "one", two)]
    np.testing.assert_allclose(att[1]["attention"], att[0]["attention"], atol=1e-6)
    files = [sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
             for d in (tmp_path / "one", two)]
    assert [f for f in files[1] if not f.startswith("shard")] == files[0]  # every file one pass writes
    merged = json.loads((two / "metrics.json").read_text())
    assert merged["metrics"]["test/auroc"] == pytest.approx(one.metrics["test/auroc"], abs=1e-6)
    assert merged["metrics"]["test/acc"] == pytest.approx(one.metrics["test/acc"], abs=1e-6)
    assert set(merged["shards"]) == {"shard0of2", "shard1of2"}
    assert predict("--check") == 0
    # a shard run again finds its slides done and merges the same files again
    assert predict("--shard", "1/2") == 0
    pd.testing.assert_frame_equal(pd.read_csv(two / "predictions.csv", dtype={"slide_id": str}), b)


def test_predict_refuses_model_overrides_and_bad_folders(abmil_run, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    manifest, res = abmil_run
    with pytest.raises(WSIError, match=r"\['method.embed_dim'\] change the model or the data"):
        run.predict(res.run_dir, manifest, overrides=["method.embed_dim=8"])
    with pytest.raises(WSIError, match="not a run folder"):
        run.predict(tmp_path, manifest)
    with pytest.raises(WSIError, match="nope.csv not found"):
        run.predict(res.run_dir, tmp_path / "nope.csv")
    with caplog.at_level(logging.ERROR):
        assert cli.main(["predict", str(res.run_dir), str(manifest), "--ckpt", "nope"]) == 2
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli.main(["predict", str(res.run_dir), str(manifest), "--shard", "2/2", "--out", str(tmp_path / "p")]) == 2
    assert any("--shard 2/2; expected 0 <= I < N" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "p").exists()  # refused before anything ran


def _demo_fit_and_new_slides(tmp_path: Path, n_train: int, n_new: int):
    """A 1-epoch ABMIL fit on `n_train` demo slides (store ``tmp_path/store``) and a label-free
    manifest frame of `n_new` other demo slides (ids ``new_*``, absolute paths)."""
    from wsi_lightning.demo.dataset import make_demo_dataset

    train = make_demo_dataset(tmp_path / "train", n_slides=n_train, seed=3, workers=1, size_um=768.0)
    over = feature_cfg_overrides(train, tmp_path / "runs", **{
        "data.store": tmp_path / "store", "tiling.tile_size": 64, "tiling.mpp": 1.0, "features.backbone": "demo_cnn",
        "features.pretrained": "false", "trainer.max_epochs": 1})
    res = run.fit(config.load("abmil", over))
    new = make_demo_dataset(tmp_path / "new", n_slides=n_new, seed=11, workers=1, size_um=768.0)
    df = pd.read_csv(new, dtype=str).drop(columns=["label"])
    df["slide_id"] = ["new_" + s for s in df["slide_id"]]
    df["path"] = [str((new.parent / p).resolve()) for p in df["path"]]
    return res, df


def test_new_slides_are_extracted_into_the_runs_store_and_failures_skipped(tmp_path: Path):
    """Slides from demo files: the fit extracts its own; predict extracts new ones (one of
    them missing: left out with --skip-errors and counted)."""
    store = tmp_path / "store"
    res, df = _demo_fit_and_new_slides(tmp_path, n_train=7, n_new=3)
    df.loc[2, "path"] = str(tmp_path / "gone.tiff")
    df.to_csv(tmp_path / "new.csv", index=False)
    for k in range(2):  # shards first: each extracts its own new slides and reports its own failures
        assert cli.main(["predict", str(res.run_dir), str(tmp_path / "new.csv"), "--out", str(tmp_path / "sharded"),
                         "--shard", f"{k}/2", "--skip-errors"]) == 0
    reports = sorted(p.name for p in store.glob("errors*.csv"))
    assert len(reports) == 1 and reports[0].startswith("errors.predict.shard")  # the shard that held 'gone'
    out = run.predict(res.run_dir, tmp_path / "new.csv", out=tmp_path / "pred", skip_errors=True)
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype={"slide_id": str})
    sharded = pd.read_csv(tmp_path / "sharded" / "predictions.csv", dtype={"slide_id": str})
    assert list(sharded["slide_id"]) == list(pred["slide_id"])
    np.testing.assert_allclose(sharded[["prob_normal", "prob_tumor"]], pred[["prob_normal", "prob_tumor"]], atol=1e-6)
    pngs = [sorted(p.name for p in (d / "attention").glob("*.png")) for d in (tmp_path / "pred", tmp_path / "sharded")]
    assert pngs[0] and pngs[1] == pngs[0]  # the heat-maps of every shard's slides
    assert json.loads((tmp_path / "sharded" / "metrics.json").read_text())["metrics"]["test/slides_left_out"] == 1.0
    assert list(pred["slide_id"]) == sorted(df["slide_id"][:2])
    assert out.metrics["test/slides_left_out"] == 1.0
    assert set(df["slide_id"][:2]) <= set(FeatureStore(store).complete_slides())
    np.testing.assert_allclose(pred[["prob_normal", "prob_tumor"]].sum(1), 1.0, atol=1e-5)


def test_predict_a_quadtree_method(tmp_path: Path):
    manifest = make_quadtree_bags(tmp_path, n_slides=12)
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "trainer.max_epochs": 1, "tiling.multiscale.mode": "quadtree", "method.t_patch": 2, "method.v_patch": 3,
        "method.hidden_dims": "[32,48,16,32]", "method.final_dim": 32, "method.attn_dim": 16,
        "method.gate_dim": 8, "method.heads": 2})
    res = run.fit(config.load("hag_mil", over))
    test = pd.read_csv(res.run_dir / "test_predictions.csv", dtype={"slide_id": str})
    new = unlabelled_copy(manifest, list(test["slide_id"]), tmp_path / "new.csv")
    run.predict(res.run_dir, new, out=tmp_path / "pred")
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype={"slide_id": str})
    np.testing.assert_allclose(pred[PROB], test.sort_values("slide_id")[PROB], atol=1e-6)


def test_predict_an_end_to_end_method(tmp_path: Path):
    """Slides sampled on the fly (no store): test-time draws are seeded per slide, so the
    prediction repeats the fit's test exactly."""
    from wsi_lightning.demo.dataset import make_demo_dataset

    manifest = make_demo_dataset(tmp_path / "demo", n_slides=8, seed=3, workers=1, size_um=768.0)
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "data.task": "binary", "data.num_workers": 0, "data.sampling.n_patches": 4, "data.sampling.patch_size": 64,
        "data.sampling.patch_mpp": 1.0, "data.sampling.test_draws": 2, "method.backbone": "demo_cnn",
        "method.pretrained": "false", "method.resize": None, "method.crop": 56, "trainer.max_epochs": 1,
        "method.mil_args": "{heads: 1, mta: false, attention: ilse, attn_dim: 16, pt_norm: softmax}",
        "callbacks": "[]", "monitor.metric": "val/loss", "monitor.mode": "min"})
    res = run.fit(config.load("pt_3head_mta", over))
    test = pd.read_csv(res.run_dir / "test_predictions.csv", dtype={"slide_id": str})
    new = unlabelled_copy(manifest, list(test["slide_id"]), tmp_path / "new.csv")
    run.predict(res.run_dir, new, out=tmp_path / "pred")
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype={"slide_id": str})
    np.testing.assert_allclose(pred["prob_tumor"], test.sort_values("slide_id")["prob_tumor"], atol=1e-5)


def test_predict_patient_level_bags(tmp_path: Path):
    """data.bag_level=case: one prediction row per case, as the fit's test; resumed by slide."""
    from tests.conftest import make_case_bags

    manifest = make_case_bags(tmp_path / "cases", n_cases=16)
    res = run.fit(config.load("abmil", feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "data.bag_level": "case", "trainer.max_epochs": 2})))
    test = pd.read_csv(res.run_dir / "test_predictions.csv", dtype=str)
    slides = [s for cell in test["slide_ids"] for s in cell.split(";")]
    new = unlabelled_copy(manifest, slides, tmp_path / "new.csv")
    run.predict(res.run_dir, new, out=tmp_path / "pred")
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype={"case_id": str})
    assert list(pred["case_id"]) == sorted(test["case_id"])
    np.testing.assert_allclose(pred[PROB], test.sort_values("case_id")[PROB].astype(float), atol=1e-6)
    out = run.predict(res.run_dir, new, out=tmp_path / "pred")  # every slide done: nothing to redo
    assert out.metrics == {}
    for k in range(3):  # shards take whole cases
        run.predict(res.run_dir, new, out=tmp_path / "sharded", shard=(k, 3))
    parts = [pd.read_csv(tmp_path / "sharded" / f"shard{k}of3" / "predictions.csv", dtype=str) for k in range(3)]
    assert sorted(c for p in parts for c in p["case_id"]) == sorted(test["case_id"])
    assert sorted(s for p in parts for cell in p["slide_ids"] for s in cell.split(";")) == sorted(slides)
    merged = pd.read_csv(tmp_path / "sharded" / "predictions.csv", dtype={"case_id": str})
    assert list(merged["case_id"]) == list(pred["case_id"])
    np.testing.assert_allclose(merged[PROB], pred[PROB], atol=1e-6)


def test_outputs_of_a_patient_level_run_are_per_slide(tmp_path: Path):
    from tests.conftest import make_case_bags
    from wsi_lightning.outputs import load_outputs

    manifest = make_case_bags(tmp_path / "cases", n_cases=12)
    res = run.fit(config.load("abmil", feature_cfg_overrides(manifest, tmp_path / "runs", **{
        "data.bag_level": "case", "trainer.max_epochs": 1, "callbacks": "[{name: attention_logger}]"})))
    out = load_outputs(res.run_dir)
    test = pd.read_csv(res.run_dir / "test_predictions.csv", dtype=str)
    slides = sorted(s for cell in test["slide_ids"] for s in cell.split(";"))
    assert out.slide_ids == slides and not out.tiles(slides[0]).empty


@pytest.mark.slow
def test_two_shard_processes_at_once_into_one_folder(tmp_path: Path):
    """Two ``wsi predict --shard k/2`` processes at the same time, a job array's tasks: each
    extracts its own new slides into the run's store (host-named, as on two nodes), and the
    merged folder holds what one unsharded pass predicts."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    res, df = _demo_fit_and_new_slides(tmp_path, n_train=6, n_new=6)
    df.to_csv(tmp_path / "new.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "wsi_lightning", "predict", str(res.run_dir),
                               str(tmp_path / "new.csv"), "--out", str(tmp_path / "sharded"), "--shard", f"{k}/2",
                               "trainer.num_threads=1"], cwd=tmp_path, env={**env, "WSI_HOST": f"node{k}"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    for k, p in enumerate(procs):
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"shard {k}:\n{out[-4000:]}"
    assert set(df["slide_id"]) <= set(FeatureStore(tmp_path / "store").complete_slides())
    run.predict(res.run_dir, tmp_path / "new.csv", out=tmp_path / "one")
    a = pd.read_csv(tmp_path / "one" / "predictions.csv", dtype={"slide_id": str})
    b = pd.read_csv(tmp_path / "sharded" / "predictions.csv", dtype={"slide_id": str})
    assert list(b["slide_id"]) == sorted(df["slide_id"]) == list(a["slide_id"])
    np.testing.assert_allclose(b[["prob_normal", "prob_tumor"]], a[["prob_normal", "prob_tumor"]], atol=1e-6)
