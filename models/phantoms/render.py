"""Acquisition geometry and rasterisation of structures into a label grid.

Frames:
- *anatomy*: the generator's nominal frame (mm), structures are defined there.
- *world*: metric frame aligned with the anatomy before size scaling/mirroring:
  ``anatomy = mirror * world / scale``.
- *patient*: DICOM LPS, ``patient = R_p @ world + t_p`` (a proper rotation).

The slice grid is prescribed in world: ``world = center + R_n @ (u*n + v*col + w*row)`` with
``n = row x col``; ``u`` runs over slices (and sub-slices for the slice profile), ``v`` over
rows (j), ``w`` over columns (i). ``R_n`` is the prescription error (nuisance rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.phantoms.shapes import Coords, Structure
from models.types import Volume


@dataclass(frozen=True)
class Geometry:
    n_slices: int
    rows: int
    cols: int
    slice_spacing: float  # mm between slice centres
    slice_thickness: float  # mm
    row_spacing: float  # mm between rows (along col cosine)
    col_spacing: float  # mm between columns (along row cosine)
    base_row: tuple[float, float, float]  # world direction of increasing column index i
    base_col: tuple[float, float, float]  # world direction of increasing row index j
    center: tuple[float, float, float]  # world position of the grid centre
    r_nuisance: np.ndarray  # 3x3
    scale: tuple[float, float, float]
    mirror: tuple[float, float, float]
    r_patient: np.ndarray  # 3x3 world -> patient
    t_patient: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_slices, self.rows, self.cols)

    def _axes_world(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = self.r_nuisance @ np.asarray(self.base_row, float)
        col = self.r_nuisance @ np.asarray(self.base_col, float)
        return np.cross(row, col), col, row

    def slice_offsets(self) -> np.ndarray:
        return (np.arange(self.n_slices) - (self.n_slices - 1) / 2.0) * self.slice_spacing

    def anatomy_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b): anatomy = A @ (u, v, w) + b."""
        n, col, row = self._axes_world()
        d = np.asarray(self.mirror, float) / np.asarray(self.scale, float)
        a = d[:, None] * np.stack([n, col, row], axis=1)
        b = d * np.asarray(self.center, float)
        return a, b

    def uvw_of_index(self, k, j, i) -> np.ndarray:
        u = (np.asarray(k, float) - (self.n_slices - 1) / 2.0) * self.slice_spacing
        v = (np.asarray(j, float) - (self.rows - 1) / 2.0) * self.row_spacing
        w = (np.asarray(i, float) - (self.cols - 1) / 2.0) * self.col_spacing
        return np.stack([u, v, w], axis=-1)

    def world_of_anatomy(self, a) -> np.ndarray:
        return np.asarray(a, float) * np.asarray(self.scale, float) * np.asarray(self.mirror, float)

    def index_of_anatomy(self, a) -> np.ndarray:
        """Fractional (k, j, i) of anatomy points (..., 3)."""
        am, bm = self.anatomy_affine()
        uvw = (np.asarray(a, float) - bm) @ np.linalg.inv(am).T
        k = uvw[..., 0] / self.slice_spacing + (self.n_slices - 1) / 2.0
        j = uvw[..., 1] / self.row_spacing + (self.rows - 1) / 2.0
        i = uvw[..., 2] / self.col_spacing + (self.cols - 1) / 2.0
        return np.stack([k, j, i], axis=-1)

    def patient_of_index(self, kji) -> np.ndarray:
        kji = np.asarray(kji, float)
        n, col, row = self._axes_world()
        uvw = self.uvw_of_index(kji[..., 0], kji[..., 1], kji[..., 2])
        world = np.asarray(self.center) + uvw[..., 0:1] * n + uvw[..., 1:2] * col + uvw[..., 2:3] * row
        return world @ self.r_patient.T + np.asarray(self.t_patient)

    def patient_cosines(self) -> tuple[np.ndarray, np.ndarray]:
        _n, col, row = self._axes_world()
        return self.r_patient @ row, self.r_patient @ col

    def volume(self, array: np.ndarray, **kwargs) -> Volume:
        row_p, col_p = self.patient_cosines()
        rx, ry, rz = (float(x) for x in np.round(row_p, 6))
        cx, cy, cz = (float(x) for x in np.round(col_p, 6))
        ks = np.arange(self.n_slices)
        positions = self.patient_of_index(np.stack([ks, np.zeros_like(ks), np.zeros_like(ks)], axis=-1))
        return Volume(
            array=np.ascontiguousarray(array, dtype=np.float32),
            spacing=(float(self.slice_spacing), float(self.row_spacing), float(self.col_spacing)),
            positions=positions,
            row_cosine=(rx, ry, rz),
            col_cosine=(cx, cy, cz),
            **kwargs,
        )


