"""Super-resolution quality: foreground PSNR / SSIM against the high-resolution truth, and the
evaluation of a model against tricubic interpolation on the same degraded inputs."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from models.errors import SuperResError
from models.superres.data import check_fresh, phantom_case
from models.superres.inference import CONSISTENCY_TOLERANCE

if TYPE_CHECKING:
    from models.superres.inference import SuperResModel


# --------------------------------------------------------------------------------------
# metrics (foreground PSNR / SSIM against the high-resolution truth)


def foreground_mask(hr: np.ndarray) -> np.ndarray:
    """Voxels above 10 % of the 99th percentile of the truth, dilated by one voxel in-plane."""
    p99 = float(np.percentile(hr, 99))
    mask = hr > 0.1 * p99
    return ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool))


def psnr(x: np.ndarray, hr: np.ndarray, mask: np.ndarray) -> float:
    """PSNR over the mask, peak = maximum of the truth in the mask."""
    peak = float(hr[mask].max())
    mse = float(np.mean((x[mask].astype(np.float64) - hr[mask]) ** 2))
    return 10.0 * math.log10(peak * peak / max(mse, 1e-20))


def ssim(x: np.ndarray, hr: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM over the mask (per-slice Gaussian window, sigma 1.5 px; K1=0.01, K2=0.03)."""
    peak = float(hr[mask].max())
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=(0, 1.5, 1.5), truncate=3.5)

    a = x.astype(np.float64)
    b = hr.astype(np.float64)
    ma, mb = blur(a), blur(b)
    saa = blur(a * a) - ma * ma
    sbb = blur(b * b) - mb * mb
    sab = blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma * ma + mb * mb + c1) * (saa + sbb + c2))
    return float(s[mask].mean())


