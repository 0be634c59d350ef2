"""One short GPU check (``bash bench/gpu_check.sh``, at most 8 minutes on one CUDA device).

Runs the GPU paths that CPU machines never execute and records what they measure in
``bench/results/gpu-<time>.json`` (rewritten atomically after every step, so a step that fails or
runs out of time keeps the ones before it):

    extract_<model>   bf16 extraction throughput (tiles/s) of resnet50_trunc and the UNI ViT-L/16
                      preset (random weights) at 224 px, batch 256, DataLoader workers feeding
                      uint8 tiles, channels-last, autocast as ``features.precision=bf16`` does;
                      peak GPU memory.
    amp_epoch         one ``wsi fit abmil`` epoch under ``trainer.precision=bf16-mixed`` on a
                      synthetic store of 200 CLAM-like 1024-d bags (train + val + test).
    magnet_step       one training step of MagNets at the paper's size (magnet_4layer: (3, 2, 3,
                      2) tree, 56/112/224 px, InceptionV3 + ResNet-18, 8 slides a batch; random
                      weights) under bf16-mixed; seconds and peak GPU memory.
    hag_mil_40k       one HAG-MIL cascade step at 40,000 coarsest parents (IAT widths
                      1024-1536-512-1024, t_patch 7000: 40,000 / 28,000 / 28,000 tokens of
                      40,000 / 160,000 / 640,000 candidates) under bf16 autocast; seconds and
                      peak memory per level.

``--device cpu --smoke`` runs every step at toy sizes on a CPU (what ``make test`` checks, so
the script cannot rot unseen between GPU loans).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("gpu_check")
HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class _Tiles(torch.utils.data.Dataset):
    """Random uint8 RGB tiles, as a slide loader hands them over (decoding is benchmarked apart)."""

    def __init__(self, n: int, px: int) -> None:
        self.n, self.px = n, px

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = np.random.default_rng(i)
        return torch.from_numpy(g.integers(0, 256, (3, self.px, self.px), dtype=np.uint8))


def extraction(name: str, device: str, batch: int, batches: int, workers: int, px: int = 224) -> dict:
    from wsi_lightning.features.backbones import build_backbone
    from wsi_lightning.features.extract import autocast_dtype

    bb = build_backbone(name, pretrained=False).to(device).eval()
    bb = bb.to(memory_format=torch.channels_last)
    dtype = autocast_dtype("bf16", device.split(":")[0])
    loader = torch.utils.data.DataLoader(_Tiles(batch * (batches + 2), px), batch_size=batch,
                                         num_workers=workers, pin_memory=device.startswith("cuda"),
                                         persistent_workers=False)
    _reset_peak(device)
    n, t0 = 0, None
    with torch.inference_mode():
        for i, x in enumerate(loader):
            if i == 2:  # two warm-up batches (cuDNN autotune, allocator)
                _sync(device)
                t0 = time.perf_counter()
            x = x.to(device, non_blocking=True).float().div_(255).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                out = bb(x)
            if i >= 2:
                n += len(out)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"model": name, "dim": bb.dim, "batch": batch, "workers": workers, "tiles": n,
            "seconds": round(seconds, 2), "tiles_per_s": round(n / seconds, 1), "peak_gpu_mib": _peak_mib(device)}


def _write_bags(root: Path, n: int, instances: int, dim: int) -> Path:
    import pandas as pd

    from wsi_lightning.features.store import FeatureStore

    rng = np.random.default_rng(0)
    store, rows = FeatureStore(root / "store"), []
    mean, std = rng.uniform(0.5, 3.0, dim), np.exp(rng.uniform(np.log(0.1), np.log(3.0), dim))
    for i in range(n):
        f = np.maximum(mean + std * rng.standard_normal((instances, dim)), 0).astype(np.float32)
        if i % 2:
            f[:3, :32] += 2 * std[:32]
        xy = np.stack(np.divmod(np.arange(instances), 64), 1)[:, ::-1] * 256
        store.write_slide(f"s{i:04d}", f, xy.astype(np.int64), {"tile_size": 256, "extent_level0": 256})
        rows.append({"slide_id": f"s{i:04d}", "case_id": f"c{i:04d}", "label": ["normal", "tumor"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _common(root: Path, accelerator: str, precision: str) -> list[str]:
    return [f"paths.runs={root / 'runs'}", "logger.wandb.enabled=false", f"trainer.accelerator={accelerator}",
            f"trainer.precision={precision}", "trainer.enable_progress_bar=false", "monitor.patience=null"]


def amp_epoch(device: str, root: Path, slides: int, instances: int) -> dict:
    from wsi_lightning import config, run

    manifest = _write_bags(root / "bags", slides, instances, 1024)
    accel, precision = ("gpu", "bf16-mixed") if device.startswith("cuda") else ("cpu", "bf16-mixed")
    over = [f"data.manifest={manifest}", f"data.store={manifest.parent / 'store'}", "trainer.max_epochs=1",
            *_common(root, accel, precision)]
    _reset_peak(device)
    t0 = time.perf_counter()
    res = run.fit(config.load("abmil", over))
    return {"slides": slides, "instances": instances, "precision": precision,
            "seconds_fit_and_test": round(time.perf_counter() - t0, 2),
            "test_auroc": round(float(res.metrics["test/auroc"]), 3), "peak_gpu_mib": _peak_mib(device)}


def _slides(root: Path, n: int, side: int) -> Path:
    import pandas as pd

    from wsi_lightning.slides.pyramid import write_pyramid_tiff

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    for i in range(n):
        img = np.stack([150 + 60 * np.sin(xx / (20 + i)), 90 + 50 * np.cos(yy / 30), 160 + 40 * np.sin((xx + yy) / 50)], -1)
        tissue = ((xx - side / 2) / (0.4 * side)) ** 2 + ((yy - side / 2) / (0.35 * side)) ** 2 < 1
        img = np.where(tissue[..., None], img, 240).clip(0, 255).astype(np.uint8)
        write_pyramid_tiff(root / f"m{i}.tiff", img, 0.5, n_levels=4)
        rows.append({"slide_id": f"m{i}", "case_id": f"c{i}", "path": str(root / f"m{i}.tiff"),
                     "label": ["normal", "tumor"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def magnet_step(device: str, root: Path, smoke: bool) -> dict:
    from wsi_lightning import build, config

    manifest = _slides(root / "slides", 16 if not smoke else 8, 4096 if not smoke else 512)
    accel = "gpu" if device.startswith("cuda") else "cpu"
    over = [f"data.manifest={manifest}", "method.pretrained=false", "callbacks=[]", "data.split.val=0.25",
            "data.split.test=0.25", *_common(root, accel, "bf16-mixed")]
    if smoke:  # the same code at toy sizes
        over += ["method.patches=[2,2]", "method.aux_layers=[1]", "method.in_size=16", "method.source_size=32", "method.last_source_size=32",
                 "method.leaf_size=32", "data.sampling.image_size=16", "method.backbone=demo_cnn",
                 "method.aux_backbone=demo_cnn", "method.gru_hidden=8", "method.mlp=[8]", "data.batch_size=2"]
    cfg = config.load("magnet_4layer", over)
    dm = build.build_datamodule(cfg)
    dm.setup("fit")
    model = build.build_method(cfg, dm.in_dim, dm.num_classes, dm.class_names, str(root / "pred"))
    trainer = build.build_trainer(cfg, root / "magnet_run", max_steps=1, limit_val_batches=0,
                                  num_sanity_val_steps=0, logger=False, callbacks=[], enable_checkpointing=False)
    _reset_peak(device)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    _sync(device)
    return {"patches": list(cfg.method.patches), "batch": int(cfg.data.batch_size),
            "seconds_one_step_incl_loading": round(time.perf_counter() - t0, 2), "peak_gpu_mib": _peak_mib(device)}


def hag_mil(device: str, parents: int, t_patch: int, dims: list[int], levels: int = 3) -> dict:
    from wsi_lightning.nn.iat import IATModel

    dt = torch.bfloat16 if device.startswith("cuda") else None  # CPU bf16 matmuls crawl: fp32 there
    out, candidates, tokens = [], parents, parents
    labels = torch.tensor([1], device=device)
    for lvl in range(levels):
        torch.manual_seed(lvl)
        feats = torch.randn(1, candidates, 1024, device=device)
        model = IATModel(1024, tuple(dims)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-5)
        idx = torch.randperm(candidates, device=device)[:tokens].sort().values
        with torch.autocast(device.split(":")[0], dtype=dt, enabled=dt is not None):  # warm-up
            model(feats[:, :64], labels=labels).logits.float().sum().backward()
        opt.zero_grad(set_to_none=True)
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=dt, enabled=dt is not None):
            o = model(feats[:, idx], labels=labels)
            loss = 0.5 * torch.nn.functional.cross_entropy(o.logits.float(), labels) + 0.5 * o.instance_loss.float()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = torch.argsort(o.attention_raw[0].detach().float(), descending=True)[:t_patch]
        _sync(device)
        out.append({"level": lvl, "tokens": tokens, "candidates": candidates,
                    "seconds": round(time.perf_counter() - t0, 3), "peak_gpu_mib": _peak_mib(device)})
        log.info("  HAG-MIL level %d: %s", lvl, out[-1])
        del feats, model, opt, o, loss
        candidates, tokens = 4 * candidates, 4 * min(t_patch, tokens)
    return {"parents": parents, "t_patch": t_patch, "dims": dims, "levels": out}


def _save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (a CPU check of the script itself)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--only", default="extract,amp_epoch,magnet_step,hag_mil_40k")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu --smoke)")
        return 2
    dev = args.device
    gpu = torch.cuda.get_device_name() if dev.startswith("cuda") else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"gpu-{stamp}{'-smoke' if args.smoke else ''}.json"
    record: dict[str, Any] = {"meta": {"device": dev, "gpu": gpu, "torch": torch.__version__,
                                       "cuda": torch.version.cuda, "python": platform.python_version(),
                                       "cpus": os.cpu_count(), "smoke": args.smoke, "time": stamp},
                              "results": {}, "failed": {}}
    workers = 0 if args.smoke else min(8, os.cpu_count() or 1)
    steps = {
        "extract_resnet50_trunc": lambda tmp: extraction(
            "demo_cnn" if args.smoke else "resnet50_trunc", dev, 8 if args.smoke else 256, 2 if args.smoke else 40, workers,
            px=64 if args.smoke else 224),
        "extract_uni_vit_l16": lambda tmp: extraction(
            "vit_tiny_patch16_224" if args.smoke else "uni", dev, 4 if args.smoke else 256, 2 if args.smoke else 20, workers),
        "amp_epoch": lambda tmp: amp_epoch(dev, tmp, 24 if args.smoke else 200, 16 if args.smoke else 2000),
        "magnet_step": lambda tmp: magnet_step(dev, tmp, args.smoke),
        "hag_mil_40k": lambda tmp: hag_mil(dev, 500 if args.smoke else 40_000, 300 if args.smoke else 7000,
                                           [64, 96, 32, 64] if args.smoke else [1024, 1536, 512, 1024]),
    }
    only = {s.strip() for s in args.only.split(",")}
    failed = 0
    for name, step in steps.items():
        if not any(name.startswith(o) for o in only):
            continue
        log.info("gpu_check: %s", name)
        try:
            with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
                record["results"][name] = step(Path(tmp))
            log.info("  %s", record["results"][name])
        except Exception as e:  # record it, go on with the next step
            failed += 1
            record["failed"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            log.error("  %s FAILED: %s", name, e)
        _save(path, record)
    log.info("gpu_check: wrote %s (%d failed)", path, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
