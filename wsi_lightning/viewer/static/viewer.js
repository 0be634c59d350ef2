/* wsi view: the page's logic. Its data is window.WSI_VIEWER (slides.js, written by `wsi view`);
 * coordinates there are level-0 pixels, OpenSeadragon's viewport has the slide 1 unit wide.
 * Everything loads from the viewer folder: no server, no network. window.wsiView exposes the
 * state to tests and the browser console. */
(function () {
  "use strict";
  const D = window.WSI_VIEWER;
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";
  if (!D || typeof OpenSeadragon === "undefined") {
    document.body.textContent = "slides.js or openseadragon/ is missing from this folder: rebuild it with `wsi view`.";
    return;
  }
  const state = { slide: null, map: 0, layers: [], markers: [], generation: 0, ready: false, selected: null };
  window.wsiView = state;

  const viewer = OpenSeadragon({
    element: $("osd"),
    prefixUrl: "openseadragon/images/",
    drawer: "canvas",            // file:// tiles are cross-origin to WebGL; the 2D canvas draws them
    crossOriginPolicy: false,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    showRotationControl: false,
    maxZoomPixelRatio: 2,
    visibilityRatio: 0.5,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
  });
  state.viewer = viewer;

  // ------------------------------------------------------------------ page
  $("title").textContent = D.title;
  $("subtitle").textContent = D.folder;
  $("osd-version").textContent = D.openseadragon;
  document.title = "wsi view · " + D.title;
  $("colorbar").querySelector(".bar").style.background = D.colorbar;

  function fmt(p) { return p === null || p === undefined ? "" : p.toFixed(3); }

  const rows = new Map();
  for (const s of D.slides) {
    const tr = document.createElement("tr");
    const a = document.createElement("a");
    a.href = "#slide=" + encodeURIComponent(s.id);
    a.textContent = s.id;
    a.title = s.id;
    const cells = [a, s.targets.map((t) => t.label || "–").join(" / "),
                   s.targets.map((t) => t.pred).join(" / "), s.targets.map((t) => fmt(t.prob)).join(" / ")];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      if (typeof c === "string") td.textContent = c; else td.appendChild(c);
      if (i === 2 && s.targets.every((t) => t.label)) {
        td.className = s.targets.every((t) => t.label === t.pred) ? "right" : "wrong";
      }
      tr.appendChild(td);
    });
    $("slides").tBodies[0].appendChild(tr);
    rows.set(s.id, tr);
  }

  // ------------------------------------------------------------------ slides
  function slideFromHash() {
    const m = /(?:^#|&)slide=([^&]*)/.exec(location.hash);
    const id = m ? decodeURIComponent(m[1]) : null;
    return D.slides.find((s) => s.id === id) || D.slides[0];
  }

  function openSlide(s) {
    if (!s) { $("slide-name").textContent = "no slides"; return; }
    state.generation += 1;
    state.slide = s; state.map = 0; state.layers = []; state.ready = false; state.selected = null;
    clearMarkers();
    rows.forEach((tr, id) => tr.classList.toggle("current", id === s.id));
    $("slide-name").textContent = s.id;
    const mm = s.mpp && s.width ? ` · ${(s.width * s.mpp / 1000).toFixed(2)} × ${(s.height * s.mpp / 1000).toFixed(2)} mm` : "";
    const preds = s.targets.map((t) => (D.targets.length > 1 ? t.target + ": " : "") +
      `label ${t.label || "unknown"}, predicted ${t.pred} (p ${fmt(t.prob)})`).join("; ");
    $("slide-info").textContent = preds + (s.width ? ` · ${s.width} × ${s.height} px${mm}` : "");
    $("note").hidden = !s.note;
    $("note").textContent = s.note || "";
    const sel = $("map");
    sel.replaceChildren(...s.maps.map((m, i) => new Option(`${m.label} (${m.tiles} tiles)`, String(i))));
    $("map-row").hidden = s.maps.length < 2;
    $("heat-controls").hidden = s.maps.length === 0;
    $("markers-row").hidden = s.maps.length === 0;
    $("lesions-row").hidden = s.lesions.length === 0;
    $("lesion-count").textContent = s.lesions.length ? `(${s.lesions.length})` : "";
    if (!s.tileSource) { viewer.close(); lesionGroup.replaceChildren(); state.ready = true; updateMap(); return; }
    viewer.open({ tileSource: s.tileSource });
  }

  viewer.addHandler("open", function () {
    const s = state.slide, gen = state.generation;
    drawLesions(s);
    let pending = s.maps.length;
    if (!pending) { state.ready = true; }
    s.maps.forEach((m, i) => {
      viewer.addTiledImage({
        tileSource: { type: "image", url: m.overlay },
        x: 0, y: 0, width: m.width, opacity: 0, preload: true,  // loaded while hidden: toggles at once
        success: (e) => {
          if (gen !== state.generation) { viewer.world.removeItem(e.item); return; }
          state.layers[i] = e.item;
          applyHeat();
          if (--pending === 0) state.ready = true;
        },
        error: (e) => { console.error("wsi view: heat-map " + m.overlay + " did not load", e.message); },
      });
    });
    updateMap();
  });
  viewer.addHandler("open-failed", (e) => console.error("wsi view: slide did not open", e.message));

  // ------------------------------------------------------------------ heat-map
  function applyHeat() {
    const op = $("heat-on").checked ? Number($("heat-opacity").value) / 100 : 0;
    $("heat-opacity-value").textContent = $("heat-opacity").value + "%";
    state.layers.forEach((item, i) => { if (item) item.setOpacity(i === state.map ? op : 0); });
  }

  function updateMap() {
    const m = state.slide && state.slide.maps[state.map];
    applyHeat();
    clearMarkers();
    $("topk").replaceChildren();
    if (!m) return;
    $("cb-min").textContent = m.range[0].toPrecision(2);
    $("cb-max").textContent = m.range[1].toPrecision(2);
    $("cb-label").textContent = `attention (${D.normalisation}) · top ${m.topk.length} tiles by attention:`;
    for (const t of m.topk) {
      const li = document.createElement("li");
      li.textContent = `tile ${t.tile} · a=${t.attention === null ? "–" : t.attention.toPrecision(3)}` +
        (t.normalised === null ? "" : ` (${D.normalisation} ${t.normalised.toFixed(3)})`);
      li.addEventListener("click", () => zoomTo(t));
      $("topk").appendChild(li);
      if (state.slide.tileSource) addMarker(t);
    }
    showMarkers();
  }

  // ------------------------------------------------------------------ top-k markers
  function tileRect(t, margin) {
    const W = state.slide.width;
    return new OpenSeadragon.Rect((t.x - margin * t.extent) / W, (t.y - margin * t.extent) / W,
      (1 + 2 * margin) * t.extent / W, (1 + 2 * margin) * t.extent / W);
  }

  function addMarker(t) {
    const el = document.createElement("div");
    el.className = "wsi-marker";
    el.dataset.rank = String(t.rank);
    el.title = `#${t.rank}: tile ${t.tile}` + (t.attention === null ? "" : `, attention ${t.attention.toPrecision(3)}`);
    const label = document.createElement("span");
    label.textContent = String(t.rank);
    el.appendChild(label);
    viewer.addOverlay({ element: el, location: tileRect(t, 0), checkResize: false });
    const tracker = new OpenSeadragon.MouseTracker({ element: el, clickHandler: () => zoomTo(t) });
    state.markers.push({ el, tracker, t });
  }

  function clearMarkers() {
    for (const m of state.markers) { m.tracker.destroy(); viewer.removeOverlay(m.el); }
    state.markers = [];
  }

  function showMarkers() {  // OpenSeadragon sets the overlays' display itself: hide them by class
    $("osd").classList.toggle("no-markers", !$("markers-on").checked);
  }

  function zoomTo(t) {
    state.selected = t.rank;
    viewer.viewport.fitBounds(tileRect(t, 1));
    state.markers.forEach((m) => m.el.classList.toggle("selected", m.t.rank === t.rank));
    [...$("topk").children].forEach((li, i) => li.classList.toggle("selected", i + 1 === t.rank));
  }

  // ------------------------------------------------------------------ lesion outlines
  const lesionSvg = document.createElementNS(SVG_NS, "svg");
  lesionSvg.setAttribute("class", "wsi-lesions");
  const lesionGroup = document.createElementNS(SVG_NS, "g");
  lesionSvg.appendChild(lesionGroup);
  viewer.canvas.appendChild(lesionSvg);

  function drawLesions(s) {
    const d = s.lesions.map((ring) => "M" + ring.map((p) => p[0] + " " + p[1]).join("L") + "Z").join(" ");
    lesionGroup.replaceChildren();
    if (!d) return;
    for (const cls of ["halo", "line"]) {
      const path = document.createElementNS(SVG_NS, "path");
      path.setAttribute("class", cls);
      path.setAttribute("d", d);
      lesionGroup.appendChild(path);
    }
    placeLesions();
  }

  function placeLesions() {
    const s = state.slide;
    if (!s || !s.width) return;
    const vp = viewer.viewport;
    const p0 = vp.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    const p1 = vp.pixelFromPoint(new OpenSeadragon.Point(1, 0), true);
    const k = (p1.x - p0.x) / s.width;  // screen px per level-0 px
    lesionGroup.setAttribute("transform", `translate(${p0.x} ${p0.y}) scale(${k})`);
    lesionSvg.style.display = $("lesions-on").checked ? "" : "none";
  }
  viewer.addHandler("update-viewport", placeLesions);
  viewer.addHandler("resize", placeLesions);

  // ------------------------------------------------------------------ controls
  $("heat-on").addEventListener("change", applyHeat);
  $("heat-opacity").addEventListener("input", applyHeat);
  $("map").addEventListener("change", (e) => { state.map = Number(e.target.value); updateMap(); });
  $("lesions-on").addEventListener("change", placeLesions);
  $("markers-on").addEventListener("change", showMarkers);
  window.addEventListener("hashchange", () => openSlide(slideFromHash()));
  openSlide(slideFromHash());
})();
