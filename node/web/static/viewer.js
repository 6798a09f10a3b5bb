// Slice viewer: original series + AI overlay (SEG) + super-resolved series, side by side.
(function () {
  "use strict";
  var root = document.getElementById("viewer");
  if (!root) return;
  var study = root.getAttribute("data-study");
  var $ = function (id) { return document.getElementById(id); };
  var imgOrig = $("img-orig"), imgOvl = $("img-ovl"), imgSr = $("img-sr");
  var slider = $("slice"), label = $("slice-label");
  var toggle = $("overlay-toggle"), opacity = $("overlay-opacity"), segSel = $("segment-select");
  var srToggle = $("sr-toggle"), paneSr = $("pane-sr"), seriesSel = $("series-select");
  var info = null, k = 0, cache = {};
  // what the reader asked for; a toggle is only ticked when its result exists for the series shown
  var overlayWanted = toggle.checked, srWanted = srToggle.checked;

  function err(msg) { $("viewer-error").textContent = msg || ""; }
  function preload(url) { if (!cache[url]) { var i = new Image(); i.src = url; cache[url] = i; } }
  function origUrl(n) { return "/api/studies/" + study + "/series/" + info.selected.id + "/slices/" + n + ".png"; }
  function ovlUrl(n) {
    if (!info.overlays.length) return null;
    var seg = segSel.value ? "?segment=" + encodeURIComponent(segSel.value) : "";
    return "/api/studies/" + study + "/series/" + info.selected.id + "/overlay/" + info.overlays[0].result_id + "/" + n + ".png" + seg;
  }
  function srUrl(n) {
    if (!info.superres) return null;
    return "/api/studies/" + study + "/superres/" + info.superres.series_uid + "/slices/" + info.superres.map[n] + ".png";
  }
  function overlayOn() { return toggle.checked && info && info.overlays.length > 0; }

  function show(n) {
    if (!info) return;
    k = Math.max(0, Math.min(info.selected.slices - 1, n));
    slider.value = k;
    imgOrig.src = origUrl(k);
    var o = ovlUrl(k);
    if (o && overlayOn()) { imgOvl.src = o; imgOvl.style.display = ""; } else { imgOvl.style.display = "none"; }
    var s = srUrl(k);
    if (s && srToggle.checked) { imgSr.src = s; }
    var text = "slice " + (k + 1) + " / " + info.selected.slices;
    label.textContent = text;
    $("c-slice").textContent = text;
    if (info.superres) $("c-sr-slice").textContent = "slice " + (info.superres.map[k] + 1) + " / " + info.superres.slices;
    var hasEv = info.overlay_slices.indexOf(k) >= 0;
    $("c-ai").textContent = overlayOn() ? (hasEv ? "AI evidence on this slice" : "AI overlay on") : "";
    [k - 1, k + 1, k + 2].forEach(function (j) {
      if (j >= 0 && j < info.selected.slices) {
        preload(origUrl(j));
        var oo = ovlUrl(j); if (oo && overlayOn()) preload(oo);
      }
    });
  }

  function applyOverlayState() {
    var on = overlayOn();
    imgOvl.style.display = on ? "" : "none";
    imgOvl.style.opacity = (opacity.value / 100).toFixed(2);
    $("opacity-value").textContent = opacity.value + "%";
    root.setAttribute("data-overlay", on ? "on" : "off");
    $("overlay-state").textContent = !info || !info.overlays.length ? "no AI overlay for this series" : (on ? "AI overlay shown" : "AI overlay hidden");
    show(k);
  }

  function applySr() {
    var on = srToggle.checked && info && info.superres;
    paneSr.style.display = on ? "" : "none";
    show(k);
  }

  function strip() {
    var el = $("overlay-strip");
    el.innerHTML = "";
    if (!info || !info.overlay_slices.length) return;
    var n = info.selected.slices;
    info.overlay_slices.forEach(function (j) {
      var m = document.createElement("i");
      m.style.left = (100 * j / n) + "%";
      m.style.width = Math.max(100 / n, 0.6) + "%";
      el.appendChild(m);
    });
  }

  function load(seriesId) {
    err("");
    var url = "/api/studies/" + study + "/viewer" + (seriesId ? "?series_id=" + seriesId : "");
    fetch(url, { credentials: "same-origin" })
      .then(function (r) { return r.json().then(function (b) { if (!r.ok) throw new Error(b.detail || ("HTTP " + r.status)); return b; }); })
      .then(function (b) {
        info = b;
        seriesSel.innerHTML = "";
        b.series.forEach(function (s) {
          var o = document.createElement("option");
          o.value = s.id;
          o.textContent = (s.number != null ? s.number + " · " : "") + (s.description || "series " + s.id) + (s.role ? " (" + s.role + ")" : "");
          if (s.id === b.selected.id) o.selected = true;
          seriesSel.appendChild(o);
        });
        segSel.innerHTML = '<option value="">all</option>';
        (b.overlays[0] ? b.overlays[0].segments : []).forEach(function (s) {
          var o = document.createElement("option"); o.value = s.number; o.textContent = s.label; segSel.appendChild(o);
        });
        var hasOvl = b.overlays.length > 0;
        segSel.disabled = !hasOvl;
        opacity.disabled = !hasOvl;
        toggle.disabled = !hasOvl;
        toggle.checked = hasOvl && overlayWanted;
        $("c-series").textContent = b.selected.description || "";
        $("cap-orig").textContent = "Original · " + (b.selected.description || "") + " · " + b.selected.cols + "×" + b.selected.rows;
        if (b.superres) $("cap-sr").textContent = "Super-resolved (derived) · " + b.superres.slices + " slices · " + b.superres.cols + "×" + b.superres.rows;
        else $("cap-sr").textContent = "no super-resolved series";
        srToggle.disabled = !b.superres;
        srToggle.checked = !!b.superres && srWanted;
        slider.max = b.selected.slices - 1;
        k = b.start_slice;
        strip();
        applySr();
        applyOverlayState();
        var loading = $("viewer-loading");
        if (loading) loading.style.display = "none";
        root.setAttribute("data-ready", "1");
      })
      .catch(function (e) {
        var loading = $("viewer-loading");
        if (loading) loading.textContent = "cannot display this series";
        err("Viewer: " + e.message);
        root.setAttribute("data-ready", "error");
      });
  }

  slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
  $("slice-prev").addEventListener("click", function () { show(k - 1); });
  $("slice-next").addEventListener("click", function () { show(k + 1); });
  toggle.addEventListener("change", function () { overlayWanted = toggle.checked; applyOverlayState(); });
  opacity.addEventListener("input", applyOverlayState);
  segSel.addEventListener("change", function () { show(k); });
  srToggle.addEventListener("change", function () { srWanted = srToggle.checked; applySr(); });
  seriesSel.addEventListener("change", function () { load(seriesSel.value); });
  $("stage-orig").addEventListener("wheel", function (ev) { ev.preventDefault(); show(k + (ev.deltaY > 0 ? 1 : -1)); }, { passive: false });
  document.addEventListener("keydown", function (ev) {
    if (ev.target.closest("input, select, textarea")) return;
    if (ev.key === "ArrowUp") { ev.preventDefault(); show(k - 1); }
    else if (ev.key === "ArrowDown") { ev.preventDefault(); show(k + 1); }
    else if ((ev.key === "o" || ev.key === "O") && !toggle.disabled) {
      toggle.checked = !toggle.checked; overlayWanted = toggle.checked; applyOverlayState();
    }
  });
  // Brightness/contrast by dragging on the image (display only); double-click resets.
  var wl = { b: 1, c: 1 }, drag = null;
  function applyWl() {
    var f = "brightness(" + wl.b.toFixed(2) + ") contrast(" + wl.c.toFixed(2) + ")";
    imgOrig.style.filter = f; imgSr.style.filter = f;
    root.setAttribute("data-wl", wl.b.toFixed(2) + "," + wl.c.toFixed(2));
  }
  $("stage-orig").addEventListener("mousedown", function (ev) {
    if (ev.button !== 0) return;
    ev.preventDefault();
    drag = { x: ev.clientX, y: ev.clientY, b: wl.b, c: wl.c };
  });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) return;
    wl.c = Math.max(0.2, Math.min(5, drag.c * Math.exp((ev.clientX - drag.x) / 200)));
    wl.b = Math.max(0.2, Math.min(5, drag.b * Math.exp(-(ev.clientY - drag.y) / 200)));
    applyWl();
  });
  window.addEventListener("mouseup", function () { drag = null; });
  $("stage-orig").addEventListener("dblclick", function () { wl = { b: 1, c: 1 }; applyWl(); });
  load(null);
})();
