"""Implicit solid shapes in anatomy millimetres, evaluated on coordinate arrays.

Every shape has an axis-aligned bounding box (``lo``, ``hi``) so the renderer only
evaluates it where it can be, and ``inside(coords) -> bool array`` over a `Coords` box of the slice grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

_BIG = 1e4

# a point or a vector in anatomy millimetres: a tuple from the specs or an array from the geometry
# (the shapes store it as a float64 array)
Vec = Sequence[float] | np.ndarray


def _even_power(a: np.ndarray, p: int) -> np.ndarray:
    """|a|**p for p in {2, 4, 6, 8} by repeated multiplication (fast, no pow)."""
    a2 = a * a
    if p == 2:
        return a2
    if p == 4:
        return a2 * a2
    if p == 6:
        return a2 * a2 * a2
    if p == 8:
        a4 = a2 * a2
        return a4 * a4
    raise ValueError(f"unsupported power {p}")


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation matrix about a coordinate axis ("x", "y" or "z")."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(axis)


class Coords:
    """Anatomy coordinates of a box of the slice grid, as an affine map of the grid axes:
    ``p = A @ (u, v, w) + b`` with 1-D ``u`` (slices), ``v`` (rows), ``w`` (columns).

    ``x``/``y``/``z`` are built lazily; quadratic and linear forms are evaluated as sums of
    small outer products (a few passes over the box instead of a dozen).
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, u: np.ndarray, v: np.ndarray, w: np.ndarray):
        self.a = np.asarray(a, float)
        self.b = np.asarray(b, float)
        self.u = np.asarray(u, float)
        self.v = np.asarray(v, float)
        self.w = np.asarray(w, float)
        self.shape = (len(self.u), len(self.v), len(self.w))
        self._xyz: list | None = None
        self.cache: dict = {}  # per-shape fields reused by Layer shapes on the same box

    def sub(self, lo, hi):
        """(index slices, Coords) of the part of this box inside the anatomy box [lo, hi], or None."""
        lo = np.asarray(lo, float)
        hi = np.asarray(hi, float)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        uvw = (corners - self.b) @ np.linalg.inv(self.a).T
        mn, mx = uvw.min(axis=0), uvw.max(axis=0)
        sl = []
        for ax, arr in enumerate((self.u, self.v, self.w)):
            i0 = int(np.searchsorted(arr, mn[ax], side="left"))
            i1 = int(np.searchsorted(arr, mx[ax], side="right"))
            i0, i1 = max(i0 - 1, 0), min(i1 + 1, len(arr))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl), Coords(self.a, self.b, self.u[sl[0]], self.v[sl[1]], self.w[sl[2]])

    def linear(self, vec, offset) -> np.ndarray:
        """vec . (p - offset) on the box."""
        g = np.asarray(vec, float) @ self.a
        c = float(np.dot(vec, self.b - np.asarray(offset, float)))
        fu = (g[0] * self.u + c).astype(np.float32)[:, None, None]
        fv = (g[1] * self.v).astype(np.float32)[None, :, None]
        fw = (g[2] * self.w).astype(np.float32)[None, None, :]
        return (fu + fv) + fw

    def _all(self):
        if self._xyz is None:
            self._xyz = [self.linear(e, (0.0, 0.0, 0.0)) for e in np.eye(3)]
        return self._xyz

    @property
    def x(self):
        return self._all()[0]

    @property
    def y(self):
        return self._all()[1]

    @property
    def z(self):
        return self._all()[2]

    def quadratic(self, w_mat: np.ndarray, t: np.ndarray) -> np.ndarray:
        """|W (u, v, w) + t|^2 on the box, for W = diag(1/r) R^T A and t = diag(1/r) R^T (b - c)."""
        g = w_mat.T @ w_mat
        h = w_mat.T @ t
        tt = float(t @ t)
        u, v, w = self.u, self.v, self.w
        ak = g[0, 0] * u * u + 2 * h[0] * u + tt
        bkj = ak[:, None] + 2 * g[0, 1] * np.outer(u, v) + (g[1, 1] * v * v + 2 * h[1] * v)[None, :]
        cki = 2 * g[0, 2] * np.outer(u, w) + (g[2, 2] * w * w + 2 * h[2] * w)[None, :]
        dji = 2 * g[1, 2] * np.outer(v, w)
        out = cki.astype(np.float32)[:, None, :] + dji.astype(np.float32)[None, :, :]
        out += bkj.astype(np.float32)[:, :, None]
        return out


