// msknode: small helpers shared by every page (no inline scripts: the CSP forbids them).
(function () {
  "use strict";
  // A worklist row opens its study; links and buttons inside keep their own behaviour.
  document.addEventListener("click", function (ev) {
    var row = ev.target.closest("tr[data-href]");
    if (!row || ev.target.closest("a, button, input, select, form")) return;
    window.location.href = row.getAttribute("data-href");
  });
  // Buttons that need a confirmation carry data-confirm.
  document.addEventListener("submit", function (ev) {
    var msg = ev.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) ev.preventDefault();
  });
})();
