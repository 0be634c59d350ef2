"""Camelyon16 as distributed -> a manifest CSV plus GeoJSON lesion annotations.

Layout read (the CAMELYON16 folder shared via GigaScience / AWS Open Data / Google Drive, see
https://camelyon17.grand-challenge.org/Data/)::

    training/normal/normal_001.tif ...
    training/tumor/tumor_001.tif ...
    training/lesion_annotations/tumor_001.xml     or training/lesion_annotations.zip
    testing/images/test_001.tif ...
    testing/lesion_annotations/test_001.xml       or testing/lesion_annotations.zip
    testing/reference.csv                         test labels, no header:
                                                  ``test_001,Tumor,Macro,...`` / ``test_NNN,Normal``

Tolerated variants: file and folder names in any letter case (ids are lower-cased), ``.tif`` or
``.tiff``, test slides directly in ``testing/``, the lesion annotations as an extracted folder or
as the zip (read in place, members at any depth), the reference CSV in a sub-folder of
``testing/`` (``testing/evaluation/``...), with or without a header row, ``,`` ``;`` or tab
separated, ``Tumour`` for ``Tumor``, ids with a ``.tif`` suffix; columns after the label are
ignored. A reference row whose image is absent is a warning (partial downloads); a test image
without a reference row is an error.

Lesion annotations are ASAP XML: ``ASAP_Annotations/Annotations/Annotation`` (``Name``, ``Type``,
``PartOfGroup``) holding ``Coordinates/Coordinate`` with ``Order``, ``X``, ``Y`` in level-0 pixels.
Groups ``_0``, ``_1`` and ``Tumor`` are metastases, ``_2`` and ``Exclusion`` are non-tumour regions
drawn inside a metastasis. Each XML becomes ``<annotations_out>/<slide_id>.geojson``, a QuPath-style
FeatureCollection (the convention of :mod:`wsi_lightning.demo.dataset`): one ``Polygon`` feature per
tumour region, classification ``Tumor``, vertices sorted by ``Order``, rings closed. An exclusion
region all of whose vertices lie inside a tumour polygon becomes a hole of the smallest such
polygon (vertex containment, ``matplotlib.path.Path``; edges are not intersected); one that lies in
no tumour polygon is kept as its own feature, classification ``Exclusion``, so consumers reading
``Tumor`` features only ignore it. Spline annotations keep their control points as vertices;
annotations with fewer than 3 vertices (dots) are skipped with a warning.

Known quirks. The dataset's own README (``camelyon16_readme.md``, linked from the Data page above)
says: "The following files have been intentionally removed from the original data set:
normal_86: Originally misclassified, renamed to tumor_111. test_049: Duplicate slide. Test set
notes: test_114: Does not have exhaustive annotations." The DIDSR/dldp README (section 0.4) adds
that test_049 was removed by the organisers from the slide- and lesion-based tasks and test_114
from the lesion-based task. Neither names the training slide test_049 duplicates, so it cannot be
tied to a case. Handling:

- ``test_049`` (older copies still hold it): dropped with a warning; ``keep_duplicates=True`` keeps
  it with ``duplicate=true``. Listed in the reference CSV without an image: ignored.
- ``normal_086`` (the README's normal_86; older copies): tumor_111 under its old, wrong label. Dropped with a
  warning; ``keep_duplicates=True`` keeps it with label ``tumor``, ``case_id`` ``tumor_111`` (one
  patient, so never split apart) and ``duplicate=true``.
- ``test_114``: kept with its slide label; ``exclude_localisation=true`` so lesion-level metrics
  skip it. Tumour slides without an annotation file get the same flag.

Manifest columns: ``slide_id, case_id, path, label (normal|tumor), split (train|test),
annotation, exclude_localisation, duplicate``. One slide per patient, so ``case_id = slide_id``.
``path`` and ``annotation`` are relative to the manifest's folder when the file lies inside it,
absolute otherwise (what :func:`~wsi_lightning.manifest.load_manifest` resolves). Slides are
never opened.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.path import Path as MplPath

from wsi_lightning.errors import ManifestError

log = logging.getLogger(__name__)

TUMOR_GROUPS = ("_0", "_1", "tumor")
EXCLUSION_GROUPS = ("_2", "exclusion")
NOT_EXHAUSTIVE = frozenset({"test_114"})
DUPLICATES = {"test_049": None, "normal_086": "tumor_111"}  # slide -> the slide it duplicates
SLIDE_SUFFIXES = (".tif", ".tiff")
COLUMNS = ("slide_id", "case_id", "path", "label", "split", "annotation",
           "exclude_localisation", "duplicate")
_TEST_ID = re.compile(r"^test_\d+$")


@dataclass(frozen=True)
class XmlRef:
    """An annotation XML, as a file or as a member of a zip archive."""

    source: Path
    member: str | None = None

    def read_bytes(self) -> bytes:
        if self.member is None:
            return self.source.read_bytes()
        with zipfile.ZipFile(self.source) as zf:
            return zf.read(self.member)

    def __str__(self) -> str:
        return str(self.source) if self.member is None else f"{self.source}!{self.member}"


@dataclass
class _Slide:
    slide_id: str
    path: Path
    label: str
    split: str
    case_id: str
    xml: XmlRef | None = None
    geojson: Path | None = None
    duplicate: bool = False

    @property
    def exclude_localisation(self) -> bool:
        return self.slide_id in NOT_EXHAUSTIVE or (self.label == "tumor" and self.geojson is None)


def build_camelyon16_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike | None = None,
    annotations_out: str | os.PathLike | None = None,
    keep_duplicates: bool = False,
    convert_annotations: bool = True,
) -> Path:
    """Write the Camelyon16 manifest and convert its lesion annotations (see module docstring).

    Args:
        root: the CAMELYON16 folder (holding ``training/`` and ``testing/``).
        out: manifest CSV; default ``<root>/camelyon16_manifest.csv``.
        annotations_out: folder for ``<slide_id>.geojson``; default ``<root>/annotations``.
        keep_duplicates: keep ``test_049`` / ``normal_086`` (flagged ``duplicate=true``).
        convert_annotations: False: do not look for the XMLs; ``annotation`` stays empty.

    Returns:
        Path of the manifest.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise ManifestError(f"Camelyon16 root {root} is not a folder; pass the CAMELYON16 folder "
                            "holding training/ and testing/")
    out = Path(out).absolute() if out is not None else root / "camelyon16_manifest.csv"
    ann_dir = Path(annotations_out).absolute() if annotations_out is not None else root / "annotations"
    slides = _training_slides(root) + _test_slides(root, keep_duplicates)
    slides = _apply_duplicates(slides, keep_duplicates)
    if convert_annotations:
        _attach_annotations(root, slides)
    stats = _convert_annotations(slides, ann_dir) if convert_annotations else Counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, _manifest_csv(slides, out.parent))
    _log_summary(slides, stats, out)
    return out


