"""Leave-one-source-out evaluation of the real + phantom recipe (`training.train_mix_to`) on real MR.

Folds are the source *families* of `models.superres.data.REAL_FAMILIES` (knee, shoulder, lumbar, brain,
other). Each fold fine-tunes the current (phantom-trained) weights on phantoms plus every real family but
the held-out one; the held-out family's series of a realdir (``python -m models.realdir export CORPUS DIR
--public``) are then restored (every other slice taken away, `quality.restore_series`) by the current
weights, the fold's weights and the candidate trained on all families, against tricubic. The candidate and
the current weights are also compared on the same fresh phantoms (simulated thick slices).

``python -m models.superres loso --realdata CORPUS --realdir DIR --out WORK [--epochs 8]``: writes
``WORK/loso.json``; fold weights are kept in ``WORK/fold_<family>`` and reused when present.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.superres.data import REAL_FAMILIES, check_fresh, phantom_case
from models.superres.inference import WEIGHTS_PATH, SuperResModel
from models.superres.quality import evaluate_cases, mean_ci, restore_series, summarise_restore
from models.superres.training import train_mix_to

_ANATOMY_FAMILY = {"knee": "knee", "shoulder": "shoulder", "lumbar_spine": "lumbar", "other:brain": "brain"}


def realdir_family(anatomy: str | None) -> str:
    """The family of a realdir series from its sidecar anatomy (elbow, hip, ...: ``other``)."""
    return _ANATOMY_FAMILY.get(anatomy or "", "other")


def _train(out: Path, root: Path, exclude: list[str], epochs: int, n_phantoms: int, log) -> SuperResModel:
    weights = out / "model.pt"
    if not weights.is_file():
        resume = (out / "train_state.pt").is_file()
        train_mix_to(
            out,
            realdata_root=root,
            n_phantoms=n_phantoms,
            exclude=exclude,
            epochs=epochs,
            init=WEIGHTS_PATH,
            threads=1,
            resume=resume,
            log=log,
        )
    return SuperResModel.load(weights)


def run(
    realdata: Path,
    realdir: Path,
    out: Path,
    *,
    epochs: int = 8,
    n_phantoms: int = 40,
    phantom_cases: tuple[tuple[str, int, int], ...] = (("knee", 60, 9_000_000), ("shoulder", 20, 9_100_000)),
    families: tuple[str, ...] = tuple(REAL_FAMILIES),
    log=print,
) -> dict[str, Any]:
    from models.realdir import read_realdir

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    current = SuperResModel.load(WEIGHTS_PATH)
    final = _train(out / "final", realdata, [], epochs, n_phantoms, log)
    series = [(rs, realdir_family(rs.anatomy)) for rs in read_realdir(realdir)]
    result: dict[str, Any] = {
        "current_sha256": current.info.weights_sha256,
        "candidate_sha256": final.info.weights_sha256,
        "recipe": f"fine-tune of the current weights, {epochs} epochs x 50 steps, {n_phantoms} phantoms + real",
        "folds": {},
    }
    pooled: list[dict[str, Any]] = []
    for fam in families:
        held = [rs for rs, f in series if f == fam]
        if not held:
            continue
        fold = _train(out / f"fold_{fam}", realdata, [fam], epochs, n_phantoms, log)
        rows = []
        for rs in held:
            if rs.volume.shape[0] < 3:
                continue
            r = restore_series({"current": current, "fold": fold, "final": final}, rs.volume.array)
            r["key"] = rs.key
            rows.append(r)
            log(
                f"{fam} {rs.key}: tricubic {r['psnr_tricubic']:.2f}  current {r['current']['psnr']:.2f}  "
                f"fold {r['fold']['psnr']:.2f}  final {r['final']['psnr']:.2f} dB"
            )
        pooled += rows
        result["folds"][fam] = _figures(rows, fold.info.weights_sha256)
        (out / "loso.json").write_text(json.dumps(result, indent=1))
    result["pooled"] = _figures(pooled, None)
    phantom: dict[str, Any] = {}
    for anatomy, n, seed in phantom_cases:
        check_fresh(n, seed)
        cases = [phantom_case(anatomy, seed + i) for i in range(n)]
        cur = evaluate_cases(current, cases, keep_cases=True)
        new = evaluate_cases(final, cases, keep_cases=True)
        diff = [a["psnr"] - b["psnr"] for a, b in zip(new["cases"], cur["cases"])]
        sdiff = [a["ssim"] - b["ssim"] for a, b in zip(new["cases"], cur["cases"])]
        d, d_ci = mean_ci(diff)
        s, s_ci = mean_ci(sdiff)
        phantom[f"{anatomy}_synthetic_{n}"] = {
            "data": f"synthetic:{n}:{seed}",
            "current": {k: v for k, v in cur.items() if k != "cases"},
            "candidate": {k: v for k, v in new.items() if k != "cases"},
            "candidate_minus_current_psnr_db": d,
            "candidate_minus_current_psnr_db_ci": d_ci,
            "candidate_minus_current_ssim": s,
            "candidate_minus_current_ssim_ci": s_ci,
        }
        log(f"phantoms {anatomy} x{n}: candidate - current {d:+.3f} dB [{d_ci[0]:+.3f}, {d_ci[1]:+.3f}]")
    result["phantoms"] = phantom
    real_win = result["pooled"]["fold_vs_current"]["psnr_gain_db_ci"][0] > 0
    phantom_ok = all(p["candidate_minus_current_psnr_db"] >= -0.2 for p in phantom.values())
    result["decision"] = {
        "rule": "ship the candidate if, leave-one-source-out on real series, the fold weights beat the current "
        "weights (95 % CI of the mean PSNR gain above 0) and on phantoms the candidate loses at most 0.2 dB",
        "real_win": bool(real_win),
        "phantom_within_0_2_db": bool(phantom_ok),
        "ship_candidate": bool(real_win and phantom_ok),
    }
    result["seconds"] = time.perf_counter() - t0
    (out / "loso.json").write_text(json.dumps(result, indent=1))
    return result


def _figures(rows: list[dict[str, Any]], fold_sha: str | None) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(rows), "series": [r["key"] for r in rows]}
    if fold_sha:
        out["fold_sha256"] = fold_sha
    out["fold_vs_tricubic"] = summarise_restore(rows, "fold")
    out["current_vs_tricubic"] = summarise_restore(rows, "current")
    out["fold_vs_current"] = summarise_restore(rows, "fold", against="current")
    out["final_vs_tricubic"] = summarise_restore(rows, "final")  # not held out: trained on these families
    out["consistency_error_fold"] = [float(r["fold"]["consistency_error"]) for r in rows]
    out["psnr_tricubic_db"] = float(np.mean([r["psnr_tricubic"] for r in rows]))
    return out
