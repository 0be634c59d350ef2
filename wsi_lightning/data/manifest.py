"""Slide manifests (CSV) and patient-level stratified splits.

Schema: ``slide_id, case_id, path`` plus one label column (or several tag columns), with
optional ``mpp`` (overrides the slide's own), ``split`` (train / val / test) and ``fold``.
Paths are relative to the manifest's folder unless absolute. Row numbers in errors count data
rows from 1 (the header is not a row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_lightning.errors import ManifestError

REQUIRED = ("slide_id", "case_id", "path")
SPLITS = ("train", "val", "test")


@dataclass
class Manifest:
    """A validated manifest.

    Attributes:
        df: one row per slide; ``path`` absolute; label columns as strings; ``mpp`` float or NaN.
        targets: label columns (one for binary / multiclass, several for multi-tag).
        classes: {target: ordered class names}.
        source: the CSV file.
    """

    df: pd.DataFrame
    targets: list[str]
    classes: dict[str, list[str]]
    source: Path

    def label_index(self, target: str) -> np.ndarray:
        """(S,) int64 class index of every slide for ``target``."""
        lookup = {c: i for i, c in enumerate(self.classes[target])}
        return self.df[target].map(lookup).to_numpy(dtype=np.int64)

    def labels_by_slide(self) -> dict[str, dict[str, int]]:
        """{target: {slide_id: class index}} (the label dicts of the bag and slide datasets)."""
        ids = self.df["slide_id"]
        return {t: dict(zip(ids, self.label_index(t).tolist(), strict=True)) for t in self.targets}

    @property
    def num_classes(self) -> dict[str, int]:
        return {t: len(c) for t, c in self.classes.items()}


def load_manifest(
    path: str | Path,
    targets: list[str] | str = "label",
    classes: dict[str, list[str]] | list[str] | None = None,
    check_files: bool = True,
) -> Manifest:
    """Read and validate a manifest CSV.

    Args:
        path: the CSV file.
        targets: label column(s).
        classes: expected class names (a list for a single target, or {target: list}); an
            unknown label is an error naming the row. None: the sorted labels found.
        check_files: fail on rows whose slide file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} not found; check data.manifest")
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "case_id": str, "path": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise ManifestError(f"manifest {path}: cannot parse CSV: {e}") from e
    targets = [targets] if isinstance(targets, str) else list(targets)
    missing = [c for c in (*REQUIRED, *targets) if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {path}: missing column(s) {missing}; found {list(df.columns)}. "
            f"Required: {list(REQUIRED)} plus the label column(s) {targets} "
            "(set data.label_col / data.tag_cols to your column names)"
        )
    if isinstance(classes, list) or (classes is not None and not isinstance(classes, dict)):
        classes = {targets[0]: list(classes)}
    classes = dict(classes or {})
    for i, row in enumerate(df.itertuples(index=False), start=1):
        for col in REQUIRED:
            v = getattr(row, col)
            if not isinstance(v, str) or not v.strip():
                raise ManifestError(f"manifest {path} row {i}: empty '{col}'; fill it in or drop the row")
    dup = df["slide_id"][df["slide_id"].duplicated()]
    if len(dup):
        rows = (dup.index + 1).tolist()
        raise ManifestError(f"manifest {path} rows {rows}: duplicate slide_id(s) {sorted(set(dup))}; slide ids must be unique")
    for t in targets:
        df[t] = df[t].map(lambda v: "" if pd.isna(v) else str(v).strip())
        found = sorted(v for v in df[t].unique() if v)
        known = [str(c) for c in classes.get(t, found)]
        classes[t] = known
        for i, v in enumerate(df[t], start=1):
            if v and v not in known:
                raise ManifestError(
                    f"manifest {path} row {i}: slide '{df['slide_id'].iloc[i - 1]}' has {t} "
                    f"'{v}'; expected one of {known}"
                )
        if len(known) < 2:
            raise ManifestError(f"manifest {path}: column '{t}' has fewer than 2 classes ({known})")
    df["path"] = [str(p if Path(p).is_absolute() else (path.parent / p)) for p in df["path"]]
    df["mpp"] = pd.to_numeric(df["mpp"], errors="coerce") if "mpp" in df.columns else np.nan
    if "split" in df.columns:
        df["split"] = df["split"].map(lambda v: "" if pd.isna(v) else str(v).strip().lower())
        for i, v in enumerate(df["split"], start=1):
            if v and v not in SPLITS:
                raise ManifestError(f"manifest {path} row {i}: split '{v}'; expected one of {list(SPLITS)}")
    m = Manifest(df.reset_index(drop=True), targets, classes, path)
    if check_files:
        check_slide_files(m)
    return m