# ---------------------------------------------------------------- layout


def _child(parent: Path, name: str, what: str, required: bool = True) -> Path | None:
    """``parent/name`` matched case-insensitively; ManifestError (or None) when absent."""
    if parent.is_dir():
        exact = parent / name
        if exact.exists():
            return exact
        for p in sorted(parent.iterdir()):
            if p.name.casefold() == name.casefold():
                return p
    if required:
        raise ManifestError(f"Camelyon16: {parent / name} not found; expected {what}")
    return None


def _list_slides(folder: Path, prefix: str) -> dict[str, Path]:
    found = {p.stem.lower(): p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".")}
    if not found:
        raise ManifestError(f"Camelyon16: no slides ({prefix}_NNN.tif) in {folder}; is the "
                            "download complete?")
    return found


def _training_slides(root: Path) -> list[_Slide]:
    training = _child(root, "training", "the training folder (training/normal, training/tumor)")
    slides = []
    for label in ("normal", "tumor"):
        folder = _child(training, label, f"the {label} training slides ({label}_001.tif ...)")
        slides += [_Slide(sid, p, label, "train", sid) for sid, p in _list_slides(folder, label).items()]
    return slides


def _test_slides(root: Path, keep_duplicates: bool) -> list[_Slide]:
    testing = _child(root, "testing", "the test folder (testing/images, testing/reference.csv)")
    images = _child(testing, "images", "", required=False)
    if images is None and any(p.suffix.lower() in SLIDE_SUFFIXES for p in testing.iterdir()):
        images = testing  # some copies hold the test slides directly in testing/
    elif images is None:
        raise ManifestError(f"Camelyon16: {testing / 'images'} not found; expected the test slides "
                            "(test_001.tif ...)")
    found = _list_slides(images, "test")
    ref_path = find_reference_csv(testing)
    labels = read_reference_csv(ref_path)
    dropped = set() if keep_duplicates else set(DUPLICATES)
    absent = sorted(set(found) - set(labels) - dropped)
    if absent:
        raise ManifestError(f"Camelyon16 reference {ref_path}: no label for test slide(s) {absent} "
                            f"(images in {images}); the reference CSV is incomplete or from "
                            "another release")
    no_image = set(labels) - set(found)
    if no_image & set(DUPLICATES):
        log.info("Camelyon16: %s listed in %s has no image (removed from the current release as a "
                 "duplicate); ignored", sorted(no_image & set(DUPLICATES)), ref_path)
    missing = sorted(no_image - set(DUPLICATES))
    if missing:
        log.warning("Camelyon16: %d test slide(s) listed in %s have no image in %s and are left "
                    "out: %s", len(missing), ref_path, images, missing)
    return [_Slide(sid, p, labels.get(sid, ""), "test", sid) for sid, p in found.items()]


