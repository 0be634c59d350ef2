"""``make bench``: the entry point keeps going past a failed benchmark, and every benchmark runs.

The whole ``python -m bench --quick`` (what ``make bench ARGS=--quick`` runs) takes ~8 min on a
2-core CPU, so it is marked slow (``make test-all``); the fast tests check the entry point with
stand-in benchmarks, and the slide-sampling (where ``make bench`` once crashed on the batch type)
and gigapixel benchmarks on tiny slides, and the cohort benchmark on a tiny cohort.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import bench_cohort, bench_gigapixel, bench_sampling, cohort
from tests.conftest import REPO
from wsi_lightning.features.store import FeatureStore


def fake_run(key: str, cache: Path, quick: bool) -> dict:
    if key == "bags":
        raise RuntimeError("bags exploded")
    return {"name": f"fake_{key}", "ratios": {"speed": 2.0}, "targets": {"speed": 1.5}}


def test_a_failed_benchmark_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_main, "_run_one", fake_run)
    rc = bench_main.main(["--only", "tiles,bags,hag_mil", "--cache", str(tmp_path / "cache"),
                          "--results", str(tmp_path / "results")])
    assert rc == 1  # a failure makes the run fail, at the end
    out = capsys.readouterr().out
    # each benchmark's rows are printed as it finishes, before the next one starts
    assert out.index("fake_tiles") < out.index("FAILED") < out.index("fake_hag_mil")
    record = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert [r["name"] for r in record["results"]] == ["fake_tiles", "fake_hag_mil"]
    assert record["failed"][0]["benchmark"] == "bags" and "bags exploded" in record["failed"][0]["error"]
    assert len(list((tmp_path / "results").glob("bench-*.json"))) == 1


def test_unknown_benchmark_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_main.main(["--only", "tiles,nope", "--results", str(tmp_path)])
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_sampling_bench_on_tiny_slides(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_sampling.SLIDES, "size_px", 1024)
    monkeypatch.setitem(bench_sampling.SLIDES, "n_files", 2)
    monkeypatch.setitem(bench_sampling.SLIDES, "n_levels", 3)
    monkeypatch.setattr(bench_sampling, "PATCHES", {**bench_sampling.PATCHES, "n_patches": 2, "patch_size": 32})
    res = bench_sampling.run(tmp_path, quick=True, workers=1)
    assert res["loaders"]["inline"]["steps"] == res["loaders"]["workers_1"]["steps"] == 8  # 16 slides, 2 a batch
    assert set(res["ratios"]) == {"compute_fraction", "workers_speedup"}


def test_gigapixel_bench_on_tiny_slides(tmp_path, monkeypatch):
    """The gigapixel benchmark's subprocesses (drawing, extraction with each backend) end to end."""
    monkeypatch.setattr(bench_gigapixel, "QUICK_SIZES", {"large": (4096, 3072), "small": (2048, 1536)})
    res = bench_gigapixel.run(tmp_path, quick=True)
    runs = res["runs"]
    assert set(runs) == {"large/fast", "small/fast", "small/openslide"}
    assert runs["large/fast"]["tissue_tiles"] > 2 * runs["small/fast"]["tissue_tiles"] > 0
    assert runs["small/openslide"]["tissue_tiles"] == runs["small/fast"]["tissue_tiles"]
    assert all(r["peak_rss_mb"] > 0 and r["split_s"]["model"] > 0 for r in runs.values())
    assert set(res["ratios"]) == {"rss_small_over_large", "ms_per_tile_small_over_large", "openslide_read_over_fast"}
    assert res["generation"]["large"]["peak_rss_mb"] > 0


