"""MR contrast tables and the acquisition simulation (slice profile, texture, coil bias,
k-space truncation, motion ghosting, Rician noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from models.phantoms.errors import PhantomError

# Relative signal per tissue (free water on a T2-weighted image = 1.0).
_TISSUES = (
    "air",
    "cortex",
    "marrow",
    "red_marrow",
    "cartilage",
    "fibrocartilage",
    "ligament",
    "tendon",
    "fluid",
    "synovium",
    "muscle",
    "fat",
    "artery",
    "vein",
    "skin",
    "nerve",
    "csf",
    "cord",
    "nucleus",
    "annulus",
    "viscera",
    "lesion",
)

CONTRAST: dict[str, dict[str, float]] = {
    # proton density, fat-saturated (knee/shoulder fluid-sensitive)
    "PD_FS": dict(
        air=0.0,
        cortex=0.03,
        marrow=0.16,
        red_marrow=0.30,
        cartilage=0.55,
        fibrocartilage=0.07,
        ligament=0.10,
        tendon=0.06,
        fluid=1.0,
        synovium=0.24,
        muscle=0.30,
        fat=0.10,
        artery=0.04,
        vein=0.50,
        skin=0.35,
        nerve=0.40,
        csf=1.0,
        cord=0.50,
        nucleus=0.85,
        annulus=0.20,
    ),
    # proton density without fat saturation
    "PD": dict(
        air=0.0,
        cortex=0.03,
        marrow=0.85,
        red_marrow=0.60,
        cartilage=0.62,
        fibrocartilage=0.07,
        ligament=0.12,
        tendon=0.06,
        fluid=0.72,
        synovium=0.50,
        muscle=0.40,
        fat=0.95,
        artery=0.04,
        vein=0.60,
        skin=0.60,
        nerve=0.50,
        csf=0.70,
        cord=0.55,
        nucleus=0.70,
        annulus=0.25,
    ),
    "T1": dict(
        air=0.0,
        cortex=0.02,
        marrow=0.90,
        red_marrow=0.60,
        cartilage=0.45,
        fibrocartilage=0.05,
        ligament=0.08,
        tendon=0.05,
        fluid=0.18,
        synovium=0.35,
        muscle=0.36,
        fat=1.0,
        artery=0.03,
        vein=0.30,
        skin=0.50,
        nerve=0.40,
        csf=0.15,
        cord=0.45,
        nucleus=0.35,
        annulus=0.25,
    ),
    "T2_FS": dict(
        air=0.0,
        cortex=0.02,
        marrow=0.10,
        red_marrow=0.18,
        cartilage=0.38,
        fibrocartilage=0.05,
        ligament=0.08,
        tendon=0.05,
        fluid=1.0,
        synovium=0.26,
        muscle=0.20,
        fat=0.07,
        artery=0.03,
        vein=0.60,
        skin=0.25,
        nerve=0.35,
        csf=1.0,
        cord=0.35,
        nucleus=0.80,
        annulus=0.12,
    ),
    # T2 turbo spin echo without fat saturation (spine)
    "T2": dict(
        air=0.0,
        cortex=0.03,
        marrow=0.55,
        red_marrow=0.42,
        cartilage=0.35,
        fibrocartilage=0.05,
        ligament=0.06,
        tendon=0.05,
        fluid=1.0,
        synovium=0.45,
        muscle=0.20,
        fat=0.75,
        artery=0.03,
        vein=0.50,
        skin=0.45,
        nerve=0.30,
        csf=1.0,
        cord=0.38,
        nucleus=0.78,
        annulus=0.14,
    ),
    "STIR": dict(
        air=0.0,
        cortex=0.02,
        marrow=0.06,
        red_marrow=0.15,
        cartilage=0.35,
        fibrocartilage=0.05,
        ligament=0.08,
        tendon=0.05,
        fluid=1.0,
        synovium=0.45,
        muscle=0.18,
        fat=0.04,
        artery=0.03,
        vein=0.60,
        skin=0.22,
        nerve=0.35,
        csf=1.0,
        cord=0.35,
        nucleus=0.80,
        annulus=0.12,
    ),
}
_VISCERA = {"PD_FS": 0.35, "PD": 0.50, "T1": 0.30, "T2_FS": 0.35, "T2": 0.40, "STIR": 0.35}
for _name, _seq in CONTRAST.items():
    _seq["lesion"] = _seq["fluid"]
    _seq["viscera"] = _VISCERA[_name]

# Multiplicative texture amplitude (std of the smooth texture field) per tissue.
TEXTURE = dict(
    air=0.0,
    cortex=0.10,
    marrow=0.14,
    red_marrow=0.12,
    cartilage=0.05,
    fibrocartilage=0.15,
    ligament=0.15,
    tendon=0.12,
    fluid=0.03,
    synovium=0.12,
    muscle=0.09,
    fat=0.06,
    artery=0.1,
    vein=0.10,
    skin=0.08,
    nerve=0.08,
    csf=0.03,
    cord=0.05,
    nucleus=0.07,
    annulus=0.10,
    viscera=0.35,
    lesion=0.05,
)

# DICOM-ish sequence facts per contrast: (ScanningSequence, SequenceVariant, ScanOptions, TR, TE, TI, ETL)
SEQUENCE_FACTS: dict[str, tuple[str, str, str, float, float, float | None, int]] = {
    "PD_FS": ("SE", "SK\\SP", "FS", 3200.0, 33.0, None, 9),
    "PD": ("SE", "SK\\SP", "", 2800.0, 30.0, None, 9),
    "T1": ("SE", "SK\\SP", "", 600.0, 12.0, None, 3),
    "T2_FS": ("SE", "SK\\SP", "FS", 4000.0, 70.0, None, 12),
    "T2": ("SE", "SK\\SP", "", 3500.0, 95.0, None, 17),
    "STIR": ("SE\\IR", "SK\\SP", "", 4500.0, 40.0, 160.0, 12),
}


def check_sequence(sequence: str) -> str:
    if sequence not in CONTRAST:
        raise PhantomError(f"unknown sequence {sequence!r}; expected one of {sorted(CONTRAST)}")
    return sequence


@dataclass(frozen=True)
class Acquisition:
    """Per-phantom acquisition nuisances (all drawn from the seed)."""

    sequence: str
    snr: float  # mean foreground signal / noise sigma (inf = noise free)
    acq_fraction_pe: float  # acquired share of the phase-encode k-space lines (<= 1: ringing + blur)
    acq_fraction_ro: float  # acquired share along read-out
    taper: float  # width of the raised-cosine k-space filter (0 = sharp truncation, strong ringing)
    pe_axis: int  # 1 = rows (j) are phase encoded, 2 = columns (i)
    bias: float  # std of the low-order log coil bias coefficients
    motion_px: float  # ghosting displacement amplitude in pixels (0 = none)
    motion_cycles: float  # periods of motion during the acquisition
    contrast_jitter: float  # relative per-tissue signal jitter
    gain: float  # scanner intensity scale
    slice_profile: tuple[float, ...]  # weights of the sub-slices across the slice thickness


def tissue_values(acq: Acquisition, tissues: list[str], extras: list[dict], rng: np.random.Generator):
    """Per-structure (value, texture amplitude) lookup tables, with per-tissue jitter."""
    table = CONTRAST[acq.sequence]
    jitter = {t: float(np.exp(rng.normal(0.0, acq.contrast_jitter))) for t in _TISSUES}
    vals = np.zeros(256, dtype=np.float32)
    amps = np.zeros(256, dtype=np.float32)
    for sid, (tissue, extra) in enumerate(zip(tissues, extras)):
        if tissue not in table:
            raise PhantomError(f"no contrast for tissue {tissue!r}")
        v = table[tissue] * jitter[tissue]
        if "contrast" in extra:  # lesions / mimics: a share of the fluid signal
            v = table["fluid"] * jitter["fluid"] * float(extra["contrast"])
        if tissue == "air":
            v = 0.0
        vals[sid] = v
        amps[sid] = TEXTURE[tissue] * float(extra.get("texture", 1.0))
    return vals, amps


def _lin_upsample(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` to ``n_out`` samples (gathers, no BLAS)."""
    n_in = a.shape[axis]
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = (pos - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = n_out
    f = f.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - f) + np.take(a, i1, axis=axis) * f


