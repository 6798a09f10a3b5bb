"""Source series as the result writers see them: sanitised headers, slices in volume order.

`models.types.Volume` orders slices by position along the slice normal
(``cross(row_cosine, col_cosine)``), ascending; heatmaps come in that order. This
module sorts the stored source files the same way, so heatmap slice ``k`` is source
slice ``k`` (a frame of a multi-frame object counts as a slice).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from node.errors import ResultsError
from node.results.sanitize import sanitize_dataset

log = logging.getLogger(__name__)


PAIRED_BODY_PARTS = (
    "KNEE",
    "SHOULDER",
    "HIP",
    "ANKLE",
    "ELBOW",
    "WRIST",
    "HAND",
    "FOOT",
    "ARM",
    "LEG",
    "BREAST",
    "EYE",
    "EAR",
    "KIDNEY",
    "LUNG",
    "FEMUR",
    "TIBIA",
    "FIBULA",
    "HUMERUS",
    "CLAVICLE",
    "SCAPULA",
    "EXTREMITY",
    "FINGER",
    "TOE",
    "HEEL",
    "THIGH",
    "CALF",
    "FOREARM",
    "PATELLA",
    "ORBIT",
    "TMJ",
)


#: what is read of every source file at first: identity and geometry (the whole header of a file is read when a
#: writer asks for it, `SourceSlice.dataset`); the SR's evidence and the derived series' references need no more
IDENT_TAGS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


def read_header(path: Path, series_uid: str, *, tags: Sequence[str] | None = None) -> Dataset:
    """The sanitised header of a source file (no pixel data; only ``tags`` when given); `ResultsError` when it
    cannot be read, misses a UID or belongs to another series."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags) if tags else None)
    except Exception as e:
        raise ResultsError(f"series {series_uid}: cannot read source file {path}: {e}") from None
    for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(kw, "") or "").strip():
            raise ResultsError(f"series {series_uid}: source file {path} has no {kw}")
    sanitize_dataset(ds)
    if str(ds.SeriesInstanceUID) != series_uid:
        raise ResultsError(f"source file {path} belongs to series {ds.SeriesInstanceUID}, not {series_uid}")
    return ds


@dataclass
class SourceSlice:
    ident: Dataset  # sanitised identity and geometry (`IDENT_TAGS`; the whole header for a multi-frame file)
    path: Path
    frame_number: int | None  # 1-based frame for multi-frame sources
    position: tuple[float, float, float] | None
    series_uid: str = ""
    full: Dataset | None = field(default=None, repr=False)  # the whole sanitised header, once read

    @property
    def dataset(self) -> Dataset:
        """The whole sanitised header (no pixel data), read the first time a writer asks for it."""
        if self.full is None:
            self.full = read_header(self.path, self.series_uid)
        return self.full

    @property
    def sop_instance_uid(self) -> str:
        return str(self.ident.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.ident.SOPClassUID)


