"""Header parsing and validation of a received instance (no database, no network).

- `read_header` parses only the header of the received dataset bytes (stops before the
  pixel data; honours Specific Character Set) into an `InstanceHeader`;
- `validate` checks it against the C-STORE request;
- `read_series_headers` reads the headers of a folder of files (``msknode routing explain``).

Both raise `IngestError` with the DICOM status to return (the constants below, PS3.4 B.2.3).
The database rows come next (`node.receive.index`), written by `node.receive.writer`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from node.errors import IngestError
from node.intake.recognition import acquisition_from_dataset
from node.receive.storage import is_valid_uid

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (the peer retries later)
SOP_MISMATCH = 0xA900  # Error: data set does not match SOP class (or the request's instance)
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (unparseable data set)
MISSING_UID = 0xC001  # Error: cannot understand (a required UID is missing)
MALFORMED_UID = 0xC002  # Error: cannot understand (a UID is malformed)

DEFLATED_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

# demographics of the study row a resend may correct (audited by field name, never by value)
DEMOGRAPHIC_FIELDS = (
    "patient_name",
    "patient_id",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "study_date",
    "study_time",
    "study_description",
    "referring_physician",
    "specific_character_set",
)


@dataclass(frozen=True)
class InstanceHeader:
    """What the index needs from one instance. Text fields: None = absent, '' = present but empty."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    laterality: str | None = None
    series_number: int | None = None
    manufacturer: str | None = None
    instance_number: int | None = None
    image_position: str | None = None
    image_orientation: str | None = None
    number_of_frames: int | None = None
    expected_instances: int | None = None
    contributing_manufacturers: tuple[str, ...] = ()
    demographics: dict[str, str | None] = field(default_factory=dict)
    # the acquisition parameters routing recognises the series by (node.intake.recognition.Acquisition.to_json)
    acquisition: dict[str, Any] | None = None

    def is_own_object(self, uid_root: str) -> bool:
        """Objects msknode made: our UID root, or our name as (contributing) manufacturer."""
        if self.sop_instance_uid.startswith(uid_root) or self.series_uid.startswith(uid_root):
            return True
        names = [self.manufacturer or "", *self.contributing_manufacturers]
        return any(n.strip().lower() == "msknode" for n in names)


# ---- header parsing ------------------------------------------------------------------------


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= 0x7FE00000


