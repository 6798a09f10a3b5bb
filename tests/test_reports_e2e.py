"""HL7 and FHIR end to end: dcmtk storescu sends a knee study (a phantom, and the real MRI corpus's
Siemens knee series when it is present) to ``msknode listen``; the production
``msknode worker`` routes it, runs the model pipeline, writes the SR and sends the report to an ``hl7``
and a ``fhir`` destination whose receivers (real processes: an MLLP listener and an HTTP FHIR server,
tests/support) are down until the job is done. The outbox keeps retrying; once they are up, each gets
exactly one message for the study (an ORU^R01 with the SR's codes, ACKed; a valid transaction bundle)
and no repeat follows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from test_dispatch_reports import Receiver, sr_evaluations

from node.db.schema import Job, OutboxItem, ResultObject, Study
from support.env import free_port
from support.jobs import ListenerProcess, storescu, wait_for
from support.node_stack import NodeWorker, knee_study_files, node_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _items(db) -> dict[str, tuple[str, int, str | None]]:
    with db.session() as s:
        return {i.destination: (i.state, i.attempts, i.last_error) for i in s.scalars(select(OutboxItem))}


@pytest.mark.parametrize("source", ["phantom", "realdata"])
def test_a_processed_study_reaches_ris_and_ehr_once_after_they_come_up(settings, db, tmp_path, source):
    """``realdata``: the real Siemens sagittal PD-FS knee series (skipped when the corpus is absent)."""
    port = free_port()
    mllp = Receiver("hl7_receiver.py", tmp_path / "hl7")
    fhir = Receiver("fhir_receiver.py", tmp_path / "fhir")
    destinations = [
        {"type": "hl7", "name": "ris", "host": "127.0.0.1", "port": mllp.port, "timeout": 10},
        {"type": "fhir", "name": "ehr", "url": f"http://127.0.0.1:{fhir.port}/fhir", "timeout": 10},
    ]
    env = node_env(
        settings,
        port,
        MSKNODE_SWEEP_INTERVAL_SECONDS="0.3",
        MSKNODE_LISTENER_PROCESSES="1",
        MSKNODE_ACTIVATE_MODELS="all",  # results are written (no silent trial)
        MSKNODE_DESTINATIONS=json.dumps(destinations),
    )
    paths = knee_study_files(source, tmp_path, 31)
    patient_id = str(pydicom.dcmread(paths[0], stop_before_pixels=True).PatientID)
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    worker = None
    try:
        listener.wait_ready(port)
        worker = NodeWorker(env, tmp_path / "worker.log").start()
        assert storescu(port, paths).wait(120) == 0

        def tried_once():
            items = _items(db)
            return len(items) == 2 and all(att >= 1 for _st, att, _e in items.values())

        try:
            wait_for(tried_once, 400, interval=0.5, what="both reports tried once while the receivers are down")
        except AssertionError:
            print(worker.output()[-4000:])
            raise
        items = _items(db)
        assert {st for st, _a, _e in items.values()} == {"pending"}, items  # waiting to be retried, not dead
        assert "connection refused" in (items["ris"][2] or "")
        assert "ConnectError" in (items["ehr"][2] or "")

        mllp.start()
        fhir.start()

        def delivered():
            return {st for st, _a, _e in _items(db).values()} == {"sent"}

        wait_for(delivered, 120, interval=0.5, what="both reports delivered once the receivers are up")
        time.sleep(3)  # a few more outbox rounds: nothing is sent again
        assert len(mllp.received("0*.hl7")) == 1 and not mllp.received("invalid-*")
        assert len(fhir.received("0*.json")) == 1

        with db.session() as s:
            job = s.scalars(select(Job)).one()
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == job.study_id))
            sr = s.scalars(select(ResultObject).where(ResultObject.job_id == job.id, ResultObject.kind == "sr")).one()
            sr_path, sr_uid = Path(sr.path), sr.sop_instance_uid
        if not sr_path.is_absolute():
            sr_path = settings.data_dir / sr_path
        expected = sr_evaluations(sr_path)
        assert expected  # the pipeline evaluated something

        er7 = mllp.received("0*.hl7")[0].read_bytes().decode("utf-8")
        segs = [line.split("|") for line in er7.split("\r") if line]
        pid = next(s for s in segs if s[0] == "PID")
        assert pid[3].split("^")[0] == patient_id
        assert next(s for s in segs if s[0] == "OBR")[3].split("^")[0] == sr_uid
        findings = [s for s in segs if s[0] == "OBX" and s[2] == "CWE"]
        assert {(tuple(s[3].split("^")[::2]), tuple(s[5].split("^")[::2])) for s in findings} == expected
        assert next(s for s in segs if s[0] == "OBX" and s[2] == "ST")[5] == study_uid

        bundle = json.loads(fhir.received("0*.json")[0].read_text())
        report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
        assert report["identifier"][0]["value"] == f"urn:oid:{sr_uid}"
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
        assert len(report["result"]) == len(findings)
    finally:
        if worker is not None:
            worker.stop(graceful=False)
        listener.stop(graceful=False)
        mllp.stop()
        fhir.stop()
