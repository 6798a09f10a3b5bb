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
