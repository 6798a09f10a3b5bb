"""Indexing received instances: header parsing, validation and the database rows of contract C1.

Three layers, each usable alone:

- `read_header` parses only the header of the received dataset bytes (stops before the
  pixel data; honours Specific Character Set) into an `InstanceHeader`, and `validate`
  checks it against the C-STORE request. Both raise `IngestError` with the status to return.
- `publish_new` puts a new instance's file in place and fsyncs it (file and directories
  together) before any index transaction; `index_instances`, `open_association`,
  `close_association` and `record_quarantine` are plain functions on a session or
  connection: the rows of contract C1 (studies, series, instances, associations,
  association_series, quarantine). `index_instances` publishes whatever is not yet durable
  (resends, replacements) inside the transaction, before the commit, so a row never exists
  for a file that is not durable.
- `IndexWriter` writes the index of a listener process with group commit: concurrent
  handlers' rows go into one transaction, so concurrent associations share one fsync.

Logs carry UIDs and statuses only, never patient data.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import fcntl
import functools
import logging
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from sqlalchemy import Connection, and_, bindparam, func, select, update
from sqlalchemy.orm import Session

from node.db.database import Database, utcnow
from node.errors import IngestError, StorageError
from node.intake.recognition import acquisition_from_dataset
from node.receive.storage import InstanceStore, StagedFile, is_valid_uid
from node.db.schema import Association, AssociationSeries, Instance, Quarantine, Series, Study

log = logging.getLogger(__name__)

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
    # the acquisition parameters routing recognises the series by (node.recognition.Acquisition.to_json)
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
        elif data[pos + 4:pos + 6] in _LONG_VRS:
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
                    raise IngestError(CANNOT_UNDERSTAND, f"{p} holds more than {max_files} files: give the folder of one series")
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


# ---- index rows (contract C1) --------------------------------------------------------------


@dataclass
class Received:
    """One validated instance, staged on disk, waiting to be indexed."""

    header: InstanceHeader
    staged: StagedFile
    transfer_syntax_uid: str
    calling_ae: str | None = None
    association_id: int | None = None
    published: Path | None = None  # set once the staged file was renamed to its final path
    file_meta: bytes = b""  # with `data`: to write the file again under the index lock (see index_instances)
    data: bytes | None = None
    # published but not fsynced yet: made durable before the commit, or right after it (IndexWriter.overlap)
    pending_files: list[Path] = field(default_factory=list)
    pending_dirs: set[Path] = field(default_factory=set)


def publish_new(store: InstanceStore, item: Received, *, sync: bool = True) -> bool:
    """Before the index transaction: puts a new instance's file in place (and fsyncs it, with `sync`).

    Only when nothing is stored at its final path yet (the common case). The fsyncs then run
    in the handler's thread, outside the index lock, in parallel with other associations'.
    Without `sync` the file is left in `item.pending_files` for the writer to fsync.
    Returns False (and does nothing) when a file is already there: `index_instances` decides.
    """
    h = item.header
    if store.path_for(h.study_uid, h.series_uid, h.sop_instance_uid).exists():
        return False
    item.published, dirs = store.publish(item.staged, h.study_uid, h.series_uid, h.sop_instance_uid, sync_first=False)
    if sync:
        store.sync(files=[item.published], dirs=dirs)
    else:
        item.pending_files.append(item.published)
        item.pending_dirs |= dirs
    return True


@dataclass(frozen=True)
class Outcome:
    status: int
    instance_id: int | None
    duplicate: bool = False  # the same bytes were already stored: nothing changed
    replaced: bool = False  # same SOP Instance UID, different bytes: file and index updated
    demographics_changed: tuple[str, ...] = ()


def _fit(column, value):
    """Truncates text to the column's length (PostgreSQL enforces VARCHAR lengths)."""
    if value is None or not isinstance(value, str):
        return value
    length = getattr(column.type, "length", None)
    return value[:length] if length else value


def _norm(value: str | None) -> str | None:
    return value if value else None


def _insert_ignoring_conflicts(dialect: str, table):
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise StorageError(f"unsupported database dialect {dialect!r} (SQLite or PostgreSQL)")
    return insert(table).on_conflict_do_nothing()