@dataclass
class SourceSeries:
    series_uid: str
    slices: list[SourceSlice]
    paths: list[Path] = field(default_factory=list)

    def _instances(self) -> list[SourceSlice]:
        """One slice per instance, in slice order (first appearance)."""
        seen: dict[str, SourceSlice] = {}
        for s in self.slices:
            seen.setdefault(s.sop_instance_uid, s)
        return list(seen.values())

    @property
    def datasets(self) -> list[Dataset]:
        """The whole header of every instance, in slice order (read now if not yet)."""
        return [s.dataset for s in self._instances()]

    @property
    def evidence(self) -> list[Dataset]:
        """One dataset per instance in slice order, enough to name each (the SR's evidence): the first one's whole
        header (an SR takes the patient and study from its first evidence), identity datasets for the others."""
        instances = self._instances()
        return [instances[0].dataset] + [s.ident for s in instances[1:]]

    @property
    def first(self) -> Dataset:
        return self.slices[0].dataset

    @property
    def laterality(self) -> str | None:
        """R, L, B or None, from Laterality, ImageLaterality or the frame's FrameLaterality."""
        ds = self.first
        for kw in ("Laterality", "ImageLaterality"):
            v = str(ds.get(kw, "") or "").strip().upper()
            if v in ("R", "L", "B"):
                return v
        try:
            v = ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].FrameLaterality
            if str(v).upper() in ("R", "L", "B"):
                return str(v).upper()
        except (AttributeError, IndexError, KeyError):
            pass
        return None

    def series_laterality(self, body_part: str | None) -> str | None:
        """General Series Laterality (Type 2C) for an object about ``body_part``: R or L when
        known; empty when unknown for a paired (or unnamed) body part; None (absent) otherwise."""
        if self.laterality in ("R", "L"):
            return self.laterality
        part = (body_part or "").strip().upper()
        if not part or any(p in part for p in PAIRED_BODY_PARTS):
            return ""
        return None

    @property
    def is_multiframe(self) -> bool:
        return any(s.frame_number is not None for s in self.slices)

    def read_pixels(self, index: int) -> np.ndarray:
        """Stored pixel values of slice ``index`` as float32 (rescaled when the source says so)."""
        sl = self.slices[index]
        full = pydicom.dcmread(sl.path)
        arr = full.pixel_array
        if sl.frame_number is not None and arr.ndim == 3 and int(full.get("NumberOfFrames", 1) or 1) > 1:
            arr = arr[sl.frame_number - 1]
        arr = arr.astype(np.float32)
        if arr.ndim == 3:  # colour: use luminance
            arr = arr[..., :3].mean(axis=-1)
        slope = float(full.get("RescaleSlope", 1) or 1)
        intercept = float(full.get("RescaleIntercept", 0) or 0)
        return arr * slope + intercept


def _normal(ds: Dataset, frame_item: Dataset | None = None) -> np.ndarray | None:
    iop = None
    if frame_item is not None:
        try:
            iop = frame_item.PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError):
            iop = None
    if iop is None:
        try:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError):
            iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row = np.asarray([float(v) for v in iop[:3]])
    col = np.asarray([float(v) for v in iop[3:]])
    return np.cross(row, col)


def _frame_position(ds: Dataset, item: Dataset) -> tuple[float, float, float] | None:
    try:
        ipp = item.PlanePositionSequence[0].ImagePositionPatient
        return tuple(float(v) for v in ipp)  # type: ignore[return-value]
    except (AttributeError, IndexError):
        return None


def load_series(series_uid: str, paths: Sequence[Path]) -> SourceSeries:
    """Reads (identity and geometry; the whole header of the first slice and of multi-frame files), sanitises
    and orders the stored files of one source series."""
    if not paths:
        raise ResultsError(f"series {series_uid}: no source files given")
    entries: list[tuple[float, int, SourceSlice]] = []
    studies: set[str] = set()
    order = 0
    for path in paths:
        ds = read_header(Path(path), series_uid, tags=IDENT_TAGS)
        studies.add(str(ds.StudyInstanceUID))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            ds = read_header(Path(path), series_uid)
            per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
            for f in range(frames):
                item = per_frame[f] if f < len(per_frame) else None
                pos = _frame_position(ds, item) if item is not None else None
                n = _normal(ds, item)
                key = float(np.dot(n, pos)) if (pos is not None and n is not None) else float(order)
                entries.append((key, order, SourceSlice(ds, Path(path), f + 1, pos, series_uid, full=ds)))
                order += 1
        else:
            ipp = ds.get("ImagePositionPatient")
            pos = (float(ipp[0]), float(ipp[1]), float(ipp[2])) if ipp is not None and len(ipp) == 3 else None
            n = _normal(ds)
            if pos is not None and n is not None:
                key = float(np.dot(n, pos))
            else:
                key = float(ds.get("InstanceNumber", order) or order)
            entries.append((key, order, SourceSlice(ds, Path(path), None, pos, series_uid)))
            order += 1
    if len(studies) != 1:
        raise ResultsError(f"series {series_uid}: source files belong to {len(studies)} studies")
    entries.sort(key=lambda e: (e[0], e[1]))
    slices = [e[2] for e in entries]
    _ = slices[0].dataset  # the first slice's whole header: what every object copies (read errors show here)
    return SourceSeries(series_uid=series_uid, slices=slices, paths=[Path(p) for p in paths])


def load_sources(source_files: dict[str, list[Path]]) -> dict[str, SourceSeries]:
    return {uid: load_series(uid, paths) for uid, paths in source_files.items()}
