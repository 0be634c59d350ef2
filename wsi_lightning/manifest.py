"""Slide manifests (CSV) and patient-level stratified splits.

Schema: ``slide_id, case_id`` plus one label column (or several tag columns), and ``path``
(the slide file; optional, or empty in a row, when the feature store already holds the slide,
e.g. features imported from CLAM/TRIDENT: only steps that read pixels need it), with
optional ``mpp`` (overrides the slide's own; an empty cell keeps the slide's own), ``split``
(train / val / test) and ``fold`` (each filled in on every row, or on none). The file is UTF-8.
Paths are relative to the manifest's folder unless absolute; slide ids become file names, so
they must be safe ones (:func:`wsi_lightning.ids.safe_slide_id`). A single label column is
filled in on every row; multi-tag columns may be empty where a tag is unknown (class index -1,
ignored by the loss and the metrics). Row numbers in errors count data rows from 1 (the header
is not a row).

Optional ``roi`` (alias ``tissue_mask``; one of the two, not both): a region of interest that
restricts tiling, as a path relative to the manifest's folder (or absolute); an empty cell tiles
all the tissue. It is a GeoJSON file drawn in QuPath (annotations in level-0 pixels, any export
shape :mod:`wsi_lightning.slides.annotations` reads; ``Exclusion`` polygons are cut out) or a
mask image (``.png``, ``.tif``, ``.tiff``; nonzero = inside) covering the whole slide at any
downsample. Tiles are kept where their tissue inside the region covers ``tiling.min_tissue`` of
them (:mod:`wsi_lightning.slides.regions`). The file's content is part of the tile cache key and
recorded in the feature store (``roi`` attribute), so a changed region is tiled and extracted
again. Here a file with another suffix, or (with ``check_files``) a missing file, is an error
naming the row; an unreadable file or one without a polygon fails when the slide is tiled.
"""

from __future__ import annotations

import codecs
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_lightning.errors import ManifestError
from wsi_lightning.ids import safe_slide_id

REQUIRED = ("slide_id", "case_id")  # ``path`` too, for any step that reads pixels
SPLITS = ("train", "val", "test")
ROI_ALIASES = ("roi", "tissue_mask")  # the region-of-interest column and its other name
ROI_SUFFIXES = (".geojson", ".json", ".png", ".tif", ".tiff")  # slides.regions reads these