class _Statements:
    """The index statements, built once per dialect (compiled once, executed with parameters)."""

    def __init__(self, dialect: str):
        inst, st, se = Instance.__table__, Study.__table__, Series.__table__
        asr = AssociationSeries.__table__
        self.insert_instance = _insert_ignoring_conflicts(dialect, inst).returning(inst.c.id)
        self.insert_study = _insert_ignoring_conflicts(dialect, st)
        self.insert_series = _insert_ignoring_conflicts(dialect, se)
        self.insert_assoc_series = _insert_ignoring_conflicts(dialect, asr).returning(asr.c.series_id)
        self.select_instance = select(inst.c.id, inst.c.series_id, inst.c.sha256, inst.c.path).where(
            inst.c.sop_instance_uid == bindparam("b_uid")
        )
        self.select_study = select(st).where(st.c.study_uid == bindparam("b_uid"))
        self.select_series = select(se.c.id, se.c.expected_instances).where(se.c.series_uid == bindparam("b_uid"))
        self.series_expected = update(se).where(se.c.id == bindparam("b_id")).values(expected_instances=bindparam("b_n"))
        self.series_open = update(se).where(se.c.id == bindparam("b_id")).values(
            open_associations=se.c.open_associations + 1
        )
        self.series_arrival = (
            update(se)
            .where(se.c.id == bindparam("b_id"))
            .values(
                instances=se.c.instances + bindparam("b_n"),
                last_received_at=bindparam("b_now"),
                quiet_deadline=bindparam("b_deadline"),
            )
        )
        self.study_arrival = update(st).where(st.c.id == bindparam("b_id")).values(last_received_at=bindparam("b_now"))


@dataclass
class IndexCache:
    """Rows one writer has seen, so the common case (next instance of a known series) is one INSERT.

    Entries are only hints: a failed transaction clears the cache and is retried without it.
    """

    studies: dict[str, tuple[int, dict]] = field(default_factory=dict)  # study UID -> (id, demographics)
    series: dict[str, tuple[int, bool]] = field(default_factory=dict)  # series UID -> (id, has expected count)
    assoc_series: set[tuple[int, int]] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)  # associations this writer has ended
    limit: int = 20000

    def clear(self) -> None:
        self.studies.clear()
        self.series.clear()
        self.assoc_series.clear()

    def trim(self) -> None:
        if len(self.studies) + len(self.series) + len(self.assoc_series) > self.limit:
            self.clear()
        if len(self.closed) > self.limit:
            self.closed.clear()


@functools.cache
def _statements_for(dialect: str) -> _Statements:
    return _Statements(dialect)


def _connection(session_or_connection) -> Connection:
    """The Core connection of a Session (its transaction) or the Connection itself."""
    if isinstance(session_or_connection, Session):
        return session_or_connection.connection()
    return session_or_connection


def _statements(conn: Connection) -> _Statements:
    return _statements_for(conn.dialect.name)


def _study_values(header: InstanceHeader) -> dict:
    t = Study.__table__.c
    return {k: _fit(t[k], _norm(v)) for k, v in header.demographics.items()}


def _upsert_study(conn, sql: _Statements, cache: IndexCache, header: InstanceHeader, now, audit, session):
    """The study row (created, or demographics corrected); returns (id, changed field names)."""
    values = _study_values(header)
    cached = cache.studies.get(header.study_uid)
    if cached is not None and all(header.demographics.get(k) is None or v == cached[1].get(k) for k, v in values.items()):
        return cached[0], ()
    row = conn.execute(sql.select_study, {"b_uid": header.study_uid}).mappings().first()
    if row is None:
        conn.execute(sql.insert_study, dict(study_uid=header.study_uid, first_received_at=now, last_received_at=now, **values))
        row = conn.execute(sql.select_study, {"b_uid": header.study_uid}).mappings().one()
        cache.studies[header.study_uid] = (row["id"], {k: row[k] for k in values})
        return row["id"], ()
    changed = {k: v for k, v in values.items() if header.demographics.get(k) is not None and v != row[k]}
    current = {k: row[k] for k in values}
    if changed:
        st = Study.__table__
        conn.execute(update(st).where(st.c.id == row["id"]).values(**changed))
        current.update(changed)
        audit(session, "study", header.study_uid, tuple(sorted(changed)), header)
    cache.studies[header.study_uid] = (row["id"], current)
    return row["id"], tuple(sorted(changed))


