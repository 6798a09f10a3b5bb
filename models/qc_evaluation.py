"""Evaluating ``qc.anatomy``: the pixel verdict of the QC gate on phantoms and on the real corpus.

``msknode evaluate qc.anatomy --data synthetic:N:SEED`` — fresh phantoms of the nine
anatomy/plane classes and synthetic other anatomy (`models.qc_training.phantom_items`):
``accuracy``, ``per_class_recall``, ``accepted_rate`` (phantoms of a served anatomy accepted
when claimed as what they are), ``refused_rate`` (synthetic other anatomy refused when
claimed as each served anatomy), ``cross_anatomy_refused_rate``.

``msknode evaluate qc.anatomy --data realdata:PATH [--loso]`` — the labelled real corpus
(`models.realdata`; ``realdata:auto`` finds it beside the checkout):

- every series of a served anatomy is claimed as its own anatomy in its own plane (the plane
  its header would carry): ``accepted_rate`` per anatomy and per source;
- every series of another anatomy (elbow, hip, brain, abdomen) is claimed as each served
  anatomy in its own plane: ``refused_rate`` (share of those claims refused), per claimed
  anatomy and per source, and ``refused_all_rate`` (series refused for every claim);
- ``cross_anatomy_refused_rate``: served-anatomy series claimed as another served anatomy.

The shipped model learned from most of the corpus, so those figures are not an independent
estimate; ``held_out`` repeats them on the groups it never saw (the held quarter). The
independent figures come from ``--loso``: for each source, a model trained (same recipe) without
it, its thresholds chosen (`choose_rule`) on the *other* folds' predictions of the sources those
folds left out — never on the tested source — and tested on all of the source;
``loso.pooled`` counts every test series once. The rule chosen on all folds is the one the
shipped model carries (`models.qc_training.set_loso_rule`).

A series is accepted when the pixel stage of the gate (`models.qc.decide`: contradiction,
plane, support, distance) accepts it; the header checks (slice count, spacing, obliquity) and the motion
detector are not part of these figures (single slices and screen exports have no header).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataSpecError
from models.qc import ANATOMIES, ANATOMY_CLASSES, QCGate

ROUND = 4


def _rate(num: int, den: int) -> float | None:
    return round(num / den, ROUND) if den else None


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95 % Wilson score interval of k successes in n."""
    if not n:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return [round(max(0.0, c - h), ROUND), round(min(1.0, c + h), ROUND)]


def _predict(clf, item) -> dict[str, Any]:
    return clf.predict_input(np.asarray(item.infer, np.float32)[:, None])


