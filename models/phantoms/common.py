"""Shared phantom machinery: the Phantom type, random streams, nuisance draws, geometry
and the render -> MR simulation -> masks pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from models.phantoms.errors import PhantomError
from models.phantoms.mr import Acquisition, check_sequence, simulate, tissue_values
from models.phantoms.render import Geometry, Rasterizer, sub_slice_offsets
from models.phantoms.shapes import Structure
from models.phantoms.spec import AcquisitionSpec
from models.types import Volume

ANATOMIES = ("knee", "shoulder", "lumbar_spine")
# pydicom's root (free for generated UIDs); NOT the node's uid_root, which marks its own results
PHANTOM_UID_ROOT = "1.2.826.0.1.3680043.8.498."

# world directions of the image axes per plane (world = patient LPS before the patient rotation)
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # (row cosine = direction of increasing column index, col cosine = increasing row index)
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}


@dataclass
class Phantom:
    """A synthetic MR series with exact labels and structure masks (same shape as the volume)."""

    anatomy: str
    seed: int
    volume: Volume
    labels: dict[str, Any]
    masks: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)  # the nuisance values actually used


class Streams:
    """Independent random streams per concern, so forcing a label or changing the grid
    does not change the anatomy or the other nuisances."""

    NAMES = ("labels", "anatomy", "lesion", "acquisition", "texture", "noise")
    labels: np.random.Generator
    anatomy: np.random.Generator
    lesion: np.random.Generator
    acquisition: np.random.Generator
    texture: np.random.Generator
    noise: np.random.Generator

    def __init__(self, anatomy: str, seed: int):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
        code = ANATOMIES.index(anatomy) + 1
        children = np.random.SeedSequence([int(seed), code]).spawn(len(self.NAMES))
        for name, ss in zip(self.NAMES, children):
            setattr(self, name, np.random.default_rng(ss))


def uniform(rng: np.random.Generator, r) -> float:
    return float(rng.uniform(r[0], r[1]))


def loguniform(rng: np.random.Generator, r) -> float:
    return float(np.exp(rng.uniform(np.log(r[0]), np.log(r[1]))))


def choice(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    p = np.asarray([probs[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def draw_nuisances(rng: np.random.Generator, a: AcquisitionSpec) -> dict[str, Any]:
    """Every acquisition nuisance, drawn in a fixed order (never depends on labels)."""
    n: dict[str, Any] = {}
    n["sequence"] = a.sequence
    n["snr"] = loguniform(rng, a.snr)
    n["slice_thickness"] = uniform(rng, a.slice_thickness_mm)
    n["slice_gap_fraction"] = uniform(rng, a.slice_gap_fraction)
    n["coverage"] = uniform(rng, a.coverage_mm)
    n["fov"] = uniform(rng, a.fov_mm)
    n["matrix"] = a.matrix
    n["acq_fraction_pe"] = uniform(rng, a.acq_fraction_pe)
    n["acq_fraction_ro"] = uniform(rng, a.acq_fraction_ro)
    n["taper"] = uniform(rng, a.taper)
    n["pe_axis"] = int(rng.integers(1, 3))
    n["inplane_rotation"] = uniform(rng, (-a.inplane_rotation_deg, a.inplane_rotation_deg))
    n["tilt_row"] = uniform(rng, (-a.tilt_deg, a.tilt_deg))
    n["tilt_col"] = uniform(rng, (-a.tilt_deg, a.tilt_deg))
    n["shift"] = tuple(uniform(rng, (-s, s)) for s in a.shift_mm)
    s = uniform(rng, a.anatomy_scale)
    n["scale"] = tuple(s * (1.0 + uniform(rng, (-a.anatomy_aspect, a.anatomy_aspect))) for _ in range(3))
    n["bias"] = uniform(rng, a.bias)
    moving = bool(rng.uniform() < a.motion_prob)
    px = uniform(rng, a.motion_px)
    n["motion_px"] = px if moving else 0.0
    n["motion_cycles"] = uniform(rng, (2.0, 12.0))
    n["contrast_jitter"] = a.contrast_jitter
    n["gain"] = loguniform(rng, a.gain)
    n["n_slices"] = None  # derived from coverage unless forced
    n["sub_slices"] = a.sub_slices
    n["orientation"] = None  # anatomy default
    return n


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any], label_keys: set[str]) -> None:
    for key, val in overrides.items():
        if key in label_keys:
            continue
        if key not in values:
            allowed = sorted(set(values) | label_keys)
            raise PhantomError(f"unknown override {key!r}; allowed: {', '.join(allowed)}")
        values[key] = val
    check_sequence(values["sequence"])
    if values["matrix"] is None or int(values["matrix"]) < 32 or int(values["matrix"]) > 1024:
        raise PhantomError(f"matrix must be 32..1024, got {values['matrix']!r}")
    if values["snr"] is not None and float(values["snr"]) <= 0:
        raise PhantomError("snr must be positive (or inf for a noise-free volume)")
    if values["n_slices"] is not None and not (1 <= int(values["n_slices"]) <= 512):
        raise PhantomError(f"n_slices must be 1..512, got {values['n_slices']!r}")


def _axis_rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def make_geometry(
    n: dict[str, Any],
    *,
    plane: str,
    center: tuple[float, float, float],
    mirror=(1.0, 1.0, 1.0),
    r_patient: np.ndarray | None = None,
    t_patient=(0.0, 0.0, 0.0),
    spec_slices: tuple[int, int] = (1, 512),
) -> Geometry:
    if plane not in PLANES:
        raise PhantomError(f"unknown orientation {plane!r}; expected one of {sorted(PLANES)}")
    base_row, base_col = PLANES[plane]
    thick = float(n["slice_thickness"])
    spacing = thick * (1.0 + float(n["slice_gap_fraction"]))
    if n["n_slices"] is not None:
        n_slices = int(n["n_slices"])
    else:
        n_slices = int(np.clip(round(float(n["coverage"]) / spacing), spec_slices[0], spec_slices[1]))
    matrix = int(n["matrix"])
    pix = float(n["fov"]) / matrix
    normal = np.cross(base_row, base_col)
    r_n = (
        _axis_rotation(normal, n["inplane_rotation"])
        @ _axis_rotation(base_row, n["tilt_row"])
        @ _axis_rotation(base_col, n["tilt_col"])
    )
    su, sv, sw = n["shift"]
    c = np.asarray(center, float) + r_n @ (su * normal + sv * np.asarray(base_col) + sw * np.asarray(base_row))
    return Geometry(
        n_slices=n_slices,
        rows=matrix,
        cols=matrix,
        slice_spacing=spacing,
        slice_thickness=thick,
        row_spacing=pix,
        col_spacing=pix,
        base_row=base_row,
        base_col=base_col,
        center=tuple(c),
        r_nuisance=r_n,
        scale=tuple(n["scale"]),
        mirror=tuple(mirror),
        r_patient=np.eye(3) if r_patient is None else np.asarray(r_patient, float),
        t_patient=tuple(t_patient),
    )


def slice_profile(n_sub: int) -> tuple[float, ...]:
    """Sub-slice weights: a flat-topped profile with softer edges."""
    if n_sub == 1:
        return (1.0,)
    x = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    w = 1.0 - 0.6 * (2 * np.abs(x)) ** 2
    return tuple(float(v) for v in w / w.sum())


def acquisition_of(n: dict[str, Any]) -> Acquisition:
    snr = float("inf") if n["snr"] is None else float(n["snr"])
    return Acquisition(
        sequence=n["sequence"],
        snr=snr,
        acq_fraction_pe=float(n["acq_fraction_pe"]),
        acq_fraction_ro=float(n["acq_fraction_ro"]),
        taper=float(n["taper"]),
        pe_axis=int(n["pe_axis"]),
        bias=float(n["bias"]),
        motion_px=float(n["motion_px"]),
        motion_cycles=float(n["motion_cycles"]),
        contrast_jitter=float(n["contrast_jitter"]),
        gain=float(n["gain"]),
        slice_profile=slice_profile(int(n["sub_slices"])),
    )


@dataclass
class Rendered:
    array: np.ndarray
    masks: dict[str, np.ndarray]


def render(
    structures: list[Structure],
    geom: Geometry,
    n: dict[str, Any],
    streams: Streams,
    *,
    lesion_groups: tuple[str, ...] = (),
) -> Rendered:
    """Paint, simulate the acquisition and derive masks (mid sub-slice; lesions: any sub-slice)."""
    n_sub = int(n["sub_slices"])
    if n_sub < 1 or n_sub > 9:
        raise PhantomError("sub_slices must be 1..9")
    ras = Rasterizer(geom, sub_slice_offsets(geom, n_sub))
    for s in structures:
        ras.paint(s)
    extras = [dict()] + [s.extra for s in structures]
    acq = acquisition_of(n)
    vals, amps = tissue_values(acq, ras.tissues, extras, streams.texture)
    array = simulate(ras.ids, n_sub, vals, amps, acq, streams.noise)
    nk = geom.n_slices
    ids4 = ras.ids.reshape(nk, n_sub, geom.rows, geom.cols)
    mid = ids4[:, n_sub // 2]
    masks: dict[str, np.ndarray] = {}
    groups: dict[str, list[int]] = {}
    for sid, g in enumerate(ras.groups):
        if sid == 0:
            continue
        groups.setdefault(g, []).append(sid)
    for g, sids in groups.items():
        lut = np.zeros(256, dtype=bool)
        lut[sids] = True
        if g in lesion_groups:
            masks[g] = np.asarray(lut[ids4].any(axis=1))
        else:
            masks[g] = lut[mid]
    for g in lesion_groups:
        masks.setdefault(g, np.zeros(geom.shape, dtype=bool))
    masks["foreground"] = mid > 0
    return Rendered(array=array, masks=masks)


def fat_septa(rng: np.random.Generator, n: int, lo, hi, *, size=(15.0, 45.0), length=(30.0, 80.0)):
    """``n`` thin fat sheets (intermuscular septa) at random positions in the box [lo, hi] of the
    anatomy frame: (centre, radii, rotation) tuples, drawn in a fixed order."""
    from models.phantoms.shapes import rotation

    out = []
    for _ in range(n):
        c = rng.uniform(lo, hi)
        radii = (float(rng.uniform(*size)), float(rng.uniform(0.5, 0.9)), float(rng.uniform(*length)))
        rot = rotation("z", float(rng.uniform(0, 180))) @ rotation("x", float(rng.uniform(-25, 25)))
        out.append((c, radii, rot))
    return out


def centre_of(mask: np.ndarray) -> tuple[int, int, int] | None:
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return None
    c = idx.mean(axis=0)
    # the voxel of the mask closest to the centroid (a centroid can fall outside a curved lesion)
    best = idx[np.argmin(((idx - c) ** 2).sum(axis=1))]
    k, j, i = (int(v) for v in best)
    return k, j, i


def vox_and_mm(geom: Geometry, kji) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    kji = tuple(round(float(v)) for v in kji)
    kji = (
        int(np.clip(kji[0], 0, geom.n_slices - 1)),
        int(np.clip(kji[1], 0, geom.rows - 1)),
        int(np.clip(kji[2], 0, geom.cols - 1)),
    )
    mm = geom.patient_of_index(np.asarray(kji, float))
    x, y, z = (round(float(v), 3) for v in mm)
    return kji, (x, y, z)


def series_uids(anatomy: str, seed: int, n: dict[str, Any], plane: str, uid_root: str = PHANTOM_UID_ROOT):
    """Deterministic (study, series, frame of reference) UIDs for one phantom series."""
    study = generate_uid(prefix=uid_root, entropy_srcs=["study", anatomy, str(seed)])
    frame = generate_uid(prefix=uid_root, entropy_srcs=["frame", anatomy, str(seed)])
    key = [
        "series",
        anatomy,
        str(seed),
        plane,
        str(n["sequence"]),
        str(n["matrix"]),
        str(n["n_slices"]),
        f"{float(n['slice_thickness']):.4f}",
        f"{float(n['fov']):.4f}",
        repr(sorted(n.get("_overrides", {}).items())),
    ]
    series = generate_uid(prefix=uid_root, entropy_srcs=key)
    return study, series, frame