def _upsert_series(conn, sql: _Statements, cache: IndexCache, header: InstanceHeader, study_id: int, calling_ae, uid_root: str, now) -> int:
    cached = cache.series.get(header.series_uid)
    if cached is not None and (cached[1] or not header.expected_instances):
        return cached[0]
    row = conn.execute(sql.select_series, {"b_uid": header.series_uid}).first()
    if row is None:
        c = Series.__table__.c
        conn.execute(
            sql.insert_series,
            dict(
                study_id=study_id,
                series_uid=header.series_uid,
                modality=_fit(c.modality, _norm(header.modality)),
                body_part=_fit(c.body_part, _norm(header.body_part)),
                series_description=_fit(c.series_description, _norm(header.series_description)),
                protocol_name=_fit(c.protocol_name, _norm(header.protocol_name)),
                laterality=_fit(c.laterality, _norm(header.laterality)),
                series_number=header.series_number,
                manufacturer=_fit(c.manufacturer, _norm(header.manufacturer)),
                calling_ae=_fit(c.calling_ae, calling_ae),
                acquisition=header.acquisition,
                instances=0,
                expected_instances=header.expected_instances,
                own_object=header.is_own_object(uid_root),
                state="receiving",
                first_received_at=now,
                last_received_at=now,
                quiet_deadline=None,
                open_associations=0,
            ),
        )
        row = conn.execute(sql.select_series, {"b_uid": header.series_uid}).one()
    expected = row.expected_instances
    if expected is None and header.expected_instances:
        conn.execute(sql.series_expected, {"b_id": row.id, "b_n": header.expected_instances})
        expected = header.expected_instances
    cache.series[header.series_uid] = (row.id, expected is not None)
    return row.id


def _instance_values(item: Received, series_id: int, path: Path) -> dict:
    h, c = item.header, Instance.__table__.c
    return dict(
        series_id=series_id,
        sop_class_uid=h.sop_class_uid,
        transfer_syntax_uid=_fit(c.transfer_syntax_uid, item.transfer_syntax_uid),
        path=str(path),
        size=item.staged.size,
        sha256=item.staged.sha256,
        instance_number=h.instance_number,
        image_position=_fit(c.image_position, _norm(h.image_position)),
        image_orientation=_fit(c.image_orientation, _norm(h.image_orientation)),
        number_of_frames=h.number_of_frames,
        calling_ae=_fit(c.calling_ae, item.calling_ae),
        association_id=item.association_id,
    )


