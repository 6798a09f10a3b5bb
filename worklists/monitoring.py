"""Watching the models and the reading: figures per model version, control bands, alerts, turnaround.

Everything is computed from the database at request time (the dashboard, ``/metrics`` and
``msknode monitor`` show the same numbers):

- per model and version: studies, QC refusals by reason, positive rate, agreement with
  radiologists' answers (`worklists.feedback`), estimated PPV, NPV, sensitivity and
  specificity with 95 % Wilson intervals, the confusion table on the model's scale, and the
  same by ISO week;
- control bands (a p-chart, centre +/- 3 standard errors for the current window's count):
  the positive rate against the model's own reference window (the weeks before the current
  window), or the card's ``monitoring.expected_positive_rate`` when it states one; the QC
  refusal rate against the card's evaluation figure (``metrics.qc_refused / metrics.n``) or
  the reference window; agreement against the reference window;
- silence: a pipeline that received no study for longer than twice its usual gap (95th
  percentile of the gaps between its studies in the reference window), or whose routed studies
  stopped producing results;
- input drift: per model, the accepted series' manufacturer, field strength, contrast and
  TR/TE, and what the QC gate measured on them (voxel size, intensity, SNR, foreground share,
  embedding distance, motion probability), in the current window against the reference window;
- reading turnaround (arrival -> marked read) per priority and week, and overdue studies.

Estimates from feedback describe the studies radiologists answered, which need not be a random
sample (a reader answers more often when the model looks wrong): read them as that.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.schema import Finding, FindingFeedback, Job, JobInput, Series, Study
from worklists.entries import ordered, waiting_since
from worklists.tables import PRIORITIES, WorklistEntry
from worklists.targets import due_state, effective_targets
from worklists.triage import TriagePolicy

Z = 1.959964  # 95 %
SIGMA = 3.0  # control band half-width in standard errors
MIN_CURRENT = 10  # studies in the current window before a rate is judged
MIN_REFERENCE = 20  # studies in the reference window before it is a band
MIN_GAPS = 10  # arrivals before a pipeline has a "usual gap"
STALL_MINUTES = 60  # a routed study without a result after this long has stalled
SILENCE_FLOOR_MINUTES = 60


@dataclass(frozen=True)
class Windows:
    """The current window (the last `current_days`) and the reference window before it."""

    now: dt.datetime
    current_days: int = 7
    reference_days: int = 56

    @property
    def current_start(self) -> dt.datetime:
        return self.now - dt.timedelta(days=self.current_days)

    @property
    def reference_start(self) -> dt.datetime:
        return self.current_start - dt.timedelta(days=self.reference_days)


# ---- statistics ----------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z) -> dict[str, Any]:
    """A proportion with its Wilson score interval (95 %): ``{k, n, p, lo, hi}``; p None when n == 0."""
    if n <= 0:
        return {"k": k, "n": n, "p": None, "lo": None, "hi": None}
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"k": k, "n": n, "p": p, "lo": max(0.0, centre - half), "hi": min(1.0, centre + half)}


def quantile(values: list[float], q: float) -> float | None:
    """Linear-interpolation quantile (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def band(centre: float, n: int) -> tuple[float, float]:
    """The p-chart limits for a rate with centre `centre` measured on `n` studies."""
    se = math.sqrt(max(centre * (1 - centre), 0.0) / n) if n > 0 else 0.0
    return max(0.0, centre - SIGMA * se), min(1.0, centre + SIGMA * se)


def week_of(t: dt.datetime) -> str:
    y, w, _ = t.isocalendar()
    return f"{y}-W{w:02d}"


def _pct(p: float | None) -> str:
    return "n/a" if p is None else f"{100 * p:.1f} %"


# ---- per model and version -----------------------------------------------------------------


@dataclass
class _Study:
    job_id: int
    at: dt.datetime
    evaluated: bool = False
    refused_reason: str | None = None
    positive: bool = False


def _card(cards: dict[str, dict], name: str) -> dict:
    return cards.get(name) or {}


def _deployments(session: Session) -> dict[tuple[str, str], list[str]]:
    """States of each model version from the model-deployment table, when the node has one."""
    from node.db import schema

    table = getattr(schema, "ModelDeployment", None)
    if table is None:
        return {}
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    try:
        for row in session.scalars(select(table)):
            state = f"{row.state}" + (f" ({row.pipeline})" if getattr(row, "pipeline", None) else "")
            out[(row.model_name, row.version)].append(state)
    except Exception:
        session.rollback()
        return {}
    return dict(out)


def _rate_check(
    what: str, current: dict, centre: float | None, source: str, *, low_only: bool = False
) -> dict[str, Any]:
    """Judges a current-window rate against a centre: status ok / alert / too_few / no_reference."""
    out: dict[str, Any] = {"metric": what, "current": current, "centre": centre, "reference": source}
    if centre is None:
        out["status"] = "no_reference"
        return out
    n = current["n"]
    if n < MIN_CURRENT:
        out["status"] = "too_few"
        return out
    lo, hi = band(centre, n)
    out["band"] = [lo, hi]
    p = current["p"]
    bad = p < lo or (not low_only and p > hi)
    out["status"] = "alert" if bad else "ok"
    return out


def model_stats(session: Session, *, windows: Windows, cards: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Figures per model and version over the current and reference windows (see the module doc)."""
    cards = cards or {}
    start = windows.reference_start
    rows = session.execute(
        select(Finding, Job.id, Study.last_received_at, Study.first_received_at)
        .join(Job, Job.id == Finding.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == "done", Finding.code != "superres")
        .where(Study.last_received_at >= start)
    ).all()
    per: dict[tuple[str, str], dict[int, _Study]] = defaultdict(dict)
    sha: dict[tuple[str, str], str] = {}
    for f, job_id, last, first in rows:
        key = (f.model_name, f.model_version)
        sha[key] = f.weights_sha256
        st = per[key].setdefault(job_id, _Study(job_id, last or first))
        if f.evaluated:
            st.evaluated = True
            st.positive = st.positive or bool(f.positive)
        else:
            st.refused_reason = f.qc_reason or "qc_refused"
    fb_rows = session.execute(
        select(FindingFeedback, Study.last_received_at)
        .join(Study, Study.id == FindingFeedback.study_id)
        .where(Study.last_received_at >= start)
    ).all()
    feedback: dict[tuple[str, str], list[tuple[FindingFeedback, dt.datetime]]] = defaultdict(list)
    for fb, at in fb_rows:
        feedback[(fb.model_name, fb.model_version)].append((fb, at))
        sha.setdefault((fb.model_name, fb.model_version), fb.weights_sha256)
    states = _deployments(session)

    out = []
    for key in sorted(set(per) | set(feedback)):
        name, version = key
        studies = list(per.get(key, {}).values())
        cur = [s for s in studies if s.at >= windows.current_start]
        ref = [s for s in studies if s.at < windows.current_start]
        fbs = feedback.get(key, [])
        card = _card(cards, name)
        if card.get("version") not in (None, version):
            card = {}  # the card describes another version: its figures are not this one's
        out.append(_one_model(name, version, sha.get(key, ""), studies, cur, ref, fbs, card, windows, states.get(key)))
    return out


def _rates(studies: list[_Study]) -> dict[str, Any]:
    n = len(studies)
    refused = [s for s in studies if s.refused_reason and not s.evaluated]
    evaluated = [s for s in studies if s.evaluated]
    return {
        "studies": n,
        "qc_refusal": wilson(len(refused), n),
        "qc_reasons": dict(Counter(s.refused_reason for s in refused)),
        "positive": wilson(sum(1 for s in evaluated if s.positive), len(evaluated)),
    }


def _agreement(fbs: Iterable[FindingFeedback]) -> dict[str, Any]:
    fbs = list(fbs)
    tp = sum(1 for f in fbs if f.ai_positive and f.answer_positive)
    fp = sum(1 for f in fbs if f.ai_positive and not f.answer_positive)
    tn = sum(1 for f in fbs if not f.ai_positive and not f.answer_positive)
    fn = sum(1 for f in fbs if not f.ai_positive and f.answer_positive)
    return {
        "answers": len(fbs),
        "agreement": wilson(sum(1 for f in fbs if f.agree), len(fbs)),
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "ppv": wilson(tp, tp + fp),
        "npv": wilson(tn, tn + fn),
        "sensitivity": wilson(tp, tp + fn),
        "specificity": wilson(tn, tn + fp),
    }


def _confusion(fbs: list[FindingFeedback]) -> dict[str, Any]:
    """Model answer (rows) x radiologist answer (columns), per finding code, on the model's scale."""
    out: dict[str, Any] = {}
    for code in sorted({f.code for f in fbs}):
        these = [f for f in fbs if f.code == code]
        scale = list(these[-1].scale)
        for f in these:
            for v in (f.ai_answer, f.answer):
                if v not in scale:
                    scale.append(v)
        counts = Counter((f.ai_answer, f.answer) for f in these)
        out[code] = {"scale": scale, "rows": [[counts.get((a, r), 0) for r in scale] for a in scale]}
    return out


def _one_model(name, version, sha, studies, cur, ref, fbs, card, windows, states) -> dict[str, Any]:
    fb_all = [f for f, _ in fbs]
    fb_cur = [f for f, at in fbs if at >= windows.current_start]
    fb_ref = [f for f, at in fbs if at < windows.current_start]
    r_cur, r_ref = _rates(cur), _rates(ref)
    weeks: dict[str, dict[str, Any]] = {}
    by_week: dict[str, list[_Study]] = defaultdict(list)
    for s in studies:
        by_week[week_of(s.at)].append(s)
    fb_week: dict[str, list[FindingFeedback]] = defaultdict(list)
    for f, at in fbs:
        fb_week[week_of(at)].append(f)
    for w in sorted(set(by_week) | set(fb_week)):
        rr = _rates(by_week.get(w, []))
        ag = _agreement(fb_week.get(w, []))
        weeks[w] = {
            "studies": rr["studies"],
            "qc_refusal": rr["qc_refusal"],
            "positive": rr["positive"],
            "answers": ag["answers"],
            "agreement": ag["agreement"],
        }

    metrics = card.get("metrics") or {}
    monitoring = card.get("monitoring") or {}
    checks = []
    expected = monitoring.get("expected_positive_rate")
    if isinstance(expected, (int, float)):
        checks.append(_rate_check("positive_rate", r_cur["positive"], float(expected), "model card"))
    else:
        ref_pos = r_ref["positive"]
        centre = ref_pos["p"] if ref_pos["n"] >= MIN_REFERENCE else None
        checks.append(_rate_check("positive_rate", r_cur["positive"], centre, "reference window"))
    if metrics.get("n"):
        centre = float(metrics.get("qc_refused", 0)) / float(metrics["n"])
        checks.append(_rate_check("qc_refusal_rate", r_cur["qc_refusal"], centre, "model card"))
    elif r_ref["studies"] >= MIN_REFERENCE:
        checks.append(_rate_check("qc_refusal_rate", r_cur["qc_refusal"], r_ref["qc_refusal"]["p"], "reference window"))
    a_ref = _agreement(fb_ref)["agreement"]
    a_cur = _agreement(fb_cur)["agreement"]
    checks.append(
        _rate_check(
            "agreement",
            a_cur,
            a_ref["p"] if a_ref["n"] >= MIN_REFERENCE else None,
            "reference window",
            low_only=True,
        )
    )
    for c in checks:
        c["message"] = _check_message(name, version, c)
    return {
        "model": name,
        "version": version,
        "weights_sha256": sha,
        "deployment": states or [],
        "studies": len(studies),
        "current": r_cur,
        "reference": r_ref,
        "feedback": _agreement(fb_all),
        "feedback_current": _agreement(fb_cur),
        "confusion": _confusion(fb_all),
        "weeks": weeks,
        "card": {
            "qc_refusal_rate": (float(metrics.get("qc_refused", 0)) / metrics["n"]) if metrics.get("n") else None,
            "sensitivity": metrics.get("sensitivity"),
            "specificity": metrics.get("specificity"),
            "expected_positive_rate": expected if isinstance(expected, (int, float)) else None,
        },
        "checks": checks,
        "alert": any(c["status"] == "alert" for c in checks),
    }


def _check_message(name: str, version: str, c: dict) -> str:
    what = {"positive_rate": "positive rate", "qc_refusal_rate": "QC refusal rate", "agreement": "agreement"}[
        c["metric"]
    ]
    cur = c["current"]
    if c["status"] == "alert":
        lo, hi = c["band"]
        return (
            f"{name} {version}: {what} {_pct(cur['p'])} ({cur['k']}/{cur['n']}) in the last window is outside "
            f"its control band {_pct(lo)} to {_pct(hi)} (centre {_pct(c['centre'])}, from the {c['reference']})"
        )
    if c["status"] == "too_few":
        return f"{name} {version}: {what}: {cur['n']} in the current window, too few to judge (need {MIN_CURRENT})"
    if c["status"] == "no_reference":
        return f"{name} {version}: {what}: no reference yet (need {MIN_REFERENCE} in the reference window)"
    return f"{name} {version}: {what} {_pct(cur['p'])} within its band"


# ---- silence ---------------------------------------------------------------------------------


def silence(session: Session, *, windows: Windows) -> list[dict[str, Any]]:
    """Per pipeline: last arrival, usual gap, and whether it went quiet or stopped producing results."""
    now = windows.now
    arrivals: dict[str, dict[int, dt.datetime]] = defaultdict(dict)
    for pipeline, study_id, first in session.execute(
        select(Series.pipeline, Series.study_id, Series.first_received_at)
        .where(Series.pipeline.is_not(None), Series.own_object.is_(False))
        .where(Series.first_received_at >= windows.reference_start)
    ):
        if pipeline is None:
            continue
        seen = arrivals[pipeline].get(study_id)
        if seen is None or first < seen:
            arrivals[pipeline][study_id] = first
    done: dict[str, set[int]] = defaultdict(set)
    last_result: dict[str, dt.datetime] = {}
    for pipeline, study_id, finished in session.execute(
        select(Job.pipeline, Job.study_id, Job.finished_at)
        .where(Job.state == "done")
        .where(Job.created_at >= windows.reference_start)
    ):
        done[pipeline].add(study_id)
        if finished is not None and (pipeline not in last_result or finished > last_result[pipeline]):
            last_result[pipeline] = finished
    out = []
    for pipeline in sorted(arrivals):
        times = sorted(arrivals[pipeline].values())
        gaps = [(b - a).total_seconds() / 60 for a, b in itertools.pairwise(times)]
        usual = quantile(gaps, 0.95) if len(gaps) >= MIN_GAPS else None
        quiet = (now - times[-1]).total_seconds() / 60
        limit = max(2 * usual, SILENCE_FLOOR_MINUTES) if usual is not None else None
        stalled = [
            sid
            for sid, t in arrivals[pipeline].items()
            if t <= now - dt.timedelta(minutes=STALL_MINUTES)
            and t >= now - dt.timedelta(days=1)
            and sid not in done[pipeline]
        ]
        stopped = bool(stalled) and (
            pipeline not in last_result or last_result[pipeline] < min(arrivals[pipeline][s] for s in stalled)
        )
        silent = limit is not None and quiet > limit
        msg = []
        if silent and usual is not None:
            msg.append(
                f"pipeline {pipeline}: no study for {quiet / 60:.1f} h, more than twice its usual gap "
                f"({usual / 60:.1f} h, 95th percentile)"
            )
        if stopped:
            msg.append(
                f"pipeline {pipeline}: {len(stalled)} routed studies of the last day have no result "
                f"after {STALL_MINUTES} min and none has finished since they arrived"
            )
        out.append(
            {
                "pipeline": pipeline,
                "last_study_at": times[-1].isoformat(),
                "minutes_since_last": round(quiet, 1),
                "usual_gap_minutes": None if usual is None else round(usual, 1),
                "studies": len(times),
                "stalled_studies": len(stalled),
                "silent": silent,
                "stopped": stopped,
                "alert": silent or stopped,
                "messages": msg,
            }
        )
    return out


# ---- input drift -----------------------------------------------------------------------------


def _summary(values: list[Any]) -> dict[str, Any]:
    nums = [float(v) for v in values if isinstance(v, (int, float))]
    if nums and len(nums) == len([v for v in values if v is not None]):
        return {
            "kind": "number",
            "n": len(nums),
            "median": quantile(nums, 0.5),
            "p10": quantile(nums, 0.1),
            "p90": quantile(nums, 0.9),
        }
    counts = Counter("—" if v is None else str(v) for v in values)
    n = sum(counts.values())
    return {"kind": "category", "n": n, "shares": {k: c / n for k, c in counts.most_common()}}


def _distance(cur: dict, ref: dict) -> float | None:
    """How far the current distribution moved: total variation for categories, shift of the median in
    units of the reference's 10-90 % range for numbers."""
    if cur["n"] == 0 or ref["n"] == 0 or cur["kind"] != ref["kind"]:
        return None
    if cur["kind"] == "category":
        keys = set(cur["shares"]) | set(ref["shares"])
        return 0.5 * sum(abs(cur["shares"].get(k, 0) - ref["shares"].get(k, 0)) for k in keys)
    spread = (ref["p90"] - ref["p10"]) or abs(ref["median"]) or 1.0
    return abs(cur["median"] - ref["median"]) / spread


DRIFT_FEATURES = ("manufacturer", "field_strength_t", "contrast", "repetition_time_ms", "echo_time_ms")
#: what the QC gate measured on each accepted input (`Finding.details["qc_metrics"]`), shown under these names
QC_DRIFT_FEATURES = {
    "slice_spacing_mm": "slice_spacing_mm",
    "pixel_spacing_mm": "pixel_spacing_mm",
    "p99": "intensity_p99",
    "snr": "snr",
    "foreground_fraction": "foreground_fraction",
    "anatomy_distance": "qc_embedding_distance",
    "motion_probability": "qc_motion_probability",
}


def input_drift(session: Session, *, windows: Windows) -> list[dict[str, Any]]:
    """Per model: the accepted input series' facts in the current window against the reference window."""
    rows = session.execute(
        select(JobInput.used_by, Series, Study.last_received_at)
        .join(Series, Series.id == JobInput.series_id)
        .join(Job, Job.id == JobInput.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == "done", Study.last_received_at >= windows.reference_start)
    ).all()
    per: dict[str, dict[str, dict[str, list[Any]]]] = defaultdict(
        lambda: {"current": defaultdict(list), "reference": defaultdict(list)}
    )
    for used_by, se, at in rows:
        acq = se.acquisition or {}
        facts = {
            "manufacturer": se.manufacturer,
            "field_strength_t": acq.get("magnetic_field_strength"),
            "contrast": se.contrast,
            "repetition_time_ms": acq.get("repetition_time"),
            "echo_time_ms": acq.get("echo_time"),
        }
        side = "current" if at >= windows.current_start else "reference"
        for model in used_by or []:
            for k, v in facts.items():
                per[model][side][k].append(v)
    seen: set[tuple[str, int]] = set()
    for f, job_id, at in session.execute(
        select(Finding, Job.id, Study.last_received_at)
        .join(Job, Job.id == Finding.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == "done", Finding.evaluated.is_(True), Study.last_received_at >= windows.reference_start)
    ):
        qc = (f.details or {}).get("qc_metrics")
        if not isinstance(qc, dict) or (f.model_name, job_id) in seen:
            continue
        seen.add((f.model_name, job_id))  # one input per model and study (a per-level model has many rows)
        side = "current" if at >= windows.current_start else "reference"
        for key, name in QC_DRIFT_FEATURES.items():
            if isinstance(qc.get(key), (int, float)):
                per[f.model_name][side][name].append(float(qc[key]))
    out = []
    for model in sorted(per):
        feats = []
        for k in DRIFT_FEATURES + tuple(QC_DRIFT_FEATURES.values()):
            if not per[model]["current"].get(k) and not per[model]["reference"].get(k):
                continue
            cur = _summary(per[model]["current"].get(k, []))
            ref = _summary(per[model]["reference"].get(k, []))
            feats.append({"feature": k, "current": cur, "reference": ref, "distance": _distance(cur, ref)})
        out.append({"model": model, "features": feats})
    return out


# ---- reading turnaround and overdue studies ---------------------------------------------------


def turnaround(session: Session, *, policy: TriagePolicy, windows: Windows) -> dict[str, Any]:
    """Arrival -> marked read, per priority and ISO week of the read: median, p90 and share within target."""
    targets = effective_targets(session, policy)
    rows = session.execute(
        select(WorklistEntry, Study)
        .join(Study, Study.id == WorklistEntry.study_id)
        .where(WorklistEntry.status == "read", WorklistEntry.read_at >= windows.reference_start)
    ).all()
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e, st in rows:
        if e.read_at is None:
            continue
        minutes = (e.read_at - waiting_since(st)).total_seconds() / 60
        cells[(e.priority, week_of(e.read_at))].append(minutes)
    out = []
    for (prio, week), mins in sorted(cells.items(), key=lambda kv: (PRIORITIES.index(kv[0][0]), kv[0][1])):
        target = targets.get(prio)
        within = sum(1 for m in mins if target is not None and m <= target)
        out.append(
            {
                "priority": prio,
                "week": week,
                "read": len(mins),
                "median_minutes": round(quantile(mins, 0.5) or 0, 1),
                "p90_minutes": round(quantile(mins, 0.9) or 0, 1),
                "target_minutes": target,
                "within_target": wilson(within, len(mins)),
            }
        )
    return {"targets": targets, "rows": out}


def overdue(session: Session, *, policy: TriagePolicy, now: dt.datetime) -> dict[str, Any]:
    """Unread studies past their reading target, per (effective) priority, with their entry ids."""
    targets = effective_targets(session, policy)
    counts = dict.fromkeys(PRIORITIES, 0)
    entries = []
    for o in ordered(session, policy=policy, now=now, status="unread"):
        d = due_state(o.effective_priority, o.waiting_since, now, targets, False)
        if d["overdue"]:
            counts[o.effective_priority] += 1
            entries.append(
                {
                    "entry_id": o.entry.id,
                    "study_id": o.study.id,
                    "study_uid": o.study.study_uid,
                    "priority": o.effective_priority,
                    "due_at": d["due_at"].isoformat(),
                }
            )
    return {"counts": counts, "entries": entries}


# ---- everything, and the alerts ----------------------------------------------------------------


def report(
    session: Session,
    *,
    policy: TriagePolicy,
    now: dt.datetime,
    cards: dict[str, dict] | None = None,
    current_days: int = 7,
    reference_days: int = 56,
) -> dict[str, Any]:
    """The whole monitoring picture and its alerts (``status``: "ok" or "alert")."""
    w = Windows(now, current_days, reference_days)
    models = model_stats(session, windows=w, cards=cards)
    quiet = silence(session, windows=w)
    late = overdue(session, policy=policy, now=now)
    alerts = []
    for m in models:
        for c in m["checks"]:
            if c["status"] == "alert":
                alerts.append(
                    {"kind": c["metric"], "model": m["model"], "version": m["version"], "message": c["message"]}
                )
    for q in quiet:
        if q["silent"]:
            alerts.append({"kind": "silence", "pipeline": q["pipeline"], "message": q["messages"][0]})
        if q["stopped"]:
            alerts.append({"kind": "no_results", "pipeline": q["pipeline"], "message": q["messages"][-1]})
    for prio in ("STAT", "URGENT"):
        n = late["counts"][prio]
        if n:
            alerts.append(
                {
                    "kind": "overdue",
                    "priority": prio,
                    "count": n,
                    "message": f"{n} unread {prio} {'study is' if n == 1 else 'studies are'} past the reading "
                    f"target ({effective_targets(session, policy)[prio]:.0f} min)",
                }
            )
    return {
        "status": "alert" if alerts else "ok",
        "generated_at": now.isoformat(),
        "windows": {
            "current_start": w.current_start.isoformat(),
            "reference_start": w.reference_start.isoformat(),
            "current_days": current_days,
            "reference_days": reference_days,
        },
        "alerts": alerts,
        "models": models,
        "silence": quiet,
        "overdue": late,
        "turnaround": turnaround(session, policy=policy, windows=w),
        "drift": input_drift(session, windows=w),
    }


def load_cards(weights_dir) -> dict[str, dict[str, Any]]:
    """The model cards of the weights in use (name -> card; `models.cards.cards_in_use`: no model code imported)."""
    from models.cards import cards_in_use

    return cards_in_use(weights_dir)


def node_report(settings: Any, db: Any, policy: TriagePolicy, now: dt.datetime) -> dict[str, Any]:
    """`report` for a node: its database, its model cards and its monitoring windows (settings)."""
    cards = load_cards(settings.weights_dir)
    with db.session() as s:
        return report(
            s,
            policy=policy,
            now=now,
            cards=cards,
            current_days=int(settings.monitor_window_days),
            reference_days=int(settings.monitor_reference_days),
        )
