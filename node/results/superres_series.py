"""The super-resolved volume as a new MR series (DERIVED\\SECONDARY), never replacing the original.

Classic MR Image Storage, one instance per slice, built on `highdicom.SOPClass`
(patient/study copied from the sanitised source). Each slice carries its own
geometry for the new spacing (Image Position/Orientation, Pixel Spacing, Slice
Thickness, Spacing Between Slices) in the source's Frame of Reference, a Derivation
Description with the data-consistency check and a Source Image Sequence naming the
nearest source slices.
"""

from __future__ import annotations

import datetime as dt

import highdicom as hd
import numpy as np
from pydicom import DataElement, Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from models.types import SuperResOutput, Volume
from node.errors import ResultsError
from node.results import codes
from node.results.equipment import MANUFACTURER, MANUFACTURER_MODEL, contributing_equipment, node_software_versions
from node.results.sanitize import clean_text, copy_character_set
from node.results.sources import SourceSeries
from node.results.uids import UidFactory

SUPERRES_SERIES_NUMBER = 9701
_MR_COPY = (
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
    "InversionTime",
    "MagneticFieldStrength",
    "ImagedNucleus",
    "SequenceName",
    "FlipAngle",
    "BodyPartExamined",
    "ProtocolName",
    "PatientPosition",
)
_MR_DEFAULTS = {"ScanningSequence": "RM", "SequenceVariant": "NONE"}
_MR_TYPE2 = ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime", "PatientPosition")


def to_stored(volume: np.ndarray) -> tuple[np.ndarray, str]:
    """uint16 stored values and a note on the mapping (original units kept when they fit). A float32 volume
    (what the models give) is mapped in float32, in place on one working copy; values up to 65535 are exact there."""
    v = np.asarray(volume)
    if v.dtype != np.float32:
        v = v.astype(np.float64)
    if not np.isfinite(v).all():
        raise ResultsError("super-resolved volume contains NaN or infinite values")
    lo, hi = float(v.min()), float(v.max())
    if lo >= -0.5 and hi <= 65535 and hi > 255:
        work = np.rint(v)
        np.clip(work, 0, 65535, out=work)
        return work.astype(np.uint16), "signal values kept"
    scale = 4095.0 / (hi - lo) if hi > lo else 1.0
    work = v - v.dtype.type(lo)
    work *= v.dtype.type(scale)
    np.rint(work, out=work)
    np.clip(work, 0, 4095, out=work)
    return work.astype(np.uint16), f"linearly rescaled to 0-4095 from [{lo:.4g}, {hi:.4g}]"


