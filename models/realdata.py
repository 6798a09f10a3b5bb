"""Real MRI for training and evaluating the QC gate (``qc.anatomy``): loaders of the shared corpus.

The corpus (``realdata``) lives beside the checkout, never inside it: ``$MSKNODE_REALDATA`` or
``<checkout>/../shared/realdata`` (`realdata_root`). It is described by its own README and
``manifest.json``; this module turns it into `CorpusSeries` records (source, anatomy, plane,
patient group, series key) whose ``volume()`` is a `Volume` in the display layout of its plane.

| source            | what                                                          | anatomy / plane             |
|-------------------|---------------------------------------------------------------|-----------------------------|
| ``knee_stacks``   | teaching screen exports (JPEG), one folder per series         | knee, three planes          |
| ``siemens_knee``  | one sagittal knee DICOM series (Siemens Prisma 3 T)           | knee sagittal               |
| ``acl_slices``    | 110 sagittal knee slices (PNG, stored transposed: undone here)| knee sagittal, one slice    |
| ``shoulder_stacks``| teaching screen exports + two journal figure panels (cuff, SLAP)| shoulder, three planes    |
| ``lumbar_volumes``| 28 sagittal 1 mm isotropic volumes (``I[row, col, k]``)       | lumbar spine sagittal       |
| ``spider``        | 357 SPIDER mid-sagittal slices (stored upside down: undone)   | lumbar spine sagittal       |
| ``elbow_stacks``  | teaching screen exports                                       | elbow (other anatomy)       |
| ``hip_stacks``    | teaching screen exports                                       | hip (other anatomy)         |
| ``mni152``        | nilearn's MNI152 T1 template, resliced into three planes      | brain (other anatomy)       |
| ``pydicom_mr``    | pydicom-data MR: ``emri_small`` (head), ``MR-SIEMENS-DICOM-WithOverlays`` (abdomen), ``MR2_UNCR`` (Philips shoulder, oblique coronal: in-anatomy) | |

Groups (the unit of every split) are patients where the corpus says so, else the series: the
teaching stacks of one anatomy are treated as one patient, the MNI152 template as one subject,
SPIDER by patient id, the lumbar volumes and ACL slices one group each.

Screen exports carry no geometry; their volumes get the canonical direction cosines of their
plane and an assumed spacing (`ASSUMED_FOV_MM`, `ASSUMED_SLICE_MM`), recorded in
``attributes["assumed_spacing"]``. The anatomy classifier is field-of-view relative, so the
assumption only matters to the gate's header checks in tests. Burned-in overlays (orientation
letters, ``N of M`` counters, scroll bars, figure letters) are not removed here: the classifier
masks a border band of every image it reads (`models.qc.mask_overlay`).

Nothing from the corpus may be copied into the repository; caches go to ``~/.cache`` or /tmp.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from models.errors import DataSpecError
from models.transforms import PLANES
from models.types import Volume

QC_ANATOMIES = ("knee", "shoulder", "lumbar_spine")
SOURCES = (
    "knee_stacks",
    "siemens_knee",
    "acl_slices",
    "shoulder_stacks",
    "lumbar_volumes",
    "spider",
    "elbow_stacks",
    "hip_stacks",
    "mni152",
    "pydicom_mr",
)
ENV = "MSKNODE_REALDATA"
ASSUMED_FOV_MM = {"knee": 160.0, "shoulder": 170.0, "elbow": 140.0, "hip": 340.0}
ASSUMED_SLICE_MM = 3.5
# the teaching stacks: folder -> (plane, sequence); the direction of each stack is in the corpus manifest
_STACK_PLANE = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal"}
_FIGURE_PANELS = {
    "cuff-tear": ("coronal", "oblique coronal MR arthrogram (journal figure panel)"),
    "slap": ("axial", "axial fat-suppressed T1 MR arthrogram (journal figure panel)"),
}
# pydicom-data files, looked at before labelling (the MR2_* files are the same Philips shoulder image
# in four encodings, emri_small* the same head volume; one of each is used)
_PYDICOM = {
    "emri_small.dcm": ("brain", None, "pydicom:emri_small", "head (brain), 10-frame enhanced MR, 64 x 64 crop"),
    "MR-SIEMENS-DICOM-WithOverlays.dcm": (
        "abdomen",
        "axial",
        "pydicom:abdomen",
        "abdomen (liver, kidneys), Siemens, axial",
    ),
    "MR2_UNCR.dcm": (
        "shoulder",
        "coronal",
        "pydicom:mr2_shoulder",
        "shoulder, Philips, oblique coronal (StudyDescription SHOULDER)",
    ),
}


def realdata_root() -> Path | None:
    """The corpus folder: ``$MSKNODE_REALDATA`` or ``../shared/realdata`` beside the checkout (None if absent)."""
    env = os.environ.get(ENV)
    if env:
        p = Path(env)
        return p if p.is_dir() else None
    import models

    p = Path(models.__file__).resolve().parents[2] / "shared" / "realdata"
    return p if (p / "manifest.json").is_file() else None


@dataclass(frozen=True)
class CorpusSeries:
    """One real series (or single slice) of the corpus."""

    source: str  # one of SOURCES
    key: str  # unique, e.g. "knee_stacks/normal-knee-sagittal"
    group: str  # patient / subject: the unit of every split
    anatomy: str  # knee | shoulder | lumbar_spine | elbow | hip | brain | abdomen
    plane: str  # sagittal | coronal | axial (as displayed / acquired)
    description: str
    kind: str  # "stack" | "slice" | "dicom" | "npz" | "nifti"
    path: str  # file or folder it is read from
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def in_anatomy(self) -> bool:
        return self.anatomy in QC_ANATOMIES

    @property
    def label(self) -> str:
        """The anatomy classifier's class: ``anatomy/plane`` for knee, shoulder, lumbar spine, else ``other``."""
        return f"{self.anatomy}/{self.plane}" if self.in_anatomy else "other"

    def volume(self) -> Volume:
        return _LOADERS[self.kind](self)


