"""Two "nodes" on one machine (``torchrun --nnodes=2 --nproc-per-node=1`` on 127.0.0.1, separate
node ranks and host names): extraction gives the store a single process makes; a fit gives the
test metrics of a 2-process single-node DDP fit, in one run folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, feature_cfg_overrides, make_feature_bags
from wsi_lightning.features.store import FeatureStore

EXTRACT = ["tiling.tile_size=64", "tiling.mpp=1.0", "features.backbone=demo_cnn", "features.pretrained=false",
           "features.num_workers=0"]
CLEAN = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "WSI_RUN_DIR",
         "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return {**e, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def two_nodes(args: list[str], cwd: Path, timeout: int = 600) -> None:
    """``python -m wsi_lightning ARGS`` as node 0 and node 1 of a 2-node torchrun job."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={r}",
         "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "wsi_lightning", *args],
        cwd=cwd, env=env(WSI_HOST=f"node{r}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"node {r}:\n{out[-4000:]}"


@pytest.mark.ddp
def test_two_node_extraction_matches_one_process(tmp_path: Path):
    from wsi_lightning.demo.dataset import make_demo_dataset

    manifest = make_demo_dataset(tmp_path / "demo", n_slides=5, seed=3, workers=1, size_um=512.0)
    one = subprocess.run([sys.executable, "-m", "wsi_lightning", "extract", str(manifest), "--store",
                          str(tmp_path / "one"), *EXTRACT], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two_nodes(["extract", str(manifest), "--store", str(tmp_path / "two"), *EXTRACT], tmp_path)
    a, b = FeatureStore(tmp_path / "one"), FeatureStore(tmp_path / "two")
    assert sorted(b.complete_slides()) == sorted(a.complete_slides()) and len(a.complete_slides()) == 5
    for sid in a.complete_slides():
        np.testing.assert_array_equal(b.read_coords(sid), a.read_coords(sid))
        np.testing.assert_array_equal(b.read_features(sid), a.read_features(sid))
    assert not list((tmp_path / "two").glob(".tmp-*")), "temp slides left behind"


@pytest.mark.ddp
@pytest.mark.slow
def test_two_node_fit_matches_single_node_ddp(tmp_path: Path):
    manifest = make_feature_bags(tmp_path / "bags")
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{"trainer.max_epochs": 2, "data.split.val": 0.3,
                                                                 "data.split.test": 0.3, "trainer.strategy": "ddp"})
    two_nodes(["fit", "abmil", *over, "trainer.devices=1", "trainer.num_nodes=2"], tmp_path)
    (node_run,) = list((tmp_path / "runs" / "abmil").iterdir())  # one run folder for both nodes
    single = subprocess.run([sys.executable, "-m", "wsi_lightning", "fit", "abmil", *over, "trainer.devices=2"],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    (ddp_run,) = [d for d in (tmp_path / "runs" / "abmil").iterdir() if d != node_run]
    a = json.loads((node_run / "metrics.json").read_text())["metrics"]
    b = json.loads((ddp_run / "metrics.json").read_text())["metrics"]
    assert a.keys() == b.keys() and "test/auroc" in a
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
