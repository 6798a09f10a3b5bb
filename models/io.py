"""DICOM series -> `Volume`.

``load_series(paths)`` decodes one series (single-frame files or multi-frame Enhanced
objects, any transfer syntax pydicom can decode with the installed plugins: JPEG,
JPEG-LS, JPEG 2000, RLE, deflate, big endian), applies the modality rescale, and
stacks the slices sorted by their position along the slice normal (never by
InstanceNumber). The slice spacing comes from the positions. A series that cannot be a
single regular volume — mixed orientations, image sizes or pixel spacings, several
series UIDs, two slices at one position (several echoes or time points), colour images
— is refused with a `VolumeError` that says why.

``load_folder(directory)`` groups the DICOM files below a folder by SeriesInstanceUID
and loads each image series. ``group_folder`` only groups (headers only).

An object without any plane geometry (e.g. an Enhanced MR whose functional groups were
stripped) still loads, with an identity orientation and positions from
SpacingBetweenSlices/SliceThickness; ``attributes["geometry_assumed"]`` is True and the
QC gate refuses it for inference ("missing_geometry").
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import VolumeError
from models.types import Volume

# SOP classes / modalities that are never image series to load
_NON_IMAGE_MODALITIES = {"SR", "SEG", "PR", "KO", "REG", "RTSTRUCT", "RTPLAN", "DOC", "AU", "ECG"}
ORIENTATION_TOLERANCE = 1e-3  # max abs difference of direction cosines within one series
SPACING_TOLERANCE = 1e-3  # relative difference of pixel spacings within one series


@dataclass
class _Slice:
    pixels: np.ndarray  # (rows, cols) float32, rescaled
    position: np.ndarray | None  # ImagePositionPatient
    orientation: np.ndarray | None  # 6 direction cosines
    pixel_spacing: tuple[float, float] | None  # (row spacing, col spacing)
    sop_instance_uid: str
    frame_number: int | None
    instance_number: int | None
    source: str  # file name, for messages
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _f(value, default=None):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.isfinite(arr).all() else None


def _seq_item(group, keyword: str):
    """First item of ``group.<keyword>`` or None."""
    if group is None or keyword not in group:
        return None
    seq = group.get(keyword)
    return seq[0] if seq else None


def _rescale(arr: np.ndarray, slope, intercept) -> np.ndarray:
    out = arr.astype(np.float32, copy=False)
    s, i = _f(slope, 1.0), _f(intercept, 0.0)
    if s != 1.0 or i != 0.0:
        out = out * np.float32(s) + np.float32(i)
    return out


def _read(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path))
    except InvalidDicomError:
        raise VolumeError(f"{path.name}: not a DICOM file") from None
    except (OSError, EOFError, ValueError) as e:
        raise VolumeError(f"{path.name}: cannot read the file ({e})") from None


def _decode(ds, name: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise VolumeError(f"{name}: no pixel data (SOP class {ds.get('SOPClassUID', '?')}); not an image")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise VolumeError(f"{name}: colour images ({spp} samples per pixel) are not MR volumes")
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        raise VolumeError(f"{name}: cannot decode the pixel data ({ts_name}): {e}") from None
    arr = np.asarray(arr)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return arr


def _image_type(ds) -> tuple[str, ...]:
    it = ds.get("ImageType") or ds.get("FrameType") or ()
    if isinstance(it, str):
        it = it.split("\\")
    return tuple(str(v).upper() for v in it)


def _single_frame_slices(ds, name: str) -> list[_Slice]:
    arr = _decode(ds, name)
    if arr.ndim == 3:  # a multi-frame object of a legacy class: frames share the header geometry
        frames = arr
    elif arr.ndim == 2:
        frames = arr[None]
    else:
        raise VolumeError(f"{name}: unexpected pixel array shape {arr.shape}")
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ps = _floats(ds.get("PixelSpacing"), 2)
    out = []
    n = frames.shape[0]
    for f in range(n):
        pos = ipp
        if pos is not None and n > 1 and iop is not None:
            # legacy multi-frame: frames advance along the normal by SpacingBetweenSlices
            step = _f(ds.get("SpacingBetweenSlices"), None) or _f(ds.get("SliceThickness"), 1.0) or 1.0
            pos = pos + f * step * np.cross(iop[:3], iop[3:])
        out.append(
            _Slice(
                pixels=_rescale(frames[f], ds.get("RescaleSlope"), ds.get("RescaleIntercept")),
                position=pos,
                orientation=iop,
                pixel_spacing=None if ps is None else (float(ps[0]), float(ps[1])),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                frame_number=(f + 1) if n > 1 else None,
                instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
                source=name,
                image_type=_image_type(ds),
                slice_thickness=_f(ds.get("SliceThickness")),
            )
        )
    return out


def _enhanced_slices(ds, name: str) -> list[_Slice]:
    """Frames of an Enhanced (functional-group) multi-frame object."""
    arr = _decode(ds, name)
    if arr.ndim == 2:
        arr = arr[None]
    n = arr.shape[0]
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n:
        raise VolumeError(f"{name}: {len(per_frame)} per-frame functional groups for {n} frames")

    def lookup(frame_group, seq_kw: str, attr: str):
        for group in (frame_group, shared):
            item = _seq_item(group, seq_kw)
            if item is not None and attr in item:
                return item.get(attr)
        return ds.get(attr)  # some writers keep the classic attribute at the top level too

    out = []
    for f in range(n):
        fg = per_frame[f] if per_frame else None
        pos = _floats(lookup(fg, "PlanePositionSequence", "ImagePositionPatient"), 3)
        iop = _floats(lookup(fg, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = _floats(lookup(fg, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thick = _f(lookup(fg, "PixelMeasuresSequence", "SliceThickness"))
        slope = lookup(fg, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = lookup(fg, "PixelValueTransformationSequence", "RescaleIntercept")
        ftype = _seq_item(fg, "MRImageFrameTypeSequence") or _seq_item(shared, "MRImageFrameTypeSequence")
        itype = _image_type(ftype) if ftype is not None else _image_type(ds)
        content = _seq_item(fg, "FrameContentSequence")
        extra: dict[str, Any] = {}
        if content is not None:
            if "StackID" in content:
                extra["stack_id"] = str(content.StackID)
            if "TemporalPositionIndex" in content:
                extra["temporal_position"] = int(content.TemporalPositionIndex)
        out.append(
            _Slice(
                pixels=_rescale(arr[f], slope, intercept),
                position=pos,
                orientation=iop,
                pixel_spacing=None if ps is None else (float(ps[0]), float(ps[1])),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                frame_number=f + 1,
                instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
                source=name,
                image_type=itype,
                slice_thickness=thick,
                extra=extra,
            )
        )
    return out


def _slices_of(ds, name: str) -> list[_Slice]:
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _enhanced_slices(ds, name)
    return _single_frame_slices(ds, name)


def _header_facts(ds) -> dict[str, Any]:
    """Acquisition facts useful to QC and reports (never patient identifiers)."""
    facts: dict[str, Any] = {}
    for kw, key in (
        ("Manufacturer", "manufacturer"),
        ("ManufacturerModelName", "manufacturer_model"),
        ("ProtocolName", "protocol_name"),
        ("ScanningSequence", "scanning_sequence"),
        ("SequenceVariant", "sequence_variant"),
        ("ScanOptions", "scan_options"),
        ("MRAcquisitionType", "mr_acquisition_type"),
        ("PulseSequenceName", "pulse_sequence_name"),
        ("SequenceName", "sequence_name"),
        ("AcquisitionContrast", "acquisition_contrast"),
    ):
        v = ds.get(kw)
        if v not in (None, ""):
            facts[key] = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else str(v)
    for kw, key in (
        ("RepetitionTime", "repetition_time"),
        ("EchoTime", "echo_time"),
        ("InversionTime", "inversion_time"),
        ("FlipAngle", "flip_angle"),
        ("MagneticFieldStrength", "field_strength"),
        ("SpacingBetweenSlices", "spacing_between_slices"),
        ("SliceThickness", "slice_thickness"),
    ):
        v = _f(ds.get(kw))
        if v is not None:
            facts[key] = v
    return facts


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        raise VolumeError(f"degenerate direction cosines {v.tolist()}")
    return v / n


def load_series(paths: Sequence[Path | str]) -> Volume:
    """Decode one DICOM series into a `Volume` (slices sorted along the normal)."""
    files = [Path(p) for p in paths]
    if not files:
        raise VolumeError("no files given for the series")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise VolumeError(f"{len(missing)} file(s) of the series are missing, e.g. {missing[0]}")
    slices: list[_Slice] = []
    series_uids: set[str] = set()
    first = None
    transfer_syntaxes: set[str] = set()
    sop_classes: set[str] = set()
    for p in sorted(files):
        ds = _read(p)
        if first is None:
            first = ds
        modality = str(ds.get("Modality", "") or "").upper()
        if modality in _NON_IMAGE_MODALITIES:
            raise VolumeError(f"{p.name}: a {modality} object is not an image series")
        series_uids.add(str(ds.get("SeriesInstanceUID", "")))
        sop_classes.add(str(ds.get("SOPClassUID", "")))
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None:
            transfer_syntaxes.add(str(ts))
        slices.extend(_slices_of(ds, p.name))
    if len(series_uids) > 1:
        raise VolumeError(f"files belong to {len(series_uids)} different series; load one series at a time")
    assert first is not None
    return _assemble(slices, first, n_files=len(files), transfer_syntaxes=transfer_syntaxes, sop_classes=sop_classes)


def _assemble(
    slices: list[_Slice], first, *, n_files: int, transfer_syntaxes: set[str], sop_classes: set[str]
) -> Volume:
    shapes = {s.pixels.shape for s in slices}
    if len(shapes) > 1:
        desc = ", ".join(f"{r}x{c}" for r, c in sorted(shapes))
        raise VolumeError(f"mixed image sizes in one series ({desc}); cannot stack into a volume")
    have_geo = [s.position is not None and s.orientation is not None for s in slices]
    attributes: dict[str, Any] = _header_facts(first)
    if all(have_geo):
        iops = np.stack([s.orientation for s in slices if s.orientation is not None])
        spread = float(np.abs(iops - iops[0]).max())
        if spread > ORIENTATION_TOLERANCE:
            n_distinct = len({tuple(np.round(o, 3)) for o in iops})
            raise VolumeError(
                f"mixed orientations in one series ({n_distinct} distinct ImageOrientationPatient values, "
                f"max difference {spread:.3f}); a localizer or multi-plane series is not a volume"
            )
        row = _unit(iops.mean(axis=0)[:3])
        col = _unit(iops.mean(axis=0)[3:])
        normal = np.cross(row, col)
        d = np.array([float(np.dot(s.position, normal)) for s in slices if s.position is not None])
        order = np.argsort(d, kind="stable")
        slices = [slices[i] for i in order]
        d = d[order]
        positions = np.stack([s.position for s in slices if s.position is not None]).astype(float)
        if len(slices) > 1:
            diffs = np.diff(d)
            if (diffs < 1e-3).any():
                k = int(np.argmax(diffs < 1e-3))
                n_dup = int((diffs < 1e-3).sum())
                stacks = {s.extra.get("stack_id") for s in slices} | {s.extra.get("temporal_position") for s in slices}
                hint = " (several stacks, echoes or time points in one series)" if len(stacks) > 1 or n_dup else ""
                raise VolumeError(
                    f"{n_dup} slice(s) share a position along the normal (e.g. {slices[k].source} and "
                    f"{slices[k + 1].source} at {d[k]:.2f} mm){hint}; cannot stack into one volume"
                )
            slice_spacing = float(np.median(diffs))
            if diffs.max() > 1.1 * diffs.min():
                attributes["irregular_spacing"] = True
                attributes["slice_spacing_range"] = (float(diffs.min()), float(diffs.max()))
            # positions should advance along the normal; a lateral drift means gantry tilt or mixed stacks
            lateral = positions - positions[0] - np.outer(d - d[0], normal)
            attributes["max_lateral_offset_mm"] = float(np.linalg.norm(lateral, axis=1).max())
        else:
            slice_spacing = _f(first.get("SpacingBetweenSlices")) or slices[0].slice_thickness or 1.0
        row_cos: tuple[float, float, float] = (float(row[0]), float(row[1]), float(row[2]))
        col_cos: tuple[float, float, float] = (float(col[0]), float(col[1]), float(col[2]))
    elif any(have_geo):
        n_bad = len(have_geo) - sum(have_geo)
        raise VolumeError(
            f"{n_bad} of {len(slices)} slices have no position/orientation; the series geometry is incomplete"
        )
    else:
        # no plane geometry at all: keep the stored order, assume an identity orientation
        slices.sort(key=lambda s: (s.instance_number or 0, s.source, s.frame_number or 0))
        slice_spacing = _f(first.get("SpacingBetweenSlices")) or slices[0].slice_thickness or 1.0
        row_cos, col_cos = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
        positions = np.array([[0.0, 0.0, k * slice_spacing] for k in range(len(slices))], dtype=float)
        attributes["geometry_assumed"] = True
    spacings = {s.pixel_spacing for s in slices if s.pixel_spacing is not None}
    if spacings:
        ref = next(iter(spacings))
        for sp in spacings:
            if abs(sp[0] - ref[0]) > SPACING_TOLERANCE * ref[0] or abs(sp[1] - ref[1]) > SPACING_TOLERANCE * ref[1]:
                raise VolumeError(f"mixed pixel spacings in one series ({sorted(spacings)})")
        row_sp, col_sp = ref
    else:
        imager = _floats(first.get("ImagerPixelSpacing"), 2)
        row_sp, col_sp = (float(imager[0]), float(imager[1])) if imager is not None else (1.0, 1.0)
        attributes["pixel_spacing_assumed"] = True
    if len(slices) != len({(s.sop_instance_uid, s.frame_number) for s in slices}):
        raise VolumeError("the same SOP Instance UID (and frame) occurs twice in the series")
    array = np.stack([s.pixels for s in slices]).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise VolumeError("pixel data contains NaN or infinite values")
    thick = [s.slice_thickness for s in slices if s.slice_thickness]
    if thick:
        attributes["slice_thickness"] = float(np.median(thick))
    attributes["image_type"] = list(slices[0].image_type)
    attributes["localizer"] = any("LOCALIZER" in s.image_type or "SCOUT" in s.image_type for s in slices)
    attributes["n_files"] = n_files
    attributes["transfer_syntaxes"] = sorted(transfer_syntaxes)
    attributes["multiframe"] = any(s.frame_number is not None for s in slices)
    laterality = first.get("ImageLaterality") or first.get("Laterality") or first.get("FrameLaterality")
    return Volume(
        array=array,
        spacing=(float(slice_spacing), float(row_sp), float(col_sp)),
        positions=positions,
        row_cosine=row_cos,
        col_cosine=col_cos,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID")) if first.get("FrameOfReferenceUID") else None,
        sop_class_uid=sorted(sop_classes)[0] if sop_classes else None,
        sop_instance_uids=tuple(s.sop_instance_uid for s in slices),
        frame_numbers=tuple(s.frame_number for s in slices),
        modality=str(first.get("Modality")) if first.get("Modality") else None,
        body_part=str(first.get("BodyPartExamined")) if first.get("BodyPartExamined") else None,
        series_description=str(first.get("SeriesDescription")) if first.get("SeriesDescription") else None,
        laterality=str(laterality) if laterality and str(laterality) not in ("U", "") else None,
        attributes=attributes,
    )


def _iter_files(directory: Path) -> Iterable[Path]:
    for root, _dirs, files in os.walk(directory):
        for name in sorted(files):
            yield Path(root) / name


def group_folder(directory: Path | str) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> files of that image series below ``directory`` (headers only; other files skipped)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    directory = Path(directory)
    if not directory.is_dir():
        raise VolumeError(f"{directory} is not a folder")
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in _iter_files(directory):
        if path.name == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(
                str(path),
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "Modality", "SOPClassUID", "Rows"],
            )
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
            continue
        uid = ds.get("SeriesInstanceUID")
        modality = str(ds.get("Modality", "") or "").upper()
        if not uid or modality in _NON_IMAGE_MODALITIES or ds.get("Rows") is None:
            continue
        groups[str(uid)].append(path)
    return dict(groups)


def load_folder(directory: Path | str) -> dict[str, Volume]:
    """SeriesInstanceUID -> Volume for every image series below ``directory``."""
    groups = group_folder(directory)
    if not groups:
        raise VolumeError(f"no DICOM image series found under {directory}")
    out = {}
    for uid, files in groups.items():
        try:
            out[uid] = load_series(files)
        except VolumeError as e:
            raise VolumeError(f"series {uid}: {e}") from None
    return out
