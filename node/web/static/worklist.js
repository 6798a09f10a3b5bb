// Worklist auto-refresh: re-fetches the table body every 30 s with the same filters.
(function () {
  "use strict";
  var PERIOD_MS = 30000;
  var state = document.getElementById("refresh-state");
  var rows = document.getElementById("rows");
  if (!state || !rows) return;
  var query = state.getAttribute("data-query") || "";
  function stamp(text) { state.textContent = text; }
  function refresh() {
    fetch("/worklist/rows" + (query ? "?" + query : ""), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.status === 401 || r.redirected) { window.location.href = "/login?next=/worklist"; return null; }
        if (!r.ok) throw new Error("HTTP " + r.status);
        // the time comes from the server, in the node's display zone and format (never the browser's)
        var at = r.headers.get("X-Rendered-At") || "";
        return r.text().then(function (html) { return { html: html, at: at }; });
      })
      .then(function (got) {
        if (got === null) return;
        rows.innerHTML = got.html;
        stamp("updated " + got.at + " · every 30 s");
      })
      .catch(function (e) { stamp("refresh failed (" + e.message + "), retrying"); });
  }
  setInterval(refresh, PERIOD_MS);
  window.msknodeRefresh = refresh;  // lets a test (or a console user) refresh at once
  ["f-anatomy", "f-priority", "f-status"].forEach(function (id) {
    var el = document.getElementById(id);
    if (el) el.addEventListener("change", function () { document.getElementById("filters").submit(); });
  });
})();
