"""What the QC networks read of a series.

The anatomy classifier reads a few central slices (`anatomy_input`), each resampled over its whole
in-plane field of view (`fov_slices`: field-of-view relative, screen exports have no spacing) after a
border band is blanked (`mask_overlay`: burned-in orientation letters, slice counters and scroll bars of
screen exports lie there; every input is masked the same way, in training and at inference). The motion
detector reads slices of the middle half of the series at near-native resolution (`motion_input`).
"""

from __future__ import annotations

import math

import numpy as np

from models.types import Volume

SLICE_GRID = 96  # in-plane grid over the whole field of view (the longer side), square
INFER_SLICES = 5  # central slices read per series; their logits are averaged
INFER_SPAN = (0.3, 0.7)  # ... evenly spaced over this fraction of the series
# border band blanked in every image (fractions of rows top/bottom, of columns left/right): where screen
# exports carry orientation letters, "N of M" counters and scroll bars
MASK_BAND = (0.07, 0.11, 0.04, 0.04)
MOTION_GRID = 128  # in-plane grid over the whole field of view (ghosts are a field-of-view-relative pattern)
MOTION_SLICES = 4  # slices from the middle half of the series


def mask_overlay(image: np.ndarray, band: tuple[float, float, float, float] = MASK_BAND) -> np.ndarray:
    """Blank the border band of a 2-D image (or of every slice of a stack): top, bottom, left, right fractions."""
    a = np.array(image, np.float32, copy=True)
    h, w = a.shape[-2:]
    t, b, left, right = (math.ceil(f * n) for f, n in zip(band, (h, h, w, w)))
    a[..., :t, :] = 0
    a[..., h - b :, :] = 0
    a[..., :, :left] = 0
    a[..., :, w - right :] = 0
    return a


def _canonical(volume: Volume, plane: str | None) -> tuple[np.ndarray, float, float, str]:
    """The array in the canonical layout of ``plane`` (default: nearest) and its (row, col) spacing."""
    from models.transforms import canonical_layout

    perm, flips, plane = canonical_layout(volume, plane)
    a = np.transpose(np.asarray(volume.array, np.float32), perm)
    for ax, f in enumerate(flips):
        if f:
            a = np.flip(a, axis=ax)
    spacing = [float(volume.spacing[p]) for p in perm]
    return a, spacing[1], spacing[2], plane


def slice_indices(n: int, count: int, span: tuple[float, float]) -> list[int]:
    """``count`` slice indices evenly over ``span`` (fractions) of ``n`` slices (fewer when n is small)."""
    if n <= 1:
        return [0]
    lo, hi = span[0] * (n - 1), span[1] * (n - 1)
    return sorted({round(v) for v in np.linspace(lo, hi, max(1, count))})


def fov_slices(
    canonical: np.ndarray, row_mm: float, col_mm: float, ks: list[int], grid: int = SLICE_GRID
) -> np.ndarray:
    """Slices ``ks`` of a canonical array, overlay band blanked, each resampled to grid x grid over a square of
    the longer physical side (centred; the shorter side is zero-padded) and scaled by the series' 99.5th
    percentile -> (len(ks), grid, grid) float32."""
    from models.transforms import apply_separable, interp_matrix, robust_scale

    sub = mask_overlay(canonical[ks])
    h, w = sub.shape[1:]
    side = max(h * row_mm, w * col_mm)
    sj, si = side / grid / row_mm, side / grid / col_mm
    mj = interp_matrix(h, (h - 1) / 2 - (grid - 1) / 2 * sj, sj, grid)
    mi = interp_matrix(w, (w - 1) / 2 - (grid - 1) / 2 * si, si, grid)
    out = apply_separable(sub, np.eye(len(ks), dtype=np.float32), mj, mi)
    return robust_scale(np.clip(out, 0, None))


def anatomy_input(
    volume: Volume, plane: str | None = None, *, count: int = INFER_SLICES, span: tuple[float, float] = INFER_SPAN
) -> np.ndarray:
    """Volume -> (slices, 1, SLICE_GRID, SLICE_GRID) input of the anatomy classifier (canonical layout of
    ``plane``; default: the nearest plane of the slice normal)."""
    a, rs, cs, _ = _canonical(volume, plane)
    return fov_slices(a, rs, cs, slice_indices(a.shape[0], count, span))[:, None]


def motion_slices(n: int) -> list[int]:
    """The MOTION_SLICES slice indices (middle half) the motion detector reads of an n-slice series."""
    ks = sorted({round(v) for v in np.linspace(n * 0.25, n * 0.75 - 1, MOTION_SLICES)})
    ks = [min(max(k, 0), n - 1) for k in ks]
    while len(ks) < MOTION_SLICES:
        ks.append(ks[-1])
    return ks


def motion_grid(slices: np.ndarray) -> np.ndarray:
    """(n, rows, cols) slices -> (n, 1, 128, 128), each resampled over its whole field of view, scaled."""
    from models.transforms import apply_separable, interp_matrix, robust_scale

    a = np.asarray(slices, np.float32)
    mj = interp_matrix(a.shape[1], (a.shape[1] / MOTION_GRID - 1) / 2, a.shape[1] / MOTION_GRID, MOTION_GRID)
    mi = interp_matrix(a.shape[2], (a.shape[2] / MOTION_GRID - 1) / 2, a.shape[2] / MOTION_GRID, MOTION_GRID)
    mk = np.eye(len(a), dtype=np.float32)
    return robust_scale(apply_separable(a, mk, mj, mi))[:, None]


def motion_input(volume: Volume) -> np.ndarray:
    """(MOTION_SLICES, 1, 128, 128): middle-half slices, each resampled over its whole field of view."""
    a = np.asarray(volume.array, np.float32)
    return motion_grid(a[motion_slices(a.shape[0])])
