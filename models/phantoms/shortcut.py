"""Shortcut baseline: can global intensity / size statistics predict a label?

If a logistic regression on these few numbers scores well, the phantoms leak the label
(pathology changes something global) and a model could learn the shortcut instead of the
lesion. ``shortcut_auc`` must stay <= 0.65 on every task (SPEC.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.types import Volume

FEATURE_NAMES = (
    "n_slices",
    "rows",
    "cols",
    "slice_spacing",
    "row_spacing",
    "col_spacing",
    "extent_mm3",
    "mean",
    "std",
    "p1",
    "p5",
    "p25",
    "p50",
    "p75",
    "p95",
    "p99",
    "max",
    "bright_fraction",
    "fg_fraction",
    "fg_mean",
    "fg_std",
    "skewness",
    "kurtosis",
    "cv",
)


def global_features(volume: Volume | np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Global intensity and size statistics of one volume (see FEATURE_NAMES)."""
    if isinstance(volume, Volume):
        arr = volume.array
        spacing = volume.spacing
    else:
        arr = np.asarray(volume)
        spacing = spacing or (1.0, 1.0, 1.0)
    a = arr.astype(np.float32, copy=False)
    flat = a.reshape(-1)
    if flat.size > 400_000:  # subsample for speed; statistics are global
        flat = flat[:: flat.size // 400_000 + 1]
    pct = np.percentile(flat, [1, 5, 25, 50, 75, 95, 99])
    mean, std = float(flat.mean()), float(flat.std()) + 1e-6
    mx = float(flat.max())
    fg_thr = 0.2 * pct[-1]
    fg = flat[flat > fg_thr]
    z = (flat - mean) / std
    nk, nj, ni = a.shape
    sk, sj, si = (float(s) for s in spacing)
    return np.array(
        [
            nk,
            nj,
            ni,
            sk,
            sj,
            si,
            nk * nj * ni * sk * sj * si,
            mean,
            std,
            *pct,
            mx,
            float((flat > 0.5 * pct[-1]).mean()),
            float(fg.size / flat.size),
            float(fg.mean()) if fg.size else 0.0,
            float(fg.std()) if fg.size else 0.0,
            float((z**3).mean()),
            float((z**4).mean()),
            std / (abs(mean) + 1e-6),
        ],
        dtype=np.float64,
    )


def shortcut_auc(
    features: np.ndarray, labels: Sequence[int] | np.ndarray, *, folds: int = 5, repeats: int = 3, seed: int = 0
) -> float:
    """Cross-validated ROC AUC of a standardized, L2-regularized logistic regression on
    ``features`` (n, d) for binary ``labels``; mean over repeated stratified folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import RepeatedStratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if len(np.unique(y)) < 2:
        raise ValueError("shortcut_auc needs both classes")
    n_min = int(np.bincount(y).min())
    if n_min < 2:
        return float("nan")  # a class with one case cannot be on both sides of a fold: no cross-validated AUC
    folds = max(2, min(folds, n_min))
    # log-compress the scale-like features so a few extreme volumes do not dominate
    x = np.sign(x) * np.log1p(np.abs(x))
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    scores = np.zeros(len(y))
    aucs = []
    for train, test in cv.split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        clf.fit(x[train], y[train])
        scores[test] = clf.predict_proba(x[test])[:, 1]
        if len(np.unique(y[test])) == 2:
            aucs.append(roc_auc_score(y[test], scores[test]))
    return float(np.mean(aucs))