def test_cohort_bench_on_a_tiny_cohort(tmp_path, monkeypatch):
    """Both loaders through the real BagDataModule, cold and warm, each step kind, on 12 small bags."""
    monkeypatch.setattr(bench_cohort, "QUICK_COHORT", {**cohort.QUICK_COHORT, "n_slides": 12, "median": 60,
                                                       "n_min": 20, "n_max": 200, "dim": 32})
    res = bench_cohort.run(tmp_path, quick=True, workers=(0, 1), model_steps=3)
    passes = res["passes"]
    assert len(passes) == 2 * 2 * 3 * 2  # loaders x worker counts x step kinds x (cold, warm)
    assert {p["bags"] for p in passes if p["kind"] != "model"} == {12}
    assert {p["bags"] for p in passes if p["kind"] == "model"} == {3}
    assert all(p["resident"] == 1.0 for p in passes if p["cache"] == "warm" and p["kind"] != "model")
    assert all(0 < p["data_wait_fraction"] <= 1 and p["instances_per_s"] > 0 for p in passes)
    assert set(res["ratios"]) == {"store_vs_pt_cold_w0", "store_vs_pt_warm_w0", "store_vs_pt_cold_w1",
                                  "store_vs_pt_warm_w1", "fed_at_5ms_cold_w1", "fed_at_5ms_warm_w1"}
    assert res["cohort"]["generation"]["written"] == 12
    assert bench_cohort.run(tmp_path, quick=True, workers=(0,), model_steps=1)["cohort"]["generation"]["written"] == 0


def test_cohort_generation_resumes_and_refuses_another_config(tmp_path):
    """An interrupted generation writes only what is missing, the same values; another config is refused."""
    cfg = {**cohort.QUICK_COHORT, "n_slides": 5, "median": 30, "n_min": 10, "n_max": 80, "dim": 8}
    assert cohort.ensure_cohort(tmp_path, cfg)["written"] == 5
    pt = tmp_path / "pt_files"
    kept, lost = pt / "slide_00000.pt", bench_cohort.PtBags(pt).read("slide_00003")
    mtime = kept.stat().st_mtime_ns
    (pt / "slide_00001.pt").unlink()  # interrupted: a .pt missing, a store entry missing, a dead writer's temp
    shutil.rmtree(tmp_path / "store" / "slide_00003.zarr")
    (pt / ".slide_00002.999999999.tmp").write_bytes(b"partial")
    stamp = json.loads((tmp_path / "cohort.json").read_text())
    (tmp_path / "cohort.json").write_text(json.dumps({**stamp, "complete": False}))
    assert cohort.ensure_cohort(tmp_path, cfg)["written"] == 2
    assert kept.stat().st_mtime_ns == mtime and not list(pt.glob(".*.tmp"))
    feats, coords = FeatureStore(tmp_path / "store").read("slide_00003")
    assert (feats == lost[0]).all() and (coords == lost[1]).all()
    assert cohort.ensure_cohort(tmp_path, cfg)["written"] == 0
    with pytest.raises(FileExistsError, match="another --cohort-dir"):
        cohort.ensure_cohort(tmp_path, {**cfg, "n_slides": 6})


@pytest.mark.slow
def test_make_bench_quick(tmp_path):
    """``make bench ARGS=--quick`` end to end, its data and results under tmp_path (~8 min)."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--cache", str(tmp_path / "cache"),
                           "--results", str(tmp_path / "results")],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert not record["failed"] and record["meta"]["quick"]
    assert [r["name"] for r in record["results"]] == ["tile_reading", "bag_loading", "extraction",
                                                      "slide_sampling", "hag_mil_cascade", "dicom_tile_reading",
                                                      "gigapixel", "cohort_throughput"]
    assert all(r["ratios"] for r in record["results"])


def test_gpu_check_runs_every_step_at_toy_sizes_on_cpu(tmp_path):
    """bench/gpu_check.sh only runs when a GPU is lent: its steps run here on a CPU at toy sizes
    (``--device cpu --smoke``), so the script cannot break unseen between loans."""
    from bench import gpu_check

    assert gpu_check.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("gpu-*-smoke.json")).read_text())
    assert not record["failed"]
    assert set(record["results"]) == {"extract_resnet50_trunc", "extract_uni_vit_l16", "amp_epoch",
                                      "magnet_step", "hag_mil_40k"}
    assert record["results"]["extract_uni_vit_l16"]["tiles_per_s"] > 0
    assert [lv["tokens"] for lv in record["results"]["hag_mil_40k"]["levels"]] == [500, 1200, 1200]


def test_gpu_check_without_cuda_says_so(tmp_path, caplog):
    from bench import gpu_check

    if torch_cuda_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in caplog.text and not list(tmp_path.iterdir())


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
