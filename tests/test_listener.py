"""The DICOM listener as a subprocess (``msknode listen``) with real clients: dcmtk and pynetdicom.

Every test against the listener runs twice: with the fast transport (the default) and with stock
pynetdicom (``MSKNODE_FAST_TRANSPORT=0``); ``-k fast`` or ``-k stock`` picks one.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from sqlalchemy import func, select

from node.db.database import Database
from node.db.schema import Association, AssociationSeries, Instance, Quarantine, Series, Study
from node.receive.storage import dataset_offset
from support.listener import PYDICOM_DATA, ListenerProcess, RawSender, dataset_bytes, echo
from worklists.tables import AuditEvent

SERIES_KEYS = {
    "study_uid",
    "series_uid",
    "modality",
    "body_part",
    "series_description",
    "instances",
    "state",
    "pipeline",
}


def mr_dataset(
    study_uid: str, series_uid: str, i: int, *, name="Doe^Jane", description="SAG PD FS", size=32
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.PatientName = name
    ds.PatientID = "PID0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20260301"
    ds.StudyDescription = "MR KNEE"
    ds.BodyPartExamined = "KNEE"
    ds.Laterality = "L"
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.SeriesNumber = 3
    ds.InstanceNumber = i + 1
    ds.ImagesInAcquisition = 5
    ds.ImagePositionPatient = [-50.0, -40.0, 3.0 * i]
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.full((size, size), i, dtype=np.uint16).tobytes()
    return ds


def write_series(folder: Path, n: int = 5, **kw) -> tuple[str, str, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = kw.pop("study_uid", None) or generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = mr_dataset(study_uid, series_uid, i, **kw)
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, series_uid, paths


def storescu(port: int, paths: list[Path], *args: str, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", "MSKNODE", *args, "127.0.0.1", str(port), *map(str, paths)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def stored_dataset(path: str | Path) -> bytes:
    return Path(path).read_bytes()[dataset_offset(Path(path)) :]


# the listener's transport: MSKNODE_FAST_TRANSPORT, and what its start-up line says
TRANSPORTS = {"fast": "1", "stock": "0"}
TRANSPORT_LOG = {"fast": "transport: fast)", "stock": "transport: stock pynetdicom)"}


def transport_env(mode: str, **env: str) -> dict[str, str]:
    return {"MSKNODE_FAST_TRANSPORT": TRANSPORTS[mode], **env}


@pytest.fixture(scope="module", params=list(TRANSPORTS))
def node(request, tmp_path_factory):
    mode = request.param
    listener = ListenerProcess(tmp_path_factory.mktemp(f"listener-{mode}") / "data", env=transport_env(mode)).start()
    assert TRANSPORT_LOG[mode] in listener.log(), listener.log()
    listener.db = Database(f"sqlite:///{listener.data_dir / 'msknode.db'}", migrate=False)
    yield listener
    listener.db.dispose()
    assert listener.stop() == 0, listener.log()


def test_echo_with_dcmtk_and_pynetdicom(node):
    r = subprocess.run(["echoscu", "-aec", "MSKNODE", "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert echo(node.port) == 0x0000


NOT_SERVED = {
    "1.2.840.10008.5.1.4.31": "Modality Worklist Information Model - FIND",
    "1.2.840.10008.5.1.4.39.2": "Color Palette Query/Retrieve Information Model - FIND",
    "1.2.840.10008.5.1.4.39.3": "Color Palette Query/Retrieve Information Model - MOVE",
    "1.2.840.10008.5.1.4.39.4": "Color Palette Query/Retrieve Information Model - GET",
}


def test_only_storage_verification_and_ups_contexts_are_accepted(node):
    """Worklist and Color Palette query/retrieve (known SOP classes, not storage, which pynetdicom's
    unrestricted storage negotiation took as storage) are refused in the A-ASSOCIATE-AC; storage
    (known, private and unknown), Verification and UPS are accepted in the same association."""
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    for uid in NOT_SERVED:
        ae.add_requested_context(uid)
    served = [
        MRImageStorage,
        "1.2.840.10008.1.1",  # Verification
        "1.2.840.10008.5.1.4.34.6.1",  # UPS Push
        "1.2.826.0.1.3680043.10.1447.999.1",  # private / unknown: taken as storage
    ]
    for uid in served:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
    try:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == set(served)
    assert rejected == set(NOT_SERVED)
    # and dcmtk's worklist query gets no presentation context at all
    r = subprocess.run(
        ["findscu", "-W", "-k", "PatientName=", "-aec", "MSKNODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "No Acceptable Presentation Contexts" in r.stdout + r.stderr, r.stdout + r.stderr


def test_storescu_series_is_stored_and_indexed(node, tmp_path):
    study_uid, series_uid, paths = write_series(tmp_path / "s", n=5)
    r = storescu(node.port, paths)
    assert r.returncode == 0, r.stderr

    rows = [s for s in node.series_json() if s["series_uid"] == series_uid]
    assert len(rows) == 1 and set(rows[0]) >= SERIES_KEYS
    row = rows[0]
    assert row == {
        **row,
        "study_uid": study_uid,
        "modality": "MR",
        "body_part": "KNEE",
        "series_description": "SAG PD FS",
        "instances": 5,
        "pipeline": None,
    }
    assert row["state"] in {"receiving", "complete", "queued", "processing", "done", "failed", "unrouted"}

    with node.db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        instances = s.scalars(
            select(Instance).where(Instance.series_id == series.id).order_by(Instance.instance_number)
        ).all()
        assoc = s.get(Association, instances[0].association_id)
        links = s.scalars(select(AssociationSeries).where(AssociationSeries.series_id == series.id)).all()
    assert (study.patient_name, study.patient_id, study.accession_number, study.specific_character_set) == (
        "Doe^Jane",
        "PID0001",
        "ACC0001",
        "ISO_IR 100",
    )
    assert (series.laterality, series.series_number, series.manufacturer, series.calling_ae) == (
        "L",
        3,
        "SIEMENS",
        "STORESCU",
    )
    assert series.expected_instances == 5 and series.own_object is False
    # released association: ended, and the series' quiet timer started (C1)
    assert assoc.calling_ae == "STORESCU" and assoc.called_ae == "MSKNODE" and assoc.listener
    assert assoc.end_reason == "released" and assoc.ended_at is not None and assoc.instances == 5
    assert [link.association_id for link in links] == [assoc.id]
    assert series.quiet_deadline is not None and series.quiet_deadline > assoc.ended_at
    for i, (inst, src) in enumerate(zip(instances, paths)):
        # path from UIDs only, bytes as sent, header columns indexed
        assert inst.path == str(node.data_dir / "store" / study_uid / series_uid / f"{inst.sop_instance_uid}.dcm")
        assert stored_dataset(inst.path) == dataset_bytes(src)[3]
        assert inst.sha256 == hashlib.sha256(dataset_bytes(src)[3]).hexdigest()
        assert inst.transfer_syntax_uid == ExplicitVRLittleEndian and inst.instance_number == i + 1
        assert inst.image_position == f"-50.0\\-40.0\\{3.0 * i}"
        assert inst.image_orientation == "0.0\\1.0\\0.0\\0.0\\0.0\\-1.0"
        meta = dcmread(inst.path, stop_before_pixels=True).file_meta
        assert (
            meta.MediaStorageSOPInstanceUID == inst.sop_instance_uid and meta.SourceApplicationEntityTitle == "STORESCU"
        )


def _transfer_syntax_variants(tmp_path: Path) -> list[tuple[str, list[Path]]]:
    out = []
    study_uid = generate_uid()
    for ts in (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        folder = tmp_path / ts
        folder.mkdir()
        series_uid = generate_uid()
        paths = []
        for i in range(2):
            ds = mr_dataset(study_uid, series_uid, i)
            ds.file_meta.TransferSyntaxUID = ts
            path = folder / f"{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        out.append((ts, paths))
    return out


def test_uncompressed_transfer_syntaxes_as_received_with_storescu(node, tmp_path):
    """storescu proposes the files' own transfer syntax (-R -xi/-xb/-xd); stored as received."""
    options = {ImplicitVRLittleEndian: "-xi", ExplicitVRBigEndian: "-xb", DeflatedExplicitVRLittleEndian: "-xd"}
    for ts, paths in _transfer_syntax_variants(tmp_path):
        r = storescu(node.port, paths, "-R", options[ts])
        assert r.returncode == 0, (ts, r.stderr)
        with node.db.session() as s:
            for path in paths:
                sop = dataset_bytes(path)[1]
                inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
                assert inst.transfer_syntax_uid == ts
                if ts != DeflatedExplicitVRLittleEndian:  # dcmtk re-deflates, so compare decoded elements
                    assert stored_dataset(inst.path) == dataset_bytes(path)[3]
                ds = dcmread(inst.path)
                assert ds.SOPInstanceUID == sop and ds.PixelData == dcmread(path).PixelData


