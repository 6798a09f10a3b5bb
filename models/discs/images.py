"""Canonical mid-sagittal image and the geometry between it, the localiser grid and the disc patches.

Canonical orientation: rows run head to feet, columns anterior to posterior (the usual sagittal
display); ``spacing`` = (row, col) mm. A `Canonical` remembers how to map its pixels back to the
source `Volume` (slice index and row/column flips) for the finding locations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from models.types import Volume

GRID = 256  # localiser grid (square, isotropic)
PATCH = 64  # grader patch (pixels)
PATCH_MM = 0.9  # grader patch pixel size: 57.6 mm around the disc centre
CONTEXT_MM = 1.8  # second grader channel: 115 mm around the disc (neighbouring discs, CSF as reference)


@dataclass
class Canonical:
    image: np.ndarray  # (H, W) float32, normalised intensities
    spacing: tuple[float, float]  # (row, col) mm
    slice_index: int = 0
    flip_rows: bool = False
    flip_cols: bool = False
    source_shape: tuple[int, int] | None = None

    def to_voxel(self, r: float, c: float) -> tuple[int, int, int]:
        """(slice, row, col) voxel of the source volume for canonical pixel (r, c)."""
        h, w = self.image.shape
        r, c = min(max(float(r), 0.0), h - 1.0), min(max(float(c), 0.0), w - 1.0)
        rr = (h - 1 - r) if self.flip_rows else r
        cc = (w - 1 - c) if self.flip_cols else c
        return (int(self.slice_index), round(rr), round(cc))


def normalise(img: np.ndarray) -> np.ndarray:
    """Intensities / the 99.5th percentile of the foreground, clipped to [0, 1.5]."""
    a = np.asarray(img, dtype=np.float32)
    fg = a[a > np.percentile(a, 5)] if a.size else a
    hi = float(np.percentile(fg, 99.5)) if fg.size else 1.0
    return np.clip(a / max(hi, 1e-6), 0.0, 1.5).astype(np.float32)


def volume_midslice(volume: Volume) -> Canonical:
    """The central slice of a sagittal series in canonical orientation (head up, anterior left)."""
    arr = np.asarray(volume.array, dtype=np.float32)
    k = arr.shape[0] // 2
    img = arr[k]
    col = np.asarray(volume.col_cosine, dtype=np.float64)  # direction of increasing row index
    row = np.asarray(volume.row_cosine, dtype=np.float64)  # direction of increasing column index
    flip_rows = bool(col[2] > 0)  # rows run feet -> head: flip (patient +z is superior)
    flip_cols = bool(row[1] < 0)  # columns run posterior -> anterior: flip (patient +y is posterior)
    if flip_rows:
        img = img[::-1]
    if flip_cols:
        img = img[:, ::-1]
    return Canonical(
        image=normalise(np.ascontiguousarray(img)),
        spacing=(float(volume.spacing[1]), float(volume.spacing[2])),
        slice_index=k,
        flip_rows=flip_rows,
        flip_cols=flip_cols,
        source_shape=(int(arr.shape[1]), int(arr.shape[2])),
    )


@dataclass(frozen=True)
class GridMap:
    """Canonical pixel (r, c) <-> localiser grid pixel (y, x): isotropic ``mm`` per grid pixel, centred."""

    mm: float
    r0: float  # canonical row at grid y = 0
    c0: float
    sr: float
    sc: float

    def to_canonical(self, y, x):
        return self.r0 + np.asarray(y) * self.mm / self.sr, self.c0 + np.asarray(x) * self.mm / self.sc

    def to_grid(self, r, c):
        return (np.asarray(r) - self.r0) * self.sr / self.mm, (np.asarray(c) - self.c0) * self.sc / self.mm


def grid_map(canon: Canonical, grid: int = GRID) -> GridMap:
    h, w = canon.image.shape
    sr, sc = canon.spacing
    extent = max(h * sr, w * sc)
    mm = extent / grid
    # centre the image on the grid
    r0 = (h - 1) / 2 - (grid - 1) / 2 * mm / sr
    c0 = (w - 1) / 2 - (grid - 1) / 2 * mm / sc
    return GridMap(mm=mm, r0=r0, c0=c0, sr=sr, sc=sc)


def to_grid(canon: Canonical, grid: int = GRID, gm: GridMap | None = None) -> tuple[np.ndarray, GridMap]:
    """The canonical image resampled on the localiser grid (zero outside)."""
    gm = gm or grid_map(canon, grid)
    yy, xx = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    r, c = gm.to_canonical(yy, xx)
    out = map_coordinates(canon.image, [r, c], order=1, mode="constant", cval=0.0)
    return out.astype(np.float32), gm


def patch(
    canon: Canonical,
    r: float,
    c: float,
    *,
    size: int = PATCH,
    mm: float = PATCH_MM,
    angle: float = 0.0,
    scale: float = 1.0,
    normalise: bool = True,
) -> np.ndarray:
    """A ``size`` x ``size`` patch of ``mm`` mm pixels centred on canonical pixel (r, c), rotated by
    ``angle`` radians and zoomed by ``scale`` (augmentation), renormalised to its own 99th percentile."""
    sr, sc = canon.spacing
    d = (np.arange(size, dtype=np.float64) - (size - 1) / 2) * mm * scale
    dy, dx = np.meshgrid(d, d, indexing="ij")
    ca, sa = np.cos(angle), np.sin(angle)
    ry, rx = ca * dy - sa * dx, sa * dy + ca * dx
    out = map_coordinates(canon.image, [r + ry / sr, c + rx / sc], order=1, mode="constant", cval=0.0)
    return normalise_patch(out) if normalise else out.astype(np.float32)


def normalise_patch(out: np.ndarray) -> np.ndarray:
    """A patch divided by its own 99th percentile, clipped to [0, 1.5]."""
    hi = float(np.percentile(out, 99)) if out.size else 1.0
    return np.clip(out / max(hi, 1e-3), 0.0, 1.5).astype(np.float32)


def disc_input(canon: Canonical, r: float, c: float, channels: int = 2, size: int = PATCH) -> np.ndarray:
    """Grader input (channels, size, size) around canonical pixel (r, c): the disc patch (``PATCH_MM``) and,
    with two channels, the wider context (``CONTEXT_MM``), both scaled by the context's 99th percentile
    (the disc's signal relative to its surroundings, e.g. CSF on T2)."""
    if channels == 1:
        return patch(canon, r, c, size=size)[None]
    local = patch(canon, r, c, size=size, mm=PATCH_MM, normalise=False)
    context = patch(canon, r, c, size=size, mm=CONTEXT_MM, normalise=False)
    return normalise_pair(local, context)


def normalise_pair(local: np.ndarray, context: np.ndarray) -> np.ndarray:
    hi = max(float(np.percentile(context, 99)) if context.size else 1.0, 1e-3)
    return np.clip(np.stack([local, context]) / hi, 0.0, 1.5).astype(np.float32)
