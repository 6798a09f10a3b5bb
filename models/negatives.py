"""Synthetic out-of-distribution MR volumes for the QC anatomy classifier ("other" class).

Brain-like heads, abdomen-like trunks, thigh/calf-like limbs, water phantoms and pure
noise or smooth fields, in sagittal / coronal / axial slices with MR-like contrast
(T1/T2/PD), Rician noise, bias field and random geometry. Reproducible from a seed.
They teach the gate that "not a knee/shoulder/spine" exists; the gate is tested on real
MR it never saw (the MNI152 brain template, pydicom-data files).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.transforms import PLANES
from models.types import Volume

KINDS = ("brain", "abdomen", "limb", "water_phantom", "noise", "smooth")


def _grid(rng, plane: str, n_slices: int, matrix: int, fov: float, spacing: float):
    row, col = (np.asarray(v, float) for v in PLANES[plane])
    ang = np.deg2rad(rng.uniform(-10, 10))
    normal = np.cross(row, col)
    # small in-plane rotation
    r2 = np.cos(ang) * row + np.sin(ang) * col
    c2 = -np.sin(ang) * row + np.cos(ang) * col
    pix = fov / matrix
    k = (np.arange(n_slices) - (n_slices - 1) / 2) * spacing
    j = (np.arange(matrix) - (matrix - 1) / 2) * pix
    i = (np.arange(matrix) - (matrix - 1) / 2) * pix
    kk, jj, ii = np.meshgrid(k, j, i, indexing="ij")
    pts = kk[..., None] * normal + jj[..., None] * c2 + ii[..., None] * r2  # (k, j, i, 3) in mm (LPS)
    origin = -((n_slices - 1) / 2) * spacing * normal - ((matrix - 1) / 2) * pix * (c2 + r2)
    positions = np.array([origin + s * spacing * normal for s in range(n_slices)])
    return pts, r2, c2, positions, pix


def _ellipsoid(p, centre, radii):
    q = (p - np.asarray(centre)) / np.asarray(radii)
    return (q**2).sum(axis=-1)


def _smooth_noise(rng, shape, sigma):
    return ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)


def _brain(rng, p, contrast):
    s = rng.uniform(0.85, 1.15)
    head = _ellipsoid(p, (0, 0, 0), (72 * s, 92 * s, 80 * s))  # x: LR, y: AP, z: SI
    sig = np.zeros(p.shape[:3], np.float32)
    vals = {
        "T1": dict(scalp=0.9, skull=0.08, csf=0.12, gm=0.45, wm=0.7, fat=0.95),
        "T2": dict(scalp=0.6, skull=0.05, csf=1.0, gm=0.55, wm=0.35, fat=0.7),
        "PD": dict(scalp=0.8, skull=0.06, csf=0.85, gm=0.7, wm=0.55, fat=0.9),
    }[contrast]
    sig[head < 1.0] = vals["scalp"]
    sig[head < 0.92] = vals["skull"]
    brain = _ellipsoid(p, (0, 0, 4), (64 * s, 84 * s, 70 * s))
    sig[brain < 1.0] = vals["csf"]
    folds = _smooth_noise(rng, sig.shape, 1.2)
    cortex = brain < 0.95
    sig[cortex] = vals["gm"]
    wm = (brain < 0.7) & (folds > -0.15 * folds.std())
    sig[wm] = vals["wm"]
    for side in (-1, 1):  # lateral ventricles
        v = _ellipsoid(p, (side * 9 * s, 5, 12), (6 * s, 28 * s, 9 * s))
        sig[v < 1.0] = vals["csf"]
    cereb = _ellipsoid(p, (0, 45 * s, -38 * s), (45 * s, 25 * s, 20 * s))
    sig[cereb < 1.0] = np.where(folds[cereb < 1.0] > 0, vals["gm"], vals["wm"])
    stem = _ellipsoid(p, (0, 20 * s, -45 * s), (11 * s, 11 * s, 35 * s))
    sig[stem < 1.0] = vals["wm"]
    for side in (-1, 1):  # orbits / eyes
        e = _ellipsoid(p, (side * 32 * s, -70 * s, -20 * s), (12, 12, 12))
        sig[e < 1.0] = vals["csf"] * 0.9
    return sig


def _abdomen(rng, p, contrast):
    s = rng.uniform(0.85, 1.2)
    body = _ellipsoid(p * np.array([1, 1, 0.0]) + np.array([0, 0, 0]), (0, 0, 0), (160 * s, 115 * s, 1))
    sig = np.zeros(p.shape[:3], np.float32)
    fat = 0.9 if contrast != "T2" else 0.75
    sig[body < 1.0] = fat
    inner = _ellipsoid(p * np.array([1, 1, 0.0]), (0, 0, 0), (140 * s, 98 * s, 1))
    sig[inner < 1.0] = 0.35  # muscle wall
    cav = _ellipsoid(p * np.array([1, 1, 0.0]), (0, -5, 0), (128 * s, 85 * s, 1))
    bowel = _smooth_noise(rng, sig.shape, 2.5)
    sig[cav < 1.0] = np.where(bowel[cav < 1.0] > 0, 0.55, 0.25 if contrast == "T1" else 0.8)
    liver = _ellipsoid(p, (-60 * s, -10, 30), (70 * s, 60 * s, 80 * s))
    sig[(liver < 1.0) & (cav < 1.0)] = 0.5 if contrast == "T1" else 0.3
    for side in (-1, 1):
        kid = _ellipsoid(p, (side * 55 * s, 45 * s, -10), (22, 18, 50))
        sig[kid < 1.0] = 0.4 if contrast == "T1" else 0.7
    vert = _ellipsoid(p * np.array([1, 1, 0.0]), (0, 60 * s, 0), (22, 18, 1))
    sig[vert < 1.0] = 0.5
    canal = _ellipsoid(p * np.array([1, 1, 0.0]), (0, 85 * s, 0), (8, 8, 1))
    sig[canal < 1.0] = 0.9 if contrast == "T2" else 0.15
    aorta = _ellipsoid(p * np.array([1, 1, 0.0]), (-12, 35 * s, 0), (11, 11, 1))
    sig[aorta < 1.0] = 0.05
    return sig


def _limb(rng, p, contrast):
    s = rng.uniform(0.8, 1.2)
    leg = _ellipsoid(p * np.array([1, 1, 0.0]), (0, 0, 0), (65 * s, 70 * s, 1))
    sig = np.zeros(p.shape[:3], np.float32)
    sig[leg < 1.0] = 0.85
    mus = _ellipsoid(p * np.array([1, 1, 0.0]), (0, 0, 0), (55 * s, 60 * s, 1))
    tex = _smooth_noise(rng, sig.shape, 1.5)
    sig[mus < 1.0] = 0.3 + 0.05 * np.sign(tex[mus < 1.0])
    bone = _ellipsoid(p * np.array([1, 1, 0.0]), (5, -5, 0), (14 * s, 14 * s, 1))
    sig[bone < 1.0] = 0.05
    sig[bone < 0.55] = 0.8 if contrast == "T1" else 0.25
    return sig


def _water(rng, p, contrast):
    r = rng.uniform(70, 110)
    cyl = _ellipsoid(p * np.array([1, 1, 0.0]), (0, 0, 0), (r, r, 1)) < 1.0
    cyl &= np.abs(p[..., 2]) < rng.uniform(60, 120)
    sig = np.where(cyl, 0.8, 0.0).astype(np.float32)
    for _ in range(int(rng.integers(0, 6))):
        c = rng.uniform(-0.6 * r, 0.6 * r, 3)
        c[2] = rng.uniform(-40, 40)
        rod = _ellipsoid(p * np.array([1, 1, 0.0]), c * np.array([1, 1, 0]), (8, 8, 1)) < 1.0
        sig[rod & cyl] = rng.uniform(0.1, 1.0)
    return sig


def generate_negative(seed: int, kind: str | None = None) -> Volume:
    """One out-of-distribution MR-like volume."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 77]))
    kind = kind or str(rng.choice(KINDS, p=[0.35, 0.25, 0.15, 0.1, 0.075, 0.075]))
    plane = str(rng.choice(("sagittal", "coronal", "axial")))
    contrast = str(rng.choice(("T1", "T2", "PD")))
    fov_range = {"brain": (200, 260), "abdomen": (320, 440), "limb": (140, 220), "water_phantom": (200, 300)}.get(
        kind, (120, 400)
    )
    fov = float(rng.uniform(*fov_range))
    n_slices = int(rng.integers(14, 41))
    spacing = float(rng.uniform(3.0, 6.0))
    matrix = int(rng.choice([64, 96]))
    p, row, col, positions, pix = _grid(rng, plane, n_slices, matrix, fov, spacing)
    p = p + rng.uniform(-10, 10, 3)
    if kind == "brain":
        sig = _brain(rng, p, contrast)
    elif kind == "abdomen":
        sig = _abdomen(rng, p, contrast)
    elif kind == "limb":
        sig = _limb(rng, p, contrast)
    elif kind == "water_phantom":
        sig = _water(rng, p, contrast)
    elif kind == "smooth":
        sig = np.abs(_smooth_noise(rng, p.shape[:3], float(rng.uniform(2, 8)))) * 20
    else:
        sig = np.zeros(p.shape[:3], np.float32)
    sig = sig * np.exp(rng.normal(0, 0.08, sig.shape)).astype(np.float32) if kind != "noise" else sig
    sig = ndimage.gaussian_filter(sig, (0.6, 0.7, 0.7))
    bias = np.exp(_smooth_noise(rng, sig.shape, 12) * 8 * rng.uniform(0, 0.3))
    sig = sig * bias
    snr = float(np.exp(rng.uniform(np.log(8), np.log(40))))
    ref = float(sig[sig > 0.1].mean()) if (sig > 0.1).any() else 1.0
    sigma = ref / snr
    noisy = np.sqrt((sig + rng.normal(0, sigma, sig.shape)) ** 2 + rng.normal(0, sigma, sig.shape) ** 2)
    gain = float(np.exp(rng.uniform(np.log(300), np.log(3000))))
    arr = (noisy * gain).astype(np.float32)
    return Volume(
        array=arr,
        spacing=(spacing, pix, pix),
        positions=positions,
        row_cosine=tuple(row),
        col_cosine=tuple(col),
        series_uid=f"negative-{kind}-{seed}",
        modality="MR",
        body_part="KNEE",
        sop_instance_uids=tuple(f"neg-{seed}-{k}" for k in range(n_slices)),
        frame_numbers=(None,) * n_slices,
        attributes={"synthetic_kind": kind, "plane": plane},
    )
