"""Real segmented lumbar volumes (``spinevol:PATH``) for ``lumbar_spine.levels``: images, targets, split.

A folder of ``.npz`` files (any depth) with arrays ``I`` (image) and ``GT`` (0 background, one id per
vertebral body), axes ``[row, col, k]`` with row 0 superior, col 0 anterior, k left-right, 1 mm isotropic,
plus ``volumes.csv`` with ``File`` and ``labels_superior_to_inferior`` (the GT ids head -> feet; the ids
themselves are not in anatomical order). One volume is one patient.

Targets (`targets_of`):

- vertebral bodies: the GT bodies, named from the bottom: the lowest labelled body is L5 (the
  masks stop above the sacrum; S1 is visible below it, unlabelled, in every volume), then L4 ... L1,
  T12 ... upwards;
- discs are not labelled; the disc between two consecutive bodies A (upper) and B (lower) is derived
  per sagittal slice and per column (antero-posterior position) crossing both bodies, as the pixels
  between the lowest pixel of A and the highest pixel of B when that gap is at most
  ``2 * DISC_REACH_MM`` (so the space between the two endplates, bounded front and back by the
  bodies' overlap);
- ignored in the loss (label 255): everything above the top of the highest labelled body (the
  vertebrae above it are unlabelled but look the same) and a ``SACRAL_BAND_MM`` margin below L5
  (its outline's uncertainty). The L5-S1 disc (not derivable without an S1 mask) and the sacrum are
  background: the network learns to stop at L5, which anchors the names.

The split is by patient and deterministic (`split_keys`): per source, the volumes are ordered by a hash
of their key; the first quarter is the held-out test set, the next ones validation, the rest training.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import DataSpecError
from models.levels.core import BODIES, DISCS, STRUCTURES, disc_name, vertebra_names_from_bottom

DISC_REACH_MM = 10.0
SACRAL_BAND_MM = 4.0
IGNORE = 255
MAX_VOLUMES = 500
MAX_FILE_BYTES = 200 * 1024 * 1024


@dataclass
class SpineVolume:
    key: str  # e.g. "VB2/05"; one patient
    source: str  # "VB1" | "VB2" (first folder)
    image: np.ndarray  # canonical (K, H, W) uint8/float: k left-right, rows head -> feet, cols anterior -> posterior
    gt: np.ndarray  # canonical (K, H, W) uint8 GT ids
    order: list[int]  # GT ids head -> feet
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def names(self) -> list[str]:
        return vertebra_names_from_bottom(len(self.order))


def _read_csv(root: Path) -> dict[str, list[int]]:
    for p in (root / "volumes.csv", *root.glob("*/volumes.csv")):
        if p.is_file():
            out = {}
            with p.open(newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    out[(row.get("file") or row["File"]).removesuffix(".npz")] = [
                        int(v) for v in row["labels_superior_to_inferior"].split()
                    ]
            return out
    raise DataSpecError(f"spinevol:{root}: no volumes.csv with File and labels_superior_to_inferior")


def load_volumes(root: Path | str, keys: list[str] | None = None) -> list[SpineVolume]:
    root = Path(root)
    if not root.is_dir():
        raise DataSpecError(f"spinevol:{root}: not a folder")
    orders = _read_csv(root)
    out = []
    for key in sorted(orders) if keys is None else keys:
        if key not in orders:
            raise DataSpecError(f"spinevol:{root}: no volume {key!r} in volumes.csv")
        path = root / f"{key}.npz"
        if not path.is_file():
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataSpecError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        with np.load(path) as z:
            img, gt = np.asarray(z["I"]), np.asarray(z["GT"])
        if img.ndim != 3 or gt.ndim != 3 or img.shape[:2] != gt.shape[:2]:
            raise DataSpecError(f"{path}: I {img.shape} and GT {gt.shape} are not matching 3-D arrays")
        k = min(img.shape[2], gt.shape[2])  # a few GT are one slice longer along k
        out.append(
            SpineVolume(
                key=key,
                source=key.split("/")[0],
                image=np.ascontiguousarray(img[:, :, :k].transpose(2, 0, 1)),
                gt=np.ascontiguousarray(gt[:, :, :k].transpose(2, 0, 1)),
                order=orders[key],
            )
        )
        if len(out) > MAX_VOLUMES:
            raise DataSpecError(f"spinevol:{root}: more than {MAX_VOLUMES} volumes")
    if not out:
        raise DataSpecError(f"spinevol:{root}: no .npz volumes found")
    return out


def list_keys(root: Path | str) -> list[str]:
    root = Path(root)
    return [k for k in sorted(_read_csv(root)) if (root / f"{k}.npz").is_file()]


def patients_of(root: Path | str) -> dict[str, str]:
    """Volume key -> patient: the exam name of volumes.csv without a trailing contrast (``DzZ_T1`` and
    ``DzZ_T2`` are one patient); the key itself when the column is absent."""
    root = Path(root)
    out: dict[str, str] = {}
    p = root / "volumes.csv"
    if p.is_file():
        with p.open(newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                key = (row.get("file") or row.get("File") or "").removesuffix(".npz")
                exam = (row.get("source_exam_inferred") or "").strip()
                for suffix in ("_T1", "_T2", "_STIR"):
                    exam = exam.removesuffix(suffix)
                out[key] = f"{key.split('/')[0]}/{exam}" if exam else key
    return out


def split_keys(
    keys: list[str], *, patients: dict[str, str] | None = None, test_fraction: float = 0.25, val_per_source: int = 2
) -> dict[str, list[str]]:
    """Deterministic split by patient, per source: {"train": [...], "val": [...], "test": [...]}; the
    volumes of one patient always fall in the same part."""
    patients = patients or {}
    groups: dict[str, dict[str, list[str]]] = {}
    for k in keys:
        groups.setdefault(k.split("/")[0], {}).setdefault(patients.get(k, k), []).append(k)
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for src in sorted(groups):
        pats = sorted(groups[src], key=lambda p: hashlib.sha256(f"levels:{p}".encode()).hexdigest())
        n_test = max(1, round(len(pats) * test_fraction))
        for i, p in enumerate(pats):
            part = "test" if i < n_test else "val" if i < n_test + val_per_source else "train"
            split[part] += groups[src][p]
    return {k: sorted(v) for k, v in split.items()}


def targets_of(vol: SpineVolume) -> tuple[np.ndarray, np.ndarray]:
    """(classes, named) in the canonical layout: classes 0 background, 1 body, 2 disc, 255 ignored;
    named 0 or index+1 of `STRUCTURES` (L1..L5 bodies, L1-L2..L4-L5 discs; L5-S1 is never derived)."""
    from scipy import ndimage

    gt = vol.gt
    names = vol.names
    classes = np.zeros(gt.shape, np.uint8)
    named = np.zeros(gt.shape, np.uint8)
    classes[gt > 0] = 1
    for gid, nm in zip(vol.order, names):
        if nm in BODIES:
            named[gt == gid] = STRUCTURES.index(nm) + 1
    reach = DISC_REACH_MM / vol.spacing[1]
    pairs = list(zip(vol.order[:-1], vol.order[1:], names[:-1], names[1:]))
    rows_idx = np.arange(gt.shape[1])[:, None]
    for a, b, na, nb in pairs:
        code = STRUCTURES.index(disc_name(na, nb)) + 1 if disc_name(na, nb) in DISCS else 0
        for k in np.nonzero((gt == a).any(axis=(1, 2)) & (gt == b).any(axis=(1, 2)))[0]:
            sl = gt[k]
            ma, mb = sl == a, sl == b
            has = ma.any(axis=0) & mb.any(axis=0)  # columns crossing both bodies
            if has.sum() < 3:
                continue
            last_a = np.where(ma, rows_idx, -1).max(axis=0)  # lowest row of A per column
            first_b = np.where(mb, rows_idx, sl.shape[0]).min(axis=0)  # highest row of B per column
            ok = has & (first_b > last_a) & (first_b - last_a - 1 <= 2 * reach)
            disc = (rows_idx > last_a) & (rows_idx < first_b) & ok[None, :] & (sl == 0)
            classes[k][disc] = 2
            if code:
                named[k][disc] = code
    # ignored: above the top of the highest labelled body, and the band below L5
    top = gt == vol.order[0]
    top_rows = np.nonzero(top.any(axis=(0, 2)))[0]
    if top_rows.size:
        classes[:, : int(top_rows.min()), :] = IGNORE
    if names and names[-1] == "L5":
        l5 = gt == vol.order[-1]
        c_row = ndimage.center_of_mass(l5)[1]
        band = SACRAL_BAND_MM / vol.spacing[1]
        for kk in range(gt.shape[0]):
            if not l5[kk].any():
                continue
            d = ndimage.distance_transform_edt(~l5[kk])
            m = (d <= band) & ~l5[kk]
            m[: int(c_row), :] = False
            classes[kk][m & (classes[kk] != 1)] = IGNORE
    return classes, named


def disc_centres_vox(named: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Canonical voxel centroid of each named disc (and body) of a named label map."""
    from scipy import ndimage

    out = {}
    for i, nm in enumerate(STRUCTURES, start=1):
        m = named == i
        if m.any():
            out[nm] = tuple(float(c) for c in ndimage.center_of_mass(m))
    return out  # type: ignore[return-value]
