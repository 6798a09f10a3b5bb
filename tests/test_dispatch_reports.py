"""The ``hl7`` and ``fhir`` destinations against real receivers in their own processes: an MLLP listener
(hl7apy's MLLPServer, validating every ORU^R01 against HL7 2.5.1 and answering ACKs) and an HTTP FHIR
server (validating each transaction Bundle with the FHIR models and storing it). A real job is stored
by the job runner (`execute_job`), so the outbox rows are the ones production makes; the receivers are
down at first, and the outbox delivers once they are up, once per study."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy import select

from node.db.schema import Job, OutboxItem, Study
from node.dispatch.outbox import list_items, process_outbox
from node.jobs.runner import JobProducts, ResultRecord, execute_job, findings_from_output, model_versions_of
from node.results import build_results, save
from node.settings import DimseDestination, FhirDestination, Hl7Destination
from support.env import TESTS, free_port
from support.results_data import knee_output, volume_from_files, write_mr_series
from support.servers import track, untrack

pytestmark = [pytest.mark.integration]

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
EVALUATION_VALUES = {"52101004", "272519000", "373121007"}  # Present, Absent, Not Evaluated (SCT)


class Receiver:
    """One receiver script of tests/support run as a child process on a free port (stopped by `stop`)."""

    def __init__(self, script: str, store: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.store = store
        self.script, self.args = script, args
        self.proc: subprocess.Popen | None = None
        self.token: int | None = None

    def start(self) -> Receiver:
        ready = self.store.parent / f"{self.store.name}.ready"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, str(TESTS / "support" / self.script), "--port", str(self.port)]
        cmd += ["--store", str(self.store), "--ready", str(ready), *self.args]
        self.proc = subprocess.Popen(cmd)
        self.token = track(f"{self.script}:{self.port}", self.stop)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.script} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        untrack(self.token)
        self.token = None

    def received(self, pattern: str) -> list[Path]:
        return sorted(self.store.glob(pattern)) if self.store.exists() else []


@pytest.fixture(scope="module")
def knee_results(tmp_path_factory):
    """One knee job's output and its result objects (SR, SEG, SC, super-resolved MR) written once."""
    from node.settings import Settings

    tmp = tmp_path_factory.mktemp("report-results")
    settings = Settings(data_dir=tmp / "data")
    paths = write_mr_series(tmp / "src", n_slices=4, patient_name="Doe^Jane", patient_id="PID-0042")
    vol = volume_from_files(paths)
    output = knee_output(vol)
    results = build_results(
        output=output,
        source_files={vol.series_uid: paths},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="report-tests",
    )
    return vol, output, [(r, save(r, settings)) for r in results]


def run_job(db, settings, knee_results) -> int:
    """A study and a queued job, run by the job runner; returns the job id."""
    vol, output, results = knee_results
    with db.session() as s:
        study = Study(
            study_uid=vol.study_uid,
            patient_id="PID-0042",
            patient_name="Doe^Jane",
            patient_birth_date="19800101",
            patient_sex="F",
            accession_number="ACC-7",
            study_date="20240131",
            study_time="101112",
        )
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, pipeline="knee", state="queued", enqueue_pending=False)
        s.add(job)
        s.flush()
        job_id = job.id

    def runner(ctx, steps):
        return JobProducts(
            findings=findings_from_output(output),
            results=[ResultRecord(r.kind, r.sop_class_uid, r.sop_instance_uid, r.series_uid, p) for r, p in results],
            model_versions=model_versions_of(output),
        )

    outcome = execute_job(db, settings, job_id, runner=runner, finalizers=[])
    assert outcome.state == "done", outcome
    return job_id


def outbox(db, dest_key: str) -> list[OutboxItem]:
    with db.session() as s:
        rows = list(s.scalars(select(OutboxItem).where(OutboxItem.destination == dest_key)))
        s.expunge_all()
        return rows


