"""The fixed, documented MR degradation model used by super-resolution.

Training, evaluation and the data-consistency check of `models.superres` all use
this one model. It maps a high-resolution volume ``x`` (``(slices, rows, cols)``)
to the low-resolution acquisition ``y`` the scanner would have produced:

    y = N( K( S(x) ) )

``S`` — slice-profile integration (through-plane, factor ``f``, default 2).
    Low-resolution slice ``k`` integrates the high-resolution signal over its
    thickness ``T = f`` high-resolution slices with a realistic 2D-multislice
    slice profile: a box of width ``T`` whose edges are rounded by the RF pulse
    transition band (box convolved with a Gaussian of standard deviation
    ``slice_sigma_frac * T``; 0.15 by default, i.e. about 35 % of the thickness
    lies in the transition bands, so neighbouring slices cross-talk slightly).
    Each weight is the exact integral of that profile over one high-resolution
    slice; mass beyond the first/last slice folds back onto it. Rows sum to 1,
    so a uniform object keeps its intensity. Geometry: low-resolution slice
    ``k`` is centred on high-resolution slices ``f*k .. f*k+f-1``.
``K`` — k-space truncation (in-plane, factor ``g``, only when in-plane
    super-resolution is requested, default off): the central ``1/g`` of
    k-space along rows and columns is kept (what a smaller acquisition matrix
    over the same field of view measures, Gibbs ringing included). The
    Nyquist bin of the small grid receives the sum of the two folded bins, and
    the zero-fill inverse splits it evenly, so ``K(K⁺(y)) = y`` exactly.
    Geometry: pixel 0 keeps its centre (DFT sampling), spacing divides by ``g``.
``N`` — Rician noise: magnitude of (signal + complex Gaussian noise) with
    ``sigma = foreground mean / snr`` (``snr=None`` adds no noise). Noise is
    stochastic, so it is not part of the linear operator ``A = K∘S`` against
    which data consistency is checked.

It is *not* blurring of a high-resolution image: thick slices are integrated
through the slice profile and in-plane resolution loss comes from discarding
k-space, as in a real low-resolution acquisition.

Data consistency: ``project(x, y)`` returns ``x + B(y - A x)`` with ``B`` a right
inverse of ``A`` (``A B = I``; for ``S`` the pseudo-inverse ``Sᵀ(SSᵀ)⁻¹``, for
``K`` the zero-fill), so ``A(project(x, y)) = y`` up to floating-point rounding
and projecting twice changes nothing. ``consistency_error`` is the relative RMS
``‖A x − y‖ / ‖y‖``.

The ``tricubic`` baseline interpolates the low-resolution input at the
high-resolution sample positions implied by the geometry above with a cubic
B-spline (``scipy.ndimage`` order 3, edge values extended), separably per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.special import ndtr

from models.errors import ModelsError

FFT_WORKERS = 2  # threads for scipy.fft (the node runs models on 2 cores)


class DegradationError(ModelsError, ValueError):
    """A volume does not fit the degradation model (too small, wrong shape)."""


def _profile_integral(u: np.ndarray) -> np.ndarray:
    """∫ Φ(t) dt from -inf to u, i.e. u·Φ(u) + φ(u)."""
    return u * ndtr(u) + np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)


@lru_cache(maxsize=64)
def slice_matrix_for(n_lr: int, factor: int, sigma_frac: float) -> np.ndarray:
    """(n_lr, n_lr*factor) slice-profile integration matrix S (rows sum to 1)."""
    n_hr = n_lr * factor
    t = float(factor)
    sigma = max(sigma_frac * t, 1e-6)
    i = np.arange(-3 * factor, n_hr + 3 * factor)
    a = np.arange(n_lr)[:, None] * factor - 0.5  # box start (high-resolution index units)
    b = a + t
    lo = i[None, :] - 0.5
    hi = i[None, :] + 0.5
    w = (sigma / t) * (
        _profile_integral((hi - a) / sigma)
        - _profile_integral((lo - a) / sigma)
        - _profile_integral((hi - b) / sigma)
        + _profile_integral((lo - b) / sigma)
    )
    w = np.where(w > 1e-12, w, 0.0)  # exact zeros outside the profile support
    m = np.zeros((n_lr, n_hr))
    idx = np.clip(i, 0, n_hr - 1)
    for col, target in enumerate(idx):
        m[:, target] += w[:, col]
    m /= m.sum(axis=1, keepdims=True)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def slice_pseudo_inverse(n_lr: int, factor: int, sigma_frac: float) -> np.ndarray:
    """Sᵀ(SSᵀ)⁻¹, the minimum-norm right inverse of S."""
    s = slice_matrix_for(n_lr, factor, sigma_frac)
    b = s.T @ np.linalg.inv(s @ s.T)
    b.setflags(write=False)
    return b


@lru_cache(maxsize=64)
def cubic_matrix(n_lr: int, n_hr: int, offset: float, step: float) -> np.ndarray:
    """(n_hr, n_lr) matrix of cubic B-spline interpolation at coordinates offset + step*i."""
    coords = offset + step * np.arange(n_hr)
    eye = np.eye(n_lr)
    w = np.empty((n_hr, n_lr))
    for j in range(n_lr):
        w[:, j] = ndimage.map_coordinates(eye[j], [coords], order=3, mode="nearest")
    w.setflags(write=False)
    return w


def apply_along(matrix: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """Multiply one axis of x by matrix (float32 result)."""
    m = matrix.astype(np.float32, copy=False)
    out = np.tensordot(m, np.moveaxis(x, axis, 0), axes=(1, 0))
    return np.ascontiguousarray(np.moveaxis(out, 0, axis), dtype=np.float32)


def _fold_rows(spec: np.ndarray, small: int) -> np.ndarray:
    """Crop the full (complex) row axis -2 of a spectrum to ``small`` bins, Nyquist = sum of both folds."""
    big = spec.shape[-2]
    out = np.zeros(spec.shape[:-2] + (small, spec.shape[-1]), dtype=spec.dtype)
    half = small // 2
    if small % 2 == 0:
        out[..., :half, :] = spec[..., :half, :]
        out[..., half + 1 :, :] = spec[..., big - half + 1 :, :]
        out[..., half, :] = spec[..., half, :] + spec[..., big - half, :]
    else:
        out[..., : half + 1, :] = spec[..., : half + 1, :]
        out[..., half + 1 :, :] = spec[..., big - half :, :]
    return out


def _unfold_rows(spec: np.ndarray, big: int) -> np.ndarray:
    """Zero-pad the row axis -2 to ``big`` bins, splitting the Nyquist bin evenly."""
    small = spec.shape[-2]
    out = np.zeros(spec.shape[:-2] + (big, spec.shape[-1]), dtype=spec.dtype)
    half = small // 2
    if small % 2 == 0:
        out[..., :half, :] = spec[..., :half, :]
        out[..., big - half + 1 :, :] = spec[..., half + 1 :, :]
        out[..., half, :] = spec[..., half, :] / 2
        out[..., big - half, :] = spec[..., half, :] / 2
    else:
        out[..., : half + 1, :] = spec[..., : half + 1, :]
        out[..., big - half :, :] = spec[..., half + 1 :, :]
    return out


def kspace_down(x: np.ndarray, factor: int) -> np.ndarray:
    """Keep the central 1/factor of k-space along rows and columns (the last two axes).

    Intensity-preserving; real input gives real output. The Nyquist bins of the small
    grid receive the sum of the two folded bins (``rfft2``: the doubled half-spectrum
    column, whose Hermitian part is that sum).
    """
    x = np.asarray(x, dtype=np.float32)
    big_r, big_c = x.shape[-2:]
    if big_r % factor or big_c % factor:
        raise DegradationError(f"in-plane size {(big_r, big_c)} is not a multiple of {factor}")
    small_r, small_c = big_r // factor, big_c // factor
    out = np.empty(x.shape[:-2] + (small_r, small_c), dtype=np.float32)
    for k in range(0, x.shape[0], 8):
        spec = _fold_rows(sfft.rfft2(x[k : k + 8], workers=FFT_WORKERS), small_r)
        spec = spec[..., : small_c // 2 + 1].copy()
        if small_c % 2 == 0:
            spec[..., small_c // 2] *= 2
        out[k : k + 8] = sfft.irfft2(spec, s=(small_r, small_c), workers=FFT_WORKERS) / (factor * factor)
    return out


def kspace_up(y: np.ndarray, factor: int) -> np.ndarray:
    """Zero-fill k-space along rows and columns: ``kspace_down(kspace_up(y, f), f) == y``."""
    y = np.asarray(y, dtype=np.float32)
    small_r, small_c = y.shape[-2:]
    big_r, big_c = small_r * factor, small_c * factor
    out = np.empty(y.shape[:-2] + (big_r, big_c), dtype=np.float32)
    for k in range(0, y.shape[0], 8):
        spec = _unfold_rows(sfft.rfft2(y[k : k + 8], workers=FFT_WORKERS), big_r)
        if small_c % 2 == 0:
            spec[..., small_c // 2] /= 2
        full = np.zeros(spec.shape[:-1] + (big_c // 2 + 1,), dtype=spec.dtype)
        full[..., : spec.shape[-1]] = spec
        out[k : k + 8] = sfft.irfft2(full, s=(big_r, big_c), workers=FFT_WORKERS) * (factor * factor)
    return out


def foreground_mean(x: np.ndarray) -> float:
    """Mean over voxels above 10 % of the 99th percentile (the signal-bearing region)."""
    p99 = float(np.percentile(x, 99))
    fg = x[x > 0.1 * p99]
    return float(fg.mean()) if fg.size else float(np.abs(x).mean())


def rician(x: np.ndarray, snr: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of x plus complex Gaussian noise, sigma = foreground mean / snr."""
    sigma = foreground_mean(x) / snr
    re = x + rng.normal(0.0, sigma, x.shape)
    im = rng.normal(0.0, sigma, x.shape)
    return np.sqrt(re * re + im * im).astype(np.float32)