def judge_items(gate: QCGate, items: Iterable, *, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per item: the prediction and the verdict on every claim made of it."""
    rows = []
    for it in items:
        pred = _predict(gate.anatomy, it)
        claims = {}
        for anatomy in ANATOMIES:
            v = gate.judge(pred, anatomy, it.plane)
            claims[anatomy] = {"accepted": v.accepted, "reason": v.reason}
        own = ANATOMY_CLASSES[it.label].split("/")[0] if it.label else None
        rows.append(
            {
                "key": it.key,
                "source": it.source,
                "group": it.group,
                "anatomy": it.anatomy,
                "served": own,
                "plane": it.plane,
                "label": ANATOMY_CLASSES[it.label],
                "predicted": pred["label"],
                "p": round(pred["probability"], 3),
                "anatomy_probabilities": {k: round(v, 3) for k, v in pred["anatomy_probabilities"].items()},
                "distance": round(pred["anatomy_distances"][own], 2) if own else None,
                "claims": claims,
                "notes": getattr(it, "notes", ""),
            }
        )
        if log:
            log(
                f"{it.key}: {pred['label']} p={pred['probability']:.2f} "
                + (
                    "accepted"
                    if own and claims[own]["accepted"]
                    else f"{claims[own]['reason']}"
                    if own
                    else f"refused {sum(not c['accepted'] for c in claims.values())}/3"
                )
            )
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """accepted_rate per served anatomy, refused_rate of other anatomy, cross-anatomy refusal, per source."""
    out: dict[str, Any] = {
        "n": len(rows),
        "accepted_rate": {},
        "refused_rate": None,
        "refused_rate_by_claim": {},
        "refused_all_rate": None,
        "cross_anatomy_refused_rate": None,
        "counts": {},
        "reasons": {},
        "by_source": {},
    }
    served = [r for r in rows if r["served"]]
    other = [r for r in rows if not r["served"]]
    for a in ANATOMIES:
        rs = [r for r in served if r["served"] == a]
        if rs:
            out["accepted_rate"][a] = _rate(sum(r["claims"][a]["accepted"] for r in rs), len(rs))
            out["counts"][a] = len(rs)
    if served:
        k = sum(r["claims"][r["served"]]["accepted"] for r in served)
        out["accepted_rate_all"] = _rate(k, len(served))
        out["accepted_count"] = f"{k}/{len(served)}"
        out["accepted_ci"] = wilson(k, len(served))
    if other:
        pairs = [(r, a) for r in other for a in ANATOMIES]
        k = sum(not r["claims"][a]["accepted"] for r, a in pairs)
        out["refused_rate"] = _rate(k, len(pairs))
        out["refused_count"] = f"{k}/{len(pairs)}"
        out["refused_ci"] = wilson(k, len(pairs))
        out["refused_rate_by_claim"] = {
            a: _rate(sum(not r["claims"][a]["accepted"] for r in other), len(other)) for a in ANATOMIES
        }
        out["refused_all_rate"] = _rate(
            sum(all(not c["accepted"] for c in r["claims"].values()) for r in other), len(other)
        )
        out["counts"]["other"] = len(other)
    cross = [(r, a) for r in served for a in ANATOMIES if a != r["served"]]
    if cross:
        out["cross_anatomy_refused_rate"] = _rate(sum(not r["claims"][a]["accepted"] for r, a in cross), len(cross))
    for r in rows:
        claims = [r["claims"][r["served"]]] if r["served"] else list(r["claims"].values())
        for c in claims:
            if not c["accepted"]:
                out["reasons"][c["reason"]] = out["reasons"].get(c["reason"], 0) + 1
    for src in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == src]
        sv = [r for r in rs if r["served"]]
        ot = [r for r in rs if not r["served"]]
        entry: dict[str, Any] = {"series": len(rs)}
        if sv:
            entry["accepted_rate"] = _rate(sum(r["claims"][r["served"]]["accepted"] for r in sv), len(sv))
            entry["accepted"] = f"{sum(r['claims'][r['served']]['accepted'] for r in sv)}/{len(sv)}"
        if ot:
            n_ref = sum(not r["claims"][a]["accepted"] for r in ot for a in ANATOMIES)
            entry["refused_rate"] = _rate(n_ref, 3 * len(ot))
            entry["refused"] = f"{n_ref}/{3 * len(ot)}"
        out["by_source"][src] = entry
    out["failures"] = [
        {"key": r["key"], "claim": a, "reason": r["claims"][a]["reason"], "predicted": r["predicted"], "p": r["p"]}
        for r in rows
        for a in ([r["served"]] if r["served"] else [])
        if not r["claims"][a]["accepted"]
    ] + [
        {"key": r["key"], "claim": a, "accepted_as": a, "predicted": r["predicted"], "p": r["p"]}
        for r in rows
        if not r["served"]
        for a in ANATOMIES
        if r["claims"][a]["accepted"]
    ]
    return out


# ------------------------------------------------------------------------------------------
# phantoms


def evaluate_synthetic(
    clf, n: int, seed: int, *, workers: int = 1, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    from models.qc_training import phantom_items

    used = (clf.metadata or {}).get("recipe", {})
    lo, hi = int(used.get("seed", -1)), int(used.get("seed", -1)) + int(used.get("phantoms", 0)) * 7 // 6 + 1
    if used and lo <= seed + n - 1 and seed < hi:
        raise DataSpecError(
            f"synthetic:{n}:{seed} overlaps the seeds the model trained or calibrated on "
            f"({lo}..{hi - 1}); pick fresh seeds"
        )
    items = phantom_items(n, seed, with_infer=True, workers=workers, cache=False, log=log)
    gate = QCGate(clf)
    rows = judge_items(gate, items)
    out = summarise(rows)
    y = np.array([ANATOMY_CLASSES.index(r["label"]) for r in rows])
    p = np.array([ANATOMY_CLASSES.index(r["predicted"]) for r in rows])
    out["accuracy"] = round(float((y == p).mean()), ROUND)
    out["per_class_recall"] = {
        c: round(float((p[y == k] == k).mean()), ROUND) for k, c in enumerate(ANATOMY_CLASSES) if (y == k).any()
    }
    anat_y = np.array([r["served"] or "other" for r in rows])
    anat_p = np.array([max(r["anatomy_probabilities"], key=r["anatomy_probabilities"].get) for r in rows])
    out["anatomy_accuracy"] = round(float((anat_y == anat_p).mean()), ROUND)
    out.pop("by_source", None)
    out["failures"] = out["failures"][:20]
    return out


# ------------------------------------------------------------------------------------------
# the real corpus


# ------------------------------------------------------------------------------------------
# the rule, calibrated leave-one-source-out

RULE_GRID = {
    "contradiction": (0.5, 0.6, 0.7, 0.8, 0.9),
    "support": tuple(round(0.05 * k, 2) for k in range(11)),  # 0 .. 0.5
    "ood_ratio": (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 3.0),
}
ACCEPT_TARGET = 0.97  # real series of the served anatomies, pooled
MACRO_ACCEPT_TARGET = 0.95  # ... and the mean over sources
PHANTOM_ACCEPT_TARGET = 0.98


def claim_table(clf, items, *, fold: str) -> dict[str, np.ndarray]:
    """One row per claim the evaluation makes of each item (own anatomy for served ones, each served anatomy
    for other anatomy), with what the rule needs: P(rival), P(claimed anatomy, other plane), P(claimed
    anatomy), distance / the model's distance scale."""
    cols: dict[str, list] = {
        k: [] for k in ("fold", "source", "kind", "key", "rival", "other_plane", "support", "ratio")
    }
    for it in items:
        pred = _predict(clf, it)
        real = it.kind == "real"
        claims = [(ANATOMY_CLASSES[it.label].split("/")[0], True)] if it.label else [(a, False) for a in ANATOMIES]
        for anatomy, own in claims:
            ap = pred["anatomy_probabilities"]
            cols["fold"].append(fold)
            cols["source"].append(it.source)
            cols["kind"].append(("real_" if real else "phantom_") + ("in" if own else "other"))
            cols["key"].append(it.key)
            cols["rival"].append(max(v for k, v in ap.items() if k != anatomy))
            cols["other_plane"].append(
                max(
                    [
                        v
                        for k, v in pred["probabilities"].items()
                        if k.startswith(anatomy + "/") and k != f"{anatomy}/{it.plane}"
                    ]
                    or [0.0]
                )
            )
            cols["support"].append(ap[anatomy])
            cols["ratio"].append(pred["anatomy_distances"][anatomy] / clf.distance_scale)
    return {k: np.asarray(v) for k, v in cols.items()}


def _concat(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def _accepted(t: dict[str, np.ndarray], rule: dict[str, float]) -> np.ndarray:
    return (
        (t["rival"] < rule["contradiction"])
        & (t["other_plane"] < rule["plane"])
        & (t["support"] >= rule["support"])
        & (t["ratio"] <= rule["ood_ratio"])
    )


def _rates(t: dict[str, np.ndarray], acc: np.ndarray) -> dict[str, float]:
    out = {}
    for kind, want in (("real_in", True), ("real_other", False), ("phantom_in", True), ("phantom_other", False)):
        m = t["kind"] == kind
        if not m.any():
            continue
        ok = acc[m] if want else ~acc[m]
        out[f"{kind}_pooled"] = float(ok.mean())
        per = [float(ok[t["source"][m] == src].mean()) for src in np.unique(t["source"][m])]
        out[f"{kind}_macro"] = float(np.mean(per))
    return out


def choose_rule(t: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    """The rule: plane threshold from the 99th percentile of P(claimed anatomy, other plane) + 0.02 within
    [0.9, 0.95]; then, over `RULE_GRID`, the most refusing rule (mean over other-anatomy sources, then pooled)
    that accepts at least ACCEPT_TARGET of the served-anatomy series pooled, MACRO_ACCEPT_TARGET per source on
    average and PHANTOM_ACCEPT_TARGET of the phantoms; ties go to the least refusing thresholds. When no rule
    meets the targets, the most accepting one."""
    real_in = t["kind"] == "real_in"
    op = t["other_plane"][real_in]
    plane = float(min(0.95, max(0.9, (np.percentile(op, 99) if len(op) else 0.0) + 0.02)))
    best: tuple[dict[str, float], dict[str, float]] | None = None
    fallback: tuple[dict[str, float], dict[str, float]] | None = None
    best_key: tuple[Any, ...] | None = None
    fb_key: tuple[Any, ...] | None = None
    for c in RULE_GRID["contradiction"]:
        for sup in RULE_GRID["support"]:
            for r in RULE_GRID["ood_ratio"]:
                rule = {"contradiction": c, "plane": plane, "support": sup, "ood_ratio": r}
                f = _rates(t, _accepted(t, rule))
                ok = (
                    f.get("real_in_pooled", 1) >= ACCEPT_TARGET
                    and f.get("real_in_macro", 1) >= MACRO_ACCEPT_TARGET
                    and f.get("phantom_in_pooled", 1) >= PHANTOM_ACCEPT_TARGET
                )
                gentle = (c, -sup, r)
                if ok:
                    key = (f.get("real_other_macro", 0), f.get("real_other_pooled", 0), gentle)
                    if best_key is None or key > best_key:
                        best, best_key = (rule, f), key
                key = (f.get("real_in_pooled", 0) + f.get("real_in_macro", 0), f.get("real_other_macro", 0), gentle)
                if fb_key is None or key > fb_key:
                    fallback, fb_key = (rule, f), key
    chosen = best or fallback
    if chosen is None:
        raise ValueError("RULE_GRID is empty")
    rule, f = chosen
    return rule, {**{k: round(v, 4) for k, v in f.items()}, "targets_met": best is not None}


#: acceptance rates at which `frontier` reports the most refusing rule (the served-anatomy series, pooled)
FRONTIER_ACCEPT = (0.97, 0.95, 0.9, 0.85, 0.8)
#: a finer grid than `RULE_GRID` for the trade-off (support up to 0.95: the refusing end of the curve)
FRONTIER_GRID = {
    "contradiction": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "support": tuple(round(0.05 * k, 2) for k in range(20)),
    "ood_ratio": (0.8, 1.0, 1.1, 1.2, 1.3, 1.5, 1.75, 2.0, 3.0),
}


def frontier(t: dict[str, np.ndarray], plane: float = 0.9) -> list[dict[str, Any]]:
    """The trade-off between accepting real served anatomy and refusing real other anatomy that the gate's rule
    allows on out-of-source predictions: for each acceptance in `FRONTIER_ACCEPT`, the most refusing rule of
    `FRONTIER_GRID` that still accepts that share of served-anatomy series (pooled), with both rates. Chosen on
    the very predictions it reports, so an upper bound of what a rule chosen elsewhere would reach."""
    pts = []
    for c in FRONTIER_GRID["contradiction"]:
        for sup in FRONTIER_GRID["support"]:
            for r in FRONTIER_GRID["ood_ratio"]:
                rule = {"contradiction": c, "plane": plane, "support": sup, "ood_ratio": r}
                f = _rates(t, _accepted(t, rule))
                if "real_in_pooled" in f and "real_other_pooled" in f:
                    pts.append((f["real_in_pooled"], f["real_other_pooled"], rule))
    out = []
    for target in FRONTIER_ACCEPT:
        ok = [p for p in pts if p[0] >= target]
        if not ok:
            continue
        acc, ref, rule = max(ok, key=lambda p: (p[1], p[0]))
        out.append(
            {"accept_at_least": target, "accepted": round(acc, ROUND), "refused": round(ref, ROUND), "rule": rule}
        )
    return out


def fold_models(
    real,
    recipe,
    *,
    sources: Iterable[str] | None = None,
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] = print,
    reuse: bool = True,
) -> dict[str, Any]:
    """One model per real source, trained (``recipe``) without it, with its distances fitted and its distance
    scale set. The networks are cached outside the repository, keyed by the recipe, the preprocessing and
    `models.qc_training.TRAINING_REVISION`; the distances are refitted (cheap) so their code may change."""
    from models.classifier import sha256_of
    from models.qc import AnatomyClassifier
    from models.qc_training import (
        TRAINING_REVISION,
        _code_key,
        cache_root,
        distance_scale,
        fit_distance,
        phantom_items,
        train_anatomy,
        training_items,
    )
    from models.realdata import SOURCES

    cal = phantom_items(
        max(24, recipe.phantoms // 6), recipe.seed + recipe.phantoms, with_infer=True, workers=workers, log=log
    )
    present = [s for s in (sources or SOURCES) if any(it.source == s for it in real)]
    key = hashlib.sha256(json.dumps([recipe.as_dict(), _code_key(), TRAINING_REVISION]).encode()).hexdigest()[:12]
    out = {}
    ph = None
    for src in present:
        path = cache_root() / "loso" / key / src / "model.pt"
        if reuse and path.is_file():
            clf = AnatomyClassifier.load(path, sha256=sha256_of(path))
            log(f"fold {src}: cached model {path}")
        else:
            log(f"fold {src}: training without it")
            clf, _ = train_anatomy(
                path.parent,
                recipe,
                exclude_sources=[src],
                real=real,
                threads=threads,
                workers=workers,
                log=log,
                save=True,
            )
        held = set(clf.metadata.get("held_groups", []))
        rest = [it for it in real if it.source != src]
        if ph is None:
            ph = phantom_items(recipe.phantoms, recipe.seed, workers=workers, log=log)
        fit_distance(clf, training_items(rest, ph, held))
        distance_scale(clf, [it for it in rest if it.group in held], cal)
        out[src] = clf
    return {"models": out, "cal_phantoms": cal, "key": key}


def loso_tables(real, folds: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Per fold: claims on the left-out source's series and on the calibration phantoms, by the fold's model."""
    return {
        src: _concat(
            [
                claim_table(clf, [it for it in real if it.source == src], fold=src),
                claim_table(clf, folds["cal_phantoms"], fold=src),
            ]
        )
        for src, clf in folds["models"].items()
    }


def leave_one_source_out(
    root: Path | str | None,
    recipe,
    *,
    sources: Iterable[str] | None = None,
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] = print,
    reuse: bool = True,
) -> dict[str, Any]:
    """For each real source: the model trained without it, with the rule chosen on the other folds' predictions
    (never on this source), tested on every series of the source. Also the rule chosen on all folds (the one
    the shipped model carries)."""
    from models.qc_training import apply_rule, real_items

    t0 = time.time()
    real = real_items(root, log=log)
    folds = fold_models(real, recipe, sources=sources, threads=threads, workers=workers, log=log, reuse=reuse)
    tables = loso_tables(real, folds)
    out_folds: dict[str, Any] = {}
    all_rows: list[dict[str, Any]] = []
    for src, clf in folds["models"].items():
        rule, fig = choose_rule(_concat([t for s, t in tables.items() if s != src]))
        apply_rule(clf, rule)
        rows = judge_items(QCGate(clf), [it for it in real if it.source == src])
        s = summarise(rows)
        out_folds[src] = {
            k: s[k]
            for k in (
                "n",
                "accepted_rate",
                "accepted_rate_all",
                "refused_rate",
                "refused_rate_by_claim",
                "refused_all_rate",
                "cross_anatomy_refused_rate",
                "reasons",
                "failures",
            )
            if k in s and s[k] not in (None, {}, [])
        }
        out_folds[src]["rule"] = rule
        out_folds[src]["rule_calibration"] = fig
        all_rows += rows
        log(
            json.dumps(
                {
                    "fold": src,
                    **{k: out_folds[src].get(k) for k in ("n", "accepted_rate_all", "refused_rate")},
                    "rule": rule,
                }
            )
        )
    rule, fig = choose_rule(_concat(list(tables.values())))
    trade_off = frontier(_concat(list(tables.values())), plane=rule["plane"])
    pooled = summarise(all_rows)
    acc = [f["accepted_rate_all"] for f in out_folds.values() if f.get("accepted_rate_all") is not None]
    ref = [f["refused_rate"] for f in out_folds.values() if f.get("refused_rate") is not None]
    return {
        "recipe": recipe.as_dict(),
        "folds": out_folds,
        "pooled": {
            k: pooled[k]
            for k in (
                "n",
                "accepted_rate",
                "accepted_rate_all",
                "accepted_count",
                "accepted_ci",
                "refused_rate",
                "refused_count",
                "refused_ci",
                "refused_rate_by_claim",
                "refused_all_rate",
                "cross_anatomy_refused_rate",
                "counts",
                "reasons",
            )
        },
        "macro_accepted_rate": round(float(np.mean(acc)), ROUND) if acc else None,
        "macro_refused_rate": round(float(np.mean(ref)), ROUND) if ref else None,
        "rule_all_folds": rule,
        "rule_all_folds_calibration": fig,
        "frontier": trade_off,
        "targets": {
            "accepted_pooled": ACCEPT_TARGET,
            "accepted_macro": MACRO_ACCEPT_TARGET,
            "phantom_accepted": PHANTOM_ACCEPT_TARGET,
        },
        "seconds": round(time.time() - t0, 1),
    }


def loso_rule(
    root: Path | str | None, recipe, *, threads: int = 2, workers: int = 1, log: Callable[[str], None] = print
) -> tuple[dict[str, float], dict[str, Any]]:
    """The rule chosen on every fold's out-of-source predictions (trains or reuses the fold models)."""
    from models.qc_training import real_items

    real = real_items(root, log=log)
    folds = fold_models(real, recipe, threads=threads, workers=workers, log=log)
    rule, fig = choose_rule(_concat(list(loso_tables(real, folds).values())))
    return rule, {"rule": rule, "calibration": fig, "folds": sorted(folds["models"]), "fold_key": folds["key"]}


def evaluate_realdata(
    clf,
    root: Path | str | None,
    *,
    loso: bool = False,
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from models.qc_training import Recipe, real_items
    from models.realdata import realdata_root

    root = realdata_root() if root in (None, "auto", Path("auto")) else Path(root)
    if root is None or not Path(root).is_dir():
        raise DataSpecError(
            "real corpus not found: give realdata:PATH, set MSKNODE_REALDATA, or place it at "
            "../shared/realdata beside the checkout"
        )
    items = real_items(root, log=log)
    rows = judge_items(QCGate(clf), items)
    out: dict[str, Any] = {"corpus": str(root), **summarise(rows)}
    held = set((clf.metadata or {}).get("held_groups", []))
    excluded = set((clf.metadata or {}).get("excluded_sources", []))
    if held:
        h = summarise([r for r in rows if r["group"] in held])
        out["held_out"] = {
            k: h[k]
            for k in ("n", "accepted_rate", "accepted_rate_all", "cross_anatomy_refused_rate", "by_source")
            if h.get(k) not in (None, {})
        }
    if excluded:
        out["excluded_sources"] = sorted(excluded)
    out["note"] = (
        "the shipped model trained on every source except its held groups; the independent figures are "
        "held_out and (with --loso) loso"
    )
    if loso:
        recipe_d = (clf.metadata or {}).get("recipe") or {}
        recipe = Recipe(**{k: v for k, v in recipe_d.items() if k in Recipe.__dataclass_fields__})
        out["loso"] = leave_one_source_out(root, recipe, threads=threads, workers=workers, log=log or (lambda m: None))
    return out


# ------------------------------------------------------------------------------------------
# the model card

LICENCES = [
    (
        "knee_stacks, shoulder_stacks, elbow_stacks, hip_stacks",
        "teaching screen exports (JPEG) of normal knee, shoulder, elbow and hip series; repository "
        "jeremyswisher13/kneemri @ 3e5b3c2",
        "attributed to Radiopaedia, CC BY-NC-SA 3.0 (non-commercial, share-alike, attribution); the source "
        "repository records no origin, so unverified: the most restrictive terms are treated as binding",
    ),
    (
        "shoulder_stacks (figure panels)",
        "cuff-tear: Uludag V et al., Cureus 2024;16(8):e66272, Fig 1; slap: SA J Radiol 2023, PMC10879901, Fig 14",
        "CC BY 4.0 (as attributed by the source repository); evaluated only, never trained on",
    ),
    (
        "siemens_knee",
        "one sagittal knee DICOM series (Siemens Prisma 3 T); repository "
        "ataa599/AI-based-Sagittal-MRI-fine-grading-of-meniscus-injury @ 86bbacd",
        "not stated (no licence file)",
    ),
    (
        "acl_slices",
        "110 sagittal knee slices; repository CEMRR/Knee-ACL-Tear-Segmentation @ 3919b7f, upstream "
        "Zenodo 10.5281/zenodo.18054534",
        "not stated (no licence file; Zenodo terms not verified)",
    ),
    (
        "lumbar_volumes",
        "28 sagittal lumbar volumes (VB1: Zukic et al., Comput Graph Forum 33:190-204, 2014; VB2: "
        "Chu et al., PLoS ONE 10(11):e0143327, 2015); repository JonathanRamos/fastcleverseg @ b476612 (cite Ramos "
        "et al., Magn Reson Imaging 109:134-146, 2024)",
        "repository GPL-3.0; the datasets' own licence is not stated",
    ),
    (
        "spider",
        "357 SPIDER mid-sagittal lumbar slices, 175 patients (van der Graaf et al., Sci Data 11:264, 2024); "
        "repository ejd230001/medvisor @ 4e4fb31",
        "CC BY 4.0",
    ),
    (
        "mni152",
        "MNI ICBM152 2009a nonlinear symmetric T1 template (Collins 1999; Fonov et al. 2009, 2011) as shipped "
        "inside nilearn",
        "nilearn's description records it as unknown; the MNI distribution carries a permissive "
        "copyright notice (McConnell Brain Imaging Centre, MNI, McGill University) that asks to be kept with copies "
        "(not verified here)",
    ),
    (
        "pydicom_mr",
        "pydicom-data 1.0.0: emri_small (head), MR-SIEMENS-DICOM-WithOverlays (abdomen), MR2_UNCR "
        "(Philips shoulder, oblique coronal)",
        "MIT (pydicom-data package)",
    ),
]


def frontier_table(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The card's table of `frontier`: what refusing more of the unseen other anatomy costs in acceptance."""
    return {
        "title": "Out-of-source trade-off: the most refusing rule at each acceptance (chosen on these predictions, "
        "an upper bound)",
        "columns": ["served anatomy accepted at least", "accepted", "other anatomy refused", "rule"],
        "rows": [
            [
                f"{p['accept_at_least']:.2f}",
                f"{p['accepted']:.3f}",
                f"{p['refused']:.3f}",
                ", ".join(f"{k} {v:g}" for k, v in p["rule"].items()),
            ]
            for p in points
        ],
    }


def _loso_rows(loso: dict[str, Any]) -> list[list[str]]:
    rows = []
    for src, f in loso["folds"].items():
        acc = f.get("accepted_rate", {})
        rows.append(
            [
                src,
                str(f.get("n", "")),
                ", ".join(f"{a} {v:.3f}" for a, v in acc.items()) if acc else "-",
                f"{f['refused_rate']:.3f}" if f.get("refused_rate") is not None else "-",
                f"{f['cross_anatomy_refused_rate']:.3f}" if f.get("cross_anatomy_refused_rate") is not None else "-",
                ", ".join(f"{k} {v}" for k, v in f.get("reasons", {}).items()) or "-",
            ]
        )
    return rows


def anatomy_card(
    summary: dict[str, Any], synthetic: dict[str, Any], realdata: dict[str, Any], commands: list[str]
) -> dict[str, Any]:
    """card.json content of ``qc.anatomy`` from its train_summary.json and the two evaluations' JSON."""
    loso = realdata.get("loso", {})
    pooled = loso.get("pooled", {})
    cal = summary.get("calibration", {})
    metrics: dict[str, Any] = {
        "loso_accepted_rate": pooled.get("accepted_rate"),
        "loso_accepted_rate_all": pooled.get("accepted_rate_all"),
        "loso_accepted": pooled.get("accepted_count"),
        "loso_accepted_ci": pooled.get("accepted_ci"),
        "loso_refused_rate": pooled.get("refused_rate"),
        "loso_refused": pooled.get("refused_count"),
        "loso_refused_ci": pooled.get("refused_ci"),
        "loso_refused_all_rate": pooled.get("refused_all_rate"),
        "loso_cross_anatomy_refused_rate": pooled.get("cross_anatomy_refused_rate"),
        "loso_macro_accepted_rate": loso.get("macro_accepted_rate"),
        "loso_macro_refused_rate": loso.get("macro_refused_rate"),
        "loso_series": pooled.get("counts"),
        "held_out_accepted_rate": realdata.get("held_out", {}).get("accepted_rate"),
        "held_out_series": realdata.get("held_out", {}).get("n"),
        "corpus_in_sample_accepted_rate": realdata.get("accepted_rate"),
        "corpus_in_sample_refused_rate": realdata.get("refused_rate"),
        "phantom_accuracy": synthetic.get("accuracy"),
        "phantom_accepted_rate": synthetic.get("accepted_rate"),
        "phantom_other_refused_rate": synthetic.get("refused_rate"),
        "phantom_cross_anatomy_refused_rate": synthetic.get("cross_anatomy_refused_rate"),
        "phantom_per_class_recall": synthetic.get("per_class_recall"),
        "contradiction_threshold": cal.get("contradiction_threshold"),
        "plane_threshold": cal.get("plane_threshold"),
        "support_threshold": cal.get("support_threshold"),
        "ood_threshold": cal.get("ood_threshold"),
        "rule_calibration_out_of_source": cal.get("rule_calibration"),
    }
    for k in (
        "motion_val_accuracy",
        "motion_val_recall",
        "motion_val_false_positive_rate",
        "motion_real_held_series",
        "motion_real_held_false_positive_rate",
        "motion_real_held_in_spec_false_positive_rate",
        "motion_real_held_heavy_recall",
    ):
        if summary.get(k) is not None:
            metrics[k] = summary[k]
    metrics = {k: v for k, v in metrics.items() if v is not None}
    real_train = summary.get("real_training_series", {})
    trained = ", ".join(f"{s} {v['series']} series / {v['slices']} slices" for s, v in real_train.items())
    return {
        "name": "qc.anatomy",
        "version": str(summary.get("version", "2")),
        "task": "qc",
        "anatomy": "any",
        "description": "QC gate: pixel anatomy/plane classifier (2-D, central slices, 10 classes), Mahalanobis "
        "out-of-distribution distance, heavy-motion detector",
        "input": {
            "anatomy": f"{INFER_SLICES_TEXT}; border band blanked (overlays of screen exports)",
            "motion": "4 middle-half slices, each 128 x 128 over its field of view",
        },
        "outputs": {
            "classes": list(ANATOMY_CLASSES),
            "anatomy_probabilities": "marginal per anatomy (knee, shoulder, lumbar_spine, other)",
            "motion": "P(heavy motion ghosting)",
        },
        "weights_file": "model.pt",
        "weights_sha256": summary["weights_sha256"],
        "notice": "Demo weights trained on synthetic phantoms and public real MRI (non-commercial terms apply). "
        "Not for diagnostic use.",
        "licence": "The weights learned from the teaching stacks (CC BY-NC-SA 3.0, attribution unverified) and carry "
        "that restriction: non-commercial use only, share-alike, with attribution. Other sources: "
        "CC BY 4.0 (SPIDER), GPL-3.0 repository with unstated dataset licence (lumbar volumes), "
        "licence not stated (ACL slices, Siemens knee), MIT (pydicom-data), MNI152 (see sources).",
        "training_data": (
            f"{summary.get('training_data')}: phantoms of knee, shoulder and lumbar spine in three planes with every "
            "routed contrast, synthetic other anatomy (models.negatives: heads, abdomen, limbs, water phantoms, "
            f"noise), and real MRI from the development corpus (models.realdata): {trained}. Other anatomy: hip "
            "and elbow stacks, the MNI152 brain, pydicom-data head and abdomen, synthetic negatives. Held out of "
            f"training (calibration): {summary.get('real_held_series')} real series (a quarter of the ACL, lumbar "
            "volume and SPIDER groups); journal figure panels never trained on. Motion detector: "
            f"{summary.get('motion_training_data', '-')}."
        ),
        "sources": [{"source": s, "what": w, "licence": lic} for s, w, lic in LICENCES],
        "recipe": {
            **summary.get("recipe", {}),
            "calibration": cal,
            "split": "by group (patient or series), never by slice; held quarter by CRC32 of the group name",
        },
        "metrics": metrics,
        "tables": [
            {
                "title": "Leave-one-source-out (trained without the source, tested on all of it)",
                "columns": [
                    "source",
                    "series",
                    "accepted (served anatomy)",
                    "refused (other anatomy, 3 claims each)",
                    "refused when claimed as another served anatomy",
                    "refusal reasons",
                ],
                "rows": _loso_rows(loso) if loso else [],
            },
            *([frontier_table(loso["frontier"])] if loso.get("frontier") else []),
            {
                "title": "Sources and licences",
                "columns": ["source", "what", "licence"],
                "rows": [[s, w, lic] for s, w, lic in LICENCES],
            },
        ],
        "evaluation_data": (
            "leave-one-source-out on the real corpus (the rule of each fold chosen on the other "
            "folds' out-of-source predictions; each source tested by a model that never saw "
            "it; a served-anatomy series is claimed as its own anatomy in its own plane, an other-"
            "anatomy series as each served anatomy); the shipped model on its held quarter; "
            f"{synthetic.get('data', 'fresh phantoms')} (seeds never trained or calibrated on)"
        ),
        "evaluation_note": "Every series scored; rates per series (other anatomy: per claim), 95 % Wilson intervals "
        "where given.",
        "reproduce": commands,
        "limitations": [
            "Not for diagnostic use.",
            f"Body parts it never saw are refused far less often than served anatomy is accepted: leave-one-source-"
            f"out, other anatomy was refused on {pooled.get('refused_rate')} of the claims (target 0.95); the "
            "hip and elbow of the corpus are refused because it learned them (in-sample), not because it "
            "generalises to new joints. A wrist, ankle or cervical spine sent to a knee, shoulder or spine model "
            "may pass the pixel check; routing and the header checks are the first line.",
            "Non-commercial: the weights learned from teaching stacks attributed to Radiopaedia under CC BY-NC-SA 3.0 "
            "(attribution unverified); they carry that restriction.",
            "Real other anatomy is small: one hip and one elbow exam (three series each), the MNI152 template, a "
            "pydicom-data head and abdomen; no real cervical spine, wrist, ankle or foot. Whatever the corpus lacks "
            "is refused only as far as synthetic negatives and the out-of-distribution distance carry.",
            "Real shoulders come from one teaching exam, two journal figure panels and one pydicom-data image; "
            "real coronal/axial knees and spines are scarce (lumbar volumes are sagittal slabs, so no coronal or "
            "axial reslices were made from them).",
            "Screen exports carry no spacing: the classifier reads each slice over its whole field of view; the "
            "gate's header checks need a real DICOM header.",
            "The pixel plane is a weak signal: orientation is taken from the header geometry and the pixels only "
            "contradict it above plane_threshold.",
            "Figures are per series; sources with one or two exams give coarse rates.",
        ],
    }


INFER_SLICES_TEXT = "5 central slices (30-70 % of the series), each 96 x 96 over its whole in-plane field of view"


def main(argv: list[str] | None = None) -> int:
    """``python -m models.qc_evaluation card FOLDER --synthetic S.json --realdata R.json --command CMD ...``:
    writes card.json and MODEL_CARD.md of qc.anatomy from train_summary.json and the evaluations' JSON."""
    import argparse

    from models.cards import write_card

    ap = argparse.ArgumentParser(prog="python -m models.qc_evaluation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("card")
    c.add_argument("folder", type=Path)
    c.add_argument("--summary", type=Path, required=True, help="train_summary.json of the weights")
    c.add_argument("--synthetic", type=Path, required=True, help="msknode evaluate ... synthetic:N:SEED --json")
    c.add_argument("--realdata", type=Path, required=True, help="msknode evaluate ... realdata:auto --loso --json")
    c.add_argument("--command", action="append", default=[], help="reproduce command (repeatable)")
    args = ap.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    card = anatomy_card(
        summary, json.loads(args.synthetic.read_text()), json.loads(args.realdata.read_text()), args.command
    )
    write_card(args.folder, card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