def index_instances(
    session,
    store: InstanceStore,
    items: list[Received],
    *,
    uid_root: str,
    quiet_seconds: float,
    now: dt.datetime | None = None,
    audit: Callable | None = None,
    cache: IndexCache | None = None,
    sync_now: bool = True,
) -> list[Outcome]:
    """Publishes the staged files and writes their index rows (C1) in the caller's transaction.

    With `sync_now` every published file is fsynced here, before the caller commits, so a
    committed row always points at a durable file. Without it the files (and the stored
    file of a duplicate) are left in each item's `pending_files` / `pending_dirs`, and the
    caller must fsync them after the commit, before answering (see `IndexWriter.overlap`).
    A duplicate SOP Instance UID with the same bytes changes nothing (after checking that the
    stored file still holds those bytes); with different bytes the file and rows are replaced
    and changed demographics are audited (field names and UIDs only).
    """
    now = now or utcnow()
    audit = audit or audit_demographics
    cache = cache if cache is not None else IndexCache()
    conn = _connection(session)
    sql = _statements(conn)
    outcomes: list[Outcome] = []
    arrivals: dict[int, int] = {}  # series id -> instances added (may be 0 or negative on a move)
    studies: set[int] = set()
    delivered: set[tuple[int, int]] = set()  # (association id, series id)

    for item in items:
        h = item.header
        study_id, changed = _upsert_study(conn, sql, cache, h, now, audit, session)
        series_id = _upsert_series(conn, sql, cache, h, study_id, item.calling_ae, uid_root, now)
        target = store.path_for(h.study_uid, h.series_uid, h.sop_instance_uid)
        item_values = _instance_values(item, series_id, target)
        instance_id = conn.execute(
            sql.insert_instance, dict(sop_instance_uid=h.sop_instance_uid, received_at=now, **item_values)
        ).scalar()
        replaced = False
        if instance_id is None:  # the SOP Instance UID is already indexed
            existing = conn.execute(sql.select_instance, {"b_uid": h.sop_instance_uid}).one()
            if existing.sha256 == item.staged.sha256 and store.dataset_digest(Path(existing.path)) == existing.sha256:
                if item.published is None:
                    store.discard(item.staged)
                if item.published is None or Path(existing.path) != item.published:
                    # the stored copy may still be on its way to disk (another association's batch)
                    item.pending_files.append(Path(existing.path))
                    item.pending_dirs.add(Path(existing.path).parent)
                outcomes.append(Outcome(SUCCESS, existing.id, duplicate=True, demographics_changed=changed))
                continue
            instance_id, replaced = existing.id, True
            if item.published is not None and item.data is not None:
                # published outside the lock while another version is indexed (a concurrent resend):
                # write our bytes again now, under the lock, so that file and row agree
                item.staged, item.published = store.stage(item.file_meta, item.data), None
            inst = Instance.__table__
            conn.execute(update(inst).where(inst.c.id == existing.id).values(updated_at=now, **item_values))
            if existing.series_id != series_id:  # the resend moved it to another series
                arrivals[existing.series_id] = arrivals.get(existing.series_id, 0) - 1
                arrivals[series_id] = arrivals.get(series_id, 0) + 1
            else:
                arrivals.setdefault(series_id, 0)
            log.info("instance %s resent with different content: file and index replaced", h.sop_instance_uid)
        else:
            arrivals[series_id] = arrivals.get(series_id, 0) + 1
        if item.published is None:
            item.published, dirs = store.publish(
                item.staged, h.study_uid, h.series_uid, h.sop_instance_uid, sync_first=replaced
            )
            item.pending_dirs |= dirs
            if not replaced:
                item.pending_files.append(item.published)
        studies.add(study_id)
        if item.association_id is not None and item.association_id not in cache.closed:
            delivered.add((item.association_id, series_id))
        outcomes.append(Outcome(SUCCESS, instance_id, replaced=replaced, demographics_changed=changed))

    open_series: set[int] = set()
    for pair in sorted(delivered):
        if pair not in cache.assoc_series:
            inserted = conn.execute(sql.insert_assoc_series, {"association_id": pair[0], "series_id": pair[1]}).first()
            if inserted is not None:  # (RETURNING, not rowcount: psycopg reports -1 here)
                conn.execute(sql.series_open, {"b_id": pair[1]})
            cache.assoc_series.add(pair)
        open_series.add(pair[1])
    for series_id, n in sorted(arrivals.items()):
        deadline = None if series_id in open_series else now + dt.timedelta(seconds=quiet_seconds)
        conn.execute(sql.series_arrival, {"b_id": series_id, "b_n": n, "b_now": now, "b_deadline": deadline})
    for study_id in sorted(studies):
        conn.execute(sql.study_arrival, {"b_id": study_id, "b_now": now})
    if sync_now:  # in parallel: about one flush for the batch
        store.sync(files=[f for it in items for f in it.pending_files], dirs={d for it in items for d in it.pending_dirs})
        for it in items:
            it.pending_files, it.pending_dirs = [], set()
    cache.trim()
    return outcomes