@dataclass
class Manifest:
    """A validated manifest.

    Attributes:
        df: one row per slide; ``path`` absolute ("" where the manifest gives none); label columns as strings ("" where a multi-tag
            label is unknown); ``mpp`` float or NaN (NaN: the slide's own); ``roi`` absolute
            ("" where none) when the manifest has a ``roi`` / ``tissue_mask`` column.
        targets: label columns (one for binary / multiclass, several for multi-tag).
        classes: {target: ordered class names}.
        source: the CSV file.
        configured: targets whose classes were given by the caller (``data.classes``) rather
            than derived from the labels found; only derived classes must occur in training.
    """

    df: pd.DataFrame
    targets: list[str]
    classes: dict[str, list[str]]
    source: Path
    configured: frozenset[str] = frozenset()

    def label_index(self, target: str) -> np.ndarray:
        """(S,) int64 class index of every slide for ``target``; -1 where the label is unknown
        (an empty multi-tag cell), which the loss and the metrics ignore."""
        lookup = {c: i for i, c in enumerate(self.classes[target])}
        return np.array([lookup.get(v, -1) for v in self.df[target]], dtype=np.int64)

    def labels_by_slide(self) -> dict[str, dict[str, int]]:
        """{target: {slide_id: class index}} (the label dicts of the bag and slide datasets)."""
        ids = self.df["slide_id"]
        return {t: dict(zip(ids, self.label_index(t).tolist(), strict=True)) for t in self.targets}

    def cases(self) -> dict[str, list[str]]:
        """{case_id: its slide ids, in manifest order}, cases in order of first appearance."""
        out: dict[str, list[str]] = {}
        for sid, cid in zip(self.df["slide_id"], self.df["case_id"], strict=True):
            out.setdefault(str(cid), []).append(str(sid))
        return out

    def labels_by_case(self) -> dict[str, dict[str, int]]:
        """{target: {case_id: class index}}, the labels of patient-level bags
        (``data.bag_level=case``): the label every slide of the case has. Per target, empty
        cells (an unknown multi-tag label) are ignored; a case whose cells are all empty gets
        -1 (unknown) for that target.

        Raises:
            ManifestError: the slides of a case have different labels for a target (naming the
                case, its slides, their rows and labels).
        """
        rows = {sid: i for i, sid in enumerate(self.df["slide_id"], start=1)}
        out: dict[str, dict[str, int]] = {}
        for t in self.targets:
            index = dict(zip(self.df["slide_id"], self.label_index(t).tolist(), strict=True))
            cells = dict(zip(self.df["slide_id"], self.df[t], strict=True))
            out[t] = {}
            for cid, slides in self.cases().items():
                known = sorted({index[s] for s in slides if cells[s]})
                if len(known) > 1:
                    shown = ", ".join(f"'{s}' (row {rows[s]}) {cells[s]!r}" for s in slides)
                    raise ManifestError(
                        f"manifest {self.source}: case '{cid}' has slides with different {t} "
                        f"labels: {shown}; with data.bag_level=case a case is one bag with one "
                        f"label. Give every slide of the case the same {t} (multi-tag: or leave "
                        "the cell empty), or train on slides (data.bag_level=slide)")
                out[t][cid] = known[0] if known else -1
        return out

    @property
    def num_classes(self) -> dict[str, int]:
        return {t: len(c) for t, c in self.classes.items()}


