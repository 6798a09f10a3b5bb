"""Preprocessing transforms (MONAI style: an array version and a dictionary version, `d` suffix).

The path from a `Volume` to a network input is geometric and invertible, so saliency
maps go back into the geometry of the input series:

1. `ToCanonical`: permute/flip the array so its axes follow the canonical axes of the
   nearest standard plane (sagittal: slices toward patient right→left, rows head→feet,
   columns anterior→posterior) — the same layout whatever the vendor's row/column choice.
2. `ResampleToRoi`: a central region of interest given in millimetres, resampled to a
   fixed grid with separable linear interpolation (triangle filter widened when
   downsampling, i.e. anti-aliased). Out-of-field voxels are 0.
3. `RobustScale`: divide by a high percentile so tissue lies roughly in [0, 1].

`Frame` records the mapping; ``Frame.to_source(grid_array)`` maps a network-grid map
(e.g. a heatmap) back to the source array's shape and orientation.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.transforms import MapTransform, Transform

from models.types import Volume

# canonical world directions (patient LPS) of the (row-cosine, column-cosine) per plane; normal = cross
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}
_NORMAL_AXIS_PLANE = {0: "sagittal", 1: "coronal", 2: "axial"}


def detect_plane(volume: Volume) -> tuple[str, float]:
    """Nearest standard plane of the slice normal and the obliquity in degrees."""
    n = np.abs(volume.normal)
    axis = int(np.argmax(n))
    angle = float(np.degrees(np.arccos(np.clip(n[axis] / (np.linalg.norm(n) + 1e-12), -1, 1))))
    return _NORMAL_AXIS_PLANE[axis], angle


def _array_axis_directions(volume: Volume) -> np.ndarray:
    """World direction of increasing index along array axes (k, j, i)."""
    normal = volume.normal
    if len(volume.positions) > 1:
        step = np.asarray(volume.positions[-1], float) - np.asarray(volume.positions[0], float)
        if np.linalg.norm(step) > 1e-6 and float(np.dot(step, normal)) < 0:
            normal = -normal
    return np.stack([normal, np.asarray(volume.col_cosine, float), np.asarray(volume.row_cosine, float)])


def canonical_layout(
    volume: Volume, plane: str | None = None
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], str]:
    """(perm, flips, plane): canonical = flip(transpose(array, perm)); axis t of the result is source axis perm[t]
    (perm[0] is always 0)."""
    plane = plane or detect_plane(volume)[0]
    r0, c0 = (np.asarray(v, float) for v in PLANES[plane])
    targets = np.stack([np.cross(r0, c0), c0, r0])  # canonical directions of axes (k, j, i)
    dirs = _array_axis_directions(volume)
    dots = targets @ dirs.T  # [target, source]
    best: tuple[float, tuple[int, int, int]] | None = None
    # the slice axis stays first (the acquisition's normal is the through-plane direction even for
    # strongly oblique planes such as the coronal-oblique shoulder; a wrong plane is QC's business):
    # only the in-plane order and the flips are chosen
    for perm in ((0, 1, 2), (0, 2, 1)):
        score = sum(abs(dots[t, perm[t]]) for t in range(3))
        if best is None or score > best[0] + 1e-9:
            best = (score, perm)
    assert best is not None
    perm = best[1]
    flips = (bool(dots[0, perm[0]] < 0), bool(dots[1, perm[1]] < 0), bool(dots[2, perm[2]] < 0))
    return perm, flips, plane


def interp_matrix(n_src: int, origin: float, step: float, n_out: int, antialias: bool = True) -> np.ndarray:
    """(n_out, n_src) linear-interpolation weights sampling source index ``origin + n*step``.

    When ``step > 1`` (downsampling) the triangle kernel is widened to ``step`` source voxels.
    Samples outside the source get zero weight (and a row of zeros when wholly outside)."""
    width = max(1.0, abs(step)) if antialias else 1.0
    pos = origin + np.arange(n_out, dtype=np.float64) * step
    src = np.arange(n_src, dtype=np.float64)
    w = np.clip(1.0 - np.abs(pos[:, None] - src[None, :]) / width, 0.0, None)
    inside = (pos >= -0.5) & (pos <= n_src - 0.5)
    s = w.sum(axis=1, keepdims=True)
    w = np.where(s > 0, w / np.maximum(s, 1e-12), 0.0)
    w[~inside] = 0.0
    return w.astype(np.float32)


def apply_separable(x: np.ndarray, mk: np.ndarray, mj: np.ndarray, mi: np.ndarray) -> np.ndarray:
    """y[a,b,c] = sum mk[a,k] mj[b,j] mi[c,i] x[k,j,i], cheapest order first."""
    x = np.asarray(x, dtype=np.float32)
    # crop the source to the columns any weight touches (the ROI), then contract
    cuts = []
    for m in (mk, mj, mi):
        nz = np.flatnonzero(np.abs(m).sum(axis=0) > 0)
        cuts.append((int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1))
    (k0, k1), (j0, j1), (i0, i1) = cuts
    x = x[k0:k1, j0:j1, i0:i1]
    mk, mj, mi = mk[:, k0:k1], mj[:, j0:j1], mi[:, i0:i1]
    y = x @ mi.T  # (k, j, c)
    y = np.einsum("bj,kjc->kbc", mj, y, optimize=True)
    y = np.tensordot(mk, y, axes=(1, 0))
    return np.ascontiguousarray(y, dtype=np.float32)


@dataclass(frozen=True)
class Frame:
    """The mapping source array -> canonical array -> network grid (and back)."""

    source_shape: tuple[int, int, int]
    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    plane: str
    canonical_spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # canonical index of network voxel 0, per axis
    step: tuple[float, float, float]  # canonical voxels per network voxel, per axis
    out_shape: tuple[int, int, int]

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(self.source_shape[p] for p in self.perm)  # type: ignore[return-value]

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s * st) for s, st in zip(self.canonical_spacing, self.step))  # type: ignore[return-value]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        a = np.transpose(array, self.perm)
        for ax, f in enumerate(self.flips):
            if f:
                a = np.flip(a, axis=ax)
        return a

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        a = array
        for ax, f in enumerate(self.flips):
            if f:
                a = np.flip(a, axis=ax)
        inv = np.argsort(self.perm)
        return np.ascontiguousarray(np.transpose(a, inv))

    def to_grid(self, array: np.ndarray, antialias: bool = True) -> np.ndarray:
        """Source-geometry array -> network grid."""
        c = self.to_canonical(np.asarray(array, dtype=np.float32))
        origin, step = list(self.origin), list(self.step)
        if antialias:
            # strong downsampling: block-average first (cheap), then interpolate the rest of the way
            for a in range(3):
                f = int(step[a] // 1.5)
                if f >= 2 and c.shape[a] >= 2 * f:
                    n = (c.shape[a] // f) * f
                    c = np.take(c, np.arange(n), axis=a)
                    shape = list(c.shape)
                    shape[a : a + 1] = [n // f, f]
                    c = c.reshape(shape).mean(axis=a + 1)
                    origin[a] = (origin[a] - (f - 1) / 2.0) / f
                    step[a] = step[a] / f
        ms = [interp_matrix(c.shape[a], origin[a], step[a], self.out_shape[a], antialias) for a in range(3)]
        return apply_separable(c, *ms)

    def to_source(self, grid: np.ndarray) -> np.ndarray:
        """Network-grid array (e.g. a heatmap) -> the source array's shape and orientation (0 outside the ROI)."""
        cs = self.canonical_shape
        ms = []
        for a in range(3):
            m = interp_matrix(
                self.out_shape[a], -self.origin[a] / self.step[a], 1.0 / self.step[a], cs[a], antialias=False
            )
            ms.append(m)
        return self.from_canonical(apply_separable(np.asarray(grid, np.float32), *ms))

    def grid_to_source_index(self, n: Sequence[float]) -> tuple[float, float, float]:
        """Network-grid voxel index -> source (k, j, i) index (fractional)."""
        c = [self.origin[a] + float(n[a]) * self.step[a] for a in range(3)]
        cs = self.canonical_shape
        for a, f in enumerate(self.flips):
            if f:
                c[a] = cs[a] - 1 - c[a]
        src = [0.0, 0.0, 0.0]
        for t, p in enumerate(self.perm):
            src[p] = c[t]
        return tuple(src)  # type: ignore[return-value]

    def source_to_grid_index(self, kji: Sequence[float]) -> tuple[float, float, float]:
        cs = self.canonical_shape
        c = [float(kji[p]) for p in self.perm]
        for a, f in enumerate(self.flips):
            if f:
                c[a] = cs[a] - 1 - c[a]
        return tuple((c[a] - self.origin[a]) / self.step[a] for a in range(3))  # type: ignore[return-value]