def sr_evaluations(sr_path: Path) -> set[tuple[tuple[str, str], tuple[str, str]]]:
    """(finding code, Present/Absent/Not Evaluated code) pairs of the SR's qualitative evaluations."""
    out = set()

    def walk(items):
        for it in items:
            if it.ValueType == "CODE" and it.ConceptCodeSequence[0].CodeValue in EVALUATION_VALUES:
                name, value = it.ConceptNameCodeSequence[0], it.ConceptCodeSequence[0]
                out.add(
                    (
                        (str(name.CodeValue), str(name.CodingSchemeDesignator)),
                        (str(value.CodeValue), str(value.CodingSchemeDesignator)),
                    )
                )
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(pydicom.dcmread(sr_path).ContentSequence)
    return out


def sr_path_of(knee_results) -> Path:
    return next(p for r, p in knee_results[2] if r.kind == "sr")


# ---- HL7 v2 ORU^R01 over MLLP -----------------------------------------------------------------------


def test_one_oru_per_study_reaches_a_listener_that_was_down(settings, db, knee_results, tmp_path):
    rx = Receiver("hl7_receiver.py", tmp_path / "hl7")
    hl7 = Hl7Destination(type="hl7", name="ris", host="127.0.0.1", port=rx.port, timeout=10)
    pacs = DimseDestination(ae_title="PACS", host="127.0.0.1", port=free_port(), name="pacs")
    s = settings.model_copy(update={"destinations": [hl7, pacs]})
    try:
        run_job(db, s, knee_results)
        # the PACS gets every result object, the RIS one report (hung on the SR)
        assert len(outbox(db, "pacs")) == len(knee_results[2])
        (item,) = outbox(db, "ris")
        sr_uid = next(r.sop_instance_uid for r, _p in knee_results[2] if r.kind == "sr")
        with db.session() as ses:  # the PACS is not part of this test
            ses.execute(OutboxItem.__table__.delete().where(OutboxItem.destination == "pacs"))

        # the listener is down: retried with backoff, nothing lost
        rep = process_outbox(db, s.model_copy(update={"destinations": [hl7]}), now=T0)
        assert (rep.claimed, rep.sent, rep.retrying, rep.dead) == (1, 0, 1, 0)
        (item,) = outbox(db, "ris")
        assert item.state == "pending" and "connection refused" in (item.last_error or "")
        assert process_outbox(db, s, now=T0 + dt.timedelta(seconds=1)).claimed == 0  # backoff not over

        rx.start()
        only_hl7 = s.model_copy(update={"destinations": [hl7]})
        rep = process_outbox(db, only_hl7, now=T0 + dt.timedelta(seconds=6))
        assert (rep.sent, rep.retrying, rep.dead) == (1, 0, 0), rep.errors
        assert process_outbox(db, only_hl7, now=T0 + dt.timedelta(days=1)).claimed == 0
        time.sleep(0.2)
        files = rx.received("*.hl7")
        assert [f.name for f in files] == ["0001.hl7"]  # one ORU for the study, none invalid, no repeat
        (item,) = outbox(db, "ris")
        assert item.state == "sent" and item.attempts == 2
        with db.session() as ses:  # what `msknode outbox --json` and the web admin list
            (row,) = [r for r in list_items(ses) if r["destination"] == "ris"]
        assert (row["state"], row["kind"], row["sop_instance_uid"]) == ("sent", "sr", sr_uid)

        er7 = files[0].read_bytes().decode("utf-8")  # CR-separated segments, no newline translation
        msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT)
        assert msg.validate()
        assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_12.to_er7() == "2.5.1"
        assert msg.msh.msh_10.to_er7() == f"MSK{item.id}"
        segs: dict[str, str] = {}
        for line in filter(None, er7.split("\r")):
            segs.setdefault(line.split("|")[0], line)  # the first of each kind
        pid = segs["PID"].split("|")
        assert pid[3].split("^")[0] == "PID-0042" and pid[5] == "Doe^Jane" and pid[8] == "F"
        obr = segs["OBR"].split("|")
        assert obr[3].split("^")[0] == sr_uid and obr[18] == "ACC-7" and obr[25] == "F"
        assert "Not for diagnostic use" in segs["NTE"]

        lines = [x.split("|") for x in er7.split("\r") if x.startswith("OBX|")]
        findings = [x for x in lines if x[2] == "CWE"]
        ora = {(tuple(x[3].split("^")[::2]), tuple(x[5].split("^")[::2])) for x in findings}
        # one OBX per finding, with the same codes (finding, Present/Absent/Not Evaluated) as the SR
        assert len(findings) == len(ora) == 2
        assert ora == sr_evaluations(sr_path_of(knee_results))
        assert {x[18] for x in findings} == {"knee.acl 0.1.0^MSKNODE", "knee.meniscus 0.1.0^MSKNODE"}
        acl = next(x for x in findings if x[3].startswith("444798002^"))
        assert acl[5].startswith("52101004^Present^SCT") and acl[8] == "A"
        notes = [x for x in er7.split("\r") if x.startswith("NTE|")]
        assert any("ab" * 32 in n and "probability 0.91" in n for n in notes)  # weights hash, probability
        assert any("knee.meniscus" in n and "not evaluated" in n for n in notes)
        uid_obx = next(x for x in lines if x[2] == "ST")
        assert uid_obx[3] == "110180^Study Instance UID^DCM" and uid_obx[5] == knee_results[0].study_uid
    finally:
        rx.stop()


