"""``spider:PATH``: a folder in the layout of the SPIDER mid-sagittal corpus.

Layout: ``midsagittal_images/<patient>_<t1|t2|t2_SPACE>.png`` (vertically flipped: sacrum at the top),
``radiological_gradings.csv`` (one row per disc: ``Patient``, ``IVD label``, ..., ``Pfirrman grade``),
optionally ``overview.csv`` (``new_file_name``, ``PixelSpacing``) and ``disc_crops/`` (training only).
SPIDER numbers discs from the bottom: IVD label 1 = L5-S1, 2 = L4-L5, 3 = L3-L4, 4 = L2-L3,
5 = L1-L2 (`LEVEL_OF_IVD`); other labels (0, 6+) are not lumbar and are ignored.

Disc centres for training the localiser come from the crops: each crop's grey interior (inside its
red box) is found in its image by normalised cross-correlation (the crops are exact cut-outs of the
image in head-up orientation). The crops of a series are numbered head to feet (``disc_1`` is the
most cranial), so where a series has as many crops as its patient has graded discs, ``disc_k`` is
IVD label ``n + 1 - k``; other series get no centres (their crops cannot be named safely).

Split by patient (`split_of`): CRC32 of the patient id mod 10: 0-5 train, 6-7 validation (epochs,
calibration, herniation threshold), 8-9 held-out test (the reported figures).
"""

from __future__ import annotations

import ast
import csv
import itertools
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.signal import fftconvolve

from models.discs.images import Canonical, normalise
from models.errors import DataSpecError
from models.tasks.spine_discs import LEVELS

LEVEL_OF_IVD = {1: "L5-S1", 2: "L4-L5", 3: "L3-L4", 4: "L2-L3", 5: "L1-L2"}
SEQUENCE_ORDER = ("t2", "t2_SPACE", "t1")  # evaluation reads the first present (the pipeline's sag_t2, then sag_t1)
SPLITS = ("train", "val", "test")
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_ROWS = 200_000
DEFAULT_SPACING = 0.7  # mm, when overview.csv does not say
_NAME = re.compile(r"^(\d+)_(t1|t2|t2_SPACE)\.png$")
_CROP = re.compile(r"^(\d+)_(t1|t2|t2_SPACE)_disc_(\d+)\.png$")
BORDER = 5  # width of the red box in the crops


def split_of(patient: str) -> str:
    """Deterministic patient-level split."""
    b = zlib.crc32(str(patient).strip().encode()) % 10
    return "train" if b < 6 else ("val" if b < 8 else "test")


@dataclass
class DiscLabel:
    level: str
    pfirrmann: int  # 1..5
    herniation: int  # 0/1
    narrowing: int
    bulging: int


@dataclass
class Series:
    patient: str
    sequence: str  # "t1", "t2", "t2_SPACE"
    path: Path
    spacing: tuple[float, float]
    centres: dict[str, tuple[float, float]] = field(default_factory=dict)  # level -> canonical (row, col)

    @property
    def key(self) -> str:
        return f"{self.patient}_{self.sequence}"

    def canonical(self) -> Canonical:
        return load_canonical(self.path, self.spacing)


@dataclass
class Patient:
    id: str
    discs: dict[str, DiscLabel]  # level -> labels
    series: list[Series]
    n_graded: int  # graded discs (IVD labels >= 1)

    @property
    def split(self) -> str:
        return split_of(self.id)

    def eval_series(self) -> Series | None:
        for seq in SEQUENCE_ORDER:
            for s in self.series:
                if s.sequence == seq:
                    return s
        return None


def load_canonical(path: Path, spacing: tuple[float, float]) -> Canonical:
    """A SPIDER PNG in canonical orientation (flipped back: head at the top, anterior at the left)."""
    with Image.open(path) as im:
        if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
            raise DataSpecError(f"{path}: image of {im.size[0]} x {im.size[1]} pixels is too large")
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    return Canonical(image=normalise(arr[::-1].copy()), spacing=spacing, flip_rows=True)


def _int(v: str, default: int = 0) -> int:
    try:
        return int(float(str(v).strip()))
    except ValueError:
        return default


def _read_csv(path: Path) -> list[dict[str, str]]:
    if path.stat().st_size > 64 * 1024 * 1024:
        raise DataSpecError(f"{path}: larger than 64 MiB")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = []
        for i, row in enumerate(csv.DictReader(fh)):
            if i >= MAX_ROWS:
                raise DataSpecError(f"{path}: more than {MAX_ROWS} rows")
            rows.append({(k or "").strip(): (v or "") for k, v in row.items()})
    return rows


def _spacings(root: Path) -> dict[str, tuple[float, float]]:
    p = root / "overview.csv"
    out: dict[str, tuple[float, float]] = {}
    if not p.is_file():
        return out
    for row in _read_csv(p):
        try:
            v = ast.literal_eval(row.get("PixelSpacing", "").strip())
            sr, sc = float(v[0]), float(v[1])
        except (ValueError, SyntaxError, TypeError, IndexError):
            continue
        if 0.05 < sr < 5 and 0.05 < sc < 5:
            out[row.get("new_file_name", "").strip()] = (sr, sc)
    return out