def audit_demographics(session, entity_type: str, study_uid: str, fields: tuple[str, ...], header: InstanceHeader) -> None:
    """Audits a demographics correction with UIDs and field names only (no patient data).

    `session` is a Session or a Connection (then a Session joins its transaction for the audit row).
    """
    from worklists.audit import record

    if not isinstance(session, Session):
        orm = Session(bind=session, join_transaction_mode="create_savepoint")
        try:
            audit_demographics(orm, entity_type, study_uid, fields, header)
            orm.commit()  # releases the savepoint; the caller's transaction commits the row
        finally:
            orm.close()
        return
    record(
        session,
        actor="system",
        action="demographics_updated",
        entity_type=entity_type,
        entity_id=study_uid,
        details={
            "study_uid": study_uid,
            "series_uid": header.series_uid,
            "sop_instance_uid": header.sop_instance_uid,
            "fields": list(fields),
        },
    )


def open_association(session, *, calling_ae: str | None, called_ae: str | None, peer_address: str | None, listener: str, now=None) -> int:
    t = Association.__table__
    result = session.execute(
        t.insert().values(
            calling_ae=_fit(t.c.calling_ae, calling_ae),
            called_ae=_fit(t.c.called_ae, called_ae),
            peer_address=_fit(t.c.peer_address, peer_address),
            listener=_fit(t.c.listener, listener),
            started_at=now or utcnow(),
            instances=0,
        )
    )
    return int(result.inserted_primary_key[0])


def close_association(
    session, association_id: int, *, reason: str, quiet_seconds: float, now=None, cache: IndexCache | None = None
) -> list[int]:
    """Ends an association; starts the quiet timer of each series no other open association delivers to."""
    now = now or utcnow()
    asc, asr, se, inst = Association.__table__, AssociationSeries.__table__, Series.__table__, Instance.__table__
    stored = select(func.count()).select_from(inst).where(inst.c.association_id == association_id).scalar_subquery()
    done = session.execute(
        update(asc)
        .where(and_(asc.c.id == association_id, asc.c.ended_at.is_(None)))
        .values(ended_at=now, end_reason=reason, instances=stored)
    ).rowcount
    if cache is not None:
        cache.closed.add(association_id)
        cache.assoc_series = {p for p in cache.assoc_series if p[0] != association_id}
    if not done:
        return []
    series_ids = list(session.scalars(select(asr.c.series_id).where(asr.c.association_id == association_id)))
    for series_id in series_ids:
        others = session.execute(
            select(func.count())
            .select_from(asr.join(asc, asc.c.id == asr.c.association_id))
            .where(asr.c.series_id == series_id, asc.c.ended_at.is_(None))
        ).scalar_one()
        values: dict[str, Any] = {"open_associations": others}
        if others == 0:
            values["quiet_deadline"] = now + dt.timedelta(seconds=quiet_seconds)
        session.execute(update(se).where(se.c.id == series_id).values(**values))
    return series_ids


def recover_unclean_stop(session, store: InstanceStore, *, since: dt.datetime, logger: logging.Logger | None = None) -> int:
    """After an unclean stop: removes index rows written since `since` whose file is missing or
    does not hold the indexed bytes (a power loss between commit and fsync, see `IndexWriter`).

    Their senders got no Success and send them again. Returns the number of rows removed.
    """
    logger = logger or log
    inst, se = Instance.__table__, Series.__table__
    rows = session.execute(
        select(inst.c.id, inst.c.series_id, inst.c.sop_instance_uid, inst.c.path, inst.c.sha256).where(
            (inst.c.received_at >= since) | (inst.c.updated_at >= since)
        )
    ).all()
    removed = 0
    for row in rows:
        if row.sha256 is None or store.dataset_digest(Path(row.path)) == row.sha256:
            continue
        session.execute(inst.delete().where(inst.c.id == row.id))
        session.execute(update(se).where(se.c.id == row.series_id).values(instances=se.c.instances - 1))
        Path(row.path).unlink(missing_ok=True)
        removed += 1
        logger.warning(
            "instance %s was not durable when the node stopped: removed from the index (its sender got no Success)",
            row.sop_instance_uid,
        )
    logger.info("checked %d instance(s) received since %s after an unclean stop; %d removed", len(rows), since, removed)
    return removed