def sub_slice_offsets(geom: Geometry, n_sub: int) -> np.ndarray:
    """Sub-slice positions (u) sampling each slice's thickness: (n_slices * n_sub,)."""
    base = geom.slice_offsets()
    fr = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    return (base[:, None] + fr[None, :] * geom.slice_thickness).reshape(-1)


class Rasterizer:
    """Paints structures (in order) into a uint8 structure-id grid of shape (len(u), rows, cols)."""

    def __init__(self, geom: Geometry, u: np.ndarray):
        self.geom = geom
        self.u = np.asarray(u, float)
        self.v = (np.arange(geom.rows) - (geom.rows - 1) / 2.0) * geom.row_spacing
        self.w = (np.arange(geom.cols) - (geom.cols - 1) / 2.0) * geom.col_spacing
        self.a, self.b = geom.anatomy_affine()
        self.ainv = np.linalg.inv(self.a)
        self.ids = np.zeros((len(self.u), geom.rows, geom.cols), dtype=np.uint8)
        self.names: list[str] = ["background"]
        self.tissues: list[str] = ["air"]
        self.groups: list[str] = ["background"]
        self._coords: dict = {}

    def _box(self, lo, hi):
        lo = np.maximum(np.asarray(lo, float), -1e3)
        hi = np.minimum(np.asarray(hi, float), 1e3)
        if np.any(hi < lo):
            return None
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        uvw = (corners - self.b) @ self.ainv.T
        umin, vmin, wmin = uvw.min(axis=0)
        umax, vmax, wmax = uvw.max(axis=0)
        k0 = int(np.searchsorted(self.u, umin, side="left"))
        k1 = int(np.searchsorted(self.u, umax, side="right"))
        g = self.geom
        j0 = max(int(np.floor(vmin / g.row_spacing + (g.rows - 1) / 2.0)), 0)
        j1 = min(int(np.ceil(vmax / g.row_spacing + (g.rows - 1) / 2.0)) + 1, g.rows)
        i0 = max(int(np.floor(wmin / g.col_spacing + (g.cols - 1) / 2.0)), 0)
        i1 = min(int(np.ceil(wmax / g.col_spacing + (g.cols - 1) / 2.0)) + 1, g.cols)
        if k1 <= k0 or j1 <= j0 or i1 <= i0:
            return None
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1))

    def coords(self, box) -> Coords:
        key = tuple((sl.start, sl.stop) for sl in box)
        if key not in self._coords:
            if len(self._coords) >= 3:
                self._coords.pop(next(iter(self._coords)))
            self._coords[key] = Coords(self.a, self.b, self.u[box[0]], self.v[box[1]], self.w[box[2]])
        return self._coords[key]

    def paint(self, s: Structure) -> None:
        sid = len(self.names)
        if sid > 255:
            raise ValueError("too many structures")
        self.names.append(s.name)
        self.tissues.append(s.tissue)
        self.groups.append(s.group or s.name)
        box = self._box(s.shape.lo, s.shape.hi)
        if box is None:
            return
        m = s.shape.inside(self.coords(box))
        m = np.broadcast_to(m, self.ids[box].shape)
        region = self.ids[box]
        if s.over is not None:
            allowed = np.zeros(256, dtype=bool)
            for i, nm in enumerate(self.names):
                if nm in s.over or self.groups[i] in s.over:
                    allowed[i] = True
            m = m & allowed[region]
        region[m] = sid