def _smooth_noise(shape, rng: np.random.Generator, cell: int = 3) -> np.ndarray:
    """Unit-variance smooth random field (correlation ~ ``cell`` pixels in-plane)."""
    nk, nj, ni = shape
    cj, ci = max(nj // cell, 2), max(ni // cell, 2)
    small = rng.standard_normal((nk, cj, ci)).astype(np.float32)
    big = _lin_upsample(_lin_upsample(small, nj, 1), ni, 2)
    big -= big.mean()
    big *= np.float32(1.0 / (big.std() + 1e-6))
    return big


def _bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative coil bias: exp of a low-order polynomial (separable evaluation)."""
    nk, nj, ni = shape
    z = np.linspace(-1, 1, nk, dtype=np.float32)
    y = np.linspace(-1, 1, nj, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, ni, dtype=np.float32)[None, :]
    c = rng.normal(0.0, 1.0, 7) * strength
    inplane = np.exp(c[0] * x + c[1] * y + c[3] * (x * x - 0.33) + c[4] * (y * y - 0.33) + c[5] * x * y)
    through = np.exp(c[2] * z + c[6] * (z * z - 0.33))
    return (through[:, None, None] * inplane[None, :, :]).astype(np.float32)


def _window(n: int, frac: float, taper: float) -> np.ndarray:
    """k-space acquisition window (fft order): 1 inside the acquired centre, 0 outside, cosine taper."""
    k = np.abs(np.fft.fftfreq(n)) * 2.0  # 0 .. 1 (Nyquist)
    frac = float(np.clip(frac, 0.05, 1.0))
    w = (k <= frac + 1e-9).astype(np.float32)
    if taper > 0:
        edge0 = frac * (1.0 - taper)
        t = np.clip((k - edge0) / max(frac - edge0, 1e-6), 0.0, 1.0)
        w = w * (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
    return w


def simulate(
    ids: np.ndarray,
    n_sub: int,
    vals: np.ndarray,
    amps: np.ndarray,
    acq: Acquisition,
    rng: np.random.Generator,
) -> np.ndarray:
    """Structure-id grid (n_slices * n_sub, rows, cols) -> magnitude MR volume (n_slices, rows, cols)."""
    nks, nj, ni = ids.shape
    nk = nks // n_sub
    prof = np.asarray(acq.slice_profile, dtype=np.float32)
    prof = prof / prof.sum()
    ids4 = ids.reshape(nk, n_sub, nj, ni)
    img = np.zeros((nk, nj, ni), dtype=np.float32)
    amp = np.zeros((nk, nj, ni), dtype=np.float32)
    for m in range(n_sub):
        img += prof[m] * vals[ids4[:, m]]
        amp += prof[m] * amps[ids4[:, m]]
    fg = ids4[:, n_sub // 2] > 0
    # tissue texture (smooth, multiplicative) then coil bias
    tex = _smooth_noise(img.shape, rng)
    img *= 1.0 + amp * tex
    np.maximum(img, 0.0, out=img)
    img *= _bias_field(img.shape, rng, acq.bias)
    # k-space: truncation window, motion ghosting along phase encoding. The object continues
    # beyond the field of view: reflect-pad so the FOV border is not a (ringing) edge.
    pj, pi = nj // 8, ni // 8
    padded = np.pad(img, ((0, 0), (pj, pj), (pi, pi)), mode="reflect")
    spec = scipy.fft.fft2(padded.astype(np.complex64), axes=(1, 2), workers=1)
    nj2, ni2 = padded.shape[1:]
    n_pe = nj2 if acq.pe_axis == 1 else ni2
    n_ro = ni2 if acq.pe_axis == 1 else nj2
    w_pe = _window(n_pe, acq.acq_fraction_pe, acq.taper)
    w_ro = _window(n_ro, acq.acq_fraction_ro, acq.taper)
    if acq.motion_px > 0:
        # linear acquisition order of the phase-encode lines -> periodic displacement
        kpe = np.fft.fftfreq(n_pe)  # cycles per pixel
        order = np.argsort(np.argsort(kpe))
        phase0 = rng.uniform(0, 2 * np.pi)
        disp = acq.motion_px * np.sin(2 * np.pi * acq.motion_cycles * order / n_pe + phase0)
        ghost = np.exp(-2j * np.pi * kpe * disp).astype(np.complex64)
        w_pe = w_pe * ghost
    if acq.pe_axis == 1:
        spec *= w_pe[None, :, None] * w_ro[None, None, :]
    else:
        spec *= w_ro[None, :, None] * w_pe[None, None, :]
    cimg = scipy.fft.ifft2(spec, axes=(1, 2), workers=1)[:, pj : pj + nj, pi : pi + ni]
    if np.isfinite(acq.snr):
        ref = float(img[fg].mean()) if fg.any() else float(img.mean())
        sigma = ref / acq.snr
        noise = rng.standard_normal((2,) + img.shape, dtype=np.float32)
        noise *= np.float32(sigma)
        cimg.real += noise[0]
        cimg.imag += noise[1]
        out = np.abs(cimg)
    else:
        out = np.abs(cimg)
    out = out.astype(np.float32)
    out *= np.float32(acq.gain)
    return out