def test_every_pydicom_data_file_is_stored_byte_identical(node):
    """Each file of the pydicom-data package, sent as-is in its own transfer syntax (pynetdicom).

    Several files share a SOP Instance UID (the same image in other encodings): each send
    replaces the stored file, so every file is compared right after its own send.
    Two files are broken on purpose and are refused and quarantined, as any malformed input:
    bad_sequence.dcm carries hex strings as UIDs (0xC002) and
    emri_small_jpeg_2k_lossless_too_short.dcm ends inside its pixel data (0xC000).
    """
    refused = {"bad_sequence.dcm": 0xC002, "emri_small_jpeg_2k_lossless_too_short.dcm": 0xC000}
    files = sorted(p for p in PYDICOM_DATA.glob("*.dcm"))
    assert len(files) >= 60
    items = [(p, *dataset_bytes(p)) for p in files]
    contexts = [(cls, ts) for _, cls, _, ts, _ in items]
    sent_series = {}
    with RawSender(node.port, contexts) as sender:
        for path, sop_class, sop, ts, data in items:
            status = sender.send(sop_class, sop, ts, data)
            if path.name in refused:
                assert status == refused[path.name], path.name
                continue
            assert status == 0x0000, (path.name, hex(status))
            with node.db.session() as s:
                inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
                series_uid = s.get(Series, inst.series_id).series_uid
            assert stored_dataset(inst.path) == data, path.name
            assert inst.transfer_syntax_uid == ts and inst.sop_class_uid == sop_class
            sent_series[series_uid] = dcmread(path, stop_before_pixels=True, force=True).get("Modality")
    with node.db.session() as s:
        quarantined = s.scalars(select(Quarantine)).all()
    for name, status in refused.items():
        data = dataset_bytes(PYDICOM_DATA / name)[3]
        assert any(q.status == status and Path(q.path).read_bytes().endswith(data) for q in quarantined), name

    listed = {row["series_uid"]: row for row in node.series_json()}
    assert set(sent_series) <= set(listed)
    for uid, modality in sent_series.items():
        assert listed[uid]["modality"] == modality and listed[uid]["instances"] >= 1
    assert set(sent_series.values()) >= {"MR", "CT", "US", "CR", "OT", "NM", "SEG"}


