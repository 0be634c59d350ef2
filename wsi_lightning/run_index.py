"""``wsi runs [DIR]``: one row per run folder under DIR, as a table and a CSV.

A run folder is any folder holding ``config.resolved.yaml`` or ``failed.json`` (fits, table
rows, sweep trials, ``wsi test`` and ``wsi predict`` outputs). Its status:

    complete      ``metrics.json`` exists (the fit, test or prediction finished)
    failed        ``failed.json`` exists: the fit raised (its error is in the ``error`` column)
    interrupted   neither: stopped (killed, Ctrl-C, time limit) after ``last.ckpt`` or before
                  its first epoch ended; ``wsi fit EXP --resume RUN_DIR`` continues it
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from wsi_lightning.errors import WSIError
from wsi_lightning.run import FAILED

METRICS = ("test/auroc", "test/acc", "test/f1_macro", "test/loc_auc")
COLUMNS = ["experiment", "kind", "dataset", "seed", "status", *METRICS, "epochs", "error", "run_dir"]


def _kind(folder: Path) -> str:
    if (folder / "predictions.csv").is_file():
        return "predict"
    if folder.name.startswith("test-") and (folder.parent / "config.resolved.yaml").is_file():
        return "test"
    return "fit"


def _dataset(cfg: Any) -> str:
    data = cfg.get("data", {})
    if data.get("is_demo"):
        return f"demo/{(data.get('demo') or {}).get('task', 'lesion')}"
    return Path(str(data.get("manifest") or "?")).stem


def _row(folder: Path, root: Path) -> dict[str, Any]:
    cfg_path = folder / "config.resolved.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path)) if cfg_path.is_file() else {}
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(experiment=cfg.get("name", folder.parent.name), kind=_kind(folder), dataset=_dataset(cfg) if cfg else "",
               seed=cfg.get("seed"), run_dir=str(folder.relative_to(root)) if folder != root else ".")
    metrics_path, failed_path = folder / "metrics.json", folder / FAILED
    if metrics_path.is_file():
        row["status"] = "complete"
        metrics = json.loads(metrics_path.read_text()).get("metrics", {})
        row.update({k: metrics.get(k) for k in METRICS})
    elif failed_path.is_file():
        failed = json.loads(failed_path.read_text())
        row["status"], row["error"] = "failed", f"{failed.get('error')}: {failed.get('message', '')}"[:200]
    else:
        row["status"] = "interrupted"
    log_csv = folder / "logs" / "metrics.csv"
    if log_csv.is_file():
        try:  # epochs with a validation loss (the test's row carries the next epoch's number)
            logs = pd.read_csv(log_csv)
            row["epochs"] = int(logs.loc[logs["val/loss"].notna(), "epoch"].nunique()) if "val/loss" in logs else 0
        except (ValueError, KeyError, pd.errors.EmptyDataError):  # nothing logged yet
            row["epochs"] = 0
    return row


def index_runs(root: str | Path) -> pd.DataFrame:
    """Every run folder under ``root`` (see the module docstring), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise WSIError(f"wsi runs: {root} is not a folder; pass the runs folder (paths.runs, default runs/)")
    found = {p.parent for name in ("config.resolved.yaml", FAILED) for p in root.rglob(name)}
    found = {f for f in found if "wandb" not in f.parts}
    return pd.DataFrame([_row(f, root) for f in sorted(found)], columns=COLUMNS)


def print_runs(df: pd.DataFrame, title: str) -> None:
    """The index as a rich table (metrics to 3 decimals, empty columns dropped)."""
    from rich.console import Console
    from rich.table import Table

    shown = [c for c in COLUMNS if c in ("experiment", "status", "run_dir") or df[c].notna().any()]
    table = Table(title=title)
    for c in shown:
        table.add_column(c.removeprefix("test/"), justify="right" if c in METRICS or c in ("seed", "epochs") else "left",
                         overflow="fold")
    colour = {"complete": "green", "failed": "red", "interrupted": "yellow"}
    for _, r in df.iterrows():
        cells = []
        for c in shown:
            v = r[c]
            if v is None or (isinstance(v, float) and pd.isna(v)):
                cells.append("")
            elif c in METRICS:
                cells.append(f"{float(v):.3f}")
            elif c == "status":
                cells.append(f"[{colour[v]}]{v}[/]")
            else:
                cells.append(str(int(v)) if c in ("seed", "epochs") else str(v))
        table.add_row(*cells)
    import shutil

    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)
