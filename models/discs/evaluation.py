"""Figures of ``lumbar_spine.discs`` on SPIDER-layout patients, from the image alone.

Every patient is graded from one mid-sagittal image (T2, else T2 SPACE, else T1: the pipeline's
preference), the discs located and named by the model itself; the dataset's crops are used only to
score the localisation where they exist. A labelled disc the model did not locate counts against
``located_rate`` and is left out of the grading figures (it gets no finding at inference either).

Keys: ``n_patients``, ``n_discs`` (graded discs scored), ``pfirrmann_accuracy``, ``pfirrmann_within_one``,
``pfirrmann_kappa_linear`` (+ ``_ci``: 95 % bootstrap over patients), ``pfirrmann_kappa_quadratic``,
per-grade accuracy (recall), confusion matrix (rows true grade 1-5, columns predicted), ``herniation_auc``,
``herniation_sensitivity`` / ``herniation_specificity`` (at the model's threshold), ``ece`` (of
P(herniation)), ``pfirrmann_ece`` (of the top grade's probability), localisation figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.discs.spider import Patient, Series
from models.tasks.spine_discs import LEVELS

LOCALISATION_MM = 15.0  # a level is named right when its centre lies within this distance of the true one


def linear_kappa(y_true: np.ndarray, y_pred: np.ndarray, n: int = 5) -> float:
    o = np.zeros((n, n))
    for t, p in zip(y_true, y_pred):
        o[int(t), int(p)] += 1
    w = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) / (n - 1)
    e = np.outer(o.sum(axis=1), o.sum(axis=0)) / max(o.sum(), 1)
    denom = (w * e).sum()
    return float(1.0 - (w * o).sum() / denom) if denom > 0 else float("nan")


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, n: int = 5) -> float:
    from models.evaluation import quadratic_kappa as qk

    return qk(y_true, y_pred, n)


def predict_patients(
    model, patients: Sequence[Patient], log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """One row per labelled disc of every patient's evaluation image (located or not)."""
    rows: list[dict[str, Any]] = []
    for i, pt in enumerate(patients):
        s = pt.eval_series()
        if s is None:
            continue
        rows += predict_series(model, pt, s)
        if log and (i + 1) % 20 == 0:
            log(f"  evaluated {i + 1}/{len(patients)} patients")
    return rows


def predict_series(model, pt: Patient, s: Series) -> list[dict[str, Any]]:
    canon = s.canonical()
    results = {r.level: r for r in model.analyse_canonical(canon)}
    located = {d.level: d for d in model.locate(canon)} if s.centres else {}
    sr, sc = s.spacing
    rows = []
    for level, lab in pt.discs.items():
        r = results.get(level)
        row: dict[str, Any] = {
            "patient": pt.id,
            "series": s.key,
            "level": level,
            "grade": lab.pfirrmann,
            "herniation": lab.herniation,
            "located": r is not None,
        }
        if r is not None:
            p = np.asarray(r.grade_probabilities, float)
            pred = int(r.grade) if r.grade else int(np.argmax(p)) + 1
            row.update(probs=p.tolist(), pred=pred, p_herniation=float(r.p_herniation))
        if level in s.centres:
            tr, tc = s.centres[level]
            d = located.get(level)
            if d is None:
                row["loc_error_mm"] = None
            else:
                row["loc_error_mm"] = float(np.hypot((d.row - tr) * sr, (d.col - tc) * sc))
        rows.append(row)
    return rows


def youden_threshold(p: np.ndarray, y: np.ndarray) -> float:
    from models.training import youden_threshold as yt

    return float(yt(np.asarray(p, float), np.asarray(y, int)))