def test_non_mr_series_are_unrouted_by_the_completeness_tick(node):
    """Routing is the completeness module's: after the quiet period, non-MR series become unrouted."""
    import datetime as dt

    from node.intake.completeness import tick
    from node.settings import load_settings

    settings = load_settings(data_dir=node.data_dir)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    with node.db.session() as s:
        tick(s, settings, later)
    with node.db.session() as s:
        rows = s.execute(select(Series.modality, Series.state)).all()
    non_mr = [state for modality, state in rows if modality not in ("MR", None)]
    assert non_mr and set(non_mr) == {"unrouted"}


def _good_instance(sop_class=MRImageStorage) -> tuple[Dataset, bytes]:
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    ds.SOPClassUID = sop_class
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return ds, buf.getvalue()


def test_malformed_inputs_get_failure_statuses_and_are_quarantined(node):
    ds, good = _good_instance()
    no_study = Dataset()
    no_study.SOPClassUID, no_study.SOPInstanceUID, no_study.SeriesInstanceUID = (
        MRImageStorage,
        generate_uid(),
        generate_uid(),
    )
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    def encode(d: Dataset) -> bytes:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, d)
        return buf.getvalue()

    bad_uid = mr_dataset("1.2.3.abc", generate_uid(), 0)
    garbage = b"\0" * 128 + b"DICM" + os.urandom(2000)
    cases = [
        ("truncated in the pixel data", ds.SOPInstanceUID, good[: len(good) // 2], 0xC000),
        ("truncated in the header", ds.SOPInstanceUID, good[:100], 0xC000),
        ("garbage after a preamble", generate_uid(), garbage, 0xC000),
        ("missing Study Instance UID", no_study.SOPInstanceUID, encode(no_study), 0xC001),
        ("malformed Study Instance UID", bad_uid.SOPInstanceUID, encode(bad_uid), 0xC002),
        ("SOP Instance UID differs from the request", generate_uid(), good, 0xA900),
    ]
    with node.db.session() as s:
        before = s.scalar(select(func.count()).select_from(Quarantine))
    with RawSender(node.port, [(MRImageStorage, ExplicitVRLittleEndian)]) as sender:
        for label, sop, data, expected in cases:
            assert sender.send(MRImageStorage, sop, ExplicitVRLittleEndian, data) == expected, label
        # the same association still works for a valid object afterwards
        assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, good) == 0x0000
    with node.db.session() as s:
        rows = s.scalars(select(Quarantine).order_by(Quarantine.id)).all()[before:]
        assert s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
    assert [r.status for r in rows] == [c[3] for c in cases]
    for row, (label, sop, data, _) in zip(rows, cases):
        assert row.calling_ae == "PYNETSCU" and row.sop_instance_uid == sop and row.reason
        assert Path(row.path).read_bytes().endswith(data), label
        assert "Doe" not in row.reason and "PID0001" not in row.reason
    # the node keeps serving: C-ECHO and a later dcmtk send
    assert echo(node.port) == 0
    assert "Doe" not in node.log() and "PID0001" not in node.log()


def test_duplicate_is_idempotent_and_corrected_demographics_update_and_audit(node, tmp_path):
    study_uid, series_uid = generate_uid(), generate_uid()
    ds = mr_dataset(study_uid, series_uid, 0, name="Wrong^Name")
    first = tmp_path / "first.dcm"
    ds.save_as(first, enforce_file_format=True)
    assert storescu(node.port, [first]).returncode == 0
    assert storescu(node.port, [first]).returncode == 0  # identical resend: Success, nothing changes

    def state():
        with node.db.session() as s:
            study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
            inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
            audits = s.scalars(
                select(AuditEvent).where(AuditEvent.action == "demographics_updated", AuditEvent.entity_id == study_uid)
            ).all()
            return study, series, inst, audits

    study, series, inst, audits = state()
    assert study.patient_name == "Wrong^Name" and series.instances == 1 and audits == []
    assert inst.updated_at is None

    ds.PatientName = "Right^Name"
    ds.PatientBirthDate = "19710202"
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected, enforce_file_format=True)
    assert storescu(node.port, [corrected]).returncode == 0

    study, series, inst, audits = state()
    assert (study.patient_name, study.patient_birth_date) == ("Right^Name", "19710202")
    assert series.instances == 1 and inst.updated_at is not None
    assert stored_dataset(inst.path) == dataset_bytes(corrected)[3]
    assert len(audits) == 1
    audit = audits[0]
    assert audit.actor == "system" and audit.entity_type == "study"
    assert sorted(audit.details["fields"]) == ["patient_birth_date", "patient_name"]
    assert audit.details["sop_instance_uid"] == ds.SOPInstanceUID
    flat = " ".join(str(v) for v in (audit.old_value, audit.new_value, audit.reason, audit.details))
    flat = re.sub(r"\d+(?:\.\d+)+", "UID", flat)  # a random UID may hold the digits 1971
    assert "Name" not in flat.replace("patient_name", "") and "1971" not in flat