def load_manifest(
    path: str | Path,
    targets: list[str] | str = "label",
    classes: dict[str, list[str]] | list[str] | None = None,
    check_files: bool = True,
    allow_missing: bool | None = None,
    require_labels: bool = True,
) -> Manifest:
    """Read and validate a manifest CSV.

    Every problem found is a ``ManifestError`` naming the file, the row (data rows from 1) and
    the column, and saying the fix: an empty file, a file that is not UTF-8 (with the line of
    the first bad byte), a missing column, an empty ``slide_id`` / ``case_id`` / ``path``, a
    slide id that is not a safe file name (``ids.safe_slide_id``), a duplicate slide id, an
    empty or unknown label, an ``mpp`` that is not a positive number, a ``split`` outside
    train / val / test, a ``split`` or ``fold`` column filled in for some rows only, and a
    derived class (``classes`` not given for its column) that has no ``split=train`` row.

    Args:
        path: the CSV file.
        targets: label column(s).
        classes: expected class names (a list for a single target, or {target: list}); an
            unknown label is an error naming the row. None: the sorted labels found.
        check_files: fail on rows whose slide file does not exist.
        allow_missing: whether an empty label cell is allowed, meaning "unknown" (index -1,
            ignored by the loss and the metrics). None: allowed only with several targets
            (multi-tag: a slide may lack some tags, though not all of them); a single label
            column must be filled in on every row.
        require_labels: False for slides to predict (``wsi predict``): a label column may be
            absent or empty anywhere, and ``classes`` (the trained model's) must be given.

    Returns:
        The validated manifest. An empty ``mpp`` cell means the slide's own mpp (NaN in ``df``).
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} not found; check data.manifest")
    df = _read_csv(path)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not require_labels:
        if not classes:
            raise ValueError("load_manifest(require_labels=False) needs the model's classes")
        for t in targets:
            if t not in df.columns:
                df[t] = ""
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
    configured = frozenset(t for t in targets if t in classes)
    allow_missing = len(targets) > 1 if allow_missing is None else bool(allow_missing)
    for i, row in enumerate(df.itertuples(index=False), start=1):
        for col in REQUIRED:
            v = getattr(row, col)
            if not isinstance(v, str) or not v.strip():
                raise ManifestError(f"manifest {path} row {i}: empty '{col}'; fill it in or drop the row")
        safe_slide_id(row.slide_id, where=f"manifest {path} row {i}", error=ManifestError)
    dup = df["slide_id"][df["slide_id"].duplicated()]
    if len(dup):
        rows = (dup.index + 1).tolist()
        raise ManifestError(f"manifest {path} rows {rows}: duplicate slide_id(s) {sorted(set(dup))}; slide ids must be unique")
    for t in targets:
        df[t] = df[t].map(lambda v: "" if pd.isna(v) else str(v).strip())
    if require_labels:
        _check_empty_labels(df, targets, allow_missing, path)
    for t in targets:
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
    if "path" not in df.columns:
        df["path"] = ""
    df["path"] = [_slide_path(p, path.parent) for p in df["path"]]
    df["mpp"] = _parse_mpp(df, path) if "mpp" in df.columns else np.nan
    _parse_roi(df, path)
    if "split" in df.columns:
        df["split"] = df["split"].map(lambda v: "" if pd.isna(v) else str(v).strip().lower())
        for i, v in enumerate(df["split"], start=1):
            if v and v not in SPLITS:
                raise ManifestError(f"manifest {path} row {i}: split '{v}'; expected one of {list(SPLITS)}")
    for col in ("split", "fold"):
        if col in df.columns:
            _check_filled(df, col, path)
    m = Manifest(df.reset_index(drop=True), targets, classes, path, configured)
    if "split" in df.columns and (df["split"] == "train").any():
        train = set(df.loc[df["split"] == "train", "slide_id"])
        _check_trained_classes(m, train, "its split column")
    if check_files:
        check_slide_files(m)
        check_roi_files(m)
    return m


_SAVE_UTF8 = ("save it as UTF-8 (a spreadsheet's 'CSV UTF-8' format, or "
              "`iconv -f latin1 -t utf-8 in.csv > out.csv`)")
_EMPTY = ("manifest {path} is empty (no slide rows); it needs a header slide_id,case_id,path,"
          "<label column> and one row per slide")


def _read_csv(path: Path) -> pd.DataFrame:
    """The CSV as a DataFrame (``slide_id``, ``case_id``, ``path`` as strings); a file that is
    not UTF-8 is an error naming the line of its first bad byte, an empty one says so."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        bad = raw[e.start:e.end].hex(" ")
        raise ManifestError(
            f"manifest {path} line {line} (byte {col} of the line): byte(s) {bad} are not UTF-8 (the "
            f"file is in another encoding, e.g. Latin-1 or Windows-1252); {_SAVE_UTF8}"
        ) from None
    if not text.strip():
        raise ManifestError(_EMPTY.format(path=path))
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"slide_id": str, "case_id": str, "path": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ManifestError(f"manifest {path}: cannot parse CSV: {e}") from e
    if df.empty:
        raise ManifestError(_EMPTY.format(path=path))
    return df


def _first(rows: list[int], n: int = 5) -> str:
    """'[3, 7, 9]' or '[3, 7, 9, 11, 12, ... (14 in all)]'."""
    head = ", ".join(map(str, rows[:n]))
    return f"[{head}]" if len(rows) <= n else f"[{head}, ... ({len(rows)} in all)]"


