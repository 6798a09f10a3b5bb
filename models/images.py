"""Images with labels (``images:PATH``) for ``msknode train`` and ``msknode evaluate`` of the classifiers.

The layout a site has when its series are not DICOM: slices exported as pictures, NIfTI volumes
or MATLAB arrays, one folder per series, and one CSV of labels::

    PATH/
      labels.csv            series,acl           (a series folder + the task's label columns)
      case001/              one folder per row (a path relative to PATH; may be nested)
        series.json         the sidecar: anatomy, plane, spacing, order (below)
        slice_01.png ...    PNG/JPEG/TIFF slices, ordered by the last number in each file name, or
      case002/
        volume.nii.gz       one NIfTI volume (.nii or .nii.gz), or
      case003/
        volume.mat          one MATLAB array (.mat v4, v6 or v7; v7.3 files are HDF5 and are not read)

``labels.csv`` has a header. The series column is ``series`` (or ``SeriesInstanceUID`` when the
folders are named by their UID); the label columns and values are those of ``dicomcsv:``'s
labels.csv (`models.labels`): one column per head (``acl``: intact/partial/complete or 0/1 ...;
``meniscus``: none/medial/lateral; ``cuff``: none/partial/full_thickness; ``L1-L2`` ... ``L5-S1``:
normal/mild/moderate/severe); an empty cell or ``?`` is an unknown label. The rows keep their
order (training validates on the last rows). Folders without a row are ignored; a row without
its folder, a duplicate row, a row with more or fewer fields than the header and a label value
the head does not know are errors that name the file, the line and the value.

The sidecar ``series.json`` uses the keys of `models.realdir`::

    {
      "anatomy": "knee",            # must be the task's anatomy when given
      "plane": "sagittal",          # sagittal | coronal | axial: the slices are displayed in this plane
      "pixel_spacing_mm": 0.4,      # or [row, col]; or "field_of_view_mm": 160 (of the image width)
      "slice_spacing_mm": 3.5,      # distance between slices (default 3.0)
      "order": "ascending",         # "descending" reverses the slice order
      "transpose": false,           # swap rows and columns of every slice (images stored transposed)
      "flip_rows": false,           # turn every slice upside down
      "flip_cols": false,           # mirror every slice left-right
      "variable": "I",              # .mat only: the array to read (default: the only 2-D/3-D array)
      "slice_axis": 2               # .mat only: the axis of the slices (default 2, MATLAB's I(row, col, slice))
    }

Slices are read as displayed: rows top to bottom, columns left to right, in the radiological
display of the plane (sagittal: anterior left, superior up; coronal and axial: patient right on
the left); ``transpose`` and the flips are applied first. The sidecar is required for slices and
.mat arrays. A NIfTI volume takes its orientation and spacing from its affine (RAS+ converted to
the DICOM patient frame) and needs no sidecar; a sidecar with ``plane`` overrides the affine (the
voxel axes i, j, k are then read as columns, rows and slices in that plane, with the header's
spacing unless the sidecar gives one), and ``pixel_spacing_mm`` / ``slice_spacing_mm`` alone
override the spacing. A folder of DICOM files or a ``volume.npy`` is read as in `models.realdir`.

Every input is bounded: the CSV's bytes and rows, files per series, bytes per file, pixels per
image and voxels per volume.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataSpecError
from models.realdir import (
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    MAX_FILES_PER_SERIES,
    MAX_SERIES,
    SIDECAR,
    _positive,
    _read_sidecar,
    _stack_series,
    read_series,
)
from models.tasks.base import TaskSpec
from models.types import Volume

LABELS_CSV = "labels.csv"
SERIES_COLUMNS = ("series", "SeriesInstanceUID")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAT_SUFFIX = ".mat"
MAX_LABELS_BYTES = 16 * 1024 * 1024
MAX_VOLUME_BYTES = 16 * MAX_FILE_BYTES  # one NIfTI or .mat file (compressed size)
MAX_VOXELS = 256 * 1024 * 1024  # voxels of one volume once read (1 GiB as float32)


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


# --- labels.csv --------------------------------------------------------------------------------------


def read_labels(root: Path, task: TaskSpec) -> list[tuple[str, int, dict[str, str]]]:
    """(series folder, line number, row) per data row of ``root/labels.csv``, in file order, checked: every
    folder exists below ``root``, no duplicates, every row has the header's fields, a label column of ``task``."""
    path = root / LABELS_CSV
    if not path.is_file():
        raise DataSpecError(
            f"{path} not found (images:PATH needs a labels.csv: a 'series' column naming each series folder "
            "and the task's label columns)"
        )
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise DataSpecError(f"{path}: larger than {MAX_LABELS_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataSpecError(f"{path}: not UTF-8 text ({e})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    reader.fieldnames = fields
    key = next((c for c in SERIES_COLUMNS if c in fields), None)
    if key is None:
        raise DataSpecError(f"{path}: needs a 'series' column (the series folder of each row); header {fields}")
    from models.labels import labels_for

    mapping = labels_for(task)
    columns = {h.name for h in task.heads} | set(mapping.mrnet_columns)
    if not columns & set(fields):
        heads = ", ".join(h.name for h in task.heads)
        raise DataSpecError(f"{path}: no label column for {task.name} (expected one of {heads}); header {fields}")
    rows: list[tuple[str, int, dict[str, str]]] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue  # a blank line
        if None in row:
            raise DataSpecError(f"{path} line {line}: more fields than the header ({len(fields)})")
        if any(v is None for v in row.values()):
            raise DataSpecError(f"{path} line {line}: fewer fields than the header ({len(fields)})")
        name = row[key].strip()
        if not name:
            raise DataSpecError(f"{path} line {line}: the {key} column is empty")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise DataSpecError(f"{path} line {line}: series {name!r} must be a folder below {root}")
        if name in seen:
            raise DataSpecError(f"{path} line {line}: series {name!r} again (first on line {seen[name]})")
        seen[name] = line
        if not (root / rel).is_dir():
            raise DataSpecError(f"{path} line {line}: series folder {root / rel} not found")
        rows.append((name, line, {k: (v or "").strip() for k, v in row.items()}))
        if len(rows) > MAX_SERIES:
            raise DataSpecError(f"{path}: more than {MAX_SERIES} rows")
    if not rows:
        raise DataSpecError(f"{path}: no rows")
    return rows


# --- volumes -----------------------------------------------------------------------------------------


def _orient(data: np.ndarray, side: dict[str, Any], where: Path) -> np.ndarray:
    for k in ("transpose", "flip_rows", "flip_cols"):
        if k in side and not isinstance(side[k], bool):
            raise DataSpecError(f"{where}: {k} must be true or false")
    if side.get("transpose"):
        data = np.swapaxes(data, 1, 2)
    if side.get("flip_rows"):
        data = data[:, ::-1, :]
    if side.get("flip_cols"):
        data = data[:, :, ::-1]
    return np.ascontiguousarray(data)


def _check_voxels(shape: tuple[int, ...], path: Path) -> None:
    n = int(np.prod([int(s) for s in shape], dtype=np.int64)) if shape else 0
    if n > MAX_VOXELS:
        raise DataSpecError(f"{path}: {n} voxels (shape {tuple(shape)}) exceeds the limit of {MAX_VOXELS}")
    if n == 0:
        raise DataSpecError(f"{path}: empty array (shape {tuple(shape)})")


def _as_stack(arr: np.ndarray, path: Path) -> np.ndarray:
    """A 2-D (one slice) or 3-D array, or a 4-D one with a last axis of 1, as float32 of 3 axes."""
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise DataSpecError(f"{path}: expected a 2-D or 3-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataSpecError(f"{path}: expected real numbers, got {arr.dtype}")
    out = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataSpecError(f"{path}: holds NaN or infinite values")
    return out


def nifti_volume(path: Path, side: dict[str, Any] | None, key: str) -> Volume:
    """A NIfTI file as a Volume: geometry from its affine (RAS+ -> LPS), or from the sidecar when it names a plane."""
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - nibabel is a dependency
        raise DataSpecError(f"{path}: reading NIfTI needs nibabel (pip install nibabel)") from None
    if path.stat().st_size > MAX_VOLUME_BYTES:
        raise DataSpecError(f"{path}: larger than {MAX_VOLUME_BYTES} bytes")
    try:
        img: Any = nib.load(str(path))
    except Exception as e:
        raise DataSpecError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    shape = tuple(int(s) for s in img.shape)
    _check_voxels(shape, path)
    try:
        data = _as_stack(np.asanyarray(img.dataobj), path)  # (i, j, k)
    except DataSpecError:
        raise
    except Exception as e:
        raise DataSpecError(f"{path}: cannot read the voxels ({type(e).__name__}: {e})") from None
    zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - len(img.header.get_zooms()[:3]))
    stack = np.transpose(data, (2, 1, 0))  # (k, j, i) = (slices, rows, cols)
    side = dict(side or {})
    where = path.parent / SIDECAR
    if side.get("plane") is not None:
        side.setdefault("pixel_spacing_mm", [zooms[1], zooms[0]])
        side.setdefault("slice_spacing_mm", zooms[2])
        vol = _stack_series(path.parent, key, side, _orient(stack, side, where)).volume
        return replace(vol, attributes={**vol.attributes, "source": "images", "format": "nifti", "affine": "sidecar"})
    for k in ("transpose", "flip_rows", "flip_cols", "order"):
        if k in side:
            raise DataSpecError(f"{where}: {k} applies to a NIfTI volume only together with plane (else its affine)")
    affine = np.asarray(img.affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    norms = np.linalg.norm(lps, axis=0)
    if not np.all(np.isfinite(lps)) or np.any(norms <= 1e-6):
        raise DataSpecError(f"{path}: the affine is degenerate ({affine[:3, :3].tolist()})")
    units = lps / norms
    gram = units.T @ units
    if np.max(np.abs(gram - np.eye(3))) > 1e-3:
        raise DataSpecError(f"{path}: a sheared (non-orthogonal) affine is not supported")
    row_cos, col_cos, step = units[:, 0], units[:, 1], lps[:, 2]
    spacing = [float(norms[2]), float(norms[1]), float(norms[0])]
    if "pixel_spacing_mm" in side:
        ps = side["pixel_spacing_mm"]
        ps = ps if isinstance(ps, list) else [ps, ps]
        if len(ps) != 2:
            raise DataSpecError(f"{where}: pixel_spacing_mm must be a number or [row, col]")
        spacing[1], spacing[2] = (_positive(v, "pixel_spacing_mm", where) for v in ps)
    if "slice_spacing_mm" in side:
        spacing[0] = _positive(side["slice_spacing_mm"], "slice_spacing_mm", where)
    step = units[:, 2] * spacing[0]
    normal = np.cross(row_cos, col_cos)
    n = stack.shape[0]
    if float(np.dot(step, normal)) < 0:  # slices ascending along the normal (models.types)
        stack = np.ascontiguousarray(stack[::-1])
        origin = origin + (n - 1) * step
        step = -step
    positions = np.array([origin + s * step for s in range(n)], dtype=float)
    uid = "images-" + re.sub(r"[^A-Za-z0-9.-]", "-", key)[:48]
    return Volume(
        array=stack,
        spacing=(spacing[0], spacing[1], spacing[2]),
        positions=positions,
        row_cosine=(float(row_cos[0]), float(row_cos[1]), float(row_cos[2])),
        col_cosine=(float(col_cos[0]), float(col_cos[1]), float(col_cos[2])),
        series_uid=uid,
        sop_instance_uids=tuple(f"{uid}-{k}" for k in range(n)),
        frame_numbers=(None,) * n,
        modality="MR",
        attributes={"source": "images", "format": "nifti", "affine": "header"},
    )


def mat_array(path: Path, side: dict[str, Any]) -> np.ndarray:
    """The sidecar's ``variable`` (or the only 2-D/3-D numeric array) of a .mat file as (slices, rows, cols)."""
    import scipy.io

    if path.stat().st_size > MAX_VOLUME_BYTES:
        raise DataSpecError(f"{path}: larger than {MAX_VOLUME_BYTES} bytes")
    with open(path, "rb") as fh:
        head = fh.read(128)
    if b"MATLAB 7.3" in head:
        raise DataSpecError(
            f"{path}: a MATLAB v7.3 (HDF5) file, which is not read; save it with save(..., '-v7') or as NIfTI"
        )
    try:
        info = scipy.io.whosmat(str(path))
    except NotImplementedError:
        raise DataSpecError(f"{path}: a MATLAB v7.3 (HDF5) file, which is not read; save it with '-v7'") from None
    except Exception as e:
        raise DataSpecError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    where = path.parent / SIDECAR
    arrays = {
        name: shape for name, shape, cls in info if len(shape) in (2, 3) and cls not in ("cell", "struct", "char")
    }
    name = side.get("variable")
    if name is None:
        if len(arrays) != 1:
            found = ", ".join(f"{n} {tuple(s)}" for n, s in arrays.items()) or "none"
            raise DataSpecError(
                f'{path}: name the array to read with "variable" in {SIDECAR} (2-D/3-D arrays found: {found})'
            )
        name = next(iter(arrays))
    if not isinstance(name, str) or name not in {n for n, _, _ in info}:
        raise DataSpecError(f"{where}: variable {name!r} is not in {path.name} ({', '.join(n for n, _, _ in info)})")
    shape = next(tuple(s) for n, s, _ in info if n == name)
    _check_voxels(shape, path)
    try:
        arr = scipy.io.loadmat(str(path), variable_names=[name])[name]
    except Exception as e:
        raise DataSpecError(f"{path}: cannot read {name} ({type(e).__name__}: {e})") from None
    data = _as_stack(np.asarray(arr), path)
    axis = side.get("slice_axis", 2)
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise DataSpecError(f"{where}: slice_axis must be 0, 1 or 2")
    return np.moveaxis(data, int(axis), 0)


def read_images_series(folder: Path, key: str, task: TaskSpec | None = None) -> Volume:
    """The volume of one series folder (slices, NIfTI, .mat, or as `models.realdir` reads it)."""
    side = _read_sidecar(folder)
    files = [f for f in folder.iterdir() if f.is_file() and f.name != SIDECAR and not f.name.startswith(".")]
    if len(files) > MAX_FILES_PER_SERIES:
        raise DataSpecError(f"{folder}: more than {MAX_FILES_PER_SERIES} files")
    if not files:
        raise DataSpecError(f"{folder}: no files (slices, a NIfTI or a .mat volume)")
    if task is not None and side is not None and side.get("anatomy") not in (None, task.anatomy):
        raise DataSpecError(f"{folder / SIDECAR}: anatomy {side['anatomy']!r}, but {task.name} takes {task.anatomy}")
    niftis = sorted(f for f in files if _is_nifti(f))
    mats = sorted(f for f in files if f.suffix.lower() == MAT_SUFFIX)
    if len(niftis) + len(mats) > 1:
        raise DataSpecError(f"{folder}: one volume file per series folder, found {len(niftis) + len(mats)}")
    if niftis:
        return nifti_volume(niftis[0], side, key)
    if mats:
        if side is None:
            raise DataSpecError(f"{folder}: a .mat volume needs a {SIDECAR} (plane, spacing)")
        data = _orient(mat_array(mats[0], side), side, folder / SIDECAR)
        vol = _stack_series(folder, key, side, data).volume
        return replace(vol, attributes={**vol.attributes, "source": "images", "format": "mat"})
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if images and side is None:
        raise DataSpecError(f"{folder}: image slices need a {SIDECAR} (plane, pixel spacing or field of view)")
    if images and side is not None and any(k in side for k in ("transpose", "flip_rows", "flip_cols")):
        from models.realdir import _load_images, _slice_order_key

        data = _orient(_load_images(sorted(images, key=_slice_order_key), folder), side, folder / SIDECAR)
        vol = _stack_series(folder, key, side, data).volume
    else:
        vol = read_series(folder, key).volume
    return replace(vol, attributes={**vol.attributes, "source": "images"})


def images_cases(task: TaskSpec, root: Path) -> Iterator[Any]:
    """`models.data.Case` per row of ``root/labels.csv``, in file order."""
    from models.data import Case
    from models.labels import labels_for

    root = Path(root)
    if not root.is_dir():
        raise DataSpecError(f"images folder {root} does not exist or is not a folder")
    rows = read_labels(root, task)
    mapping = labels_for(task)
    path = root / LABELS_CSV
    targets = []
    for name, line, row in rows:  # every label checked before any volume is read
        try:
            targets.append(mapping.target_from_row(row))
        except ValueError as e:
            raise DataSpecError(f"{path} line {line}, series {name!r}: {e}") from None
    for (name, _, _), target in zip(rows, targets):
        folder = root / name
        try:
            volume = read_images_series(folder, name, task)
        except DataSpecError:
            raise
        except Exception as e:  # an unreadable image or DICOM file: name the folder
            raise DataSpecError(f"{folder}: cannot read the series ({type(e).__name__}: {e})") from None
        yield Case(key=name, volume=volume, target=target)