def figures(rows: list[dict[str, Any]], *, threshold: float, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The figures of prediction rows (see the module docstring)."""
    from models.evaluation import auc, binary_ece, ece

    patients = sorted({r["patient"] for r in rows})
    graded = [r for r in rows if r["located"]]
    out: dict[str, Any] = {
        "n_patients": len(patients),
        "n_discs_labelled": len(rows),
        "n_discs": len(graded),
        "located_rate": round(len(graded) / len(rows), 4) if rows else None,
    }
    if graded:
        yt = np.array([r["grade"] - 1 for r in graded])
        yp = np.array([r["pred"] - 1 for r in graded])
        probs = np.array([r["probs"] for r in graded])
        ph = np.array([r["p_herniation"] for r in graded])
        yh = np.array([r["herniation"] for r in graded])
        pid = np.array([r["patient"] for r in graded])
        out["pfirrmann_accuracy"] = round(float((yt == yp).mean()), 4)
        out["pfirrmann_within_one"] = round(float((np.abs(yt - yp) <= 1).mean()), 4)
        out["pfirrmann_kappa_linear"] = round(linear_kappa(yt, yp), 4)
        out["pfirrmann_kappa_quadratic"] = round(quadratic_kappa(yt, yp), 4)
        # bootstrap over patients (the discs of one patient are not independent)
        groups = [np.flatnonzero(pid == p) for p in sorted(set(pid.tolist()))]
        rng = np.random.default_rng(seed)
        ks = []
        for _ in range(bootstrap):
            idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
            k = linear_kappa(yt[idx], yp[idx])
            if np.isfinite(k):
                ks.append(k)
        out["pfirrmann_kappa_linear_ci"] = (
            [round(float(v), 4) for v in np.percentile(ks, [2.5, 97.5])] if ks else [None, None]
        )
        out["pfirrmann_per_grade_accuracy"] = {
            str(g + 1): (round(float((yp[yt == g] == g).mean()), 4) if (yt == g).any() else None) for g in range(5)
        }
        out["pfirrmann_per_grade_n"] = {str(g + 1): int((yt == g).sum()) for g in range(5)}
        cm = np.zeros((5, 5), int)
        for t, p in zip(yt, yp):
            cm[t, p] += 1
        out["pfirrmann_confusion"] = cm.tolist()
        out["pfirrmann_ece"] = round(ece(probs.max(axis=1), (yt == yp).astype(float)), 4)
        out["pfirrmann_per_level_accuracy"] = {
            lv: round(float((yp[m] == yt[m]).mean()), 4)
            for lv in LEVELS
            if (m := np.array([r["level"] == lv for r in graded])).any()
        }
        out["herniation_positives"] = int(yh.sum())
        out["herniation_auc"] = round(float(auc(ph, yh)), 4) if 0 < yh.sum() < len(yh) else None
        pos = ph >= threshold
        out["herniation_threshold"] = round(float(threshold), 4)
        out["herniation_sensitivity"] = round(float(pos[yh == 1].mean()), 4) if (yh == 1).any() else None
        out["herniation_specificity"] = round(float((~pos[yh == 0]).mean()), 4) if (yh == 0).any() else None
        out["ece"] = round(float(binary_ece(ph, yh)), 4)
    else:
        for key in (
            "pfirrmann_accuracy",
            "pfirrmann_within_one",
            "pfirrmann_kappa_linear",
            "herniation_auc",
            "herniation_sensitivity",
            "herniation_specificity",
            "ece",
        ):
            out[key] = None
        out["pfirrmann_kappa_linear_ci"] = [None, None]
    loc = [r for r in rows if "loc_error_mm" in r]
    if loc:
        errs = np.array([np.inf if r["loc_error_mm"] is None else r["loc_error_mm"] for r in loc])
        out["localisation"] = {
            "n_discs": len(loc),
            "n_series": len({r["series"] for r in loc}),
            "level_named_within_15mm": round(float((errs <= LOCALISATION_MM).mean()), 4),
            "median_error_mm": round(float(np.median(errs)), 2) if np.isfinite(np.median(errs)) else None,
            "located_rate": round(float(np.isfinite(errs).mean()), 4),
        }
    else:
        out["localisation"] = None
    return out


def evaluate_spider(
    model, root, *, bootstrap: int = 1000, split: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """``msknode evaluate lumbar_spine.discs --data spider:PATH``: every patient of the folder (or one split)."""
    from models.discs.spider import load_spider

    patients = load_spider(root, centres=True)
    if split is not None:
        patients = [p for p in patients if p.split == split]
    if log:
        log(f"evaluating {len(patients)} patients of {root}")
    rows = predict_patients(model, patients, log=log)
    out = figures(rows, threshold=model.threshold, bootstrap=bootstrap)
    out["evaluation"] = (
        "each patient graded from one mid-sagittal image (T2, else T2 SPACE, else T1), discs located and named "
        "by the model; localisation scored against the crop-derived disc centres where crops exist"
    )
    return out