def _inside_sub(shape: Shape, c: Coords) -> np.ndarray:
    """``shape.inside`` evaluated only on the part of the box within the shape's own bounds."""
    if np.all(shape.lo <= -_BIG + 1) and np.all(shape.hi >= _BIG - 1):
        return shape.inside(c)
    sub = c.sub(np.maximum(shape.lo, -1e3), np.minimum(shape.hi, 1e3))
    if sub is None:
        return np.zeros(c.shape, dtype=bool)
    sl, cc = sub
    if cc.shape == c.shape:
        return shape.inside(c)
    out = np.zeros(c.shape, dtype=bool)
    out[sl] = shape.inside(cc)
    return out


class Shape:
    lo: np.ndarray
    hi: np.ndarray

    def inside(self, c: Coords) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def __or__(self, other: Shape) -> Shape:
        return Union((self, other))

    def __and__(self, other: Shape) -> Shape:
        return Intersection((self, other))

    def __sub__(self, other: Shape) -> Shape:
        return Difference(self, other)


@dataclass
class Ellipsoid(Shape):
    """Super-ellipsoid: sum(|R^T (p - c) / r| ** p) <= 1, optional rotation R (local -> anatomy)."""

    center: Vec
    radii: Vec
    power: tuple[int, int, int] | int = 2
    rot: np.ndarray | None = None

    def __post_init__(self):
        self.center = np.asarray(self.center, dtype=np.float64)
        self.radii = np.asarray(self.radii, dtype=np.float64)
        if isinstance(self.power, int):
            self.power = (self.power, self.power, self.power)
        if self.rot is None:
            ext = self.radii
        else:
            self.rot = np.asarray(self.rot, dtype=np.float64)
            # conservative box of a rotated box
            ext = np.abs(self.rot) @ self.radii
        self.lo = self.center - ext
        self.hi = self.center + ext

    def level(self, c: Coords):
        if self.power == (2, 2, 2):
            rot = np.eye(3) if self.rot is None else self.rot
            w_mat = (rot.T @ c.a) / np.asarray(self.radii)[:, None]
            t = (rot.T @ (c.b - self.center)) / self.radii
            return c.quadratic(w_mat, t)
        x, y, z = c.x, c.y, c.z
        dx = x - np.float32(self.center[0])
        dy = y - np.float32(self.center[1])
        dz = z - np.float32(self.center[2])
        if self.rot is not None:
            r = self.rot.astype(np.float32)
            lx = dx * r[0, 0] + dy * r[1, 0] + dz * r[2, 0]
            ly = dx * r[0, 1] + dy * r[1, 1] + dz * r[2, 1]
            lz = dx * r[0, 2] + dy * r[1, 2] + dz * r[2, 2]
            dx, dy, dz = lx, ly, lz
        px, py, pz = (self.power,) * 3 if isinstance(self.power, int) else self.power
        return (
            _even_power(dx * np.float32(1.0 / self.radii[0]), px)
            + _even_power(dy * np.float32(1.0 / self.radii[1]), py)
            + _even_power(dz * np.float32(1.0 / self.radii[2]), pz)
        )

    def inside(self, c: Coords):
        return self.level(c) <= 1.0

    def grown(self, d: float) -> Ellipsoid:
        return Ellipsoid(self.center, np.maximum(np.asarray(self.radii) + d, 0.2), self.power, self.rot)