def find_reference_csv(testing: Path) -> Path:
    """The test-label CSV: ``testing/reference.csv``, else a ``reference.csv`` (any case) one
    folder below ``testing/``."""
    direct = _child(testing, "reference.csv", "", required=False)
    if direct is not None and direct.is_file():
        return direct
    nested = sorted(p for p in testing.glob("*/*") if p.name.casefold() == "reference.csv")
    if not nested:
        raise ManifestError(f"Camelyon16: test labels {testing / 'reference.csv'} not found (nor a "
                            f"reference.csv in a sub-folder of {testing}); expected the reference "
                            "CSV shipped with the test set (rows like 'test_001,Tumor,...')")
    return nested[0]


def read_reference_csv(path: Path) -> dict[str, str]:
    """{test slide id: 'normal' | 'tumor'} from the reference CSV (see module docstring)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = max(",;\t", key=first.count)  # ',' unless the first line uses ';' or tabs
    labels: dict[str, str] = {}
    for i, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        sid = re.sub(r"\.tiff?$", "", cells[0].lower())
        if not _TEST_ID.match(sid):
            if i == 1:
                continue  # header row
            raise ManifestError(f"Camelyon16 reference {path} row {i}: '{cells[0]}' is not a test "
                                "slide id (test_NNN)")
        label = {"tumor": "tumor", "tumour": "tumor", "normal": "normal"}.get(
            cells[1].lower() if len(cells) > 1 else "")
        if label is None:
            raise ManifestError(f"Camelyon16 reference {path} row {i}: slide '{sid}' has label "
                                f"{cells[1:2] or 'none'}; expected 'Tumor' or 'Normal'")
        if labels.setdefault(sid, label) != label:
            raise ManifestError(f"Camelyon16 reference {path} row {i}: slide '{sid}' is listed "
                                "twice with different labels")
    if not labels:
        raise ManifestError(f"Camelyon16 reference {path}: no rows; expected 'test_001,Tumor,...'")
    return labels


def _apply_duplicates(slides: list[_Slide], keep: bool) -> list[_Slide]:
    kept = []
    for s in slides:
        if s.slide_id not in DUPLICATES:
            kept.append(s)
            continue
        original = DUPLICATES[s.slide_id]
        what = f"a duplicate of {original}" if original else "a duplicate of a training slide"
        if not keep:
            log.warning("Camelyon16: %s is %s (dataset README); dropped from the manifest "
                        "(keep_duplicates=True keeps it, flagged)", s.slide_id, what)
            continue
        log.warning("Camelyon16: %s is %s (dataset README); kept with duplicate=true",
                    s.slide_id, what)
        s.duplicate = True
        if original:  # normal_086 is tumor_111 under its old label: one patient, label tumour
            s.label, s.case_id = "tumor", original
        kept.append(s)
    return kept


# ---------------------------------------------------------------- annotations


def _annotation_index(split_dir: Path) -> dict[str, XmlRef]:
    """{slide id: XML} from ``<split>/lesion_annotations/`` or ``<split>/lesion_annotations.zip``."""
    folder = _child(split_dir, "lesion_annotations", "", required=False)
    if folder is not None and folder.is_dir():
        found = {p.stem.lower(): XmlRef(p) for p in sorted(folder.rglob("*"))
                 if p.suffix.lower() == ".xml" and not p.name.startswith(".")}
        if found:
            return found
    archive = _child(split_dir, "lesion_annotations.zip", "", required=False)
    if archive is None:
        raise ManifestError(
            f"Camelyon16: lesion annotations {split_dir / 'lesion_annotations'} (folder) or "
            f"{split_dir / 'lesion_annotations.zip'} not found; download them, or build with "
            "convert_annotations=False to leave the annotation column empty")
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as e:
        raise ManifestError(f"Camelyon16: {archive} is not a readable zip ({e}); re-download it") from e
    return {Path(n).stem.lower(): XmlRef(archive, n) for n in sorted(names)
            if n.lower().endswith(".xml") and not Path(n).name.startswith((".", "__"))
            and "__macosx" not in n.lower()}


def _attach_annotations(root: Path, slides: list[_Slide]) -> None:
    index = {**_annotation_index(_child(root, "training", "")),
             **_annotation_index(_child(root, "testing", ""))}
    for s in slides:
        s.xml = index.get(s.slide_id)
    lacking = sorted(s.slide_id for s in slides if s.label == "tumor" and s.xml is None)
    if lacking:
        log.warning("Camelyon16: %d tumour slide(s) have no lesion annotation (flagged "
                    "exclude_localisation): %s", len(lacking), lacking)


def parse_asap_xml(data: bytes, name: str) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Tumour and exclusion polygons of an ASAP annotation file.

    Args:
        data: the XML bytes.
        name: the file, for error messages.

    Returns:
        (tumour rings, exclusion rings, number of skipped annotations with < 3 vertices); each
        ring a (V, 2) float64 array of level-0 (x, y), in ``Order``, not closed.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ManifestError(f"annotation {name}: malformed XML ({e}); re-extract or re-download "
                            "the lesion annotations") from e
    if root.tag != "ASAP_Annotations":
        raise ManifestError(f"annotation {name}: root element <{root.tag}>, expected "
                            "<ASAP_Annotations> (an ASAP lesion annotation)")
    tumours, exclusions, skipped = [], [], 0
    for k, ann in enumerate(root.iter("Annotation")):
        label = ann.get("Name") or f"#{k}"
        group = (ann.get("PartOfGroup") or "").strip()
        if group.casefold() not in TUMOR_GROUPS + EXCLUSION_GROUPS:
            raise ManifestError(f"annotation {name}: annotation '{label}' has PartOfGroup "
                                f"'{group}'; expected one of {list(TUMOR_GROUPS)} (tumour) or "
                                f"{list(EXCLUSION_GROUPS)} (exclusion)")
        ring = _coordinates(ann, name, label)
        if len(np.unique(ring, axis=0)) < 3:
            skipped += 1
            continue
        (tumours if group.casefold() in TUMOR_GROUPS else exclusions).append(ring)
    return tumours, exclusions, skipped


def _coordinates(ann: ET.Element, name: str, label: str) -> np.ndarray:
    """(V, 2) vertices of one annotation sorted by ``Order`` (document order where absent)."""
    rows = []
    for j, c in enumerate(ann.iter("Coordinate")):
        try:
            x, y = (float(c.get(a, "").replace(",", ".")) for a in ("X", "Y"))
            order = float(c.get("Order", j))
        except ValueError as e:
            raise ManifestError(f"annotation {name}: annotation '{label}' coordinate {j} has "
                                f"X={c.get('X')!r} Y={c.get('Y')!r} Order={c.get('Order')!r}; "
                                "expected numbers") from e
        rows.append((order, j, x, y))
    rows.sort()
    return np.array([(x, y) for _, _, x, y in rows], dtype=np.float64).reshape(-1, 2)


def _ring(vertices: np.ndarray) -> list[list[float]]:
    ring = vertices.tolist()
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def _area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def to_geojson(tumours: list[np.ndarray], exclusions: list[np.ndarray]) -> tuple[dict, int, int]:
    """QuPath-style FeatureCollection; exclusions inside a tumour polygon become its holes.

    Returns:
        (FeatureCollection, number of holes, number of stand-alone exclusion features).
    """
    holes: list[list[np.ndarray]] = [[] for _ in tumours]
    loose = []
    paths = [MplPath(t) for t in tumours]
    areas = [_area(t) for t in tumours]
    for ex in exclusions:
        inside = [i for i, p in enumerate(paths) if p.contains_points(ex).all()]
        if inside:
            holes[min(inside, key=lambda i: areas[i])].append(ex)
        else:
            loose.append(ex)
    features = [_feature([_ring(t)] + [_ring(h) for h in hs], "Tumor", [200, 0, 0])
                for t, hs in zip(tumours, holes, strict=True)]
    features += [_feature([_ring(ex)], "Exclusion", [0, 160, 0]) for ex in loose]
    return {"type": "FeatureCollection", "features": features}, sum(map(len, holes)), len(loose)


def _feature(rings: list, name: str, color: list[int]) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": {"objectType": "annotation", "classification": {"name": name, "color": color}},
    }


def _convert_annotations(slides: list[_Slide], ann_dir: Path) -> Counter:
    stats: Counter = Counter()
    todo = [s for s in slides if s.xml is not None]
    if todo:
        ann_dir.mkdir(parents=True, exist_ok=True)
    for s in todo:
        tumours, exclusions, skipped = parse_asap_xml(s.xml.read_bytes(), str(s.xml))
        geo, n_holes, n_loose = to_geojson(tumours, exclusions)
        s.geojson = ann_dir / f"{s.slide_id}.geojson"
        _write_atomic(s.geojson, json.dumps(geo))
        stats.update(files=1, tumour_polygons=len(tumours), holes=n_holes,
                     exclusion_features=n_loose, skipped=skipped)
        if skipped:
            log.warning("annotation %s: %d annotation(s) with fewer than 3 vertices skipped",
                        s.xml, skipped)
    return stats


# ---------------------------------------------------------------- output


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it, else absolute (POSIX separators if relative)."""
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def _manifest_csv(slides: list[_Slide], base: Path) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    order = {"train": 0, "test": 1}
    for s in sorted(slides, key=lambda s: (order[s.split], s.slide_id)):
        geo = _relative(s.geojson, base) if s.geojson is not None else ""
        writer.writerow([s.slide_id, s.case_id, _relative(s.path, base), s.label, s.split, geo,
                         str(s.exclude_localisation).lower(), str(s.duplicate).lower()])
    return buf.getvalue()


def _log_summary(slides: list[_Slide], stats: Counter, out: Path) -> None:
    counts = Counter((s.split, s.label) for s in slides)
    table = ", ".join(f"{sp}/{lb}={n}" for (sp, lb), n in sorted(counts.items()))
    log.info("Camelyon16 manifest %s: %d slides (%s)", out, len(slides), table)
    log.info("Camelyon16 annotations: %d XML converted (%d tumour polygons, %d exclusion holes, "
             "%d stand-alone exclusions, %d skipped); %d slide(s) flagged exclude_localisation",
             stats["files"], stats["tumour_polygons"], stats["holes"], stats["exclusion_features"],
             stats["skipped"], sum(s.exclude_localisation for s in slides))