# ------------------------------------------------------------------------------------------
# volumes


def image_volume(
    slices: np.ndarray,
    plane: str,
    *,
    pixel_mm: float,
    slice_mm: float,
    uid: str,
    body_part: str | None,
    description: str,
    attributes: dict[str, Any] | None = None,
) -> Volume:
    """(n, rows, cols) images already in the display layout of ``plane`` -> a `Volume` with the canonical
    direction cosines of that plane (rows head->feet / anterior->posterior, as a radiology viewer shows them)."""
    a = np.asarray(slices, np.float32)
    if a.ndim == 2:
        a = a[None]
    row, col = PLANES[plane]
    normal = np.cross(row, col)
    positions = np.array([normal * slice_mm * k for k in range(a.shape[0])], float)
    return Volume(
        array=a,
        spacing=(float(slice_mm), float(pixel_mm), float(pixel_mm)),
        positions=positions,
        row_cosine=row,
        col_cosine=col,
        study_uid=f"realdata.{uid}",
        series_uid=f"realdata.{uid}",
        modality="MR",
        body_part=body_part,
        series_description=description,
        attributes=dict(attributes or {}),
    )


def _gray(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), np.float32)


def _trailing_number(p: Path) -> int:
    m = re.search(r"(\d+)$", p.stem)
    return int(m.group(1)) if m else 0


_BODY_PART = {
    "knee": "KNEE",
    "shoulder": "SHOULDER",
    "lumbar_spine": "LSPINE",
    "elbow": "ELBOW",
    "hip": "HIP",
    "brain": "HEAD",
    "abdomen": "ABDOMEN",
}


def _load_stack(s: CorpusSeries) -> Volume:
    files = sorted(Path(s.path).glob("*.jpg"), key=_trailing_number)
    imgs = [_gray(f) for f in files]
    h = min(i.shape[0] for i in imgs)
    w = min(i.shape[1] for i in imgs)
    arr = np.stack([i[:h, :w] for i in imgs])
    fov = ASSUMED_FOV_MM.get(s.anatomy, 160.0)
    return image_volume(
        arr,
        s.plane,
        pixel_mm=fov / max(h, w),
        slice_mm=ASSUMED_SLICE_MM,
        uid=s.key,
        body_part=_BODY_PART.get(s.anatomy),
        description=s.description,
        attributes={"assumed_spacing": True, "screen_export": True, "realdata_key": s.key},
    )


def _load_slice(s: CorpusSeries) -> Volume:
    img = _gray(Path(s.path))
    if s.source == "acl_slices":
        img = img.T  # stored transposed (femur left, anterior up): back to head at the top, anterior left
    elif s.source == "spider":
        img = img[::-1]  # stored upside down (sacrum at the top)
    fov = float(s.extra.get("fov_mm") or 160.0)
    pixel = float(s.extra.get("pixel_mm") or fov / max(img.shape))
    return image_volume(
        img,
        s.plane,
        pixel_mm=pixel,
        slice_mm=ASSUMED_SLICE_MM,
        uid=s.key,
        body_part=_BODY_PART.get(s.anatomy),
        description=s.description,
        attributes={"assumed_spacing": "pixel_mm" not in s.extra, "realdata_key": s.key},
    )


