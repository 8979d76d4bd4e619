// The Deep Zoom viewer: OpenSeadragon over the slide's DZI, with its tiles drawn as overlays.
// Data (from the page): dzi URL, level-0 offset of the Deep Zoom image, tile side in level-0 px, and
// level-0 x, y of the mosaic, the indexed (high-cellularity) tiles and a hit's matched tiles.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("viewer-data").textContent);
  const element = document.getElementById("viewer");
  const viewer = OpenSeadragon({
    element: element,
    prefixUrl: "/static/openseadragon/images/",
    tileSources: data.dzi,
    showNavigator: true,
    maxZoomPixelRatio: 4,
    gestureSettingsMouse: { clickToZoom: false },
  });
  let loaded = 0;
  viewer.addHandler("tile-loaded", function () {
    loaded += 1;
    element.dataset.tilesLoaded = String(loaded);
  });
  viewer.addHandler("tile-load-failed", function () {
    element.dataset.tileFailed = "1";
  });

  function box(x, y, side, cls, text) {
    const div = document.createElement("div");
    div.className = "ov " + cls;
    if (text) {
      div.textContent = text;
    }
    const rect = viewer.viewport.imageToViewportRectangle(x - data.offset[0], y - data.offset[1], side, side);
    viewer.addOverlay({ element: div, location: rect });
    return rect;
  }

  viewer.addHandler("open", function () {
    data.mosaic.forEach(function (xy) { box(xy[0], xy[1], data.tile, "mosaic"); });
    data.cellular.forEach(function (xy) { box(xy[0], xy[1], data.tile, "cellular"); });
    let focus = null;
    data.matches.forEach(function (m) {
      const rect = box(m.xy[0], m.xy[1], data.tile, "match", String(m.n));
      focus = focus ? focus.union(rect) : rect;
    });
    if (focus) {
      const pad = Math.max(focus.width, focus.height) * 0.5;
      viewer.viewport.fitBounds(new OpenSeadragon.Rect(focus.x - pad, focus.y - pad,
        focus.width + 2 * pad, focus.height + 2 * pad), true);
    }
    element.dataset.overlays = String(data.mosaic.length + data.cellular.length + data.matches.length);
  });

  document.querySelectorAll("input[data-layer]").forEach(function (input) {
    input.addEventListener("change", function () {
      element.classList.toggle("hide-" + input.dataset.layer, !input.checked);
    });
  });
})();