@dataclass(frozen=True)
class DegradationModel:
    """``y = N(K(S(x)))`` — see the module docstring for the exact definition."""

    slice_factor: int = 2
    inplane_factor: int = 1
    slice_sigma_frac: float = 0.15
    snr: float | None = 40.0

    def __post_init__(self) -> None:
        if self.slice_factor < 1 or self.inplane_factor < 1:
            raise DegradationError("factors must be >= 1")
        if not 0.0 <= self.slice_sigma_frac <= 1.0:
            raise DegradationError("slice_sigma_frac must be in [0, 1]")

    # --- shapes -------------------------------------------------------------------------
    def lr_shape(self, hr_shape: tuple[int, ...]) -> tuple[int, int, int]:
        n, r, c = hr_shape
        f, g = self.slice_factor, self.inplane_factor
        if n % f or r % g or c % g:
            raise DegradationError(f"high-resolution shape {hr_shape} is not divisible by ({f}, {g}, {g})")
        return n // f, r // g, c // g

    def hr_shape(self, lr_shape: tuple[int, ...]) -> tuple[int, int, int]:
        n, r, c = lr_shape
        return n * self.slice_factor, r * self.inplane_factor, c * self.inplane_factor

    def crop_to_multiple(self, x: np.ndarray) -> np.ndarray:
        """Drop trailing slices/rows/cols so the shape divides by the factors."""
        f, g = self.slice_factor, self.inplane_factor
        n, r, c = x.shape
        return x[: n - n % f, : r - r % g, : c - c % g]

    # --- the linear operator A = K∘S and its right inverse -------------------------------
    def slice_matrix(self, n_lr: int) -> np.ndarray:
        return slice_matrix_for(n_lr, self.slice_factor, self.slice_sigma_frac)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Noise-free degradation A(x)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise DegradationError(f"expected a 3-D volume, got shape {x.shape}")
        n_lr = self.lr_shape(x.shape)[0]
        y = apply_along(self.slice_matrix(n_lr), x, 0) if self.slice_factor > 1 else x
        if self.inplane_factor > 1:
            y = kspace_down(y, self.inplane_factor)
        return y

    def right_inverse(self, y: np.ndarray) -> np.ndarray:
        """B(y) with A(B(y)) = y (pseudo-inverse through-plane, zero-fill in-plane)."""
        y = np.asarray(y, dtype=np.float32)
        if self.inplane_factor > 1:
            y = kspace_up(y, self.inplane_factor)
        if self.slice_factor > 1:
            y = apply_along(slice_pseudo_inverse(y.shape[0], self.slice_factor, self.slice_sigma_frac), y, 0)
        return y

    def project(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Closest-by-construction data-consistent volume: x + B(y - A x)."""
        expected = self.hr_shape(y.shape)
        if tuple(x.shape) != expected:
            raise DegradationError(f"volume shape {x.shape} does not match input {y.shape} (expected {expected})")
        return (x + self.right_inverse(np.asarray(y, dtype=np.float32) - self.apply(x))).astype(np.float32)

    def consistency_error(self, x: np.ndarray, y: np.ndarray) -> float:
        """Relative RMS ‖A x − y‖ / ‖y‖ (computed in float64)."""
        d = self.apply(x).astype(np.float64) - np.asarray(y, dtype=np.float64)
        den = float(np.sqrt(np.mean(np.asarray(y, dtype=np.float64) ** 2)))
        return float(np.sqrt(np.mean(d * d)) / max(den, 1e-12))

    # --- simulation and baseline ---------------------------------------------------------
    def degrade(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The full model N(A(x)) (use ``dataclasses.replace(model, snr=...)`` for another SNR)."""
        y = self.apply(self.crop_to_multiple(np.asarray(x, dtype=np.float32)))
        if self.snr is None:
            return y
        return rician(y, float(self.snr), rng)

    def slice_coords(self, n_hr: int) -> tuple[float, float]:
        """(offset, step): high-resolution slice i sits at low-resolution index offset + step*i."""
        f = self.slice_factor
        return (0.5 / f - 0.5, 1.0 / f)

    def tricubic(self, y: np.ndarray) -> np.ndarray:
        """Cubic B-spline interpolation of y onto the high-resolution grid (the baseline)."""
        y = np.asarray(y, dtype=np.float32)
        n, r, c = y.shape
        nh, rh, ch = self.hr_shape(y.shape)
        out = y
        if self.slice_factor > 1:
            off, step = self.slice_coords(nh)
            out = apply_along(cubic_matrix(n, nh, off, step), out, 0)
        if self.inplane_factor > 1:
            g = self.inplane_factor
            out = apply_along(cubic_matrix(r, rh, 0.0, 1.0 / g), out, 1)
            out = apply_along(cubic_matrix(c, ch, 0.0, 1.0 / g), out, 2)
        return out
