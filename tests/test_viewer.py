"""``wsi view``: the Deep Zoom geometry, pyramids against the slide, the viewer folder (layout,
slides.js, resume, atomic writes, errors) and, in headless Chromium, the page itself: tiles drawn
and matching the slide, the heat-map toggled and faded, a map switched, lesion outlines in place,
a top-k marker clicked, no console errors and no request leaving the folder.

The browser tests need Debian's ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the
``playwright`` package (``.[dev]``; its browsers are never downloaded: Chromium is launched from
that path), and OpenSeadragon from ``make install``. Without them they skip, saying which is
missing, unless ``WSI_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.callbacks.test_attention_logger import FEATS, TILING, demo_overrides
from tests.conftest import REPO
from wsi_lightning import cli, config, run
from wsi_lightning.errors import WSIError
from wsi_lightning.outputs import load_outputs
from wsi_lightning.slides import SlideReader
from wsi_lightning.slides.annotations import lesion_outlines
from wsi_lightning.viewer import assets, build_viewer, deepzoom, site

CHROMIUM = Path(os.environ.get("WSI_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JET1, JET0 = np.array([128, 0, 0]), np.array([0, 0, 128])  # jet at 1 (top tile) and 0


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch ABMIL fit with the attention logger on 7 tiny demo slides (2 test slides)."""
    from wsi_lightning.demo.dataset import make_demo_dataset
    from wsi_lightning.features.extract import extract_features
    from wsi_lightning.features.store import FeatureStore
    from wsi_lightning.manifest import load_manifest

    root = tmp_path_factory.mktemp("view_demo")
    manifest = make_demo_dataset(root / "demo", n_slides=7, seed=3, workers=1, size_um=768.0)
    extract_features(load_manifest(manifest), FeatureStore(root / "store"), TILING, FEATS)
    over = demo_overrides(manifest, root / "store", root / "runs", "[{name: attention_logger, top_k: 2, bottom_k: 0}]")
    return run.fit(config.load("abmil", over)).run_dir