def test_ack_ae_is_retried_and_ar_is_dead_lettered(settings, db, knee_results, tmp_path):
    rx = Receiver("hl7_receiver.py", tmp_path / "hl7", "--answers", "AE,AA").start()
    try:
        hl7 = Hl7Destination(type="hl7", name="ris", host="127.0.0.1", port=rx.port, timeout=10)
        s = settings.model_copy(update={"destinations": [hl7]})
        run_job(db, s, knee_results)
        rep = process_outbox(db, s, now=T0)
        assert (rep.sent, rep.retrying) == (0, 1)
        (item,) = outbox(db, "ris")
        assert item.state == "pending" and "ACK AE" in (item.last_error or "")
        rep = process_outbox(db, s, now=T0 + dt.timedelta(seconds=6))
        assert rep.sent == 1
        sent = rx.received("0*.hl7")
        assert len(sent) == 2  # the same message twice (AE then AA), with the same control ID
        assert len({f.read_bytes().decode().split("\r")[0].split("|")[9] for f in sent}) == 1
    finally:
        rx.stop()

    rx2 = Receiver("hl7_receiver.py", tmp_path / "hl7-ar", "--answers", "AR").start()
    try:
        hl7 = Hl7Destination(type="hl7", name="ris2", host="127.0.0.1", port=rx2.port, timeout=10)
        s2 = settings.model_copy(update={"destinations": [hl7]})
        with db.session() as ses:
            ses.execute(OutboxItem.__table__.delete())
            ses.execute(Job.__table__.delete())
            ses.execute(Study.__table__.delete())
        run_job(db, s2, knee_results)
        rep = process_outbox(db, s2, now=T0)
        assert (rep.sent, rep.retrying, rep.dead) == (0, 0, 1)
        (item,) = outbox(db, "ris2")
        assert item.state == "dead" and "ACK AR" in (item.last_error or "")
    finally:
        rx2.stop()


def test_no_answer_within_the_timeout_is_retried(settings, db, knee_results):
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts the connection (kernel backlog) and never answers
    try:
        hl7 = Hl7Destination(type="hl7", name="ris", host="127.0.0.1", port=srv.getsockname()[1], timeout=1)
        s = settings.model_copy(update={"destinations": [hl7]})
        run_job(db, s, knee_results)
        started = time.monotonic()
        rep = process_outbox(db, s, now=T0)
        assert time.monotonic() - started < 5
        assert rep.retrying == 1
        (item,) = outbox(db, "ris")
        assert "no ACK within 1 s" in (item.last_error or "")
    finally:
        srv.close()


# ---- FHIR R4 transaction bundle ---------------------------------------------------------------------


