"""Real series without labels, for ``msknode evaluate MODEL --data realdir:PATH``.

A *realdir* is a folder whose subfolders (at any depth) are series. A series folder holds
either

- DICOM files of one series (any names; geometry, anatomy and plane come from the headers), or
- an image stack — PNG/JPEG/TIFF slices, ordered by the last number in each file name —, or
- one ``volume.npy`` / ``volume.npz`` (array ``I``, axes ``(slices, rows, cols)``),

plus an optional ``series.json`` sidecar (required for image stacks and arrays)::

    {
      "anatomy": "knee",                 # knee | shoulder | lumbar_spine | other:<name> (e.g. other:hip)
      "plane": "sagittal",               # sagittal | coronal | axial (canonical display orientation)
      "pixel_spacing_mm": 0.3,           # or [row, col]; or "field_of_view_mm": 160 (of the image width)
      "slice_spacing_mm": 3.5,           # distance between slices
      "label": "normal",                 # optional: "normal" series count towards the false-positive rate
      "source": "site PACS export 2026", # optional free text, reported per source
      "order": "ascending"               # optional: "descending" reverses the file-name order
    }

Image stacks are displayed slices, so they are read as they are shown: rows top to bottom,
columns left to right, in the radiological display of their plane (sagittal: anterior left,
superior up; coronal and axial: patient right on the left). Values are the displayed grey
levels; colour images are converted to grey.

`read_realdir(root)` yields `RealSeries` (a `Volume` + what the sidecar says). Every input is
bounded: series count, files per series, bytes per file and pixels per image.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataSpecError
from models.transforms import PLANES
from models.types import Volume

SIDECAR = "series.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ARRAY_NAMES = ("volume.npy", "volume.npz")
ANATOMIES = ("knee", "shoulder", "lumbar_spine")
MAX_SERIES = 5000
MAX_FILES_PER_SERIES = 2000
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_SIDECAR_BYTES = 64 * 1024
_TRAILING_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class RealSeries:
    key: str  # the series folder relative to the realdir
    volume: Volume
    anatomy: str | None  # knee | shoulder | lumbar_spine | other:<name> | None (unknown)
    plane: str | None
    label: str | None = None  # "normal" or any text the sidecar gives
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def normal(self) -> bool:
        return (self.label or "").strip().lower() == "normal"

    @property
    def anatomy_group(self) -> str:
        """knee / shoulder / lumbar_spine, "other" for every other body part, "unknown"."""
        if not self.anatomy:
            return "unknown"
        return self.anatomy if self.anatomy in ANATOMIES else "other"


def _read_sidecar(folder: Path) -> dict[str, Any] | None:
    path = folder / SIDECAR
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise DataSpecError(f"{path}: larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataSpecError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataSpecError(f"{path}: must be a JSON object")
    anatomy = data.get("anatomy")
    if anatomy is not None and (
        not isinstance(anatomy, str) or not (anatomy in ANATOMIES or re.fullmatch(r"other(:[\w-]{1,40})?", anatomy))
    ):
        raise DataSpecError(f"{path}: anatomy {anatomy!r} is not one of {', '.join(ANATOMIES)} or other:<name>")
    plane = data.get("plane")
    if plane is not None and plane not in PLANES:
        raise DataSpecError(f"{path}: plane {plane!r} is not one of {', '.join(PLANES)}")
    return data


def _positive(value: Any, what: str, path: Path) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DataSpecError(f"{path}: {what} must be a number") from None
    if not (0 < v < 1000):
        raise DataSpecError(f"{path}: {what} {v} out of range (0, 1000) mm")
    return v


def _slice_order_key(p: Path) -> tuple[int, str]:
    m = _TRAILING_NUMBER.search(p.stem)
    return (int(m.group(1)) if m else -1, p.name)


def stack_volume(slices: np.ndarray, plane: str, spacing: tuple[float, float, float], key: str, **attrs: Any) -> Volume:
    """A (slices, rows, cols) stack in the canonical display orientation of ``plane`` as a Volume."""
    arr = np.asarray(slices, dtype=np.float32)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise DataSpecError(f"series {key}: expected a (slices, rows, cols) stack, got shape {arr.shape}")
    row, col = PLANES[plane]
    normal = np.cross(row, col)
    positions = np.array([k * spacing[0] * normal for k in range(arr.shape[0])], dtype=float)
    uid = "realdir-" + re.sub(r"[^A-Za-z0-9.-]", "-", key)[:48]
    return Volume(
        array=arr,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        positions=positions,
        row_cosine=row,
        col_cosine=col,
        series_uid=uid,
        sop_instance_uids=tuple(f"{uid}-{k}" for k in range(arr.shape[0])),
        frame_numbers=(None,) * arr.shape[0],
        modality="MR",
        attributes={"source": "realdir", **attrs},
    )


def _load_images(files: list[Path], folder: Path) -> np.ndarray:
    from PIL import Image

    planes = []
    for f in files:
        if f.stat().st_size > MAX_FILE_BYTES:
            raise DataSpecError(f"{f}: larger than {MAX_FILE_BYTES} bytes")
        with Image.open(f) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataSpecError(f"{f}: {im.width}x{im.height} pixels exceeds the limit")
            planes.append(np.asarray(im.convert("F"), dtype=np.float32))
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise DataSpecError(f"{folder}: the images of one series differ in size ({sorted(shapes)})")
    return np.stack(planes)


def _load_array(path: Path) -> np.ndarray:
    if path.stat().st_size > 16 * MAX_FILE_BYTES:
        raise DataSpecError(f"{path}: too large")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "I" not in z:
                raise DataSpecError(f"{path}: no array 'I'")
            return np.asarray(z["I"], dtype=np.float32)
    return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)


def _stack_series(folder: Path, key: str, side: dict[str, Any] | None, data: np.ndarray) -> RealSeries:
    where = folder / SIDECAR
    if side is None:
        raise DataSpecError(f"{folder}: an image stack needs a {SIDECAR} (plane, spacing, anatomy)")
    plane = side.get("plane")
    if plane is None:
        raise DataSpecError(f"{where}: plane is required for an image stack")
    if side.get("order", "ascending") == "descending":
        data = data[::-1]
    if "pixel_spacing_mm" in side:
        ps = side["pixel_spacing_mm"]
        ps = ps if isinstance(ps, list) else [ps, ps]
        if len(ps) != 2:
            raise DataSpecError(f"{where}: pixel_spacing_mm must be a number or [row, col]")
        row_mm, col_mm = (_positive(v, "pixel_spacing_mm", where) for v in ps)
    elif "field_of_view_mm" in side:
        fov = _positive(side["field_of_view_mm"], "field_of_view_mm", where)
        row_mm = col_mm = fov / data.shape[2]
    else:
        raise DataSpecError(f"{where}: pixel_spacing_mm or field_of_view_mm is required for an image stack")
    slice_mm = _positive(side.get("slice_spacing_mm", 3.0), "slice_spacing_mm", where)
    vol = stack_volume(data, plane, (slice_mm, row_mm, col_mm), key)
    return RealSeries(
        key,
        vol,
        side.get("anatomy"),
        plane,
        side.get("label"),
        side.get("source"),
        {k: v for k, v in side.items() if k in ("sequence", "assumed", "note")},
    )


def _dicom_series(folder: Path, key: str, side: dict[str, Any] | None, files: list[Path]) -> RealSeries:
    from models.io import load_series
    from models.transforms import detect_plane

    vol = load_series(files)
    side = side or {}
    anatomy = side.get("anatomy") or _header_anatomy(vol.body_part)
    plane = side.get("plane") or detect_plane(vol)[0]
    return RealSeries(
        key,
        vol,
        anatomy,
        plane,
        side.get("label"),
        side.get("source"),
        {k: v for k, v in side.items() if k in ("sequence", "note")},
    )


_BODY_PART_ANATOMY = {
    "KNEE": "knee",
    "SHOULDER": "shoulder",
    "LSPINE": "lumbar_spine",
    "LUMBARSPINE": "lumbar_spine",
    "LUMBAR": "lumbar_spine",
    "LSSPINE": "lumbar_spine",
}


def _header_anatomy(body_part: str | None) -> str | None:
    part = re.sub(r"[\s_-]", "", (body_part or "").upper())
    if not part:
        return None
    return _BODY_PART_ANATOMY.get(part, f"other:{part.lower()[:40]}")


def series_folders(root: Path) -> list[Path]:
    """Every folder below ``root`` that directly holds series data (files other than the sidecar)."""
    root = Path(root)
    if not root.is_dir():
        raise DataSpecError(f"realdir {root} does not exist or is not a folder")
    found = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if any(f.is_file() and f.name != SIDECAR and not f.name.startswith(".") for f in folder.iterdir()):
            found.append(folder)
            if len(found) > MAX_SERIES:
                raise DataSpecError(f"realdir {root}: more than {MAX_SERIES} series folders")
    return found


def read_series(folder: Path, key: str) -> RealSeries:
    side = _read_sidecar(folder)
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != SIDECAR and not f.name.startswith("."))
    if len(files) > MAX_FILES_PER_SERIES:
        raise DataSpecError(f"{folder}: more than {MAX_FILES_PER_SERIES} files")
    arrays = [f for f in files if f.name in ARRAY_NAMES]
    if arrays:
        return _stack_series(folder, key, side, _load_array(arrays[0]))
    images = sorted((f for f in files if f.suffix.lower() in IMAGE_SUFFIXES), key=_slice_order_key)
    if images:
        return _stack_series(folder, key, side, _load_images(images, folder))
    return _dicom_series(folder, key, side, files)


def read_realdir(root: Path | str) -> Iterator[RealSeries]:
    """The series of a realdir, in folder order. A folder that cannot be read raises `DataSpecError`."""
    root = Path(root)
    folders = series_folders(root)
    if not folders:
        raise DataSpecError(f"realdir {root}: no series folders")
    for folder in folders:
        key = str(folder.relative_to(root)) if folder != root else root.name
        try:
            yield read_series(folder, key)
        except DataSpecError:
            raise
        except Exception as e:  # unreadable DICOM / image: name the folder
            raise DataSpecError(f"{folder}: cannot read the series ({type(e).__name__}: {e})") from None


# --- the shared development corpus as a realdir ---------------------------------------------------------

#: display conventions and nominal geometry of the corpus' teaching stacks (screen exports without
#: spacing): field of view of the image width and slice spacing as typical for each protocol
_STACK_GEOMETRY = {
    "knee": (160.0, 3.5),
    "shoulder": (170.0, 3.5),
    "elbow": (150.0, 3.5),
    "hip": (360.0, 4.0),
}
_STACK_PLANE = re.compile(r"(axial|coronal|sagittal)")


def export_corpus(corpus: Path | str, out: Path | str) -> list[str]:
    """Writes a realdir view of the development corpus (``../shared/realdata``) under ``out``.

    Series folders hold symbolic links to the corpus files (never copies), plus a sidecar;
    the lumbar volumes are written as ``volume.npy`` (sagittal slices) because the corpus packs
    them with their masks. Returns the series keys written. Single 2-D slices (the ACL and SPIDER
    collections) are not series and are left out.
    """
    import shutil

    corpus, out = Path(corpus), Path(out)
    if not corpus.is_dir():
        raise DataSpecError(f"corpus {corpus} not found")
    keys: list[str] = []

    def series_dir(key: str) -> Path:
        d = out / key
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        keys.append(key)
        return d

    for group in ("knee", "shoulder", "other_anatomy"):
        base = corpus / group / "teaching_stacks"
        if not base.is_dir():
            continue
        for stack in sorted(p for p in base.iterdir() if p.is_dir()):
            m = _STACK_PLANE.search(stack.name)
            body = next((b for b in _STACK_GEOMETRY if b in stack.name), None)
            if m is None or body is None:
                continue  # the article figure panels (cuff-tear, slap) are not series
            fov, step = _STACK_GEOMETRY[body]
            d = series_dir(f"stacks/{stack.name}")
            for f in stack.iterdir():
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    (d / f.name).symlink_to(f.resolve())
            anatomy = body if body in ANATOMIES else f"other:{body}"
            (d / SIDECAR).write_text(
                json.dumps(
                    {
                        "anatomy": anatomy,
                        "plane": m.group(1),
                        "field_of_view_mm": fov,
                        "slice_spacing_mm": step,
                        "label": "normal" if stack.name.startswith("normal") else None,
                        "source": f"{group}/teaching_stacks",
                        "assumed": "field of view and slice spacing (screen export)",
                    },
                    indent=1,
                )
            )
    dicom = corpus / "knee" / "siemens_sagittal_dicom"
    if dicom.is_dir():
        d = series_dir("dicom/siemens_knee_sagittal")
        for f in dicom.iterdir():
            if f.is_file():
                (d / ("x" + f.name)).symlink_to(f.resolve())
        (d / SIDECAR).write_text(json.dumps({"source": "knee/siemens_sagittal_dicom"}))
    vols = corpus / "lumbar_spine" / "segmented_volumes"
    for npz in sorted(vols.glob("*/*.npz")) if vols.is_dir() else ():
        with np.load(npz, allow_pickle=False) as z:
            arr = np.asarray(z["I"])  # I[row (superior 0), col (anterior 0), k (left-right)]
        d = series_dir(f"lumbar_volumes/{npz.parent.name}_{npz.stem}")
        np.save(d / "volume.npy", np.ascontiguousarray(np.transpose(arr, (2, 0, 1))))
        (d / SIDECAR).write_text(
            json.dumps(
                {
                    "anatomy": "lumbar_spine",
                    "plane": "sagittal",
                    "pixel_spacing_mm": 1.0,
                    "slice_spacing_mm": 1.0,
                    "source": f"lumbar_spine/segmented_volumes/{npz.parent.name}",
                }
            )
        )
    return keys


def export_public_other(out: Path | str) -> list[str]:
    """Adds other-anatomy series available on every machine: nilearn's MNI152 T1 brain in three planes.

    The template is in RAS+ voxel order at 1 mm; each plane is written in its display orientation.
    """
    import glob

    import nibabel as nib
    import nilearn

    out = Path(out)
    files = glob.glob(str(Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_*.nii*"))
    if not files:
        return []
    img = nib.as_closest_canonical(nib.load(files[0]))  # axes x: left->right (R+), y: post->ant (A+), z: inf->sup
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    data = np.asarray(img.get_fdata(), np.float32)
    views = {
        # (slices, rows top->bottom, cols left->right) in each plane's radiological display
        "sagittal": (np.transpose(data, (0, 2, 1))[:, ::-1, ::-1], (zooms[0], zooms[2], zooms[1])),
        "coronal": (np.transpose(data, (1, 2, 0))[:, ::-1, :], (zooms[1], zooms[2], zooms[0])),
        "axial": (np.transpose(data, (2, 1, 0))[:, ::-1, :], (zooms[2], zooms[1], zooms[0])),
    }
    keys = []
    for plane, (arr, (sk, rj, ci)) in views.items():
        key = f"public/mni152_brain_{plane}"
        d = out / key
        d.mkdir(parents=True, exist_ok=True)
        step = max(1, round(4.0 / sk))  # 4 mm slices, as a clinical brain series
        np.save(d / "volume.npy", np.ascontiguousarray(arr[::step]))
        (d / SIDECAR).write_text(
            json.dumps(
                {
                    "anatomy": "other:brain",
                    "plane": plane,
                    "pixel_spacing_mm": [rj, ci],
                    "slice_spacing_mm": sk * step,
                    "source": "nilearn MNI152 T1 template",
                }
            )
        )
        keys.append(key)
    return keys


def main(argv: list[str] | None = None) -> int:
    """``python -m models.realdir export CORPUS OUT``: a realdir view of the development corpus."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m models.realdir")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a realdir of the development corpus (links, sidecars)")
    ex.add_argument("corpus", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--public", action="store_true", help="also the MNI152 brain (nilearn) as other anatomy")
    args = ap.parse_args(argv)
    try:
        keys = export_corpus(args.corpus, args.out)
        if args.public:
            keys += export_public_other(args.out)
    except DataSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(keys)} series written under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