@pytest.fixture
def fake_osd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in OpenSeadragon package folder, so the build tests need no npm."""
    pkg = tmp_path / "osd_pkg"
    (pkg / "build" / "openseadragon" / "images").mkdir(parents=True)
    (pkg / "build" / "openseadragon" / "openseadragon.min.js").write_text("/* stand-in */")
    (pkg / "build" / "openseadragon" / "images" / "home_rest.png").write_bytes(b"png")
    (pkg / "LICENSE.txt").write_text("BSD-3-Clause")
    (pkg / "package.json").write_text(json.dumps({"version": assets.OPENSEADRAGON_VERSION}))
    monkeypatch.setenv(assets.ENV, str(pkg))
    return pkg


def read_slides_js(viewer: Path) -> dict:
    text = (viewer / "slides.js").read_text()
    assert text.startswith("window.WSI_VIEWER = ") and text.rstrip().endswith(";")
    return json.loads(text[len("window.WSI_VIEWER = "):].rstrip().rstrip(";"))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("viewer", "checkpoints", "logs"))
    return dst


# ----------------------------------------------------------------------------- Deep Zoom
def test_deep_zoom_geometry_matches_the_format():
    geo = deepzoom.DeepZoomGeometry(3072, 1000)
    assert geo.max_level == 12 and geo.level_size(12) == (3072, 1000) and geo.level_size(11) == (1536, 500)
    assert geo.level_size(0) == (1, 1) and geo.level_size(2) == (3, 1)  # ceil at every level
    assert geo.tile_grid(12) == (13, 4)  # 3072 / 254 -> 13 columns
    assert geo.tile_box(12, 0, 0) == (0, 0, 255, 255)  # overlap on the sides with a neighbour only
    assert geo.tile_box(12, 1, 1) == (253, 253, 509, 509)
    assert geo.tile_box(12, 12, 3) == (3047, 761, 3072, 1000)  # clipped at the image edge
    assert deepzoom.DeepZoomGeometry(4096, 4096).max_level == 12 and deepzoom.DeepZoomGeometry(1, 1).max_level == 0
    xml = geo.dzi_xml()
    assert 'TileSize="254"' in xml and 'Overlap="1"' in xml and '<Size Width="3072" Height="1000"/>' in xml
    src = geo.tile_source("slides/a/a_files/")["Image"]
    assert src["Url"] == "slides/a/a_files/" and src["Size"] == {"Width": "3072", "Height": "1000"}
    assert src["xmlns"] == deepzoom.DZI_XMLNS


def test_pyramid_tiles_have_the_format_sizes_and_the_slide_pixels(fit_run: Path, tmp_path: Path):
    outs = load_outputs(fit_run)
    path = outs.slide_row(outs.slide_ids[0])["path"]
    with SlideReader(path) as reader:
        geo = deepzoom.write_deep_zoom(reader, tmp_path, "s")
        full = reader.read_region((0, 0), 0, reader.dimensions)
        assert reader.level_count > 1  # coarser DZ levels come from coarser slide levels
    for level in range(geo.max_level + 1):
        cols, rows = geo.tile_grid(level)
        files = sorted((tmp_path / "s_files" / str(level)).iterdir())
        assert len(files) == cols * rows, level
        x0, y0, x1, y1 = geo.tile_box(level, cols - 1, rows - 1)
        assert Image.open(tmp_path / "s_files" / str(level) / f"{cols - 1}_{rows - 1}.jpeg").size == (x1 - x0, y1 - y0)
    x0, y0, x1, y1 = geo.tile_box(geo.max_level, 1, 1)
    tile = np.asarray(Image.open(tmp_path / "s_files" / str(geo.max_level) / "1_1.jpeg"), np.float64)
    assert np.abs(tile - full[y0:y1, x0:x1]).mean() < 4  # JPEG only
    small = np.asarray(Image.open(tmp_path / "s_files" / str(geo.max_level - 3) / "0_0.jpeg"), np.float64)
    ref = np.asarray(Image.fromarray(full).reduce(8), np.float64)[: small.shape[0], : small.shape[1]]
    assert np.abs(small - ref).mean() < 6
    assert (tmp_path / "s.dzi").read_text() == geo.dzi_xml()


# ----------------------------------------------------------------------------- the folder
def test_build_writes_the_folder_and_a_rerun_reuses_the_pyramids(fit_run: Path, fake_osd: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture):
    out = tmp_path / "v"
    index = build_viewer(fit_run, out=out, top_k=3)
    assert index == out / "index.html"
    for name in ("index.html", "viewer.js", "viewer.css", "slides.js", "openseadragon/openseadragon.min.js",
                 "openseadragon/LICENSE.txt", "openseadragon/images/home_rest.png"):
        assert (out / name).is_file(), name
    data = read_slides_js(out)
    preds = pd.read_csv(fit_run / "test_predictions.csv", dtype={"slide_id": str})
    assert [s["id"] for s in data["slides"]] == sorted(preds["slide_id"])
    att = pd.read_csv(fit_run / "attention" / "attention.csv", dtype={"slide_id": str})
    for s in data["slides"]:
        p = preds[preds["slide_id"] == s["id"]].iloc[0]
        t = s["targets"][0]
        assert (t["label"], t["pred"]) == (p["label"], p["pred"])
        assert t["prob"] == pytest.approx(p[f"prob_{p['pred']}"], abs=1e-4)
        assert s["tileSource"]["Image"]["Url"] == f"slides/{s['id']}/{s['id']}_files/"
        assert (out / "slides" / s["id"] / f"{s['id']}.dzi").is_file()
        (m,) = s["maps"]
        a = att[att["slide_id"] == s["id"]]
        assert m["tiles"] == len(a) and len(m["topk"]) == 3
        assert [t["tile"] for t in m["topk"]] == a.sort_values("attention", ascending=False, kind="stable")["tile"].tolist()[:3]
        layer, k = Image.open(out / m["overlay"]), m["scale"]  # its pixels span whole level-0 pixels
        assert k == pytest.approx(site.LAYER_TILE_PX / a["extent"].iloc[0])
        assert layer.mode == "RGBA" and layer.size == (np.ceil(s["width"] * k), np.ceil(s["height"] * k))
        assert m["width"] == pytest.approx(layer.size[0] / k / s["width"])
        row = load_outputs(fit_run).slide_row(s["id"])
        assert len(s["lesions"]) == len(lesion_outlines(row, load_outputs(fit_run).manifest.source))
    assert any(s["lesions"] for s in data["slides"]), "a tumour test slide has its lesion outlines"
    assert not [p for p in out.rglob(".*")], "temporary files left behind"

    stamps = {p: p.stat().st_mtime_ns for p in (out / "slides").rglob("*.jpeg")}
    with caplog.at_level("INFO", logger="wsi_lightning.viewer.site"):
        build_viewer(fit_run, out=out, top_k=3)
    assert "0 pyramid(s) built, 2 reused" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (out / "slides").rglob("*.jpeg")} == stamps

    sid = data["slides"][0]["id"]  # a pyramid that no longer matches its slide file is rebuilt
    meta = out / "slides" / sid / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "mtime_ns": 1}))
    caplog.clear()
    with caplog.at_level("INFO", logger="wsi_lightning.viewer.site"):
        build_viewer(fit_run, out=out, slides=[sid])
    assert "1 pyramid(s) built, 0 reused" in caplog.text
    assert [s["id"] for s in read_slides_js(out)["slides"]] == [sid]
    assert json.loads(meta.read_text())["mtime_ns"] != 1 and not [p for p in out.rglob(".*")]


def test_cli_builds_the_default_folder_and_names_bad_slides(fit_run: Path, fake_osd: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture):
    folder = copy_run(fit_run, tmp_path / "run")
    assert cli.main(["view", str(folder), "--max-slides", "1", "--top-k", "1"]) == 0
    data = read_slides_js(folder / "viewer")
    assert len(data["slides"]) == 1 and len(data["slides"][0]["maps"][0]["topk"]) == 1
    assert cli.main(["view", str(folder), "--slides", "nope,demo_000x"]) == 2
    assert "['nope', 'demo_000x'] are not in" in caplog.text and data["slides"][0]["id"] in caplog.text
    assert cli.main(["view", str(tmp_path)]) == 2  # not a run folder
    assert "no config.resolved.yaml" in caplog.text
    assert cli.main(["view", str(folder), "--max-slides", "0"]) == 2


def test_slides_without_a_file_are_listed_without_pixels(fit_run: Path, fake_osd: Path, tmp_path: Path):
    folder = copy_run(fit_run, tmp_path / "run")
    cfg = OmegaConf.load(folder / "config.resolved.yaml")
    df = pd.read_csv(cfg.data.manifest, dtype=str, keep_default_na=False)
    sid, gone = sorted(pd.read_csv(folder / "test_predictions.csv", dtype={"slide_id": str})["slide_id"])
    df.loc[df["slide_id"] == sid, "path"] = ""
    df.loc[df["slide_id"] == gone, "path"] = str(tmp_path / "gone.tiff")
    src = Path(cfg.data.manifest)
    manifest = src.parent / "manifest_nopath.csv"  # beside the original: same annotations/
    df.to_csv(manifest, index=False)
    cfg.data.manifest = str(manifest)
    OmegaConf.save(cfg, folder / "config.resolved.yaml")
    build_viewer(folder)
    slides = {s["id"]: s for s in read_slides_js(folder / "viewer")["slides"]}
    for s, note in ((slides[sid], "no slide file in the manifest"), (slides[gone], "gone.tiff not found")):
        assert s["tileSource"] is None and s["maps"] == [] and note in s["note"]
        assert s["targets"][0]["pred"] and not (folder / "viewer" / "slides" / s["id"]).exists()


def test_missing_openseadragon_says_how_to_get_it(fit_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(assets.ENV, raising=False)
    monkeypatch.setattr(assets, "REPO", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WSIError, match=r"`make install` fetches it from the npm registry") as err:
        build_viewer(fit_run, out=tmp_path / "v")
    assert assets.NPM_COMMAND in str(err.value) and not (tmp_path / "v").exists()
    monkeypatch.setenv(assets.ENV, str(tmp_path / "empty"))
    with pytest.raises(WSIError, match=rf"\${assets.ENV}=.*empty holds no OpenSeadragon"):
        build_viewer(fit_run, out=tmp_path / "v")


def test_the_pins_and_the_package_data_agree():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^OSD_VERSION := (\S+)$", make, re.M).group(1) == assets.OPENSEADRAGON_VERSION
    assert '"wsi_lightning.viewer" = ["static/*"]' in (REPO / "pyproject.toml").read_text()
    for name in site.STATIC:
        assert (REPO / "wsi_lightning" / "viewer" / "static" / name).is_file()
    js = (REPO / "wsi_lightning" / "viewer" / "static" / "viewer.js").read_text()
    html = (REPO / "wsi_lightning" / "viewer" / "static" / "index.html").read_text()
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", js + html), "the page must fetch nothing"


# ----------------------------------------------------------------------------- in the browser
def _browser_or_skip():
    why = None
    if not CHROMIUM.is_file():
        why = f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set WSI_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "playwright is not installed (pip install -e '.[dev]')"
    if why is None:
        try:
            assets.find_openseadragon()
        except WSIError as e:
            why = str(e)
    if why and os.environ.get("WSI_REQUIRE_BROWSER") == "1":
        pytest.fail(f"WSI_REQUIRE_BROWSER=1 but {why}")
    if why:
        pytest.skip(why)


SETTLED = """() => {
  const s = window.wsiView; if (!s || !s.ready) return false;
  const v = s.viewer, vp = v.viewport, n = v.world.getItemCount();
  if (!n || v.world.needsDraw()) return false;
  for (let i = 0; i < n; i++) if (!v.world.getItemAt(i).getFullyLoaded()) return false;
  const a = vp.getCenter(true), b = vp.getCenter(false);
  return Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9 && Math.abs(a.x - b.x) < 1e-9 && Math.abs(a.y - b.y) < 1e-9;
}"""
TO_PAGE = """([x, y]) => {
  const v = wsiView.viewer, W = wsiView.slide.width, r = v.element.getBoundingClientRect();
  const p = v.viewport.pixelFromPoint(new OpenSeadragon.Point(x / W, y / W), true);
  return [r.left + p.x, r.top + p.y];
}"""


def _shot(page) -> np.ndarray:
    page.wait_for_function(SETTLED, timeout=20000)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    from io import BytesIO

    return np.asarray(Image.open(BytesIO(page.screenshot())).convert("RGB")).astype(np.int64)


def _at(img: np.ndarray, page, x: float, y: float) -> np.ndarray:
    px, py = page.evaluate(TO_PAGE, [x, y])
    return img[int(round(py)), int(round(px))]


def _jet_fraction(img: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of the box's pixels within 20 of a jet colour (the slide's pinks and purples are not)."""
    import matplotlib

    jet = np.round(matplotlib.colormaps["jet"](np.linspace(0, 1, 128))[:, :3] * 255)
    x0, y0, x1, y1 = box
    px = img[y0:y1:3, x0:x1:3].reshape(-1, 3).astype(np.float64)
    d = np.sqrt(((px[:, None] - jet[None]) ** 2).sum(-1)).min(1)
    return float((d < 20).mean())