def test_one_bundle_per_study_reaches_a_fhir_server_that_was_down(settings, db, knee_results, tmp_path):
    rx = Receiver("fhir_receiver.py", tmp_path / "fhir", "--fail", "1")
    fhir = FhirDestination(type="fhir", name="ehr", url=f"http://127.0.0.1:{rx.port}/fhir", timeout=10)
    s = settings.model_copy(update={"destinations": [fhir]})
    try:
        run_job(db, s, knee_results)
        (item,) = outbox(db, "ehr")
        rep = process_outbox(db, s, now=T0)  # the server is down
        assert rep.retrying == 1
        assert "ConnectError" in (outbox(db, "ehr")[0].last_error or "")

        rx.start()
        rep = process_outbox(db, s, now=T0 + dt.timedelta(seconds=6))  # up, but answers 503 first
        assert rep.retrying == 1 and "HTTP 503" in (outbox(db, "ehr")[0].last_error or "")
        rep = process_outbox(db, s, now=T0 + dt.timedelta(seconds=20))
        assert rep.sent == 1, rep.errors
        assert process_outbox(db, s, now=T0 + dt.timedelta(days=1)).claimed == 0
        (item,) = outbox(db, "ehr")
        assert item.state == "sent" and item.attempts == 3

        bodies = rx.received("0*.json")
        assert len(bodies) == 2  # the 503 and the stored one
        created = json.loads((rx.store / "created.json").read_text())
        assert sorted(k.split("?")[0] for k in created) == ["DiagnosticReport", "Observation", "Observation"]

        bundle = json.loads(bodies[-1].read_text())
        assert bundle["type"] == "transaction"
        res = [e["resource"] for e in bundle["entry"]]
        (report,) = [r for r in res if r["resourceType"] == "DiagnosticReport"]
        observations = [r for r in res if r["resourceType"] == "Observation"]
        sr_uid = next(r.sop_instance_uid for r, _p in knee_results[2] if r.kind == "sr")
        assert report["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"}
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{knee_results[0].study_uid}"
        assert {r["reference"] for r in report["result"]} == {
            e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
        }
        assert report["subject"]["identifier"]["value"] == "PID-0042"
        assert "Not for diagnostic use" in report["conclusion"]
        scheme = {"http://snomed.info/sct": "SCT", "urn:msknode:codesystem:99MSKNODE": "99MSKNODE"}
        pairs = {
            (
                (o["code"]["coding"][0]["code"], scheme[o["code"]["coding"][0]["system"]]),
                (
                    o["valueCodeableConcept"]["coding"][0]["code"],
                    scheme[o["valueCodeableConcept"]["coding"][0]["system"]],
                ),
            )
            for o in observations
        }
        assert pairs == sr_evaluations(sr_path_of(knee_results))
        acl = next(o for o in observations if o["code"]["coding"][0]["code"] == "444798002")
        prob = next(c for c in acl["component"] if c["code"]["coding"][0]["code"] == "122157")
        assert prob["valueQuantity"]["value"] == pytest.approx(0.91)
        assert "ab" * 32 in acl["device"]["display"] and acl["interpretation"][0]["coding"][0]["code"] == "A"
    finally:
        rx.stop()


def test_a_bundle_sent_again_creates_nothing_twice(settings, db, knee_results, tmp_path):
    """A repeat (an answer lost after the server stored the bundle) is a conditional create: no duplicates."""
    from node.dispatch.fhir import build_bundle, post_bundle, response_outcome
    from node.dispatch.reports import load_report

    rx = Receiver("fhir_receiver.py", tmp_path / "fhir").start()
    try:
        fhir = FhirDestination(type="fhir", name="ehr", url=f"http://127.0.0.1:{rx.port}/fhir", timeout=10)
        s = settings.model_copy(update={"destinations": [fhir]})
        run_job(db, s, knee_results)
        report = load_report(s, next(r.sop_instance_uid for r, _p in knee_results[2] if r.kind == "sr"))
        assert report is not None
        first, again = build_bundle(report, fhir), build_bundle(report, fhir)
        assert first == again  # the same bundle on every attempt (fullUrls derived from the SR)
        for b in (first, again):
            status, body = post_bundle(fhir, b)
            assert response_outcome(status, body).ok
        created = json.loads((rx.store / "created.json").read_text())
        assert len(created) == 3
        # a bundle the server refuses (400) is dead at once, not retried
        bad = dict(first, type="batch-response-nonsense")
        status, body = post_bundle(fhir, bad)
        out = response_outcome(status, body)
        assert status == 400 and out.permanent and not out.ok
    finally:
        rx.stop()