def evaluate_cases(model: SuperResModel, cases, *, inplane: bool = False, keep_cases: bool = False) -> dict[str, Any]:
    """Foreground PSNR/SSIM of the model and of tricubic on the same inputs, and their gains.

    Keys: ``n``, ``psnr_gain_db``, ``ssim_gain`` (means over cases of model − tricubic),
    ``psnr_gain_ci`` (95 % bootstrap), ``psnr_db``, ``psnr_tricubic_db``, ``ssim``,
    ``ssim_tricubic``, ``consistency_error_max``, ``consistency_passed`` (all cases),
    ``consistency_tolerance``, ``seconds_per_case``; ``cases`` with per-case figures if asked.
    """
    g = 2 if inplane else 1
    deg = model.config.degradation(inplane_factor=g)
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        out, stats = model.enhance(case.lr, inplane=inplane)
        base = deg.tricubic(case.lr)
        mask = foreground_mask(case.truth)
        err = deg.consistency_error(out, case.lr)
        rows.append(
            {
                "name": case.name,
                "psnr": psnr(out, case.truth, mask),
                "psnr_tricubic": psnr(base, case.truth, mask),
                "ssim": ssim(out, case.truth, mask),
                "ssim_tricubic": ssim(base, case.truth, mask),
                "consistency_error": err,
                "detail_gain": stats["detail_gain"],
            }
        )
    n = len(rows)
    if n == 0:
        raise SuperResError("no evaluation cases")
    gain_p = np.array([r["psnr"] - r["psnr_tricubic"] for r in rows])
    gain_s = np.array([r["ssim"] - r["ssim_tricubic"] for r in rows])
    boot = np.random.default_rng(0).integers(0, n, size=(1000, n))
    ci = np.percentile(gain_p[boot].mean(axis=1), [2.5, 97.5])
    result: dict[str, Any] = {
        "n": n,
        "psnr_gain_db": float(gain_p.mean()),
        "psnr_gain_ci": [float(ci[0]), float(ci[1])],
        "ssim_gain": float(gain_s.mean()),
        "psnr_db": float(np.mean([r["psnr"] for r in rows])),
        "psnr_tricubic_db": float(np.mean([r["psnr_tricubic"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "ssim_tricubic": float(np.mean([r["ssim_tricubic"] for r in rows])),
        "psnr_gain_positive_share": float(np.mean(gain_p > 0)),
        "detail_gain_mean": float(np.mean([r["detail_gain"] for r in rows])),
        "consistency_error_max": float(max(r["consistency_error"] for r in rows)),
        "consistency_tolerance": CONSISTENCY_TOLERANCE,
        "consistency_passed": bool(all(r["consistency_error"] <= CONSISTENCY_TOLERANCE for r in rows)),
        "seconds_per_case": (time.perf_counter() - t0) / n,
    }
    if keep_cases:
        result["cases"] = rows
    return result


def evaluate_synthetic(
    model: SuperResModel, n: int, seed: int, *, anatomy: str = "knee", inplane: bool = False
) -> dict[str, Any]:
    """`evaluate_cases` on ``n`` fresh phantoms ``seed .. seed+n-1`` (refuses training seeds)."""
    check_fresh(n, seed)
    g = 2 if inplane else 1
    cases = (phantom_case(anatomy, seed + i, inplane_factor=g) for i in range(n))
    result = evaluate_cases(model, cases, inplane=inplane)
    result["qc_refused"] = 0  # the fixed degradation of a phantom is always a valid input
    return result


# --------------------------------------------------------------------------------------
# real series without a high-resolution truth: take every other slice away and restore it

#: border band (top, bottom, left, right fractions) left out of the restore metrics: screen exports carry
#: burned-in overlays there (orientation letters, an "N of M" counter that changes every slice, scroll bars);
#: the same band as the QC gate's `models.qc.preprocess.MASK_BAND`
OVERLAY_BAND = (0.07, 0.11, 0.04, 0.04)
N_BOOTSTRAP = 1000


def _band_mask(shape: tuple[int, ...], band: tuple[float, float, float, float] = OVERLAY_BAND) -> np.ndarray:
    h, w = shape[-2:]
    t, b, left, right = (math.ceil(f * n) for f, n in zip(band, (h, h, w, w)))
    keep = np.zeros((h, w), bool)
    keep[t : h - b, left : w - right] = True
    return keep


def restore_series(models: dict[str, SuperResModel], x: np.ndarray) -> dict[str, Any]:
    """Take every other slice of the real series ``x`` (n, H, W) away and restore it.

    Input = slices 0, 2, 4, … (``m`` slices); scored = slices 1, 3, …, 2m − 3 (each lies between two kept
    slices; a trailing odd slice would be extrapolated and is left out). Each model super-resolves the kept
    slices ×2 through-plane; its sub-slices sit at k ± 0.25 (kept-slice units), so the removed slice at
    k + 0.5 is the mean of sub-slices 2k + 1 and 2k + 2. Tricubic = cubic B-spline interpolation of the kept
    slices at k + 0.5. PSNR / SSIM (`psnr`, `ssim`) over the foreground of the removed slices
    (`foreground_mask`) minus the `OVERLAY_BAND` border. The data-consistency error is ``‖A(output) − kept‖ /
    ‖kept‖`` of each model's full ×2 output. Returns per model ``psnr``, ``ssim``, ``consistency_error``,
    ``detail_gain``, and ``psnr_tricubic``, ``ssim_tricubic``, ``kept``, ``scored``."""
    from models.degradation import apply_along, cubic_matrix

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] < 3:
        raise SuperResError(f"restoring removed slices needs at least 3 slices, got shape {x.shape}")
    kept = np.ascontiguousarray(x[0::2])
    m = kept.shape[0]
    truth = x[1 : 2 * m - 2 : 2]
    mask = foreground_mask(truth) & _band_mask(truth.shape)[None]
    if not mask.any():
        raise SuperResError("no foreground on the removed slices")
    cubic = apply_along(cubic_matrix(m, m - 1, 0.5, 1.0), kept, 0)
    row: dict[str, Any] = {
        "kept": m,
        "scored": m - 1,
        "psnr_tricubic": psnr(cubic, truth, mask),
        "ssim_tricubic": ssim(cubic, truth, mask),
    }
    for label, model in models.items():
        out, stats = model.enhance(kept)
        restored = 0.5 * (out[1 : 2 * m - 1 : 2] + out[2 : 2 * m : 2])
        deg = model.config.degradation()
        row[label] = {
            "psnr": psnr(restored, truth, mask),
            "ssim": ssim(restored, truth, mask),
            "consistency_error": deg.consistency_error(out, kept),
            "detail_gain": stats["detail_gain"],
        }
    return row


def mean_ci(values, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, list[float]]:
    """Mean and its 95 % bootstrap interval (percentile, resampling the items)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return math.nan, [math.nan, math.nan]
    boot = v[np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(v.mean()), [float(lo), float(hi)]


def summarise_restore(rows: list[dict[str, Any]], label: str, *, against: str | None = None) -> dict[str, Any]:
    """Means over series of model ``label`` minus tricubic (or minus model ``against``), with 95 % CIs."""
    if not rows:
        raise SuperResError("no series to summarise")

    def ref(r: dict[str, Any], metric: str) -> float:
        return float(r[against][metric] if against else r[f"{metric}_tricubic"])

    gp, gp_ci = mean_ci([r[label]["psnr"] - ref(r, "psnr") for r in rows])
    gs, gs_ci = mean_ci([r[label]["ssim"] - ref(r, "ssim") for r in rows])
    errs = [float(r[label]["consistency_error"]) for r in rows]
    return {
        "n": len(rows),
        "psnr_gain_db": gp,
        "psnr_gain_db_ci": gp_ci,
        "ssim_gain": gs,
        "ssim_gain_ci": gs_ci,
        "psnr_db": float(np.mean([r[label]["psnr"] for r in rows])),
        "psnr_reference_db": float(np.mean([ref(r, "psnr") for r in rows])),
        "ssim": float(np.mean([r[label]["ssim"] for r in rows])),
        "ssim_reference": float(np.mean([ref(r, "ssim") for r in rows])),
        "psnr_gain_positive_share": float(np.mean([r[label]["psnr"] > ref(r, "psnr") for r in rows])),
        "detail_gain_mean": float(np.mean([r[label]["detail_gain"] for r in rows])),
        "consistency_error_mean": float(np.mean(errs)),
        "consistency_error_max": float(np.max(errs)),
    }
