"""Evaluation: metrics with 95 % bootstrap confidence intervals, through the inference path.

Every case goes through the QC gate (refusals are counted as ``qc_refused``) and is scored
anyway, so refusing hard cases cannot flatter a metric. JSON keys (those that apply):

``n``, ``qc_refused``, ``auc``, ``auc_ci``, ``sensitivity``, ``specificity``, ``ece``,
``balanced_accuracy``, ``kappa`` (minimum over levels), ``kappa_per_level``, ``kappa_ci``,
``kappa_ci_per_level``,
``psnr_gain_db``, ``ssim_gain``, ``saliency_hit_rate``, ``shortcut_auc``; plus
``sensitivity_ci``, ``specificity_ci``, ``threshold`` and the model identity.

- AUC: Mann-Whitney; sensitivity/specificity at the model's operating threshold.
- ECE: 10 equal-width bins of P(finding) (binary) or of the top-class confidence.
- Balanced accuracy: mean per-class recall (multi-class head).
- Kappa: quadratic-weighted Cohen's kappa per grading head (level).
- Saliency hit rate: share of cases with a planted lesion whose heatmap peak lies within
  10 mm (patient coordinates) of the lesion centre (phantoms only).
- Shortcut AUC: the phantom shortcut baseline (`models.phantoms.shortcut`, logistic
  regression on global intensity/size statistics, cross-validated) on the same volumes.
- Super-resolution: foreground PSNR/SSIM gain over tricubic with the documented
  degradation model (`models.superres.quality.evaluate_cases`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.data import DataSpec, open_cases, parse_spec
from models.errors import DataSpecError
from models.tasks.base import TaskSpec

HIT_RADIUS_MM = 10.0
N_BOOTSTRAP = 1000


# --- metrics ----------------------------------------------------------------------------------


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from models.training import binary_auc

    return binary_auc(np.asarray(scores, float), np.asarray(labels, int))


def bootstrap_ci(fn: Callable[[np.ndarray], float], n: int, *, reps: int = N_BOOTSTRAP, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of ``fn(indices)`` over resamples of n cases."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        v = fn(idx)
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of |accuracy - confidence| weighted by share."""
    conf = np.asarray(confidence, float)
    corr = np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        m = (conf >= edges[b]) & ((conf < edges[b + 1]) if b < bins - 1 else (conf <= edges[b + 1]))
        if m.any():
            total += m.mean() * abs(corr[m].mean() - conf[m].mean())
    return float(total)