def _check_empty_labels(df: pd.DataFrame, targets: list[str], allow_missing: bool, path: Path) -> None:
    """Empty label cells: an error unless ``allow_missing``; a row with every label empty is
    always one (nothing to train or evaluate on)."""
    empty = pd.DataFrame({t: df[t] == "" for t in targets})
    bad = empty.all(axis=1) if allow_missing else empty.any(axis=1)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad.to_numpy())[0])
    cols = [t for t in targets if empty[t].iloc[i]]
    rows = (np.flatnonzero(bad.to_numpy()) + 1).tolist()
    what = f"empty {cols[0]!r}" if len(cols) == 1 else f"every label column empty ({cols})"
    hint = " (a multi-tag slide may leave some tags empty, not all)" if allow_missing else ""
    raise ManifestError(
        f"manifest {path} row {i + 1}: slide '{df['slide_id'].iloc[i]}' has {what}{hint}; "
        f"rows with this problem: {_first(rows)}. Fill in the label(s) or drop the row(s)"
    )


def _parse_mpp(df: pd.DataFrame, path: Path) -> pd.Series:
    """The ``mpp`` column as floats, NaN where empty (the slide's own mpp)."""
    raw = df["mpp"].map(lambda v: v.strip() if isinstance(v, str) else v)
    raw = raw.map(lambda v: np.nan if isinstance(v, str) and not v else v)
    num = pd.to_numeric(raw, errors="coerce").astype(np.float64)
    bad = raw.notna() & ~(np.isfinite(num) & (num > 0))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        v = df["mpp"].iloc[i]
        shown = repr(v) if isinstance(v, str) else f"{float(v):g}"
        raise ManifestError(
            f"manifest {path} row {i + 1}: slide '{df['slide_id'].iloc[i]}' has mpp "
            f"{shown}; expected a positive number of microns per pixel (e.g. 0.25), "
            "or an empty cell to use the slide's own mpp"
        )
    return num


def _parse_roi(df: pd.DataFrame, path: Path) -> None:
    """The ``roi`` column (or its alias ``tissue_mask``, renamed ``roi``) as absolute paths, ""
    where empty; a suffix :mod:`wsi_lightning.slides.regions` cannot read is an error naming the row."""
    given = [c for c in ROI_ALIASES if c in df.columns]
    if len(given) > 1:
        raise ManifestError(f"manifest {path}: both 'roi' and 'tissue_mask' columns; they are the same "
                            "column (the region that restricts tiling): keep one")
    if not given:
        return
    df["roi"] = [_slide_path(p, path.parent) for p in df.pop(given[0])]
    for i, (sid, roi) in enumerate(zip(df["slide_id"], df["roi"], strict=True), start=1):
        if roi and Path(roi).suffix.lower() not in ROI_SUFFIXES:
            raise ManifestError(
                f"manifest {path} row {i}: slide '{sid}' has {given[0]} {roi} (suffix "
                f"{Path(roi).suffix or 'none'!r}); expected a QuPath GeoJSON (.geojson, .json) or a mask "
                "image (.png, .tif, .tiff; nonzero = inside) covering the whole slide")


def check_roi_files(m: Manifest) -> None:
    """Fail on the first row whose ``roi`` file is given but does not exist."""
    if "roi" not in m.df.columns:
        return
    for i, (sid, roi) in enumerate(zip(m.df["slide_id"], m.df["roi"], strict=True), start=1):
        if roi and not Path(roi).is_file():
            raise ManifestError(
                f"manifest {m.source} row {i}: slide '{sid}' roi file {roi} does not exist; fix the "
                "'roi' column (relative paths are relative to the manifest's folder) or empty the cell "
                "to tile all the tissue")


def _check_filled(df: pd.DataFrame, col: str, path: Path) -> None:
    """A ``split`` / ``fold`` column is all filled in or all empty: partly filled, the slides
    without one would otherwise be split at random (or put in train) without a word."""
    blank = df[col].map(lambda v: pd.isna(v) or (isinstance(v, str) and not v.strip()))
    if blank.any() and not blank.all():
        rows = (np.flatnonzero(blank.to_numpy()) + 1).tolist()
        raise ManifestError(
            f"manifest {path}: column '{col}' is empty in row(s) {_first(rows)} but filled in "
            "elsewhere; fill it in on every row, or drop the column (the split is then a random "
            "patient-level one, data.split)"
        )