def record_quarantine(session, *, calling_ae: str | None, sop_instance_uid: str | None, status: int, reason: str, path: str | None, now=None) -> int:
    t = Quarantine.__table__
    result = session.execute(
        t.insert().values(
            received_at=now or utcnow(),
            calling_ae=_fit(t.c.calling_ae, calling_ae),
            sop_instance_uid=_fit(t.c.sop_instance_uid, sop_instance_uid),
            status=status,
            reason=reason,
            path=path,
        )
    )
    return int(result.inserted_primary_key[0])


# ---- group commit ----------------------------------------------------------------------------


@dataclass
class _Op:
    kind: str  # "store", "open", "close", "quarantine"
    payload: Any
    future: Future = field(default_factory=Future)
    taken: bool = False  # in a batch (committed by whoever took it)


class IndexWriter:
    """Writes the index for one listener process, committing concurrent work in shared transactions.

    Group commit without a thread hop: a handler queues its operation and takes the commit
    lock; whoever holds the lock commits everything queued so far (up to `max_batch`) in one
    transaction; handlers whose operation was taken by another wait for its result. One
    association pays no hand-over to another thread (measured: on a busy 2-core machine the
    wake-up of a writer thread cost about 1.5 ms per instance); concurrent associations share
    one commit per batch.

    `overlap` (SQLite, where files and database share a disk): the transaction commits
    without its own fsync, then the batch's files, their directories and the SQLite WAL are
    fsynced together (the flushes merge: one per batch instead of two) and only then do the
    handlers answer. A power loss in that window can leave a committed row whose file is
    incomplete: its sender got no Success and sends it again (a resend checks the stored
    bytes, `index_instances`), and `recover_unclean_stop` checks the rows of the last minute
    at the next start. Elsewhere (PostgreSQL) files are fsynced before the commit.
    """

    def __init__(self, db: Database, store: InstanceStore, settings, *, max_batch: int = 64, logger: logging.Logger | None = None):
        self.db = db
        self.store = store
        self.uid_root = settings.uid_root
        self.quiet_seconds = settings.quiet_seconds
        self.max_batch = max_batch
        self.log = logger or log
        self.cache = IndexCache()
        self.overlap = settings.is_sqlite
        self._wal = Path(str(db.url).split("///", 1)[-1] + "-wal") if settings.is_sqlite else None
        self._pending: collections.deque[_Op] = collections.deque()
        self._commit_lock = threading.Lock()
        self._conn: Connection | None = None
        self._lock_path = Path(settings.data_dir) / "index-writer.lock" if settings.is_sqlite else None
        self._lock_fd: int | None = None
        self.batches = 0
        self.committed = 0

    # -- API used by the handlers (each blocks until its work is durable) --
    def store_instance(self, item: Received, timeout: float | None = None) -> Outcome:
        return self._run("store", item, timeout)

    def open_association(self, timeout: float | None = None, **kw) -> int:
        return self._run("open", kw, timeout)

    def close_association(self, association_id: int, reason: str, timeout: float | None = None) -> list[int]:
        return self._run("close", (association_id, reason), timeout)

    def quarantine(self, timeout: float | None = None, **kw) -> int:
        return self._run("quarantine", kw, timeout)

    def flush(self) -> None:
        """Commits whatever is still queued (at shutdown)."""
        while self._pending:
            with self._commit_lock:
                batch = self._take()
                done = self._commit(batch)
            self._finish(done)

    def _run(self, kind: str, payload: Any, timeout: float | None) -> Any:
        op = _Op(kind, payload)
        self._pending.append(op)
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        while not op.taken:
            wait = remaining()
            if not self._commit_lock.acquire(timeout=-1 if wait is None else wait):
                raise StorageError(f"index write timed out after {timeout:.0f} s")
            try:
                if op.taken:
                    break
                done = self._commit(self._take())
            finally:
                self._commit_lock.release()
            self._finish(done)  # fsyncs (overlap) outside the lock: the next batch may commit meanwhile
        try:
            return op.future.result(remaining())
        except TimeoutError:
            raise StorageError(f"index write timed out after {timeout:.0f} s") from None

    def _take(self) -> list[_Op]:
        batch: list[_Op] = []
        while self._pending and len(batch) < self.max_batch:
            op = self._pending.popleft()
            op.taken = True
            batch.append(op)
        return batch

    def _commit(self, batch: list[_Op]) -> list[tuple[_Op, Any, BaseException | None]]:
        """Commits a batch (isolating a failing operation); returns (op, result, error) for each."""
        if not batch:
            return []
        try:
            results = self._transaction(batch)
        except Exception as e:
            self.cache.clear()  # it may hold ids of rows that were purged meanwhile
            if len(batch) > 1:  # isolate the failing operation; the others still commit
                return [entry for op in batch for entry in self._commit([op])]
            self.log.error("index write failed (%s): %s", batch[0].kind, type(e).__name__, exc_info=True)
            return [(batch[0], None, e)]
        self.batches += 1
        self.committed += len(batch)
        return [(op, result, None) for op, result in zip(batch, results)]

    def _finish(self, done: list[tuple[_Op, Any, BaseException | None]]) -> None:
        """Makes a committed batch durable (overlap: files, directories and WAL in one go), then answers."""
        if not done:
            return
        error: BaseException | None = None
        if self.overlap:
            items = [op.payload for op, _, err in done if op.kind == "store" and err is None]
            files = [f for it in items for f in it.pending_files]
            dirs = {d for it in items for d in it.pending_dirs}
            if self._wal is not None and self._wal.exists():
                files.append(self._wal)  # (a WAL deleted meanwhile was checkpointed and synced by SQLite)
            try:
                self.store.sync(files=files, dirs=dirs)
            except (OSError, StorageError) as e:
                error = e  # nothing is acknowledged; the senders retry
            for it in items:
                it.pending_files, it.pending_dirs = [], set()
        for op, result, err in done:
            err = err or error
            if err is not None:
                op.future.set_exception(err)
            else:
                op.future.set_result(result)

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.invalidated or self._conn.closed:
            self._conn = self.db.engine.connect()
            if self.overlap:  # the commit is made durable by `_finish` (WAL fsync with the files)
                self._conn.connection.driver_connection.execute("PRAGMA synchronous=NORMAL")
        return self._conn

    def close(self) -> None:
        with self._commit_lock:
            self._release_connection()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextlib.contextmanager
    def _interprocess_lock(self):
        """On SQLite, the listener processes take turns with a lock that wakes the next one at
        once (SQLite's own busy wait sleeps 1, 2, 5, 10 ms ... between retries)."""
        if self._lock_path is None:
            yield
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _transaction(self, batch: list[_Op]) -> list[Any]:
        """One transaction on the writer's own connection (kept open: no pool round trip per commit)."""
        results: list[Any] = [None] * len(batch)
        now = utcnow()
        conn = self._connection()
        try:
            with self._interprocess_lock(), conn.begin():
                self._apply(conn, batch, results, now)
        except Exception:
            self._release_connection()  # a fresh connection for the next transaction
            raise
        return results

    def _release_connection(self) -> None:
        """Returns the writer's connection to the pool with SQLite's default durability restored."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.overlap and not conn.invalidated:
            try:
                if conn.in_transaction():
                    conn.rollback()
                conn.connection.driver_connection.execute("PRAGMA synchronous=FULL")
            except Exception:
                conn.invalidate()
        conn.close()

    def _apply(self, s: Connection, batch: list[_Op], results: list[Any], now) -> None:
        stores = [(i, op.payload) for i, op in enumerate(batch) if op.kind == "store"]
        for i, op in enumerate(batch):
            if op.kind == "open":
                results[i] = open_association(s, now=now, **op.payload)
        if stores:
            outcomes = index_instances(
                s,
                self.store,
                [item for _, item in stores],
                uid_root=self.uid_root,
                quiet_seconds=self.quiet_seconds,
                now=now,
                cache=self.cache,
                sync_now=not self.overlap,
            )
            for (i, _), outcome in zip(stores, outcomes):
                results[i] = outcome
        for i, op in enumerate(batch):
            if op.kind == "close":
                results[i] = close_association(
                    s, op.payload[0], reason=op.payload[1], quiet_seconds=self.quiet_seconds, now=now, cache=self.cache
                )
            elif op.kind == "quarantine":
                results[i] = record_quarantine(s, now=now, **op.payload)