def binary_ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE of P(finding) against the label (reliability of the probability itself)."""
    return ece(np.asarray(p, float), np.asarray(y, float), bins)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in range(n_classes) if (y_true == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    o = np.zeros((n_classes, n_classes))
    for t, p in zip(y_true, y_pred):
        o[int(t), int(p)] += 1
    w = np.array([[(i - j) ** 2 for j in range(n_classes)] for i in range(n_classes)], float) / (n_classes - 1) ** 2
    e = np.outer(o.sum(axis=1), o.sum(axis=0)) / max(o.sum(), 1)
    denom = (w * e).sum()
    return float(1.0 - (w * o).sum() / denom) if denom > 0 else float("nan")


# --- classifier evaluation ------------------------------------------------------------------------


def _phantom_job(args):
    task_name, seed = args
    import torch

    torch.set_num_threads(1)
    from models.data import phantom_case
    from models.tasks import TASKS

    case, _ = phantom_case(TASKS[task_name], seed)
    case.target.lesion = None  # not needed for evaluation; keeps the pickle small
    return case


def iter_cases(spec: DataSpec, task: TaskSpec, workers: int = 1) -> Iterable:
    if spec.kind == "synthetic" and workers > 1 and spec.n > 1:
        import multiprocessing as mp

        jobs = [(task.name, s) for s in range(spec.seed, spec.seed + spec.n)]
        with mp.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap(_phantom_job, jobs, chunksize=2)
    else:
        yield from open_cases(spec, task)


def evaluate_classifier(
    model,
    spec: DataSpec,
    *,
    gate=None,
    workers: int = 1,
    saliency: bool = True,
    log: Callable[[str], None] | None = None,
    bootstrap: int = N_BOOTSTRAP,
) -> dict[str, Any]:
    """Score a ClassifierModel on every case of ``spec`` (QC refusals counted, not skipped)."""
    from models.phantoms.shortcut import global_features, shortcut_auc

    task: TaskSpec = model.task
    rows = []
    feats = []
    refused = 0
    reasons: dict[str, int] = {}
    t0 = time.time()
    for i, case in enumerate(iter_cases(spec, task, workers)):
        if gate is not None:
            qc = gate.check(case.volume, task)
            if not qc.accepted:
                refused += 1
                reasons[qc.reason] = reasons.get(qc.reason, 0) + 1
        want_sal = saliency and bool(case.target.lesion_centers_mm)
        results = model.analyse(case.volume, extras=case.extras, saliency=want_sal, uncertainty=False)
        rows.append((case, results))
        if spec.kind == "synthetic":
            feats.append(global_features(case.volume))
        if log and (i + 1) % 50 == 0:
            log(f"evaluated {i + 1} cases in {time.time() - t0:.0f} s")
    if not rows:
        raise DataSpecError(f"{spec}: no cases")
    out: dict[str, Any] = {"n": len(rows), "qc_refused": refused}
    if reasons:
        out["qc_reasons"] = reasons
    heads = task.heads
    if task.kind == "binary":
        head = heads[0]
        n_cls = len(head.classes)
        neg = [head.classes.index(c) for c in head.negative]
        p = np.array([r[1][0].p_finding for r in rows], float)
        allowed = np.array([c.target.allowed[0, :n_cls] for c, _ in rows])
        known = ~allowed.all(axis=1)
        y = (~allowed[:, neg].any(axis=1)).astype(int)
        p, y = p[known], y[known]
        thr = float(model.threshold)
        pred = p >= thr
        out["auc"] = round(auc(p, y), 4)
        out["auc_ci"] = bootstrap_ci(lambda idx: auc(p[idx], y[idx]), len(p), reps=bootstrap)
        sens = lambda idx: float(pred[idx][y[idx] == 1].mean()) if (y[idx] == 1).any() else float("nan")  # noqa: E731
        spec_ = lambda idx: float((~pred[idx])[y[idx] == 0].mean()) if (y[idx] == 0).any() else float("nan")  # noqa: E731
        all_idx = np.arange(len(p))
        out["sensitivity"] = round(sens(all_idx), 4)
        out["sensitivity_ci"] = bootstrap_ci(sens, len(p), reps=bootstrap, seed=1)
        out["specificity"] = round(spec_(all_idx), 4)
        out["specificity_ci"] = bootstrap_ci(spec_, len(p), reps=bootstrap, seed=2)
        out["ece"] = round(binary_ece(p, y), 4)
        out["threshold"] = round(thr, 4)
        pos_cls = [i for i in range(n_cls) if i not in neg]
        if len(pos_cls) > 1:  # which positive class (e.g. medial / lateral meniscus), among cases with a known one
            al = np.array([c.target.allowed[0, :n_cls] for c, _ in rows])
            one = (al.sum(axis=1) == 1) & al[:, pos_cls].any(axis=1)
            if one.any():
                truth = al[one].argmax(axis=1)
                guess = np.array(
                    [
                        head.classes.index(task.positive_class(res[0], case.volume))
                        for (case, res), keep in zip(rows, one)
                        if keep
                    ]
                )
                out["positive_class_accuracy"] = round(float(np.mean(truth == guess)), 4)
                out["positive_class_cases"] = int(one.sum())
        if spec.kind == "synthetic" and len(np.unique(y)) == 2:
            out["shortcut_auc"] = round(shortcut_auc(np.stack(feats)[known], y), 4)
    else:
        kappas = {}
        levels = []  # grading: (name, exact-label mask, y_true, y_pred, n_classes) over all cases, for the CIs
        bal = []
        confs, corrects = [], []
        for h, head in enumerate(heads):
            n_cls = len(head.classes)
            allowed = np.array([c.target.allowed[h, :n_cls] for c, _ in rows])
            exact = allowed.sum(axis=1) == 1
            y_true = allowed.argmax(axis=1)[exact]
            probs = np.array([r[1][h].probabilities for r in rows])[exact]
            y_pred = probs.argmax(axis=1)
            confs.append(probs.max(axis=1))
            corrects.append(y_pred == y_true)
            if task.kind == "grading":
                kappas[head.name] = round(quadratic_kappa(y_true, y_pred, n_cls), 4)
                all_probs = np.array([r[1][h].probabilities for r in rows])
                levels.append((head.name, exact, allowed.argmax(axis=1), all_probs.argmax(axis=1), n_cls))
            else:
                bal.append(balanced_accuracy(y_true, y_pred, n_cls))
        out["ece"] = round(ece(np.concatenate(confs), np.concatenate(corrects)), 4)
        if task.kind == "grading":
            out["kappa_per_level"] = kappas
            out["kappa"] = min(kappas.values()) if kappas else float("nan")

            def level_kappa(idx, level):
                _, ex, yt, yp, n_cls = level
                return quadratic_kappa(yt[idx][ex[idx]], yp[idx][ex[idx]], n_cls)

            if levels:
                out["kappa_ci"] = bootstrap_ci(
                    lambda idx: min(level_kappa(idx, lv) for lv in levels), len(rows), reps=bootstrap
                )
                out["kappa_ci_per_level"] = {
                    lv[0]: bootstrap_ci(functools.partial(level_kappa, level=lv), len(rows), reps=bootstrap, seed=3)
                    for lv in levels
                }
        else:
            out["balanced_accuracy"] = round(float(np.mean(bal)), 4)
        if spec.kind == "synthetic":
            # shortcut baseline on "any finding" of the first head (and per grading head: the minimum is not
            # meaningful; report the worst, i.e. the highest, AUC over heads)
            aucs = []
            for h, head in enumerate(heads):
                if not head.negative:
                    continue
                n_cls = len(head.classes)
                neg = [head.classes.index(c) for c in head.negative]
                allowed = np.array([c.target.allowed[h, :n_cls] for c, _ in rows])
                y = (~allowed[:, neg].any(axis=1)).astype(int)
                if len(np.unique(y)) == 2:
                    aucs.append(shortcut_auc(np.stack(feats), y))
            if aucs:
                out["shortcut_auc"] = round(float(max(aucs)), 4)
    if saliency:
        hits = []
        for case, results in rows:
            for r in results:
                centre = case.target.lesion_centers_mm.get(r.head.name)
                if centre is None or r.peak_mm is None:
                    if centre is not None:
                        hits.append(False)
                    continue
                hits.append(float(np.linalg.norm(np.subtract(r.peak_mm, centre))) <= HIT_RADIUS_MM)
        if hits:
            out["saliency_hit_rate"] = round(float(np.mean(hits)), 4)
            out["saliency_cases"] = len(hits)
    out["seconds"] = round(time.time() - t0, 1)
    if task.kind == "binary":
        out["cases_positive"], out["cases_negative"] = int((y == 1).sum()), int((y == 0).sum())
    warnings = small_sample_warnings(out["n"], out.get("cases_positive"), out.get("cases_negative"))
    if warnings:
        out["warnings"] = warnings
    return out


SMALL_SAMPLE_CASES = 30  # below this many cases a bootstrap interval says little
SMALL_SAMPLE_CLASS = 10  # ... or this many of a class


def small_sample_warnings(n: int, positives: int | None = None, negatives: int | None = None) -> list[str]:
    """Warnings for figures on few cases: a percentile bootstrap over 4 cases can give [1.0, 1.0], which is not
    certainty but the absence of evidence."""
    out = []
    if n < SMALL_SAMPLE_CASES:
        out.append(
            f"only {n} cases: the 95 % bootstrap intervals are unreliable below {SMALL_SAMPLE_CASES} cases "
            "(an interval such as [1.0, 1.0] reflects the few cases, not certainty)"
        )
    for name, k in (("positive", positives), ("negative", negatives)):
        if k is not None and k < SMALL_SAMPLE_CLASS:
            out.append(f"only {k} {name} cases: sensitivity/specificity/AUC and their intervals rest on them")
    return out


def finite_or_none(v: Any) -> Any:
    """The result with every non-finite float (NaN, inf) as None, recursively: strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_or_none(x) for x in v]
    return v