def _int3(v: Sequence[Any]) -> tuple[int, int, int]:
    return int(v[0]), int(v[1]), int(v[2])


def _float3(v: Sequence[Any]) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


def make_frame(
    volume: Volume, out_shape: Sequence[int], roi_mm: Sequence[float | None] | None = None, plane: str | None = None
) -> Frame:
    """The Frame of ``volume`` for a central ROI (mm per canonical axis; None = full extent) on ``out_shape``."""
    perm, flips, plane = canonical_layout(volume, plane)
    spacing = tuple(float(volume.spacing[p]) for p in perm)
    shape = tuple(int(volume.array.shape[p]) for p in perm)
    origin, step = [], []
    for a in range(3):
        extent = shape[a] * spacing[a]
        roi_a = None if roi_mm is None else roi_mm[a]
        roi = extent if roi_a is None else float(roi_a)
        st = (roi / out_shape[a]) / spacing[a]
        centre = (shape[a] - 1) / 2.0
        origin.append(centre - (out_shape[a] - 1) / 2.0 * st)
        step.append(st)
    return Frame(
        source_shape=_int3(volume.array.shape),
        perm=perm,
        flips=flips,
        plane=plane,
        canonical_spacing=_float3(spacing),
        origin=_float3(origin),
        step=_float3(step),
        out_shape=_int3(out_shape),
    )


