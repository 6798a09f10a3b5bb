"""A reader's answers reach the PACS as a TID 1500 SR that references the AI SR, valid per dciodvfy.

A seeded knee study whose AI SR is written by the real `node.results.build_results`; the reader
answers through `worklists.feedback`, marks the study read; `node.jobs.answers.send_answers`
writes the SR and queues it, and the real outbox sends it to a pynetdicom C-STORE SCP on localhost.
"""

from __future__ import annotations

import datetime as dt
import threading

import highdicom as hd
import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from support import web_seed as ws
from support.env import free_port, isolate_env
from support.results_data import assert_valid, knee_output, volume_from_files

pytestmark = pytest.mark.integration


class Scp:
    def __init__(self):
        self.port = free_port()
        self.received: list[pydicom.Dataset] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event):
        with self.lock:
            self.received.append(event.dataset)
        return 0x0000

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def scp():
    s = Scp()
    yield s
    s.stop()


def test_answers_of_a_read_study_are_sent_once_as_an_sr_referencing_the_ai_sr(tmp_path, monkeypatch, scp):
    isolate_env(monkeypatch, MSKNODE_DATA_DIR=tmp_path / "data")
    from node.db.database import Database
    from node.db.schema import OutboxItem, ResultObject
    from node.dispatch.outbox import process_outbox
    from node.jobs.answers import send_answers
    from node.results import build_results, save
    from node.settings import load_settings
    from worklists.entries import mark_read
    from worklists.feedback import Answer, record
    from worklists.triage import load_policy

    settings = load_settings(
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": scp.port, "name": "pacs"}], feedback_sr=True
    )
    settings.ensure_dirs()
    db = Database(settings.database_url)
    policy = load_policy(settings.triage_policy)
    st = ws.seed_study(
        db,
        settings,
        policy,
        findings=[
            ws.F("acl_tear", "Partial ACL tear", 0.98, 0.01, True, grade="partial"),
            ws.F("meniscal_tear", "No meniscal tear", 0.1, 0.05, False, model_name="knee.meniscus"),
        ],
        patient_name="MÜLLER^ANNA",
        with_seg=False,
        with_superres=False,
        outbox_states=(),
    )
    vol = volume_from_files(st.source_paths)
    (ai,) = [
        r
        for r in build_results(
            output=knee_output(vol),
            source_files={vol.series_uid: st.source_paths},
            triage=None,
            predecessors=[],
            settings=settings,
            job_fingerprint="answers-test",
        )
        if r.kind == "sr"
    ]
    ai_path = save(ai, settings)
    now = dt.datetime.now(dt.UTC)
    with db.session() as s:
        s.add(
            ResultObject(
                job_id=st.job_id,
                kind="sr",
                sop_class_uid=ai.sop_class_uid,
                sop_instance_uid=ai.sop_instance_uid,
                series_uid=ai.series_uid,
                path=str(ai_path),
            )
        )
        s.flush()
        record(
            s,
            study_id=st.study_id,
            actor="rob",
            answer=Answer(agree=False, answer="complete", comment="Stumpf retrahiert, Ödem"),
            now=now,
            key="acl_tear",
        )
        record(s, study_id=st.study_id, actor="rob", answer=Answer(agree=True), now=now, key="meniscal_tear")

    assert send_answers(db, settings, now=now) == []  # not read yet: the answers may still change
    with db.session() as s:
        mark_read(s, entry_id=st.entry_id, actor="rob", now=now)
    (uid,) = send_answers(db, settings, now=now)
    assert send_answers(db, settings, now=now) == []  # once

    with db.session() as s:
        ro = s.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == uid))
        assert ro.kind == "answers" and ro.job_id == st.job_id
        (item,) = s.scalars(select(OutboxItem).where(OutboxItem.result_object_id == ro.id)).all()
        assert (item.destination, item.state) == ("pacs", "pending")
        path = ro.path
    assert_valid(path, "answers SR")
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == st.study_uid and ds.SOPInstanceUID.startswith(settings.uid_root)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "MÜLLER^ANNA"
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [e.ReferencedSOPInstanceUID for e in evidence] == [ai.sop_instance_uid]
    sr = hd.sr.srread(path)
    observer = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Person Observer Name"]
    assert str(observer[0].PersonName) == "rob^"
    groups = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    groups = groups or [
        g
        for g in sr.ContentSequence[-1].ContentSequence
        if g.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"
    ]
    texts = []
    for g in groups:
        for i in g.ContentSequence:
            if i.ValueType == "TEXT":
                texts.append(i.TextValue)
            if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Tear extent":
                texts.append("grade " + i.ConceptCodeSequence[0].CodeMeaning)
    assert "Reader disagrees with the AI result (knee.acl 0.1.0: partial)" in texts
    assert "grade Complete" in texts and "Stumpf retrahiert, Ödem" in texts
    assert "Reader agrees with the AI result (knee.meniscus 0.1.0: none)" in texts

    report = process_outbox(db, settings, now=now)
    assert report is not None
    assert [str(d.SOPInstanceUID) for d in scp.received] == [uid]
    with db.session() as s:
        assert s.scalar(select(OutboxItem.state).where(OutboxItem.id == item.id)) == "sent"

    # read again after a change: a new SR with new UIDs, the first one stays as sent
    with db.session() as s:
        mark_read(s, entry_id=st.entry_id, actor="rob", now=now, read=False)
        record(s, study_id=st.study_id, actor="rob", answer=Answer(agree=True), now=now, key="acl_tear")
        mark_read(s, entry_id=st.entry_id, actor="rob", now=now)
    (second,) = send_answers(db, settings, now=now)
    assert second != uid
    db.dispose()