def _check_trained_classes(m: Manifest, train: set[str], how: str) -> None:
    """Every derived class of every target has a slide in ``train``: otherwise the model gets an
    output for a class it never sees in training. Classes given in ``data.classes`` are exempt
    (listing a class there says it is meant)."""
    df = m.df
    in_train = df["slide_id"].isin(train)
    for t in m.targets:
        if t in m.configured:
            continue
        for c in m.classes[t]:
            rows = df[t] == c
            if rows.any() and not (rows & in_train).any():
                ids = sorted(df.loc[rows, "slide_id"])
                splits = sorted(set(df.loc[rows, "split"]) - {""}) if "split" in df.columns else []
                raise ManifestError(
                    f"manifest {m.source}: {t} '{c}' has no training slide under {how} (its "
                    f"slides: {_first(ids)}" + (f", split {splits}" if splits else "") + "); the "
                    "model would get an output for a class it never trains on. Put some of "
                    "these slides in train (split column, data.split.seed or data.split.fold), "
                    "drop them, or list the class in data.classes if an untrained class is meant"
                )


def _slide_path(value: object, base: Path) -> str:
    """A manifest ``path`` cell as an absolute path ("" for an empty cell)."""
    if pd.isna(value) or not str(value).strip():
        return ""
    p = Path(str(value).strip())
    return str(p if p.is_absolute() else base / p)


def check_slide_files(m: Manifest, skip: set[str] | frozenset[str] = frozenset(),
                      step: str = "tiling and extraction") -> None:
    """Fail on the first row whose slide file is not given or does not exist (slides in
    ``skip`` excepted, e.g. those whose features are already in the store); ``step`` names
    what needs the pixels."""
    for i, (sid, p) in enumerate(zip(m.df["slide_id"], m.df["path"], strict=True), start=1):
        if sid in skip:
            continue
        if not p:
            raise ManifestError(
                f"manifest {m.source} row {i}: slide '{sid}' has no path, and {step} reads its "
                "pixels; add a 'path' column (or fill in this row), or import its features first "
                "(wsi import-features ... --store DIR, then data.store=DIR)"
            )
        if not Path(p).exists():
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

    Raises:
        ManifestError: a case in two splits; no ``fold`` column or an absent fold; a class
            derived from the labels (not in ``data.classes``) with no slide in train.
    """
    df = m.df
    if "split" in df.columns and (df["split"] != "").all():
        out = {s: sorted(df.loc[df["split"] == s, "slide_id"]) for s in SPLITS}
        how = "its split column"
        if not out["val"] and val > 0 and out["train"]:  # e.g. official train/test only: carve val out of train
            carved = _stratified_case_split(df[df["split"] == "train"], m.targets[0], val, 0.0, seed)
            out["train"], out["val"] = carved["train"], carved["val"]
            how += f" (data.split.val={val:g} of train carved out as val, data.split.seed={seed})"
    elif fold is not None:
        if "fold" not in df.columns:
            raise ManifestError(f"manifest {m.source}: data.split.fold={fold} but no 'fold' column")
        folds = sorted(df["fold"].unique())
        if fold not in folds:
            raise ManifestError(f"manifest {m.source}: data.split.fold={fold}; folds present: {folds}")
        vfold = folds[(folds.index(fold) + 1) % len(folds)]
        split = np.where(df["fold"] == fold, "test", np.where(df["fold"] == vfold, "val", "train"))
        out = {s: sorted(df.loc[split == s, "slide_id"]) for s in SPLITS}
        how = f"data.split.fold={fold}"
    else:
        out = _stratified_case_split(df, m.targets[0], val, test, seed)
        how = f"the random split (data.split.seed={seed})"
    _check_no_leak(df, out, m.source)
    if out["train"]:  # no train at all: a test-only manifest (``wsi test``)
        _check_trained_classes(m, set(out["train"]), how)
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