def ncc_peak(image: np.ndarray, template: np.ndarray) -> tuple[float, float, float]:
    """(score, row, col) of the best normalised cross-correlation of ``template`` in ``image`` (centre)."""
    t = template - template.mean()
    n = t.size
    tt = float((t * t).sum())
    if tt <= 1e-9 or template.shape[0] > image.shape[0] or template.shape[1] > image.shape[1]:
        return 0.0, float("nan"), float("nan")
    img = image.astype(np.float64)
    num = fftconvolve(img, t[::-1, ::-1], mode="valid")
    ones = np.ones_like(t)
    s = fftconvolve(img, ones, mode="valid")
    s2 = fftconvolve(img * img, ones, mode="valid")
    var = np.maximum(s2 - s * s / n, 1e-6)
    r = num / np.sqrt(var * tt)
    y, x = np.unravel_index(int(np.argmax(r)), r.shape)
    return float(r[y, x]), y + (template.shape[0] - 1) / 2, x + (template.shape[1] - 1) / 2


def crop_centres(root: Path, s: Series, n_graded: int, min_score: float = 0.9) -> dict[str, tuple[float, float]]:
    """Level -> canonical (row, col) of the disc centres of series ``s`` from its crops (see module doc)."""
    crops = {}
    folder = root / "disc_crops"
    if not folder.is_dir():
        return {}
    for p in folder.glob(f"{s.patient}_{s.sequence}_disc_*.png"):
        m = _CROP.match(p.name)
        if m and m.group(1) == s.patient and m.group(2) == s.sequence:
            crops[int(m.group(3))] = p
    if not crops or len(crops) != n_graded or sorted(crops) != list(range(1, n_graded + 1)):
        return {}
    with Image.open(s.path) as im:
        raw = np.asarray(im.convert("L"), dtype=np.float64)[::-1]
    out: dict[str, tuple[float, float]] = {}
    for k, p in crops.items():
        ivd = n_graded + 1 - k
        level = LEVEL_OF_IVD.get(ivd)
        if level is None:
            continue
        with Image.open(p) as cim:
            c = np.asarray(cim.convert("RGB"), dtype=np.float64)
        inner = c[BORDER:-BORDER, BORDER:-BORDER, 1]
        if min(inner.shape) < 4:
            continue
        score, r, col = ncc_peak(raw, inner)
        if score >= min_score:
            out[level] = (r, col)
    # the named centres must run head to feet in level order
    rows = [out[lv][0] for lv in LEVELS if lv in out]
    if any(b <= a for a, b in itertools.pairwise(rows)):
        return {}
    return out


def load_spider(root: Path | str, *, centres: bool = False) -> list[Patient]:
    """The patients of a SPIDER-layout folder (with at least one image and graded lumbar discs)."""
    root = Path(root)
    grading = root / "radiological_gradings.csv"
    images = root / "midsagittal_images"
    if not root.is_dir():
        raise DataSpecError(f"spider:{root}: no such folder")
    if not grading.is_file() or not images.is_dir():
        raise DataSpecError(
            f"spider:{root}: expected radiological_gradings.csv and midsagittal_images/ (SPIDER layout)"
        )
    discs: dict[str, dict[str, DiscLabel]] = {}
    graded: dict[str, int] = {}
    for row in _read_csv(grading):
        pid = str(_int(row.get("Patient", ""), -1))
        ivd = _int(row.get("IVD label", ""), 0)
        if pid == "-1" or ivd < 1:
            continue
        graded[pid] = graded.get(pid, 0) + 1
        level = LEVEL_OF_IVD.get(ivd)
        grade = _int(row.get("Pfirrman grade", row.get("Pfirrmann grade", "")), 0)
        if level is None or not 1 <= grade <= 5:
            continue
        discs.setdefault(pid, {})[level] = DiscLabel(
            level=level,
            pfirrmann=grade,
            herniation=1 if _int(row.get("Disc herniation", "0")) else 0,
            narrowing=1 if _int(row.get("Disc narrowing", "0")) else 0,
            bulging=1 if _int(row.get("Disc bulging", "0")) else 0,
        )
    spacings = _spacings(root)
    series: dict[str, list[Series]] = {}
    for p in sorted(images.iterdir()):
        m = _NAME.match(p.name)
        if not m:
            continue
        pid, seq = m.group(1), m.group(2)
        sp = spacings.get(f"{pid}_{seq}", (DEFAULT_SPACING, DEFAULT_SPACING))
        series.setdefault(pid, []).append(Series(patient=pid, sequence=seq, path=p, spacing=sp))
    patients = []
    for pid in sorted(set(discs) & set(series), key=int):
        if len(discs[pid]) < 1:
            continue
        pt = Patient(id=pid, discs=discs[pid], series=series[pid], n_graded=graded[pid])
        if centres:
            for s in pt.series:
                s.centres = crop_centres(root, s, pt.n_graded)
        patients.append(pt)
    if not patients:
        raise DataSpecError(f"spider:{root}: no patient has both an image and graded lumbar discs")
    return patients