def _load_dicom(s: CorpusSeries) -> Volume:
    from models.io import load_series

    p = Path(s.path)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_series(files)


def _load_npz(s: CorpusSeries) -> Volume:
    arr = np.load(s.path)["I"]  # I[row, col, k]: row 0 superior, col 0 anterior, k left-right; 1 mm
    a = np.ascontiguousarray(np.transpose(arr, (2, 0, 1)), dtype=np.float32)
    return image_volume(
        a,
        "sagittal",
        pixel_mm=1.0,
        slice_mm=1.0,
        uid=s.key,
        body_part="LSPINE",
        description=s.description,
        attributes={"realdata_key": s.key},
    )


def mni152_path() -> Path | None:
    try:
        import nilearn
    except ImportError:
        return None
    return next(iter(sorted((Path(nilearn.__file__).parent / "datasets" / "data").glob("mni_icbm152_t1_*.nii*"))), None)


def mni_slices(plane: str, step: int = 3) -> np.ndarray:
    """The MNI152 T1 template (RAS voxel axes, 1 mm) as (n, rows, cols) in the display layout of ``plane``."""
    import nibabel as nib

    path = mni152_path()
    if path is None:
        raise DataSpecError("nilearn's MNI152 template is not installed")
    d = np.asarray(
        cast(nib.Nifti1Image, nib.load(str(path))).dataobj, np.float32
    )  # (x: left->right, y: posterior->anterior, z: up)
    if plane == "sagittal":  # slices along x; rows head->feet (z down), cols anterior->posterior (y down)
        a = d.transpose(0, 2, 1)[:, ::-1, ::-1]
    elif plane == "coronal":  # slices along y; rows z down, cols patient right->left (x down)
        a = d.transpose(1, 2, 0)[:, ::-1, ::-1]
    else:  # axial: slices along z; rows anterior->posterior (y down), cols right->left (x down)
        a = d.transpose(2, 1, 0)[:, ::-1, ::-1]
    n = a.shape[0]
    keep = [k for k in range(0, n, step) if a[k].max() > 0.1 * float(a.max())]
    return np.ascontiguousarray(a[keep])


def _load_nifti(s: CorpusSeries) -> Volume:
    step = 3
    return image_volume(
        mni_slices(s.plane, step),
        s.plane,
        pixel_mm=1.0,
        slice_mm=float(step),
        uid=s.key,
        body_part="HEAD",
        description=s.description,
        attributes={"realdata_key": s.key},
    )


_LOADERS = {"stack": _load_stack, "slice": _load_slice, "dicom": _load_dicom, "npz": _load_npz, "nifti": _load_nifti}


# ------------------------------------------------------------------------------------------
# the catalogue


def _stacks(root: Path, folder: str, source: str, anatomy_filter: str | None = None) -> list[CorpusSeries]:
    out: list[CorpusSeries] = []
    base = root / folder / "teaching_stacks"
    if not base.is_dir():
        return out
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        name = d.name
        if name in _FIGURE_PANELS:
            plane, desc = _FIGURE_PANELS[name]
            anatomy = "shoulder"
            group, notes = f"{source}:{name}", "journal figure panel (small RGB crop, letters and arrows burned in)"
        else:
            m = re.match(r"normal-([a-z]+)-([a-z]+)", name)
            if not m:
                continue
            stack_plane = _STACK_PLANE.get(m.group(2))
            if stack_plane is None:
                continue
            anatomy, plane = m.group(1), stack_plane
            desc = name.replace("-", " ")
            group, notes = f"teaching:{anatomy}", "screen export (orientation letters, counter, scroll bar)"
        if anatomy_filter and anatomy != anatomy_filter:
            continue
        out.append(
            CorpusSeries(
                source=source,
                key=f"{source}/{name}",
                group=group,
                anatomy=anatomy,
                plane=plane,
                description=desc,
                kind="stack",
                path=str(d),
                notes=notes,
            )
        )
    return out