@dataclass
class Tube(Shape):
    """A band along a polyline with an elliptical cross-section.

    ``radii = (r_a, r_b)``: r_a along ``up`` (projected perpendicular to the segment),
    r_b along the third axis. ``param`` gives the arc-length position (mm from the first
    point) and the cross-section coordinates of every point, used to cut tears.
    """

    points: Sequence[Vec] | np.ndarray
    radii: tuple[float, float]
    up: Vec = (1.0, 0.0, 0.0)
    flat_ends: bool = False  # cut square at the first and last point (no rounded caps)

    def __post_init__(self):
        self.points = np.asarray(self.points, dtype=np.float64)
        r = max(self.radii)
        self.lo = self.points.min(axis=0) - r
        self.hi = self.points.max(axis=0) + r
        self._segs = []
        s0 = 0.0
        up = np.asarray(self.up, dtype=np.float64)
        for a, b in zip(self.points[:-1], self.points[1:]):
            d = b - a
            length = float(np.linalg.norm(d))
            t = d / length
            e1 = up - np.dot(up, t) * t
            if np.linalg.norm(e1) < 1e-6:
                e1 = np.cross(t, [0.0, 1.0, 0.0])
            e1 /= np.linalg.norm(e1)
            e2 = np.cross(t, e1)
            self._segs.append((a, t, length, e1, e2, s0))
            s0 += length
        self.length = s0

    def param(self, c: Coords):
        """(level, s, a, b): normalized radial level (<=1 inside), arc position, cross-section coords (mm).

        Each segment is evaluated only on its own sub-box; elsewhere level is large."""
        lev_all = np.full(c.shape, np.float32(1e6), dtype=np.float32)
        s_all = np.zeros(c.shape, dtype=np.float32)
        a_all = np.zeros(c.shape, dtype=np.float32)
        b_all = np.zeros(c.shape, dtype=np.float32)
        r = max(self.radii)
        last = len(self._segs) - 1
        for n_seg, (a, t, length, e1, e2, s0) in enumerate(self._segs):
            b_pt = a + t * length
            sub = c.sub(np.minimum(a, b_pt) - r, np.maximum(a, b_pt) + r)
            if sub is None:
                continue
            sl, cc = sub
            along = cc.linear(t, a)
            along_c = np.clip(along, 0.0, length)
            ca = cc.linear(e1, a)
            cb = cc.linear(e2, a)
            off = along - along_c
            lev = (
                (ca * np.float32(1.0 / self.radii[0])) ** 2
                + (cb * np.float32(1.0 / self.radii[1])) ** 2
                + (off * np.float32(1.0 / min(self.radii))) ** 2
            )
            if self.flat_ends and n_seg == 0:
                lev[along < 0] = np.float32(1e6)
            if self.flat_ends and n_seg == last:
                lev[along > length] = np.float32(1e6)
            m = lev < lev_all[sl]
            lev_all[sl][m] = lev[m]
            s_all[sl][m] = (along_c + np.float32(s0))[m]
            a_all[sl][m] = ca[m]
            b_all[sl][m] = cb[m]
        return lev_all, s_all, a_all, b_all

    def inside(self, c: Coords):
        return self.param(c)[0] <= 1.0

    def point_at(self, s: float) -> np.ndarray:
        """The polyline point at arc position ``s`` (mm)."""
        for a, t, length, _e1, _e2, s0 in self._segs:
            if s <= s0 + length:
                return a + t * max(s - s0, 0.0)
        a, t, length, *_ = self._segs[-1]
        return a + t * length

    def frame_at(self, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(direction, e1, e2) unit vectors of the segment at arc position ``s``."""
        for _a, t, length, e1, e2, s0 in self._segs:
            if s <= s0 + length:
                return t, e1, e2
        _a, t, _l, e1, e2, _s0 = self._segs[-1]
        return t, e1, e2


@dataclass
class HalfSpace(Shape):
    """n . (p - p0) <= 0 (unbounded box; use inside an Intersection)."""

    point: Vec
    normal: Vec

    def __post_init__(self):
        self.point = np.asarray(self.point, dtype=np.float64)
        self.normal = np.asarray(self.normal, dtype=np.float64)
        self.lo = np.full(3, -_BIG)
        self.hi = np.full(3, _BIG)
        # axis-aligned half spaces give a finite side
        nz = np.flatnonzero(np.abs(self.normal) > 1e-9)
        if len(nz) == 1:
            ax = nz[0]
            if self.normal[ax] > 0:
                self.hi[ax] = self.point[ax]
            else:
                self.lo[ax] = self.point[ax]

    def inside(self, c: Coords):
        return c.linear(self.normal, self.point) <= 0.0


@dataclass
class Box(Shape):
    lo_: Vec
    hi_: Vec

    def __post_init__(self):
        self.lo = np.asarray(self.lo_, dtype=np.float64)
        self.hi = np.asarray(self.hi_, dtype=np.float64)

    def inside(self, c: Coords):
        lo = self.lo.astype(np.float32)
        hi = self.hi.astype(np.float32)
        x, y, z = c.x, c.y, c.z
        return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])


@dataclass
class Func(Shape):
    """An arbitrary inside-function ``fn(coords)`` with an explicit bounding box."""

    fn: Callable
    lo_: Vec
    hi_: Vec

    def __post_init__(self):
        self.lo = np.asarray(self.lo_, dtype=np.float64)
        self.hi = np.asarray(self.hi_, dtype=np.float64)

    def inside(self, c: Coords):
        return self.fn(c)


@dataclass
class Union(Shape):
    parts: Sequence[Shape]

    def __post_init__(self):
        self.lo = np.min([p.lo for p in self.parts], axis=0)
        self.hi = np.max([p.hi for p in self.parts], axis=0)

    def inside(self, c: Coords):
        out = None
        for p in self.parts:
            m = _inside_sub(p, c)
            out = m if out is None else (out | m)
        return out


@dataclass
class Intersection(Shape):
    parts: Sequence[Shape]

    def __post_init__(self):
        self.lo = np.max([p.lo for p in self.parts], axis=0)
        self.hi = np.min([p.hi for p in self.parts], axis=0)

    def inside(self, c: Coords):
        out = None
        for p in self.parts:
            m = p.inside(c)
            out = m if out is None else (out & m)
        return out


@dataclass
class Difference(Shape):
    a: Shape
    b: Shape

    def __post_init__(self):
        self.lo = self.a.lo
        self.hi = self.a.hi

    def inside(self, c: Coords):
        return self.a.inside(c) & ~_inside_sub(self.b, c)


@dataclass
class Structure:
    """One painted structure: name, tissue and shape; ``over`` limits painting to voxels
    currently holding one of these structure names (None = paint anywhere)."""

    name: str
    tissue: str
    shape: Shape
    over: tuple[str, ...] | None = None
    group: str | None = None  # mask name the structure contributes to (default: name)
    extra: dict = field(default_factory=dict)


@dataclass
class SmoothUnion(Shape):
    """Blended union of super-ellipsoids: inside where sum(level_i ** -k) >= 1.

    Fills the waists between overlapping parts (bones that widen smoothly); larger ``k``
    blends less.
    """

    parts: Sequence[Ellipsoid | Rod]  # anything with level() (<= 1 inside)
    k: int = 4

    def __post_init__(self):
        # blending can extend a little beyond the parts: pad the box
        pad = np.minimum(0.125 * np.max([p.hi - p.lo for p in self.parts], axis=0), 30.0)
        self.lo = np.min([p.lo for p in self.parts], axis=0) - pad
        self.hi = np.max([p.hi for p in self.parts], axis=0) + pad

    def field(self, c: Coords) -> np.ndarray:
        """sum(level_i ** -k): >= 1 inside (cached per box). Each part is evaluated on its box
        grown by half its extent (at most 40 mm); beyond that its share is negligible."""
        key = ("smooth_union", id(self))
        if key in c.cache:
            return c.cache[key]
        acc = np.zeros(c.shape, dtype=np.float32)
        for p in self.parts:
            ext = np.minimum((p.hi - p.lo) / 2.0, 40.0)
            sub = c.sub(p.lo - ext, p.hi + ext)
            if sub is None:
                continue
            sl, cc = sub
            f = p.level(cc)
            np.maximum(f, np.float32(1e-6), out=f)
            g = _even_power(np.float32(1.0) / f, self.k) if self.k in (2, 4, 6, 8) else (1.0 / f) ** self.k
            acc[sl] += g
        c.cache[key] = acc
        return acc

    def inside(self, c: Coords):
        return self.field(c) >= 1.0

    def grown(self, d: float) -> SmoothUnion:
        return SmoothUnion([p.grown(d) for p in self.parts], self.k)


@dataclass
class Layer(Shape):
    """``base`` shrunk by ``depth`` mm (approximately, for a reference radius ``r_ref``),
    evaluated from the base's cached field: nested skin / fat / muscle layers cost one
    evaluation of the outline instead of one each."""

    base: Ellipsoid | SmoothUnion
    depth: float
    r_ref: float

    def __post_init__(self):
        self.lo = self.base.lo
        self.hi = self.base.hi
        q = max(self.r_ref - self.depth, 1e-3) / self.r_ref  # radius ratio
        if isinstance(self.base, SmoothUnion):
            self._thr = float(q ** (-2 * self.base.k))
        elif isinstance(self.base, Ellipsoid) and self.base.power == (2, 2, 2):
            self._thr = float(q * q)
        else:
            raise TypeError("Layer needs a SmoothUnion or a quadratic Ellipsoid")

    def inside(self, c: Coords):
        if isinstance(self.base, SmoothUnion):
            return self.base.field(c) >= self._thr
        key = ("ellipsoid_level", id(self.base))
        if key not in c.cache:
            c.cache[key] = self.base.level(c)
        return c.cache[key] <= self._thr


@dataclass
class Rod(Shape):
    """A straight bone shaft: elliptical cross-section (radii along ``e1`` and the third axis)
    from ``start`` along ``direction`` for ``length`` mm, with a rounded cap of ``cap`` mm at
    the start; constant width (unlike an elongated ellipsoid). Level <= 1 inside."""

    start: Vec
    direction: Vec
    radii: tuple[float, float]
    length: float
    cap: float = 10.0
    e1: Vec = (1.0, 0.0, 0.0)

    def __post_init__(self):
        self.start = np.asarray(self.start, float)
        d = np.asarray(self.direction, float)
        self._t = d / np.linalg.norm(d)
        e1 = np.asarray(self.e1, float)
        e1 = e1 - np.dot(e1, self._t) * self._t
        self._e1 = e1 / np.linalg.norm(e1)
        self._e2 = np.cross(self._t, self._e1)
        end = self.start + self._t * self.length
        r = max(self.radii)
        self.lo = np.minimum(self.start - self._t * self.cap, end) - r
        self.hi = np.maximum(self.start - self._t * self.cap, end) + r

    def level(self, c: Coords):
        along = c.linear(self._t, self.start)
        a = c.linear(self._e1, self.start) * np.float32(1.0 / self.radii[0])
        b = c.linear(self._e2, self.start) * np.float32(1.0 / self.radii[1])
        cap = np.minimum(along, 0.0) * np.float32(1.0 / self.cap)
        lev = a * a + b * b + cap * cap
        lev[along > self.length] = np.float32(1e6)
        return lev

    def inside(self, c: Coords):
        return self.level(c) <= 1.0

    def grown(self, d: float) -> Rod:
        return Rod(
            self.start, self._t, (self.radii[0] + d, self.radii[1] + d), self.length, max(self.cap + d, 0.5), self._e1
        )


@dataclass
class Transformed(Shape):
    """``shape`` rigidly rotated by ``rot`` about ``pivot`` (anatomy frame): a point p is inside
    when ``pivot + rot^T (p - pivot)`` is inside ``shape`` (e.g. the flexed tibia)."""

    shape: Shape
    rot: np.ndarray
    pivot: Vec

    def __post_init__(self):
        self.rot = np.asarray(self.rot, float)
        self.pivot = np.asarray(self.pivot, float)
        lo, hi = np.maximum(self.shape.lo, -1e3), np.minimum(self.shape.hi, 1e3)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        moved = (corners - self.pivot) @ self.rot.T + self.pivot
        self.lo = moved.min(axis=0)
        self.hi = moved.max(axis=0)

    def inside(self, c: Coords):
        a = self.rot.T @ c.a
        b = self.rot.T @ (c.b - self.pivot) + self.pivot
        return self.shape.inside(Coords(a, b, c.u, c.v, c.w))

    def point(self, p) -> np.ndarray:
        """Where the shape's point ``p`` ends up."""
        return self.pivot + self.rot @ (np.asarray(p, float) - self.pivot)
