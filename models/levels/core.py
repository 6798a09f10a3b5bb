"""Geometry, network and naming of ``lumbar_spine.levels`` (inference side; no training code).

The network is a 2-D MONAI UNet applied to every sagittal slice of the series after the slice
is put in the canonical sagittal layout (rows head -> feet, columns anterior -> posterior,
`models.transforms.canonical_layout`) and resampled in-plane to a ``GRID_MM`` grid. It
predicts three classes per pixel: background, vertebral body, intervertebral disc. The
per-slice predictions are stacked back into the series' own slices, so the label volume is in
the input geometry.

Naming (`name_structures`): vertebral body instances (3-D components of the in-plane eroded
body class, every body voxel given to its nearest core; fragments smaller than a third of the
median body dropped) are ordered head -> feet by their centroid; the lowest one is L5 and the names go up from
there (L4 ... L1, then T12, T11 ...). The anchor is the sacrum: the network is trained to mark
the mobile vertebral bodies down to L5 and never the sacrum (S1 is background in every
training target), so the lowest complete body it finds is the one above the sacrum. Disc
components are named by the two bodies their centroid lies between; a disc below L5 is
L5-S1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BODIES = ("L1", "L2", "L3", "L4", "L5")
DISCS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
STRUCTURES = BODIES + DISCS  # label value = index + 1 in the level label volume
CLASSES = ("background", "vertebral_body", "disc")
GRID_MM = 2.0
# vertebra names from the bottom (L5) up; the name below L5 is S1 (for disc names)
_COLUMN = ("S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4")
MIN_BODY_MM3 = 2500.0  # a vertebral body is >= ~10 cm^3; fragments below this are dropped
MIN_DISC_MM3 = 300.0
MIN_CORE_MM3 = 800.0
MIN_BODY_SHARE = 0.35  # of the median body volume of the series
ERODE_MM = 6.0  # in-plane erosion of the body mask before the instances are counted (chosen on validation patients)


def vertebra_names_from_bottom(n: int) -> list[str]:
    """Names of ``n`` bodies ordered head -> feet whose lowest is L5."""
    return list(reversed(_COLUMN[1 : n + 1]))


def disc_name(upper: str, lower: str) -> str:
    return f"{upper}-{lower}"


def build_unet(channels: Sequence[int] = (16, 32, 64, 128, 128)):
    from monai.networks.nets import UNet

    ch = tuple(int(c) for c in channels)
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=len(CLASSES),
        channels=ch,
        strides=(2,) * (len(ch) - 1),
        num_res_units=1,
        norm="instance",
        dropout=0.0,
    )


def scale_intensity(x: np.ndarray) -> np.ndarray:
    """Per-volume robust scaling: the 99.5th percentile of the non-zero voxels -> 1."""
    a = np.asarray(x, np.float32)
    nz = a[a > 0]
    top = float(np.percentile(nz, 99.5)) if nz.size else 1.0
    return np.clip(a / max(top, 1e-6), 0.0, 1.5).astype(np.float32)


def grid_shape(shape_hw: tuple[int, int], spacing_hw: tuple[float, float]) -> tuple[int, int]:
    return (
        max(16, round(shape_hw[0] * spacing_hw[0] / GRID_MM)),
        max(16, round(shape_hw[1] * spacing_hw[1] / GRID_MM)),
    )


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


@torch.no_grad()
def predict_probabilities(
    net: torch.nn.Module,
    canonical: np.ndarray,
    spacing_hw: tuple[float, float],
    *,
    batch: int = 8,
    out_grid: bool = False,
) -> np.ndarray:
    """Class probabilities (K, 3, H, W) of a canonical sagittal stack (K, H, W) at its own pixel grid
    (``out_grid``: at the network grid instead)."""
    net.eval()
    k, h, w = canonical.shape
    gh, gw = grid_shape((h, w), spacing_hw)
    x = torch.from_numpy(scale_intensity(canonical))[:, None]
    out = []
    multiple = 2 ** (len(getattr(net, "channels", (0,) * 5)) - 1)
    for s in range(0, k, batch):
        xb = F.interpolate(x[s : s + batch], size=(gh, gw), mode="bilinear", antialias=True, align_corners=False)
        xb, (hh, ww) = _pad_to(xb, multiple)
        logits = net(xb)[..., :hh, :ww]
        if not out_grid:
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        out.append(torch.softmax(logits, dim=1).numpy())
    return np.concatenate(out, axis=0).astype(np.float32)


def upsample_labels(labels: np.ndarray, shape_hw: tuple[int, int], n: int) -> np.ndarray:
    """(K, gh, gw) labels 0..n -> (K, H, W): each label's indicator interpolated bilinearly, the largest wins
    (smooth outlines instead of blocks); only the bounding box of the labelled pixels of each slice is
    interpolated."""
    h, w = shape_hw
    gh, gw = labels.shape[1:]
    fy, fx = h / gh, w / gw
    out = np.zeros((labels.shape[0], h, w), np.uint8)
    for k in range(labels.shape[0]):
        rows, cols = np.nonzero(labels[k])
        if rows.size == 0:
            continue
        r0, r1 = max(int(rows.min()) - 1, 0), min(int(rows.max()) + 2, gh)
        c0, c1 = max(int(cols.min()) - 1, 0), min(int(cols.max()) + 2, gw)
        crop = labels[k, r0:r1, c0:c1]
        s0, s1 = round(r0 * fy), round(r1 * fy)
        t0, t1 = round(c0 * fx), round(c1 * fx)
        present = np.unique(crop)
        onehot = torch.from_numpy((crop[None] == present[:, None, None]).astype(np.float32))[None]
        up = F.interpolate(onehot, size=(s1 - s0, t1 - t0), mode="bilinear", align_corners=False)[0]
        out[k, s0:s1, t0:t1] = present[up.argmax(0).numpy()]
    return out


@dataclass
class Named:
    """The named structures of one series in the canonical layout."""

    labels: np.ndarray  # (K, H, W) uint8: 0 or index+1 of STRUCTURES
    bodies: list[str]  # every body found, head -> feet (T11 ... L5)
    centroids: dict[str, tuple[float, float, float]]  # structure -> canonical (k, row, col) voxel centroid
    volumes_mm3: dict[str, float]
    estimated: tuple[str, ...] = ()  # structures with a centre but no voxels (L5-S1 placed from L4-L5 and L5)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return lab, int(n)


def _body_instances(body: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, list[int]]:
    """Vertebral body instances of a body mask: in-plane eroded cores (a thin bridge across a missed disc does
    not join two bodies), 3-D components of the cores, every body voxel given to its nearest core."""
    from scipy import ndimage

    it = max(1, round(ERODE_MM / max(min(spacing[1], spacing[2]), 1e-3)))
    st2 = np.zeros((3, 3, 3), bool)
    st2[1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(body, structure=st2, iterations=it)
    lab, n = ndimage.label(core, structure=ndimage.generate_binary_structure(3, 1))
    if n == 0:
        return np.zeros(body.shape, np.int32), []
    vox = float(np.prod(spacing))
    sizes = ndimage.sum(np.ones(body.shape, np.float32), lab, np.arange(1, n + 1)) * vox
    small = np.zeros(n + 1, bool)
    small[1:] = sizes < MIN_CORE_MM3
    lab[small[lab]] = 0
    if not lab.any():
        return np.zeros(body.shape, np.int32), []
    _, idx = ndimage.distance_transform_edt(lab == 0, sampling=spacing, return_indices=True)
    nearest = lab[tuple(idx)]
    inst = np.where(body, nearest, 0).astype(np.int32)
    ids = [int(i) for i in np.unique(inst) if i > 0]
    vols: list[float] = [float(v) * vox for v in ndimage.sum(np.ones(body.shape, np.float32), inst, ids)] if ids else []
    keep = [(i, v) for i, v in zip(ids, vols) if v >= MIN_BODY_MM3]
    if len(keep) >= 3:
        # fragments (a piece of the sacral ala, a partial-volume sliver) are far smaller than the bodies
        typical = float(np.median([v for _, v in keep]))
        keep = [(i, v) for i, v in keep if v >= MIN_BODY_SHARE * typical]
    return inst, [i for i, _ in keep]


def name_structures(classes: np.ndarray, spacing: tuple[float, float, float]) -> Named:
    """Named level labels from a (K, H, W) class map (0 background, 1 body, 2 disc) in the canonical layout
    with voxel ``spacing`` (slice, row, col) in mm; see the module docstring for the rule."""
    from scipy import ndimage

    vox = float(np.prod(spacing))
    body_lab, keep = _body_instances(classes == 1, spacing)
    cents = {i: ndimage.center_of_mass(body_lab == i) for i in keep}
    order = sorted(keep, key=lambda i: cents[i][1])  # head -> feet by row
    names = vertebra_names_from_bottom(len(order))
    labels = np.zeros(classes.shape, np.uint8)
    centroids: dict[str, tuple[float, float, float]] = {}
    volumes: dict[str, float] = {}
    body_rows = [float(cents[i][1]) for i in order]
    for i, nm in zip(order, names):
        if nm in BODIES:
            labels[body_lab == i] = STRUCTURES.index(nm) + 1
            centroids[nm] = tuple(float(c) for c in cents[i])  # type: ignore[assignment]
            volumes[nm] = float((body_lab == i).sum() * vox)
    if order:
        disc_lab, nd = _components(classes == 2)
        groups: dict[str, list[int]] = {}
        for j in range(1, nd + 1):
            m = disc_lab == j
            size = float(m.sum() * vox)
            if size < MIN_DISC_MM3:
                continue
            r = float(ndimage.center_of_mass(m)[1])
            below = int(np.searchsorted(body_rows, r))  # index of the first body below the disc
            if below == 0:
                continue  # above the highest body found
            upper = names[below - 1]
            lower = names[below] if below < len(names) else "S1"
            if below == len(names) and r - body_rows[-1] > 60.0 / spacing[1]:
                continue  # far below L5: not the L5-S1 disc
            groups.setdefault(disc_name(upper, lower), []).append(j)
        for nm, js in groups.items():
            if nm not in DISCS:
                continue
            m = np.isin(disc_lab, js)
            labels[m] = STRUCTURES.index(nm) + 1
            centroids[nm] = tuple(float(c) for c in ndimage.center_of_mass(m))  # type: ignore[assignment]
            volumes[nm] = float(m.sum() * vox)
    return Named(labels=labels, bodies=names, centroids=centroids, volumes_mm3=volumes)
