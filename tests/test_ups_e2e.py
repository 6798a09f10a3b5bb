"""IHE AIW-I end to end: a UPS watcher (pynetdicom, a real AE with its own listening port) subscribes
globally to ``msknode listen``; dcmtk storescu sends a knee study; the production ``msknode worker``
routes it, runs the model pipeline and writes the SR. The watcher receives SCHEDULED → IN PROGRESS →
COMPLETED for that study's workitem over N-EVENT-REPORT, N-GET shows the SR in the Output
Information, C-FIND finds the workitem, an admin's reprioritisation through the web API changes the
UPS priority (seen by N-GET and by an event), and UPS-RS answers the search and retrieve with DICOM
JSON to an authenticated httpx client (401 without)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import warnings

import pytest
from pydicom import Dataset
from pynetdicom import AE, evt
from sqlalchemy import select

from node.db.schema import Job, ResultObject, Study
from support.env import free_port
from support.jobs import ListenerProcess, storescu, wait_for
from support.node_stack import NodeWorker, knee_study_files, node_env

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}


class Watcher:
    """A UPS Watch SCU and event receiver: its own AE listening for N-EVENT-REPORTs."""

    def __init__(self, ae_title: str, port: int):
        self.ae_title = ae_title
        self.port = port
        self.events: list[tuple[int, str, Dataset]] = []
        self.received_at: list[dt.datetime] = []
        self.lock = threading.Lock()
        self.server = None

    def start(self) -> Watcher:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(UPS_EVENT)

        def on_report(event):
            with self.lock:
                self.events.append(
                    (event.event_type, str(event.request.AffectedSOPInstanceUID), event.event_information)
                )
                self.received_at.append(dt.datetime.now(dt.UTC))
            return 0x0000, None

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def states(self, uid: str) -> list[str]:
        with self.lock:
            return [str(info.ProcedureStepState) for t, u, info in self.events if u == uid and t == 1]

    def priorities(self, uid: str) -> list[str]:
        with self.lock:
            return [str(info.ScheduledProcedureStepPriority) for t, u, info in self.events if u == uid and t == 1]

    def uids(self) -> list[str]:
        with self.lock:
            return list(dict.fromkeys(u for _, u, _ in self.events))


def _scu(port: int, *contexts: str):
    ae = AE(ae_title="WATCHER")
    for c in contexts:
        ae.add_requested_context(c)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
    assert assoc.is_established
    return assoc


def subscribe_globally(port: int, receiving_ae: str) -> int:
    assoc = _scu(port, UPS_WATCH)
    try:
        info = Dataset()
        info.ReceivingAE = receiving_ae
        info.DeletionLock = "FALSE"
        status, _ = assoc.send_n_action(info, 3, UPS_PUSH, GLOBAL_SUBSCRIPTION, meta_uid=UPS_WATCH)
        return int(status.Status)
    finally:
        assoc.release()


def n_get(port: int, uid: str) -> tuple[int, Dataset | None]:
    assoc = _scu(port, UPS_WATCH)
    try:
        status, ds = assoc.send_n_get([], UPS_PUSH, uid, meta_uid=UPS_WATCH)
        return int(status.Status), ds
    finally:
        assoc.release()


def c_find(port: int, **keys) -> list[Dataset]:
    query = Dataset()
    query.SOPInstanceUID = ""
    query.ProcedureStepState = ""
    query.ScheduledProcedureStepPriority = ""
    for k, v in keys.items():
        setattr(query, k, v)
    assoc = _scu(port, UPS_QUERY)
    try:
        out = []
        for status, identifier in assoc.send_c_find(query, UPS_QUERY):
            assert status is not None and int(status.Status) in (0x0000, 0xFF00, 0xFF01), status
            if int(status.Status) in (0xFF00, 0xFF01):
                out.append(identifier)
        return out
    finally:
        assoc.release()


@pytest.mark.parametrize("source", ["phantom", "realdata"])
def test_watcher_sees_a_real_study_scheduled_in_progress_completed_with_its_sr(settings, db, tmp_path, source):
    port, watch_port = free_port(), free_port()
    env = node_env(
        settings,
        port,
        MSKNODE_SWEEP_INTERVAL_SECONDS="0.3",
        MSKNODE_ACTIVATE_MODELS="all",  # results are written (no silent trial)
        MSKNODE_UPS_EVENT_RECEIVERS=json.dumps({"WATCHER": f"127.0.0.1:{watch_port}"}),
    )
    files = knee_study_files(source, tmp_path, 23)
    watcher = Watcher("WATCHER", watch_port).start()
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    worker = None
    try:
        listener.wait_ready(port)
        # an AE that is not a configured event receiver cannot subscribe (0xC308)
        assert subscribe_globally(port, "STRANGER") == 0xC308
        assert subscribe_globally(port, "WATCHER") == 0x0000
        worker = NodeWorker(env, tmp_path / "worker.log").start()
        assert storescu(port, files).wait(120) == 0

        def completed():
            for uid in watcher.uids():
                if "COMPLETED" in watcher.states(uid):
                    return uid
            return None

        try:
            uid = wait_for(completed, 400, interval=0.5, what="a COMPLETED event for the study's workitem")
        except AssertionError:
            print(worker.output()[-4000:])
            print(listener.output()[-2000:])
            raise
        states, priorities = watcher.states(uid), watcher.priorities(uid)
        changes = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
        assert changes == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
        # a repeated IN PROGRESS report announces a priority change while the job runs: its triage priority is
        # known once its findings are published (before super-resolution), and subscribers learn it then
        for i in range(1, len(states)):
            assert states[i] != states[i - 1] or priorities[i] != priorities[i - 1], (states, priorities)
        with watcher.lock:  # the running job's steps as UPS Progress Reports
            steps = [
                str(info.ProcedureStepProgressInformationSequence[0].ProcedureStepProgressDescription)
                for t, u, info in watcher.events
                if u == uid and t == 3
            ]
        assert steps and all(s.startswith("AI job step: ") for s in steps), steps

        with db.session() as s:
            job = s.scalars(select(Job)).one()
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == job.study_id))
            results = s.scalars(select(ResultObject).where(ResultObject.job_id == job.id)).all()
        sr = [r for r in results if r.kind == "sr"]
        assert job.state == "done" and len(sr) == 1
        with watcher.lock:
            completed_at = next(
                t
                for (kind, u, info), t in zip(watcher.events, watcher.received_at, strict=True)
                if u == uid and kind == 1 and info.ProcedureStepState == "COMPLETED"
            )
        print(
            f"COMPLETED reached the watcher {(completed_at - job.finished_at).total_seconds():.2f} s after the job was done"
        )

        # N-GET: COMPLETED, the input study, the SR (and every other result) in the Output Information
        status, ds = n_get(port, uid)
        assert status == 0x0000 and ds is not None
        assert ds.ProcedureStepState == "COMPLETED"
        assert "TransactionUID" not in ds
        assert ds.InputInformationSequence[0].StudyInstanceUID == study_uid
        performed = ds.UnifiedProcedureStepPerformedProcedureSequence[0]
        assert performed.PerformedProcedureStepEndDateTime
        outputs = {
            (r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
            for item in performed.OutputInformationSequence
            for r in item.ReferencedSOPSequence
        }
        assert {(r.sop_class_uid, r.sop_instance_uid) for r in results} == outputs
        assert sr[0].sop_class_uid in SR_CLASSES and (sr[0].sop_class_uid, sr[0].sop_instance_uid) in outputs
        priority = str(ds.ScheduledProcedureStepPriority)
        assert priority in ("HIGH", "MEDIUM", "LOW")

        # C-FIND over UPS finds it by state and by UID; a SCHEDULED search does not
        found = c_find(port, ProcedureStepState="COMPLETED")
        assert uid in {str(f.SOPInstanceUID) for f in found}
        assert [str(f.ProcedureStepState) for f in c_find(port, SOPInstanceUID=uid)] == ["COMPLETED"]
        assert uid not in {str(f.SOPInstanceUID) for f in c_find(port, ProcedureStepState="SCHEDULED")}

        # an admin reprioritises the study on the web: the UPS priority follows, the watcher hears it
        from node.web.app import create_app
        from node.web.users import add_user

        with db.session() as s:
            add_user(s, username="alice", password="alice-password-1", role="admin")
        app = create_app(settings, db)
        with TestClient(app) as client:
            token = client.post("/api/auth/token", json={"username": "alice", "password": "alice-password-1"}).json()[
                "access_token"
            ]
            auth = {"Authorization": f"Bearer {token}"}
            wl = client.get("/api/worklist", headers=auth).json()["entries"]
            entry = next(e for e in wl if e["study_id"] == job.study_id)
            target, expected = ("ROUTINE", "LOW") if priority != "LOW" else ("STAT", "HIGH")
            before = len(watcher.priorities(uid))
            r = client.post(
                f"/api/entries/{entry['entry_id']}/priority",
                json={"priority": target, "reason": "clinical question from the ward"},
                headers=auth,
            )
            assert r.status_code == 200, r.text
            status, ds = n_get(port, uid)
            assert status == 0x0000 and ds.ScheduledProcedureStepPriority == expected
            wait_for(lambda: len(watcher.priorities(uid)) > before, 30, what="the reprioritisation event")
            assert watcher.priorities(uid)[before:] == [expected] and watcher.states(uid)[-1] == "COMPLETED"

            # UPS-RS: search and retrieve, DICOM JSON, authenticated
            r = client.get("/ups-rs/workitems", params={"ProcedureStepState": "COMPLETED"}, headers=auth)
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
            items = r.json()
            mine = [i for i in items if i["00080018"]["Value"] == [uid]]
            assert len(mine) == 1
            assert mine[0]["00741000"]["Value"] == ["COMPLETED"]
            assert mine[0]["00741200"]["Value"] == [expected]
            assert "00081195" not in mine[0]
            r = client.get(f"/ups-rs/workitems/{uid}", headers=auth)
            assert r.status_code == 200
            (item,) = r.json()
            seq = item["00741216"]["Value"][0]["00404033"]["Value"]
            refs = {ref["00081155"]["Value"][0] for o in seq for ref in o["00081199"]["Value"]}
            assert sr[0].sop_instance_uid in refs
            assert (
                client.get("/ups-rs/workitems", params={"ProcedureStepState": "SCHEDULED"}, headers=auth).status_code
                == 204
            )
            from worklists.tables import AuditEvent

            with db.session() as s:
                seen = s.scalars(select(AuditEvent).where(AuditEvent.action.in_(("ups.search", "ups.view")))).all()
                assert {(e.actor, e.action) for e in seen} == {("alice", "ups.search"), ("alice", "ups.view")}
                assert uid in {e.entity_id for e in seen}
            assert client.get("/ups-rs/workitems").status_code == 401
            assert client.get(f"/ups-rs/workitems/{uid}").status_code == 401
    finally:
        if worker is not None:
            worker.stop(graceful=False)
        listener.stop()
        watcher.stop()