def test_charsets_are_honoured_when_indexing(node):
    """pydicom's character-set files (ISO-IR 100, 126, 127, 138, 144, 192, GB18030, ISO 2022 IR 13/87/149)."""
    charset_dir = Path(__import__("pydicom").__file__).parent / "data" / "charset_files"
    files = [
        p for p in sorted(charset_dir.glob("chr*.dcm")) if "StudyInstanceUID" in dcmread(p, stop_before_pixels=True)
    ]
    assert len(files) >= 14
    with RawSender(node.port, [(dataset_bytes(p)[0], dataset_bytes(p)[2]) for p in files]) as sender:
        for path in files:
            sop_class, sop, ts, data = dataset_bytes(path)
            assert sender.send(sop_class, sop, ts, data) == 0, path.name
            expected = dcmread(path)
            with node.db.session() as s:
                study = s.scalars(select(Study).where(Study.study_uid == expected.StudyInstanceUID)).one()
            assert study.patient_name == str(expected.PatientName), path.name
            charset = expected.SpecificCharacterSet
            assert study.specific_character_set == (charset if isinstance(charset, str) else "\\".join(charset))


def test_eight_concurrent_associations_lose_nothing(node, tmp_path):
    batches = [write_series(tmp_path / f"c{k}", n=12, size=64) for k in range(8)]
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda p=p: results.append(storescu(node.port, p))) for _, _, p in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    with node.db.session() as s:
        for _study_uid, series_uid, paths in batches:
            series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
            assert series.instances == 12 and series.open_associations == 0 and series.quiet_deadline is not None
            stored = s.scalars(select(Instance).where(Instance.series_id == series.id)).all()
            assert {i.sop_instance_uid for i in stored} == {dataset_bytes(p)[1] for p in paths}
            for inst in stored:
                assert Path(inst.path).exists()
            assoc = s.get(Association, stored[0].association_id)
            assert assoc.end_reason == "released" and assoc.instances == 12
    assert not list((node.data_dir / "store" / ".incoming").iterdir())


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC002])
def test_store_response_encoding_matches_pynetdicom(status):
    """The listener's hand-encoded C-STORE-RSP command set is byte-identical to pynetdicom's."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from node.receive.transport import encode_store_response

    sop = generate_uid()
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPInstanceUID, rsp.AffectedSOPClassUID, rsp.Status = (
        7,
        sop,
        MRImageStorage,
        status,
    )
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert encode_store_response(MRImageStorage, sop, 7, status) == encode(message.command_set, True, True)