def percentiles_u16(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (linear interpolation) of unsigned 16-bit values, from their histogram:
    one counting pass instead of a partial sort of the whole volume."""
    counts = np.cumsum(np.bincount(values.ravel(), minlength=1))
    n = int(counts[-1])
    out = []
    for q in qs:
        pos = q / 100.0 * (n - 1)
        i = int(np.floor(pos))
        lo = int(np.searchsorted(counts, i, side="right"))
        hi = int(np.searchsorted(counts, min(i + 1, n - 1), side="right"))
        out.append(lo + (pos - i) * (hi - lo))
    return out


def _nearest_sources(vol: Volume, k: int, series: SourceSeries) -> list[tuple[str, str, int | None]]:
    """(sop class, sop instance, frame) of the one or two source slices nearest to output slice k."""
    normal = vol.normal
    target = float(np.dot(normal, np.asarray(vol.positions[k], dtype=float)))
    cand = []
    for sl in series.slices:
        d = abs(float(np.dot(normal, np.asarray(sl.position))) - target) if sl.position is not None else 0.0
        cand.append((d, sl.sop_class_uid, sl.sop_instance_uid, sl.frame_number))
    cand.sort(key=lambda c: c[0])
    best = cand[:1]
    # an output slice between two source slices names both
    if len(cand) > 1 and cand[0][0] > 1e-3:
        best.append(cand[1])
    return [(c[1], c[2], c[3]) for c in best]


def _put(ds: Dataset, keyword: str, value: object) -> None:
    """Sets an element by replacing it (a new `DataElement`): the slices of a series share the elements of
    the first one, so an element is never changed in place."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    vr = "OW" if keyword == "PixelData" else dictionary_VR(tag)
    ds[tag] = DataElement(tag, vr, value)


def _slice(ds: Dataset, vol: Volume, series: SourceSeries, stored: np.ndarray, k: int) -> None:
    """The elements of output slice ``k`` alone: its source slices, position, location and pixels."""
    src_items = []
    for sop_class, sop_uid, frame in _nearest_sources(vol, k, series):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        if frame is not None:
            item.ReferencedFrameNumber = frame
        item.PurposeOfReferenceCodeSequence = [codes.SOURCE_IMAGE_FOR_PROCESSING]
        src_items.append(item)
    _put(ds, "SourceImageSequence", src_items)
    _put(ds, "ImagePositionPatient", [f"{float(v):.6g}" for v in vol.positions[k]])
    _put(ds, "SliceLocation", f"{float(np.dot(vol.normal, np.asarray(vol.positions[k], dtype=float))):.6g}")
    _put(ds, "PixelData", np.ascontiguousarray(stored[k]).tobytes())


def build_superres_series(
    *,
    output: SuperResOutput,
    series: SourceSeries,
    uids: UidFactory,
    index: int,
    institution_name: str | None = None,
) -> list[Dataset]:
    vol = output.volume
    if vol.array.ndim != 3:
        raise ResultsError(f"super-resolved volume of {output.model.name} is not 3-D")
    if len(vol.positions) != vol.array.shape[0]:
        raise ResultsError("super-resolved volume: one position per slice is required")
    stored, mapping = to_stored(vol.array)
    ref = series.first
    src_desc = clean_text(ref.get("SeriesDescription", ""), "LO")
    description = clean_text(f"AI superres {src_desc}".strip(), "LO")
    series_uid = uids.series("superres", index)
    for_uid = str(ref.get("FrameOfReferenceUID") or vol.frame_of_reference_uid or uids.uid("superres-for", index))
    m = output.model
    derivation = (
        f"Residual super-resolution by AI model {m.name} {m.version} (weights sha256 {m.weights_sha256}) "
        f"from series {series.series_uid}; spacing {vol.spacing[0]:.3g}/{vol.spacing[1]:.3g}/{vol.spacing[2]:.3g} mm "
        f"(slice/row/col); data consistency relative error {output.consistency_error:.4g} "
        f"(tolerance {output.consistency_tolerance:.4g}, {'passed' if output.consistency_passed else 'failed'}); "
        f"{mapping}."
    )
    if m.demo_weights:
        derivation += " " + m.notice
    lo, hi = percentiles_u16(stored, (1.0, 99.0)) if stored.size else (0, 1)
    center, width = float(lo + hi) / 2.0, max(float(hi - lo), 1.0)
    now = dt.datetime.now().astimezone()  # the node's local time, as DICOM dates and times are
    equipment = contributing_equipment([m])
    out: list[Dataset] = []
    row, col = vol.row_cosine, vol.col_cosine
    n = stored.shape[0]
    # the first slice is built whole; the others share its elements, all but their own (`_slice`)
    ds = hd.SOPClass(
        study_instance_uid=str(ref.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=SUPERRES_SERIES_NUMBER + index,
        sop_instance_uid=uids.instance("superres", index, 0),
        sop_class_uid=MRImageStorage,
        instance_number=1,
        modality="MR",
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=ref.get("PatientID"),
        patient_name=ref.get("PatientName"),
        patient_birth_date=ref.get("PatientBirthDate"),
        patient_sex=ref.get("PatientSex") or None,
        accession_number=ref.get("AccessionNumber"),
        study_id=ref.get("StudyID"),
        study_date=ref.get("StudyDate"),
        study_time=ref.get("StudyTime"),
        referring_physician_name=ref.get("ReferringPhysicianName"),
        series_description=description or None,
        manufacturer_model_name=MANUFACTURER_MODEL,
        software_versions=node_software_versions(),
        device_serial_number=MANUFACTURER,
        institution_name=institution_name,
        specific_character_set=None,
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0),
    )
    ds.copy_patient_and_study_information(ref)
    copy_character_set(ds, ref)
    ds._add_contributing_equipment(equipment, ref)  # private, but highdicom's own helper
    lat = series.series_laterality(ref.get("BodyPartExamined"))
    if lat is not None:
        ds.Laterality = lat
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.DerivationDescription = clean_text(derivation, "ST")
    ds.DerivationCodeSequence = [codes.SPATIAL_RESAMPLING]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageOrientationPatient = [f"{float(v):.6g}" for v in (*row, *col)]
    ds.PixelSpacing = [f"{vol.spacing[1]:.6g}", f"{vol.spacing[2]:.6g}"]
    ds.SliceThickness = f"{vol.spacing[0]:.6g}"
    ds.SpacingBetweenSlices = f"{vol.spacing[0]:.6g}"
    for kw in _MR_COPY:
        if kw in ref and ref.get(kw) not in (None, ""):
            setattr(ds, kw, ref.get(kw))
    for kw, default in _MR_DEFAULTS.items():
        if not ds.get(kw):
            setattr(ds, kw, default)
    for kw in _MR_TYPE2:
        if kw not in ds:
            setattr(ds, kw, None)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = f"{center:.6g}"
    ds.WindowWidth = f"{width:.6g}"
    _slice(ds, vol, series, stored, 0)
    template = ds
    out.append(ds)
    for k in range(1, n):
        sl = Dataset()
        sl.update(template)
        sop_uid = uids.instance("superres", index, k)
        meta = FileMetaDataset()  # elements of its own: writing the file sets the group length in place
        for elem in template.file_meta:
            meta.add_new(elem.tag, elem.VR, elem.value)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        sl.file_meta = meta
        _put(sl, "SOPInstanceUID", sop_uid)
        _put(sl, "InstanceNumber", k + 1)
        _slice(sl, vol, series, stored, k)
        out.append(sl)
    return out