@pytest.fixture(scope="module")
def browser_ok() -> None:
    """Skips (or fails, see the module docstring) before the fit fixture runs for nothing."""
    _browser_or_skip()


@pytest.mark.browser
def test_the_page_in_headless_chromium(browser_ok: None, fit_run: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    out = tmp_path / "viewer"
    build_viewer(fit_run, out=out, top_k=3)
    data = read_slides_js(out)
    outs = load_outputs(fit_run)
    s = next(s for s in data["slides"] if s["lesions"])  # a tumour slide with its lesion outlined
    top = s["maps"][0]["topk"][0]
    cx, cy = top["x"] + top["extent"] / 2, top["y"] + top["extent"] / 2
    two = copy_run(fit_run, tmp_path / "run2")  # the same run with a second, reversed map
    att = pd.read_csv(two / "attention" / "attention.csv", dtype={"slide_id": str})
    rev = att.assign(map=1, attention=-att["attention"], normalised=1 - att["normalised"])
    pd.concat([att, rev]).to_csv(two / "attention" / "attention.csv", index=False)
    build_viewer(two, out=tmp_path / "viewer2", slides=[s["id"]], top_k=3)

    errors, requests = [], []
    with sync_playwright() as pw:
        # Playwright gives every launch a new empty profile (its own --user-data-dir)
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.on("console", lambda m: m.type in ("error", "warning") and errors.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "index.html").as_uri() + "#slide=" + s["id"])
            page.uncheck("#markers-on")
            page.uncheck("#lesions-on")
            page.uncheck("#heat-on")
            off = _shot(page)
            page.screenshot(path=str(tmp_path / "off.png"))

            # the slide is drawn, and it is the slide: the screen box against its thumbnail
            (x0, y0), (x1, y1) = (page.evaluate(TO_PAGE, [0, 0]), page.evaluate(TO_PAGE, [s["width"], s["height"]]))
            box = tuple(int(round(v)) for v in (x0, y0, x1, y1))
            drawn = off[box[1]:box[3], box[0]:box[2]]
            assert drawn.std() > 10, "OpenSeadragon drew nothing"
            with SlideReader(outs.slide_row(s["id"])["path"]) as r:
                thumb, _ = r.thumbnail(max_size=128)
            got = np.asarray(Image.fromarray(drawn.astype(np.uint8)).resize(thumb.shape[1::-1], Image.Resampling.BOX))
            assert np.abs(got.astype(np.float64) - thumb).mean() < 10

            # heat-map on at full opacity: the top tile is jet(1); off again: gone
            page.check("#heat-on")
            page.fill("#heat-opacity", "100")
            on = _shot(page)
            page.screenshot(path=str(tmp_path / "on.png"))
            assert np.abs(_at(on, page, cx, cy) - JET1).max() <= 12
            assert np.abs(_at(off, page, cx, cy) - JET1).max() > 60
            assert _jet_fraction(on, box) > 0.2 and _jet_fraction(off, box) < 0.01
            page.fill("#heat-opacity", "40")  # a blend, between the slide and the colour
            mid = _at(_shot(page), page, cx, cy)
            expect = 0.4 * JET1 + 0.6 * _at(off, page, cx, cy)
            assert np.abs(mid - expect).max() <= 12
            page.uncheck("#heat-on")
            assert np.abs(_shot(page) - off).max(-1).mean() < 0.5

            # lesion outlines where the lesion is
            page.check("#lesions-on")
            rect = page.evaluate("() => { const b = document.querySelector('svg.wsi-lesions path.line')"
                                 ".getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; }")
            pts = np.concatenate([np.asarray(r) for r in s["lesions"]])
            (ex0, ey0), (ex1, ey1) = (page.evaluate(TO_PAGE, list(pts.min(0))), page.evaluate(TO_PAGE, list(pts.max(0))))
            assert np.abs(np.array(rect) - [ex0, ey0, ex1, ey1]).max() < 3

            # top-k markers: hidden while unticked, and one zooms to its tile
            assert page.locator(".wsi-marker").count() == 3 and not page.is_visible('.wsi-marker[data-rank="1"]')
            page.check("#markers-on")
            assert page.is_visible('.wsi-marker[data-rank="1"]')
            page.click('.wsi-marker[data-rank="1"]')
            _shot(page)
            bounds = page.evaluate("() => { const b = wsiView.viewer.viewport.getBounds(); return [b.x, b.y, b.width, b.height]; }")
            W = s["width"]
            assert bounds[0] <= top["x"] / W and top["x"] / W + top["extent"] / W <= bounds[0] + bounds[2]
            assert bounds[2] < 5 * top["extent"] / W, "not zoomed to the tile"
            assert "selected" in page.get_attribute('.wsi-marker[data-rank="1"]', "class")
            page.screenshot(path=str(tmp_path / "zoomed.png"))

            # two maps: a selector, and switching repaints the layer
            page.goto((tmp_path / "viewer2" / "index.html").as_uri())
            assert page.is_visible("#map-row") and page.locator("#map option").count() == 2
            page.uncheck("#markers-on")
            page.fill("#heat-opacity", "100")
            assert np.abs(_at(_shot(page), page, cx, cy) - JET1).max() <= 12
            page.select_option("#map", "1")
            assert np.abs(_at(_shot(page), page, cx, cy) - JET0).max() <= 12
        finally:
            browser.close()
    assert errors == []
    assert requests and all(u.startswith("file://") for u in requests), [u for u in requests if not u.startswith("file://")]
    assert time.perf_counter() - t0 < 60