def read_header(data: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Parses the header of dataset bytes received in `transfer_syntax_uid` (no pixel decoding).

    Raises `IngestError` (0xC000 cannot understand, 0xC001 missing UID, 0xC002 malformed UID).
    """
    try:
        ds = _parse(data, str(transfer_syntax_uid))
        uids = {k: _text(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    except IngestError:
        raise
    except Exception as e:  # pydicom raises many types for broken input
        raise IngestError(CANNOT_UNDERSTAND, f"cannot parse the data set: {type(e).__name__}") from None
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise IngestError(MISSING_UID, f"missing {', '.join(missing)}")
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        raise IngestError(MALFORMED_UID, f"malformed {', '.join(bad)}")
    try:
        return _header_from(ds, uids)
    except Exception as e:
        raise IngestError(CANNOT_UNDERSTAND, f"cannot read the header: {type(e).__name__}") from None


def _parse(data: bytes, ts: str) -> Dataset:
    if ts in DEFLATED_TRANSFER_SYNTAXES:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
    implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
    little = ts != EXPLICIT_VR_BIG_ENDIAN
    if len(data) < 8:
        raise IngestError(CANNOT_UNDERSTAND, "the data set is empty or too short")
    fp = BytesIO(data)
    ds = read_dataset(fp, implicit, little, stop_when=_stop_at_pixels)
    if len(ds) == 0:
        raise IngestError(CANNOT_UNDERSTAND, "no data elements")
    for raw in ds._dict.values():  # a value cut short by the end of the data
        length, value = getattr(raw, "length", None), getattr(raw, "value", None)
        if length is not None and length != 0xFFFFFFFF and isinstance(value, bytes) and len(value) < length:
            raise IngestError(CANNOT_UNDERSTAND, "the data set is truncated")
    _check_tail(data, fp.tell(), implicit=implicit, little=little)
    return ds


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


def _check_tail(data: bytes, pos: int, *, implicit: bool, little: bool) -> None:
    """Checks that the elements after the header (pixel data ...) are complete, without reading them.

    Walks element headers and lengths only: a truncated data set is refused here instead of
    being stored. An undefined-length element other than encapsulated pixel data ends the check.
    """
    e = "<" if little else ">"
    n = len(data)

    def truncated() -> IngestError:
        return IngestError(CANNOT_UNDERSTAND, "the data set is truncated")

    while pos < n:
        if n - pos < 8:
            raise truncated()
        group, element = struct.unpack_from(e + "HH", data, pos)
        if implicit:
            (length,) = struct.unpack_from(e + "L", data, pos + 4)
            pos += 8
        elif data[pos + 4 : pos + 6] in _LONG_VRS:
            if n - pos < 12:
                raise truncated()
            (length,) = struct.unpack_from(e + "L", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from(e + "H", data, pos + 6)
            pos += 8
        if length != 0xFFFFFFFF:
            pos += length
            if pos > n:
                raise truncated()
            continue
        if (group, element) != (0x7FE0, 0x0010):
            return
        while True:  # encapsulated pixel data: items of defined length, then a sequence delimiter
            if n - pos < 8:
                raise truncated()
            tag = struct.unpack_from(e + "HH", data, pos)
            (length,) = struct.unpack_from(e + "L", data, pos + 4)
            pos += 8
            if tag == _SEQUENCE_END:
                break
            if tag != _ITEM or length == 0xFFFFFFFF:
                raise IngestError(CANNOT_UNDERSTAND, "malformed encapsulated pixel data")
            pos += length
            if pos > n:
                raise truncated()


def _text(ds: Dataset, keyword: str) -> str | None:
    """A text value: None if absent, '' if empty; multi-valued joined with backslash."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_fmt(v) for v in value)
    return _fmt(value).strip()


def _fmt(v: Any) -> str:
    return str(v).strip()  # DS/IS keep their original text


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _safe_text(ds: Dataset, keyword: str) -> str | None:
    try:
        return _text(ds, keyword)
    except Exception:  # an undecodable or invalid value is not a reason to refuse the object
        return None


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """The `InstanceHeader` of a dataset read elsewhere (e.g. a file read with ``stop_before_pixels``).

    Raises `IngestError` as `read_header` does for missing or malformed UIDs.
    """
    uids = {k: _safe_text(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise IngestError(MISSING_UID, f"missing {', '.join(missing)}")
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        raise IngestError(MALFORMED_UID, f"malformed {', '.join(bad)}")
    return _header_from(ds, uids)


#: `read_series_headers` reads at most this many files of a folder
MAX_SERIES_FILES = 4000


def read_series_headers(path: Path | str, *, max_files: int = MAX_SERIES_FILES) -> tuple[list[InstanceHeader], int]:
    """The headers of a DICOM file, or of the files of one folder (not its subfolders), and how many were skipped.

    Reads each file's header only (pydicom stops before the pixel data); files that are not
    DICOM, or lack the UIDs of an instance, are skipped. Raises `IngestError` (0xC000) when
    the path is neither a file nor a folder, or the folder holds more than ``max_files`` files.
    """
    from pydicom import dcmread

    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = []
        for entry in sorted(p.iterdir()):
            if entry.is_file():
                files.append(entry)
                if len(files) > max_files:
                    raise IngestError(
                        CANNOT_UNDERSTAND, f"{p} holds more than {max_files} files: give the folder of one series"
                    )
    else:
        raise IngestError(CANNOT_UNDERSTAND, f"{p} is neither a file nor a folder")
    from pydicom import config as pydicom_config

    headers: list[InstanceHeader] = []
    skipped = 0
    mode = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE  # odd values: no warning per file
    try:
        for f in files:
            try:
                ds = dcmread(f, stop_before_pixels=True)
                headers.append(header_from_dataset(ds))
            except Exception:  # not DICOM, unreadable, or not an instance: skipped (and counted)
                skipped += 1
    finally:
        pydicom_config.settings.reading_validation_mode = mode
    return headers, skipped


def _acquisition(ds: Dataset) -> dict[str, Any] | None:
    """The acquisition parameters (header only, bounded); None when there are none or they cannot be read."""
    try:
        return acquisition_from_dataset(ds).to_json() or None
    except Exception:  # odd values are no reason to refuse the object: routing falls back on the text
        return None


def _header_from(ds: Dataset, uids: dict[str, str | None]) -> InstanceHeader:
    laterality = _safe_text(ds, "Laterality") or _safe_text(ds, "ImageLaterality")
    frames = _int(ds, "NumberOfFrames")
    expected = _int(ds, "ImagesInAcquisition") or _int(ds, "NumberOfSeriesRelatedInstances")
    contributing: list[str] = []
    try:
        for item in ds.get("ContributingEquipmentSequence") or []:
            if "Manufacturer" in item:
                contributing.append(str(item.Manufacturer))
    except Exception:
        pass
    demographics = {
        "patient_name": _safe_text(ds, "PatientName"),
        "patient_id": _safe_text(ds, "PatientID"),
        "patient_birth_date": _safe_text(ds, "PatientBirthDate"),
        "patient_sex": _safe_text(ds, "PatientSex"),
        "accession_number": _safe_text(ds, "AccessionNumber"),
        "study_date": _safe_text(ds, "StudyDate"),
        "study_time": _safe_text(ds, "StudyTime"),
        "study_description": _safe_text(ds, "StudyDescription"),
        "referring_physician": _safe_text(ds, "ReferringPhysicianName"),
        "specific_character_set": _safe_text(ds, "SpecificCharacterSet"),
    }
    return InstanceHeader(
        sop_class_uid=str(uids["SOPClassUID"]),
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        study_uid=str(uids["StudyInstanceUID"]),
        series_uid=str(uids["SeriesInstanceUID"]),
        modality=_safe_text(ds, "Modality"),
        body_part=_safe_text(ds, "BodyPartExamined"),
        series_description=_safe_text(ds, "SeriesDescription"),
        protocol_name=_safe_text(ds, "ProtocolName"),
        laterality=laterality,
        series_number=_int(ds, "SeriesNumber"),
        manufacturer=_safe_text(ds, "Manufacturer"),
        instance_number=_int(ds, "InstanceNumber"),
        image_position=_safe_text(ds, "ImagePositionPatient"),
        image_orientation=_safe_text(ds, "ImageOrientationPatient"),
        number_of_frames=frames,
        expected_instances=expected if expected and expected > 0 else None,
        contributing_manufacturers=tuple(contributing),
        demographics=demographics,
        acquisition=_acquisition(ds),
    )


def validate(header: InstanceHeader, *, request_sop_class_uid: str, request_sop_instance_uid: str) -> None:
    """The data set must be the object the C-STORE request announced (else 0xA900)."""
    if header.sop_class_uid != str(request_sop_class_uid).strip("\0 "):
        raise IngestError(SOP_MISMATCH, "SOP Class UID of the data set differs from the request")
    if header.sop_instance_uid != str(request_sop_instance_uid).strip("\0 "):
        raise IngestError(SOP_MISMATCH, "SOP Instance UID of the data set differs from the request")
