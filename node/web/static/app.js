// msknode: small helpers shared by every page (no inline scripts: the CSP forbids them).
(function () {
  "use strict";
  // A worklist row opens its study; links and buttons inside keep their own behaviour.
  document.addEventListener("click", function (ev) {
    var row = ev.target.closest("tr[data-href]");
    if (!row || ev.target.closest("a, button, input, select, form")) return;
    window.location.href = row.getAttribute("data-href");
  });
  // Probability bars: widths from data-p (inline style attributes are blocked by the CSP).
  function bars(root) {
    (root || document).querySelectorAll(".bar[data-p]").forEach(function (b) {
      var p = Math.max(0, Math.min(1, parseFloat(b.getAttribute("data-p")) || 0));
      if (b.firstElementChild) b.firstElementChild.style.width = (p * 100).toFixed(0) + "%";
    });
  }
  bars(document);
  window.msknodeBars = bars;
  // Buttons that need a confirmation carry data-confirm.
  document.addEventListener("submit", function (ev) {
    var msg = ev.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) ev.preventDefault();
  });
})();