def _acl(root: Path) -> list[CorpusSeries]:
    base = root / "knee" / "acl_tear_slices"
    out: list[CorpusSeries] = []
    if not base.is_dir():
        return out
    for d in sorted((p for p in base.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        if (d / "img.png").is_file():
            out.append(
                CorpusSeries(
                    source="acl_slices",
                    key=f"acl_slices/{d.name}",
                    group=f"acl:{d.name}",
                    anatomy="knee",
                    plane="sagittal",
                    description="sagittal knee slice (ACL tear)",
                    kind="slice",
                    path=str(d / "img.png"),
                )
            )
    return out


def _siemens(root: Path) -> list[CorpusSeries]:
    d = root / "knee" / "siemens_sagittal_dicom"
    if not d.is_dir():
        return []
    return [
        CorpusSeries(
            source="siemens_knee",
            key="siemens_knee/sagittal",
            group="siemens_knee",
            anatomy="knee",
            plane="sagittal",
            description="Siemens Prisma 3 T sagittal PD FS TSE, left knee",
            kind="dicom",
            path=str(d),
        )
    ]


def _lumbar(root: Path) -> list[CorpusSeries]:
    base = root / "lumbar_spine" / "segmented_volumes"
    out = []
    for p in sorted(base.glob("VB*/*.npz")):
        key = f"{p.parent.name}/{p.stem}"
        out.append(
            CorpusSeries(
                source="lumbar_volumes",
                key=f"lumbar_volumes/{key}",
                group=f"lumbar:{key}",
                anatomy="lumbar_spine",
                plane="sagittal",
                description=f"sagittal lumbar spine volume {key} (1 mm isotropic)",
                kind="npz",
                path=str(p),
            )
        )
    return out


def _spider(root: Path) -> list[CorpusSeries]:
    base = root / "lumbar_spine" / "spider_midsagittal"
    spacing: dict[str, float] = {}
    ov = base / "overview.csv"
    if ov.is_file():
        with open(ov, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    spacing[row["new_file_name"]] = float(str(row.get("PixelSpacing", "")).strip("[]").split(",")[0])
                except (ValueError, IndexError):
                    pass
    out = []
    for p in sorted((base / "midsagittal_images").glob("*.png"), key=lambda p: (int(p.stem.split("_")[0]), p.stem)):
        patient = p.stem.split("_")[0]
        extra = {"header_pixel_mm": spacing[p.stem]} if p.stem in spacing else {}
        out.append(
            CorpusSeries(
                source="spider",
                key=f"spider/{p.stem}",
                group=f"spider:{patient}",
                anatomy="lumbar_spine",
                plane="sagittal",
                description=f"SPIDER mid-sagittal {p.stem.split('_', 1)[1]}",
                kind="slice",
                path=str(p),
                extra={**extra, "fov_mm": 300.0},
            )
        )
    return out


def _mni() -> list[CorpusSeries]:
    p = mni152_path()
    if p is None:
        return []
    return [
        CorpusSeries(
            source="mni152",
            key=f"mni152/{plane}",
            group="mni152",
            anatomy="brain",
            plane=plane,
            description=f"MNI152 T1 template, {plane}",
            kind="nifti",
            path=str(p),
        )
        for plane in ("sagittal", "coronal", "axial")
    ]


def _pydicom() -> list[CorpusSeries]:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    out = []
    for name, (anatomy, plane, group, desc) in _PYDICOM.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = get_testdata_file(name)
        except Exception:  # pydicom-data not installed / not downloadable
            path = None
        if not path:
            continue
        out.append(
            CorpusSeries(
                source="pydicom_mr",
                key=f"pydicom_mr/{Path(name).stem}",
                group=group,
                anatomy=anatomy,
                plane=plane or "sagittal",
                description=desc,
                kind="dicom",
                path=str(path),
                notes="" if plane else "no plane geometry in the file; shown as stored",
            )
        )
    return out


def catalogue(root: Path | str | None = None, sources: Iterable[str] | None = None) -> list[CorpusSeries]:
    """Every real series of the corpus at ``root`` (default `realdata_root`) plus the MNI152 template and the
    pydicom-data MR (which live in installed packages). ``sources`` restricts the list."""
    root = Path(root) if root is not None else realdata_root()
    wanted = set(sources) if sources is not None else set(SOURCES)
    unknown = wanted - set(SOURCES)
    if unknown:
        raise DataSpecError(f"unknown real-data source(s) {', '.join(sorted(unknown))}; known: {', '.join(SOURCES)}")
    out: list[CorpusSeries] = []
    if root is not None and root.is_dir():
        out += _stacks(root, "knee", "knee_stacks")
        out += _siemens(root)
        out += _acl(root)
        out += _stacks(root, "shoulder", "shoulder_stacks")
        out += _lumbar(root)
        out += _spider(root)
        out += _stacks(root, "other_anatomy", "elbow_stacks", "elbow")
        out += _stacks(root, "other_anatomy", "hip_stacks", "hip")
    out += _mni()
    out += _pydicom()
    return [s for s in out if s.source in wanted]
