"""On-the-fly slide sampling: how much of a training step waits for slide reads.

Demo-style slides (``SLIDES``: rendered tissue, JPEG q90, 256-px tiles, halving pyramid) are
written once into the cache folder, with a manifest that lists each file several times (distinct
slide and case ids, so an epoch is long enough for prefetching to reach its steady state). A
``SlideSamplingDataModule`` in patches mode draws M tissue patches per slide per visit (224 px at
the slides' 0.5 µm/px: level-0 reads through the fast path); its training loader feeds a model
step of fixed cost: a small conv net forward + backward + SGD step on the (B * M, 3, 224, 224)
batch, on the GPU when there is one.

For each loader setting (inline reads, ``num_workers=0``; and ``workers`` processes with
``prefetch_factor``) one warm-up epoch starts the workers, then each step is timed as
``wait`` (``next(loader)`` plus the host-to-device copy) and ``compute`` (the model step,
synchronised). Reported per setting: the wait fraction ``wait / (wait + compute)``, steps/s,
patches/s; plus the model step alone on a fixed batch and the read rate alone (one process).

Ratios: ``compute_fraction`` = 1 - wait fraction with workers (target 0.9: the model waits for
reads less than 10% of the time) and ``workers_speedup`` = step time inline / with workers. On a
2-core CPU the workers and the model share the same cores, so neither target is meaningful there
(as in ``bench_extract``); the targets apply with a GPU.

Run: ``python bench/bench_sampling.py [--quick] [--workers N [N ...]] [--save FILE]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from wsi_lightning.data.sampling import SlideSamplingDataModule
from wsi_lightning.demo.synthetic import render, sample_spec
from wsi_lightning.manifest import load_manifest
from wsi_lightning.slides.pyramid import write_pyramid_tiff

log = logging.getLogger(__name__)

SLIDES = {"n_files": 4, "size_px": 4096, "mpp": 0.5, "tile": 256, "quality": 90, "n_levels": 5,
          "seed": 0, "v": 1}
PATCHES = {"n_patches": 16, "patch_size": 224, "patch_mpp": 0.5, "batch_size": 2}
HERE = Path(__file__).resolve().parent


def _slides(out_dir: Path, rows: int) -> Path:
    """Write (or reuse) the slides; a manifest of `rows` rows cycling over them."""
    stamp = out_dir / "slides.json"
    paths = [out_dir / f"bench_{i}.tiff" for i in range(SLIDES["n_files"])]
    if not (stamp.exists() and json.loads(stamp.read_text()) == SLIDES):
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("rendering %d demo slides of %d px into %s (once)", len(paths), SLIDES["size_px"],
                 out_dir)
        rng = np.random.default_rng(SLIDES["seed"])
        for i, path in enumerate(paths):
            spec = sample_spec(rng, ("normal", "tumor")[i % 2], f"bench_{i}",
                               size_um=SLIDES["size_px"] * SLIDES["mpp"], mpp=SLIDES["mpp"])
            write_pyramid_tiff(path, render(spec)[0], SLIDES["mpp"], SLIDES["n_levels"],
                               SLIDES["tile"], SLIDES["quality"])
        stamp.write_text(json.dumps(SLIDES))
    manifest = out_dir / f"manifest_{rows}.csv"
    pd.DataFrame({"slide_id": [f"s{r:03d}" for r in range(rows)],
                  "case_id": [f"c{r:03d}" for r in range(rows)],
                  "path": [paths[r % len(paths)].name for r in range(rows)],
                  "label": [("normal", "tumor")[r % 2] for r in range(rows)]}).to_csv(manifest,
                                                                                    index=False)
    return manifest


class StepNet(nn.Module):
    """A small conv net: (N, 3, T, T) -> (N, 2); its step is the fixed compute cost."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 32, 64, 128, 256]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(chans[-1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _step_fn(device: torch.device):
    model = StepNet().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        b, m = images.shape[:2]  # (B, M, 3, T, T)
        logits = model(images.flatten(0, 1)).view(b, m, 2).mean(1)  # (B, 2)
        loss = nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def _time_loader(dm: SlideSamplingDataModule, step, device: torch.device, epochs: int) -> dict:
    """Warm-up epoch, then per-step wait (next batch + copy) and compute (model step) times."""
    loader = dm.train_dataloader()
    waits, computes = [], []
    for epoch in range(epochs + 1):
        loader.sampler.set_epoch(epoch)  # as Lightning does: fresh draws each epoch, not re-reads
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            images = batch.features.to(device, non_blocking=True)  # a Bag: (B, M, 3, T, T)
            labels = batch.labels["label"].to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            step(images, labels)
            if epoch:  # epoch 0 starts the workers and fills the prefetch queue
                waits.append(t1 - t0)
                computes.append(time.perf_counter() - t1)
    wait, compute = sum(waits), sum(computes)
    n_patches = len(waits) * PATCHES["batch_size"] * PATCHES["n_patches"]
    return {"wait_fraction": round(wait / (wait + compute), 3), "steps": len(waits),
            "step_ms": round(1e3 * (wait + compute) / len(waits), 1),
            "wait_ms_median": round(1e3 * statistics.median(waits), 1),
            "compute_ms_median": round(1e3 * statistics.median(computes), 1),
            "patches_per_s": round(n_patches / (wait + compute), 1)}