def check_slide_files(m: Manifest, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Fail on the first row whose slide file does not exist (slides in ``skip`` excepted,
    e.g. those whose features are already in the store)."""
    for i, (sid, p) in enumerate(zip(m.df["slide_id"], m.df["path"], strict=True), start=1):
        if sid not in skip and not Path(p).exists():
            raise ManifestError(
                f"manifest {m.source} row {i}: slide '{sid}' file {p} does not exist; fix the "
                "path (relative paths are relative to the manifest's folder)"
            )


def patient_split(
    m: Manifest, val: float = 0.15, test: float = 0.3, seed: int = 0, fold: int | None = None
) -> dict[str, list[str]]:
    """Split slides into train / val / test with no case in two splits.

    Priority: a ``split`` column (if it has no ``val`` rows, a ``val`` fraction of the train
    cases is carved out, stratified); else, with ``fold`` given and a ``fold`` column, that fold is
    test and the next fold (cyclically) is val; else a case-level split stratified by the
    case's label (its most common first-target label).

    Returns:
        {split: sorted slide ids}.
    """
    df = m.df
    if "split" in df.columns and (df["split"] != "").all():
        out = {s: sorted(df.loc[df["split"] == s, "slide_id"]) for s in SPLITS}
        if not out["val"] and val > 0:  # e.g. official train/test only: carve val out of train
            carved = _stratified_case_split(df[df["split"] == "train"], m.targets[0], val, 0.0, seed)
            out["train"], out["val"] = carved["train"], carved["val"]
    elif fold is not None:
        if "fold" not in df.columns:
            raise ManifestError(f"manifest {m.source}: data.split.fold={fold} but no 'fold' column")
        folds = sorted(df["fold"].unique())
        if fold not in folds:
            raise ManifestError(f"manifest {m.source}: data.split.fold={fold}; folds present: {folds}")
        vfold = folds[(folds.index(fold) + 1) % len(folds)]
        split = np.where(df["fold"] == fold, "test", np.where(df["fold"] == vfold, "val", "train"))
        out = {s: sorted(df.loc[split == s, "slide_id"]) for s in SPLITS}
    else:
        out = _stratified_case_split(df, m.targets[0], val, test, seed)
    _check_no_leak(df, out, m.source)
    return out


def _stratified_case_split(df: pd.DataFrame, target: str, val: float, test: float, seed: int) -> dict[str, list[str]]:
    cases = df.groupby("case_id")[target].agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for label in sorted(cases.unique()):
        ids = np.array(sorted(cases.index[cases == label]))
        rng.shuffle(ids)
        n = len(ids)
        n_test = int(round(n * test))
        n_val = int(round(n * val))
        if n >= 3 and val > 0:
            n_val = max(1, n_val)
        if n >= 3 and test > 0:
            n_test = max(1, n_test)
        for j, cid in enumerate(ids):
            assign[cid] = "test" if j < n_test else ("val" if j < n_test + n_val else "train")
    split = df["case_id"].map(assign)
    return {s: sorted(df.loc[split == s, "slide_id"]) for s in SPLITS}


def _check_no_leak(df: pd.DataFrame, out: dict[str, list[str]], source: Path) -> None:
    case_of = dict(zip(df["slide_id"], df["case_id"], strict=True))
    seen: dict[str, str] = {}
    for s, ids in out.items():
        for sid in ids:
            c = case_of[sid]
            if seen.setdefault(c, s) != s:
                raise ManifestError(
                    f"manifest {source}: case '{c}' has slides in both '{seen[c]}' and '{s}' "
                    "splits; give all slides of a case the same split"
                )