# --- super-resolution -------------------------------------------------------------------------------


def evaluate_superres(model, spec: DataSpec) -> dict[str, Any]:
    """Super-resolution on fresh knee phantoms (`models.superres.quality.evaluate_synthetic`: refuses the
    training seeds)."""
    from models.errors import SuperResError
    from models.superres.quality import evaluate_synthetic

    if spec.kind != "synthetic":
        raise DataSpecError("super-resolution evaluates on synthetic:N:SEED (truth = noise-free phantoms)")
    try:
        return dict(evaluate_synthetic(model, spec.n, spec.seed, anatomy="knee"))
    except SuperResError as e:
        raise DataSpecError(str(e)) from None


# --- real series without labels (realdir:PATH) --------------------------------------------------------


def _distribution(values: np.ndarray) -> dict[str, Any]:
    if not len(values):
        return {}
    q = np.percentile(values, [0, 25, 50, 75, 100])
    hist, _ = np.histogram(values, bins=10, range=(0.0, 1.0))
    return {
        "min": round(float(q[0]), 4),
        "p25": round(float(q[1]), 4),
        "median": round(float(q[2]), 4),
        "p75": round(float(q[3]), 4),
        "max": round(float(q[4]), 4),
        "histogram_0_1_10": hist.tolist(),
    }


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _group_counts(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault(r[key] or "unknown", {"n": 0, "qc_accepted": 0, "qc_refused": 0, "qc_reasons": {}})
        g["n"] += 1
        if r["accepted"]:
            g["qc_accepted"] += 1
        else:
            g["qc_refused"] += 1
            g["qc_reasons"][r["reason"]] = g["qc_reasons"].get(r["reason"], 0) + 1
    for g in groups.values():
        g["accepted_rate"] = _rate(g["qc_accepted"], g["n"])
    return dict(sorted(groups.items()))


def evaluate_realdir_classifier(
    model, spec: DataSpec, *, gate, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """QC outcome and output distribution of a classifier on unlabelled real series.

    Every series goes through the QC gate as at a site; accepted series are analysed (no
    saliency, no uncertainty). The false-positive rate counts series the sidecar marks
    ``normal`` that the model calls positive (any head with a non-negative class).
    """
    from models.realdir import read_realdir

    task: TaskSpec = model.task
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for rs in read_realdir(spec.required_path()):
        qc = gate.check(rs.volume, task) if gate is not None else None
        accepted = qc is None or qc.accepted
        row: dict[str, Any] = {
            "key": rs.key,
            "anatomy": rs.anatomy_group,
            "source": rs.source,
            "normal": rs.normal,
            "accepted": accepted,
            "reason": None if accepted or qc is None else qc.reason,
        }
        if accepted:
            results = model.analyse(rs.volume, saliency=False, uncertainty=False)
            row["p_finding"] = float(results[0].p_finding) if task.kind == "binary" else None
            row["classes"] = [r.head.classes[int(np.argmax(r.probabilities))] for r in results]
            row["positive"] = any(c not in r.head.negative for c, r in zip(row["classes"], results) if r.head.negative)
        rows.append(row)
        if log:
            log(f"{rs.key}: " + ("accepted" if accepted else f"refused ({row['reason']})"))
    if not rows:
        raise DataSpecError(f"{spec}: no series")
    acc = [r for r in rows if r["accepted"]]
    reasons: dict[str, int] = {}
    for r in rows:
        if not r["accepted"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    own = [r for r in rows if r["anatomy"] == task.anatomy]
    out: dict[str, Any] = {
        "n": len(rows),
        "qc_accepted": len(acc),
        "qc_refused": len(rows) - len(acc),
        "qc_reasons": reasons,
        "n_own_anatomy": len(own),
        "own_anatomy_accepted_rate": _rate(sum(r["accepted"] for r in own), len(own)),
        "by_anatomy": _group_counts(rows, "anatomy"),
        "by_source": _group_counts(rows, "source"),
        "positive_rate": _rate(sum(r["positive"] for r in acc), len(acc)),
    }
    if task.kind == "binary":
        out["p_finding"] = _distribution(np.array([r["p_finding"] for r in acc], float))
        out["threshold"] = round(float(model.threshold), 4)
    else:
        out["predicted_classes"] = {
            head.name: {c: sum(1 for r in acc if r["classes"][h] == c) for c in head.classes}
            for h, head in enumerate(task.heads)
        }
    normal = [r for r in acc if r["normal"]]
    out["normal_accepted"] = len(normal)
    out["false_positive_rate"] = _rate(sum(r["positive"] for r in normal), len(normal))
    out["series"] = [
        {
            k: v
            for k, v in r.items()
            if k in ("key", "anatomy", "accepted", "reason", "p_finding", "classes", "positive")
        }
        for r in rows
    ]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def evaluate_realdir_superres(model, spec: DataSpec, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Super-resolution on unlabelled real series: every other slice taken away and restored.

    Each series passes the model's input QC; then the slices 0, 2, 4, ... are its input and the slices
    between two of them are restored and scored against what was taken away, for the model and for
    tricubic interpolation (`models.superres.quality.restore_series`). ``psnr_gain_db`` / ``ssim_gain``:
    means over series of model - tricubic with 95 % bootstrap CIs (``*_ci``); ``consistency_error``: the
    data-consistency error of every scored series (and its mean and max); ``by_source``: the same per
    sidecar source (else anatomy group)."""
    from models.errors import SuperResError
    from models.realdir import read_realdir
    from models.superres.inference import CONSISTENCY_TOLERANCE, _input_qc
    from models.superres.quality import restore_series, summarise_restore

    rows: list[dict[str, Any]] = []
    for rs in read_realdir(spec.required_path()):
        qc = _input_qc(rs.volume)
        row: dict[str, Any] = {
            "key": rs.key,
            "anatomy": rs.anatomy_group,
            "source": rs.source or rs.anatomy_group,
            "accepted": qc.accepted,
            "reason": qc.reason,
        }
        if qc.accepted and rs.volume.shape[0] < 3:
            row.update(accepted=False, reason="too_few_slices")
        if row["accepted"]:
            try:
                r = restore_series({"model": model}, rs.volume.array)
            except SuperResError as e:
                row.update(accepted=False, reason="no_foreground")
                if log:
                    log(f"{rs.key}: {e}")
            else:
                err = float(r["model"]["consistency_error"])
                row.update(
                    {
                        "slices_kept": r["kept"],
                        "slices_scored": r["scored"],
                        "psnr_db": r["model"]["psnr"],
                        "psnr_tricubic_db": r["psnr_tricubic"],
                        "ssim": r["model"]["ssim"],
                        "ssim_tricubic": r["ssim_tricubic"],
                        "psnr_gain_db": r["model"]["psnr"] - r["psnr_tricubic"],
                        "ssim_gain": r["model"]["ssim"] - r["ssim_tricubic"],
                        "detail_gain": r["model"]["detail_gain"],
                        "consistency_error": err,
                        "consistency_passed": bool(err <= CONSISTENCY_TOLERANCE),
                        "_restore": r,
                    }
                )
        rows.append(row)
        if log:
            log(
                f"{rs.key}: psnr gain {row['psnr_gain_db']:+.2f} dB, ssim gain {row['ssim_gain']:+.4f}"
                if "psnr_gain_db" in row
                else f"{rs.key}: refused ({row['reason']})"
            )
    if not rows:
        raise DataSpecError(f"{spec}: no series")
    acc = [r for r in rows if r["accepted"]]
    reasons: dict[str, int] = {}
    for r in rows:
        if not r["accepted"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1

    def figures(group: list[dict[str, Any]]) -> dict[str, Any]:
        s = summarise_restore([r["_restore"] for r in group], "model")
        return {
            "n": s["n"],
            "psnr_gain_db": round(s["psnr_gain_db"], 4),
            "psnr_gain_db_ci": [round(v, 4) for v in s["psnr_gain_db_ci"]],
            "ssim_gain": round(s["ssim_gain"], 5),
            "ssim_gain_ci": [round(v, 5) for v in s["ssim_gain_ci"]],
            "psnr_db": round(s["psnr_db"], 3),
            "psnr_tricubic_db": round(s["psnr_reference_db"], 3),
            "ssim": round(s["ssim"], 4),
            "ssim_tricubic": round(s["ssim_reference"], 4),
            "psnr_gain_positive_share": round(s["psnr_gain_positive_share"], 4),
            "detail_gain_mean": round(s["detail_gain_mean"], 4),
            "consistency_error_mean": s["consistency_error_mean"],
            "consistency_error_max": s["consistency_error_max"],
        }

    out: dict[str, Any] = {
        "n": len(rows),
        "qc_accepted": len(acc),
        "qc_refused": len(rows) - len(acc),
        "qc_reasons": reasons,
        "by_anatomy": _group_counts(rows, "anatomy"),
        "method": (
            "every other slice taken away (input: slices 0, 2, 4, ...), the slices between two kept ones "
            "restored (model: mean of its two x2 sub-slices around the gap; tricubic: cubic B-spline at the "
            "gap) and scored against the removed slices: foreground PSNR / SSIM without the overlay border "
            "band; means over series of model - tricubic, 95 % bootstrap CIs over series"
        ),
        "consistency_tolerance": CONSISTENCY_TOLERANCE,
        "consistency_passed_rate": _rate(sum(r["consistency_passed"] for r in acc), len(acc)),
    }
    if acc:
        out.update(figures(acc))
        out["consistency_error"] = [r["consistency_error"] for r in acc]
        sources = sorted({r["source"] for r in rows})
        counts = _group_counts(rows, "source")
        out["by_source"] = {
            src: {**counts[src], **{("n_scored" if k == "n" else k): v for k, v in figures(group).items()}}
            for src in sources
            if (group := [r for r in acc if r["source"] == src])
        }
    else:
        out["consistency_error_max"] = None
    keys = (
        "key", "anatomy", "source", "accepted", "reason", "slices_scored", "psnr_gain_db", "ssim_gain",
        "detail_gain", "consistency_error", "consistency_passed",
    )  # fmt: skip
    out["series"] = [{k: r[k] for k in keys if k in r} for r in rows]
    return out


def evaluate_realdir_anatomy(registry, spec: DataSpec, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The QC gate on unlabelled real series, as every shipped classifier would apply it.

    A series of a served anatomy (knee, shoulder, lumbar spine) counts as accepted when the
    gate accepts it for every classifier of its anatomy that reads its plane; a series of any
    other anatomy counts as refused when the gate refuses it for every classifier that reads
    its plane. Series whose plane no classifier reads are reported, not counted.
    """
    from models.realdir import read_realdir
    from models.tasks import TASKS

    gate = registry.gate()
    rows: list[dict[str, Any]] = []
    for rs in read_realdir(spec.required_path()):
        group = rs.anatomy_group
        tasks = [
            t
            for t in TASKS.values()
            if t.input.plane == rs.plane and (group not in TASKS_ANATOMIES or t.anatomy == group)
        ]
        results = {t.name: gate.check(rs.volume, t) for t in tasks}
        pred = gate.anatomy.predict(rs.volume, rs.plane) if gate.anatomy is not None else None
        row: dict[str, Any] = {
            "key": rs.key,
            "anatomy": group,
            "plane": rs.plane,
            "source": rs.source,
            "models": {k: (None if q.accepted else q.reason) for k, q in results.items()},
            "pixels": pred["label"] if pred else None,
        }
        if not tasks:
            row["counted"] = False
        elif group in TASKS_ANATOMIES:
            row["counted"], row["accepted"] = True, all(q.accepted for q in results.values())
        else:
            row["counted"], row["accepted"] = True, not any(q.accepted for q in results.values())
        rows.append(row)
        if log:
            log(f"{rs.key}: {row}")
    if not rows:
        raise DataSpecError(f"{spec}: no series")
    out: dict[str, Any] = {"n": len(rows), "accepted_rate": {}, "refused_rate": {}, "counts": {}}
    for g in sorted({r["anatomy"] for r in rows}):
        counted = [r for r in rows if r["anatomy"] == g and r["counted"]]
        key = "accepted_rate" if g in TASKS_ANATOMIES else "refused_rate"
        out[key][g] = _rate(sum(r["accepted"] for r in counted), len(counted))
        out["counts"][g] = {"series": sum(r["anatomy"] == g for r in rows), "counted": len(counted)}
    out["series"] = rows
    return out


TASKS_ANATOMIES = ("knee", "shoulder", "lumbar_spine")


def evaluate(
    name: str,
    data: str | DataSpec,
    *,
    registry,
    weights: Path | None = None,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
    bootstrap: int = N_BOOTSTRAP,
    loso: bool = False,
) -> dict[str, Any]:
    """Evaluate model ``name`` (registry weights, or a checkpoint ``weights`` with its .sha256) on a data spec.
    ``loso``: qc.anatomy on ``realdata:PATH`` only, leave-one-source-out retraining (`models.qc_evaluation`)."""
    from models.protocol import verify_weights
    from models.registry import MODEL_ANATOMY, MODEL_SUPERRES

    spec = parse_spec(data) if isinstance(data, str) else data
    entry = registry.entry(name)
    if weights is not None:
        weights = Path(weights)
        model = entry.loader(registry, weights, verify_weights(weights))
    else:
        model = registry.get(name)
    if (spec.kind == "spider") != (name == "lumbar_spine.discs"):
        raise DataSpecError(f"{spec}: lumbar_spine.discs evaluates on spider:PATH, and spider:PATH serves it only")
    if spec.kind == "spider":
        from models.discs.evaluation import evaluate_spider

        result = evaluate_spider(model, spec.required_path(), bootstrap=bootstrap, log=log)
        return finite_or_none(
            {
                "model": name,
                "version": model.info.version,
                "weights_sha256": model.info.weights_sha256,
                "data": str(spec),
                **result,
            }
        )
    if loso and not (name == MODEL_ANATOMY and spec.kind == "realdata"):
        raise DataSpecError("--loso is for qc.anatomy on realdata:PATH")
    if name == MODEL_ANATOMY and spec.kind in ("synthetic", "realdata"):
        import torch

        from models.qc_evaluation import evaluate_realdata, evaluate_synthetic

        if spec.kind == "synthetic":
            result = evaluate_synthetic(model, spec.n, spec.seed, workers=workers, log=log)
        else:
            result = evaluate_realdata(
                model, spec.path, loso=loso, threads=torch.get_num_threads(), workers=workers, log=log
            )
        version = (
            str(registry.card(name).get("version", entry.version))
            if weights is None
            else str(model.metadata.get("version", entry.version))
        )
        return {"model": name, "version": version, "weights_sha256": model.sha256, "data": str(spec), **result}
    if spec.kind == "realdata":
        raise DataSpecError(
            f"{spec}: the real corpus is labelled by anatomy only; evaluate qc.anatomy on it, or "
            "other models on realdir:PATH"
        )
    if spec.kind == "realdir" and name == MODEL_SUPERRES:
        result = evaluate_realdir_superres(model, spec, log=log)
    elif spec.kind == "realdir" and name == MODEL_ANATOMY:
        result = evaluate_realdir_anatomy(registry, spec, log=log)
    elif spec.kind == "realdir":
        result = evaluate_realdir_classifier(model, spec, gate=registry.gate(), log=log)
    elif name == MODEL_SUPERRES:
        result = evaluate_superres(model, spec)
    else:
        result = evaluate_classifier(model, spec, gate=registry.gate(), workers=workers, log=log, bootstrap=bootstrap)
    info = model.info if hasattr(model, "info") else registry.info(name)
    return finite_or_none(
        {"model": name, "version": info.version, "weights_sha256": info.weights_sha256, "data": str(spec), **result}
    )
