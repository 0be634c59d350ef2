"""HAG-MIL cascade at real scale on CPU: peak memory and step time per level.

A synthetic slide with P coarsest-level parents (10,000 by default, so 40,000 and 160,000
candidates at the two finer levels) of 1024-d features, the paper's IAT widths
(1024-1536-512-1024) and ``t_patch`` = 7000. One training step of the cascade runs the coarsest
model on all P tiles, then each finer model on the 4 * t_patch children of the top t_patch
parents, each level stepping its own Adam before the next runs. The same is measured with 4x
more parents. Each level's step runs in a fresh subprocess (so freed memory of one level cannot
hide another's); its peak resident memory above the process's baseline (features already in
memory) is sampled every 2 ms from /proc.

What it shows: below the coarsest level, memory and time do not depend on the slide's size,
only on ``t_patch``; the coarsest level grows linearly with the number of parents (a level whose
estimated memory does not fit this machine is skipped and its estimate reported).

Run: ``python bench/bench_hag_mil.py [--quick]`` or ``make bench ARGS="--only hag_mil"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
DIM = 1024


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _level_step(n_tokens: int, n_candidates: int, t_patch: int, dims: list[int], seed: int) -> dict:
    """In this process: a (n_candidates, D) level, the step of its model on n_tokens of them."""
    import torch

    from wsi_lightning.nn.iat import IATModel

    torch.manual_seed(seed)
    feats = torch.randn(1, n_candidates, DIM)  # the level's features, as a loader holds them
    model = IATModel(DIM, tuple(dims))
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-5)
    idx = torch.randperm(n_candidates)[:n_tokens].sort().values
    labels = torch.tensor([1])
    # warm-up on a small bag (allocator, kernels), then measure the real step
    model(feats[:, :64], labels=labels).logits.sum().backward()
    opt.zero_grad(set_to_none=True)
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = model(feats[:, idx], labels=labels)
    loss = 0.5 * torch.nn.functional.cross_entropy(out.logits, labels, label_smoothing=0.1) + 0.5 * out.instance_loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sel = torch.argsort(out.attention_raw[0].detach(), descending=True)[:t_patch]
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    return {"tokens": n_tokens, "candidates": n_candidates, "seconds": round(seconds, 2),
            "peak_mib": round(max(peak[0], _rss()) - base) / 2**20, "selected": len(sel)}


def _run_level(n_tokens: int, n_candidates: int, t_patch: int, dims: list[int]) -> dict:
    code = ("import json,sys; from bench.bench_hag_mil import _level_step; "
            f"print(json.dumps(_level_step({n_tokens}, {n_candidates}, {t_patch}, {dims}, 0)))")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"HAG-MIL level benchmark failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _available_mib() -> float:
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) / 1024


def cascade(parents: int, t_patch: int, dims: list[int], levels: int = 3,
            mib_per_token: float | None = None) -> list[dict]:
    """One training step of the cascade, level by level (coarsest first).

    A level whose estimated peak (``mib_per_token`` x tokens, from an earlier measurement) would
    not fit in 80% of the available memory is skipped and reported with its estimate.
    """
    out, candidates, tokens = [], parents, parents
    for lvl in range(levels):
        need = None if mib_per_token is None else mib_per_token * tokens
        if need is not None and need > 0.8 * _available_mib():
            log.info("  level %d: %d tokens need ~%.0f MiB (> 80%% of the %.0f MiB available): skipped",
                     lvl, tokens, need, _available_mib())
            out.append({"level": lvl, "tokens": tokens, "candidates": candidates, "skipped": True,
                        "estimated_peak_mib": round(need)})
            candidates, tokens = 4 * candidates, 4 * min(t_patch, tokens)
            continue
        r = _run_level(tokens, candidates, t_patch, dims)
        r["level"] = lvl
        out.append(r)
        mib_per_token = max(mib_per_token or 0.0, r["peak_mib"] / tokens)
        log.info("  level %d: %d of %d candidates, %.1f s, peak +%.0f MiB", lvl, tokens, candidates,
                 r["seconds"], r["peak_mib"])
        candidates = 4 * candidates
        tokens = 4 * min(t_patch, tokens)
    return out


def run(out_dir: Path, quick: bool = False) -> dict:
    """Args: out_dir: unused (no cached data); quick: 1/10 of the sizes and small widths.

    Returns: ``{"name", "levels": {parents: [per-level dicts]}, "ratios", "targets", "config"}``.
    """
    parents, t_patch = (1000, 700) if quick else (10_000, 7000)
    dims = [256, 384, 128, 256] if quick else [1024, 1536, 512, 1024]
    results: dict[int, list[dict]] = {}
    per_token = None
    for p in (parents, 4 * parents):
        log.info("HAG-MIL cascade, %d parents (%d / %d candidates below), t_patch %d", p, 4 * p, 16 * p, t_patch)
        results[p] = cascade(p, t_patch, dims, mib_per_token=per_token)
        per_token = max(x["peak_mib"] / x["tokens"] for x in results[p] if "peak_mib" in x)
    small, big = results[parents], results[4 * parents]
    finer = lambda r: max(x.get("peak_mib", 0.0) for x in r[1:])  # noqa: E731
    return {
        "name": "hag_mil_cascade",
        "levels": {str(k): v for k, v in results.items()},
        # > ~0.8 means the finer levels' memory did not grow with 4x more parents
        "ratios": {"finer_levels_peak_1x_over_4x": round(finer(small) / max(finer(big), 1e-9), 3),
                   **({"coarsest_peak_4x_over_1x": round(big[0]["peak_mib"] / max(small[0]["peak_mib"], 1e-9), 3)}
                      if "peak_mib" in big[0] else {})},
        "targets": {"finer_levels_peak_1x_over_4x": 0.8},
        "config": {"parents": parents, "t_patch": t_patch, "dims": dims, "feature_dim": DIM},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(run(Path("."), quick=args.quick), indent=2))