def _model_alone(step, device: torch.device, n: int) -> float:
    """Median ms of the model step on a fixed random batch (no reads)."""
    b, m, t = PATCHES["batch_size"], PATCHES["n_patches"], PATCHES["patch_size"]
    x = torch.rand(b, m, 3, t, t, device=device)
    y = torch.zeros(b, dtype=torch.int64, device=device)
    step(x, y)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 1)


def _reads_alone(dm: SlideSamplingDataModule, n: int) -> float:
    """Patches/s of the dataset in this process (reads, resize, augmentation; no model)."""
    ds = dm.datasets["train"]
    ds[0]  # open the slide, load its tissue mask
    t0 = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return round(n * PATCHES["n_patches"] / (time.perf_counter() - t0), 1)


def run(out_dir: Path, quick: bool = False, workers: int | Sequence[int] | None = None) -> dict:
    """Measure read waiting per training step. Returns the benchmark record (module docstring).

    Args:
        out_dir: cache folder for the slides and tissue masks.
        quick: 16 manifest rows and 1 timed epoch instead of 48 rows and 2 epochs.
        workers: DataLoader workers of the prefetching setting(s) (default: 1 on CPU, 8 on
            GPU); the ratios use the last one.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the model gets one core, the reader(s) the rest
    workers = workers if workers is not None else (8 if device.type == "cuda" else 1)
    workers = [int(workers)] if isinstance(workers, int) else [int(w) for w in workers]
    rows, epochs = (16, 1) if quick else (48, 2)
    manifest = load_manifest(_slides(Path(out_dir), rows))
    step = _step_fn(device)
    model_ms = _model_alone(step, device, 5 if quick else 10)
    settings = {"inline": 0, **{f"workers_{w}": w for w in workers}}
    results = {}
    for name, nw in settings.items():
        dm = SlideSamplingDataModule(manifest, split={"val": 0.0, "test": 0.0},
                                     num_workers=nw, prefetch_factor=2, seed=0,
                                     tissue_cache=Path(out_dir) / "tissue", **PATCHES)
        dm.prepare_data()  # tissue masks, once
        dm.setup()
        if nw == 0:
            reads = _reads_alone(dm, 8 if quick else 24)
        results[name] = _time_loader(dm, step, device, epochs)
        log.info("%s: %s", name, results[name])
    inline, best = results["inline"], results[f"workers_{workers[-1]}"]
    return {
        "name": "slide_sampling",
        "loaders": results,
        "model_step_ms": model_ms,
        "reads_alone_patches_per_s": reads,
        "ratios": {"compute_fraction": round(1 - best["wait_fraction"], 3),
                   "workers_speedup": round(inline["step_ms"] / best["step_ms"], 3)},
        "targets": {"compute_fraction": 0.9} if device.type == "cuda" else {},
        "config": {"slides": SLIDES, "patches": PATCHES, "manifest_rows": rows,
                   "timed_epochs": epochs, "workers": workers, "prefetch_factor": 2,
                   "device": str(device), "model": "StepNet (4 conv + BN + ReLU, SGD)",
                   "torch_threads": torch.get_num_threads()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 rows, 1 timed epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="DataLoader workers of the prefetching setting(s)")
    parser.add_argument("--save", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--out-dir", type=Path, default=HERE / ".cache" / "sampling",
                        help="where the slides are written once (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.out_dir, quick=args.quick, workers=args.workers)
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))  # the script's output is the JSON result


if __name__ == "__main__":
    main()