def make_native_frame(
    volume: Volume,
    out_shape: Sequence[int],
    target_mm: Sequence[float],
    plane: str | None = None,
    offset_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> Frame:
    """A Frame that samples native voxels: per canonical axis an integer step (the whole number of
    source voxels nearest ``target_mm``, at least 1) from a voxel-aligned origin, so a line one
    native pixel thick keeps its full contrast (no interpolation between pixels or slices). The
    grid is centred on the field of view moved by ``offset_mm``; the millimetres it covers follow
    the source spacing, and samples outside the source are zero."""
    perm, flips, plane = canonical_layout(volume, plane)
    spacing = tuple(float(volume.spacing[p]) for p in perm)
    shape = tuple(int(volume.array.shape[p]) for p in perm)
    origin, step = [], []
    for a in range(3):
        st = max(1, round(float(target_mm[a]) / spacing[a]))
        centre = (shape[a] - 1) / 2.0 + float(offset_mm[a]) / spacing[a]
        origin.append(float(np.floor(centre - (out_shape[a] - 1) / 2.0 * st + 0.5)))
        step.append(float(st))
    return Frame(
        source_shape=_int3(volume.array.shape),
        perm=perm,
        flips=flips,
        plane=plane,
        canonical_spacing=_float3(spacing),
        origin=_float3(origin),
        step=_float3(step),
        out_shape=_int3(out_shape),
    )


def robust_scale(x: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    sub = x.reshape(-1)
    if sub.size > 200_000:
        sub = sub[:: sub.size // 200_000 + 1]
    hi = float(np.percentile(sub, percentile))
    if not np.isfinite(hi) or hi <= 0:
        hi = float(np.abs(sub).max()) or 1.0
    return (x / hi).astype(np.float32)


# --- MONAI transforms: array and dictionary versions -----------------------------------


class ResampleToRoi(Transform):
    """Volume -> (1, D, H, W) float32 on the network grid; also returns the Frame."""

    def __init__(
        self, out_shape: Sequence[int], roi_mm: Sequence[float | None] | None = None, plane: str | None = None
    ):
        self.out_shape = tuple(int(s) for s in out_shape)
        self.roi_mm = roi_mm
        self.plane = plane

    def __call__(self, volume: Volume) -> tuple[np.ndarray, Frame]:
        frame = make_frame(volume, self.out_shape, self.roi_mm, self.plane)
        return frame.to_grid(volume.array)[None], frame


class ResampleToRoid(MapTransform):
    """dict["volume"] -> dict["image"] (1, D, H, W) + dict["frame"]; other ``mask_keys`` (source-shaped
    arrays) are resampled with the same frame."""

    def __init__(self, out_shape, roi_mm=None, plane=None, volume_key="volume", image_key="image", mask_keys=()):
        super().__init__([volume_key])
        self.op = ResampleToRoi(out_shape, roi_mm, plane)
        self.volume_key, self.image_key, self.mask_keys = volume_key, image_key, tuple(mask_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        img, frame = self.op(d[self.volume_key])
        d[self.image_key] = img
        d["frame"] = frame
        for k in self.mask_keys:
            if k in d and d[k] is not None:
                d[k] = frame.to_grid(np.asarray(d[k], np.float32))[None]
        return d


class RobustScale(Transform):
    """Divide by the given percentile of the array (robust to a few bright voxels)."""

    def __init__(self, percentile: float = 99.5):
        self.percentile = percentile

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return robust_scale(np.asarray(x, np.float32), self.percentile)


class RobustScaled(MapTransform):
    def __init__(self, keys, percentile: float = 99.5, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.op = RobustScale(percentile)

    def __call__(self, data):
        d = dict(data)
        for k in self.key_iterator(d):
            d[k] = self.op(d[k])
        return d


def preprocess(volume: Volume, out_shape, roi_mm=None, plane: str | None = None) -> tuple[np.ndarray, Frame]:
    """Volume -> ((1, D, H, W) float32 scaled network input, Frame)."""
    img, frame = ResampleToRoi(out_shape, roi_mm, plane)(volume)
    return RobustScale()(img), frame


def training_augmentation(
    *, flip_slices: bool, affine: bool = False, keys=("image",), lesion_key: str | None = "lesion", seed: int = 0
):
    """MONAI augmentation chain for (C, D, H, W) training inputs (geometric ops also move the lesion mask).

    Phantoms already vary in rotation, shift and size, so the random affine is off by default
    (it costs more CPU than the network step); sites training on few real cases turn it on."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
    )

    spatial = list(keys) + ([lesion_key] if lesion_key else [])
    ops: list[MapTransform] = []
    if flip_slices:
        ops.append(RandFlipd(keys=spatial, prob=0.5, spatial_axis=0, allow_missing_keys=True))
    if affine:
        ops.append(
            RandAffined(
                keys=spatial,
                prob=0.7,
                rotate_range=(np.deg2rad(6), 0.0, 0.0),
                scale_range=(0.0, 0.08, 0.08),
                translate_range=(1.0, 6.0, 6.0),
                mode=["bilinear"] * len(spatial),
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        )
    ops += [
        RandScaleIntensityd(keys=list(keys), factors=0.15, prob=0.5),
        RandAdjustContrastd(keys=list(keys), gamma=(0.8, 1.25), prob=0.3),
        RandGaussianNoised(keys=list(keys), std=0.02, prob=0.3),
    ]
    chain = Compose(ops)
    chain.set_random_state(seed=seed)
    return chain
