// The reader's answer to each AI finding, by keyboard: J/K move, A agree, D disagree (then a digit),
// 1-9 the answer on the model's scale, C comment (Enter saves, Escape leaves). Saved at once through
// POST /api/studies/{id}/feedback/{finding}; without script the forms post to the page route.
(function () {
  "use strict";
  var panel = document.getElementById("feedback");
  if (!panel) { return; }
  var items = Array.prototype.slice.call(panel.querySelectorAll(".fb-item"));
  if (!items.length) { return; }
  var locked = panel.getAttribute("data-locked") === "1";
  var study = panel.getAttribute("data-study");
  var csrf = document.body.getAttribute("data-csrf") || "";
  var cur = 0;

  function label(v) { return String(v).replace(/_/g, " "); }

  function focus(k, quiet) {
    cur = Math.max(0, Math.min(items.length - 1, k));
    items.forEach(function (it, i) { it.classList.toggle("current", i === cur); });
    if (!quiet) { items[cur].scrollIntoView({ block: "nearest" }); }  // never on load: the viewer stays in view
  }

  function state(item, text, bad) {
    var e = item.querySelector(".fb-error");
    e.textContent = bad ? text : "";
    if (!bad) { item.querySelector(".fb-state").textContent = text; }
  }

  function save(item, agree, answer, next) {
    if (locked) { return; }
    var body = { agree: agree, answer: agree ? null : answer, comment: item.querySelector(".fb-comment").value || null };
    var url = "/api/studies/" + study + "/feedback/" + item.getAttribute("data-finding");
    item.classList.add("saving");
    fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (j) { return { ok: r.ok, j: j }; });
    }).then(function (res) {
      item.classList.remove("saving");
      if (!res.ok) { state(item, res.j.detail || "not saved", true); return; }
      item.setAttribute("data-agree", res.j.agree ? "1" : "0");
      item.setAttribute("data-answer", res.j.answer);
      item.classList.add("answered");
      item.classList.toggle("disagreed", !res.j.agree);
      item.querySelector(".fb-answer").value = res.j.answer;
      state(item, res.j.agree ? "You agreed" : "You disagreed: " + label(res.j.answer), false);
      item.setAttribute("data-saved", String(Date.now()));
      if (next && cur < items.length - 1) { focus(cur + 1); }
    }).catch(function () {
      item.classList.remove("saving");
      state(item, "not saved: the node did not answer", true);
    });
  }

  function choose(item, k) {
    var scale = item.getAttribute("data-scale").split(",");
    if (k < 1 || k > scale.length) { return; }
    var v = scale[k - 1];
    item.classList.remove("choosing");
    save(item, v === item.getAttribute("data-ai"), v, true);
  }

  items.forEach(function (item, i) {
    item.addEventListener("submit", function (ev) {
      ev.preventDefault();
      focus(i);
      var agree = !ev.submitter || ev.submitter.value !== "0";
      save(item, agree, item.querySelector(".fb-answer").value, false);
    });
    item.addEventListener("click", function () { focus(i, true); });
    var c = item.querySelector(".fb-comment");
    c.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") {
        ev.preventDefault();
        var a = item.getAttribute("data-agree");
        save(item, a !== "0", item.getAttribute("data-answer") || item.getAttribute("data-ai"), false);
        c.blur();
      } else if (ev.key === "Escape") { c.blur(); }
    });
  });

  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target && ev.target.tagName;
    if (t === "INPUT" || t === "TEXTAREA" || t === "SELECT") { return; }
    var item = items[cur];
    var key = ev.key.toLowerCase();
    if (key === "j") { focus(cur + 1); }
    else if (key === "k") { focus(cur - 1); }
    else if (key === "a") { item.classList.remove("choosing"); save(item, true, null, true); }
    else if (key === "d") { item.classList.add("choosing"); }
    else if (key === "c") { ev.preventDefault(); item.querySelector(".fb-comment").focus(); }
    else if (/^[1-9]$/.test(key)) { choose(item, parseInt(key, 10)); }
    else { return; }
    ev.preventDefault();
  });
  focus(0, true);
})();
