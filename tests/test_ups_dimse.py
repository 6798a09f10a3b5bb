"""UPS over the wire, against an in-process listener (both transports): a peer's workitem created,
claimed, updated and completed by pynetdicom with the PS3.4 CC statuses; the node's own workitem
refused to a peer; the AE-title allow-list applies to UPS associations; N-EVENT-REPORTs reach a
real watcher AE, and when the watcher is down they wait and then arrive in order."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from pydicom import Dataset
from pynetdicom import AE, evt
from sqlalchemy import select

from node.db.schema import UpsEvent
from support.env import free_port
from support.jobs import make_study_job
from support.listener import in_process_listener

pytestmark = pytest.mark.integration

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
WATCHER = "WATCHER"


@pytest.fixture(params=[True, False], ids=["fast", "stock"])
def node(settings, request):
    """An in-process listener on a free loopback port that knows the watcher's address."""
    settings.allowed_ae_titles = ["RIS", "PERFORMER", WATCHER]
    settings.ups_event_receivers = {WATCHER: f"127.0.0.1:{free_port()}"}
    with in_process_listener(settings, fast=request.param) as listener:
        yield listener


def _assoc(port: int, calling: str, *contexts: str):
    ae = AE(ae_title=calling)
    for c in contexts:
        ae.add_requested_context(c)
    return ae.associate("127.0.0.1", port, ae_title="MSKNODE")


def _status(rsp) -> int:
    return int(rsp[0].Status)


def test_a_peers_workitem_over_dimse(node, settings):
    port = settings.port
    assoc = _assoc(port, "RIS", UPS_PUSH, UPS_PULL)
    assert assoc.is_established
    uid = "1.2.826.0.1.3680043.10.1447.99.8.1"
    tx = "1.2.826.0.1.3680043.10.1447.99.8.2"
    try:
        ds = Dataset()
        ds.ProcedureStepState = "SCHEDULED"
        ds.ScheduledProcedureStepPriority = "LOW"
        ds.ProcedureStepLabel = "second read"
        ds.PatientName = "Doe^Jane"
        status, created = assoc.send_n_create(ds, UPS_PUSH, uid)
        assert int(status.Status) == 0x0000 and created.ProcedureStepState == "SCHEDULED"
        assert _status(assoc.send_n_create(ds, UPS_PUSH, uid)) == 0x0111  # duplicate
        claim = Dataset()
        claim.ProcedureStepState = "IN PROGRESS"
        claim.TransactionUID = tx
        assert _status(assoc.send_n_action(claim, 1, UPS_PUSH, uid, meta_uid=UPS_PULL)) == 0x0000
        assert _status(assoc.send_n_action(claim, 1, UPS_PUSH, uid, meta_uid=UPS_PULL)) == 0xC302
        mods = Dataset()
        mods.TransactionUID = tx
        mods.ScheduledProcedureStepPriority = "HIGH"
        item = Dataset()
        item.PerformedProcedureStepEndDateTime = "20261203090000"
        mods.UnifiedProcedureStepPerformedProcedureSequence = [item]
        assert _status(assoc.send_n_set(mods, UPS_PUSH, uid, meta_uid=UPS_PULL)) == 0x0000
        done = Dataset()
        done.ProcedureStepState = "COMPLETED"
        done.TransactionUID = "1.2.3.4"
        assert _status(assoc.send_n_action(done, 1, UPS_PUSH, uid, meta_uid=UPS_PULL)) == 0xC301
        done.TransactionUID = tx
        assert _status(assoc.send_n_action(done, 1, UPS_PUSH, uid, meta_uid=UPS_PULL)) == 0x0000
        status, got = assoc.send_n_get([0x00741000, 0x00741200, 0x00081195], UPS_PUSH, uid, meta_uid=UPS_PULL)
        assert int(status.Status) == 0x0000
        assert (got.ProcedureStepState, got.ScheduledProcedureStepPriority) == ("COMPLETED", "HIGH")
        assert "TransactionUID" not in got
        assert _status(assoc.send_n_get([], UPS_PUSH, "1.2.3.999", meta_uid=UPS_PULL)) == 0xC307
    finally:
        assoc.release()


def test_the_nodes_own_workitem_is_read_only_to_peers_and_strangers_are_rejected(node, settings, db):
    from node.ups.events import run_round
    from node.ups.workitems import UpsWorkitem

    make_study_job(db)
    run_round(db, settings)
    with db.session() as s:
        uid = s.scalar(select(UpsWorkitem.sop_instance_uid))
    assoc = _assoc(settings.port, "PERFORMER", UPS_PULL)
    try:
        claim = Dataset()
        claim.ProcedureStepState = "IN PROGRESS"
        claim.TransactionUID = "1.2.3.4"
        assert _status(assoc.send_n_action(claim, 1, UPS_PUSH, uid, meta_uid=UPS_PULL)) == 0x0124
        cancel = Dataset()
        cancel.ReasonForCancellation = "ordered by mistake"
        assert _status(assoc.send_n_action(cancel, 2, UPS_PUSH, uid, meta_uid=UPS_PULL)) == 0xC313
        query = Dataset()
        query.SOPInstanceUID = ""
        query.ProcedureStepState = "SCHEDULED"
        found = [ident for st, ident in assoc.send_c_find(query, UPS_PULL) if st and int(st.Status) == 0xFF00]
        assert [str(f.SOPInstanceUID) for f in found] == [uid]
    finally:
        assoc.release()
    stranger = _assoc(settings.port, "STRANGER", UPS_WATCH)
    assert stranger.is_rejected  # the listener's AE-title allow-list holds for UPS too


class _Watcher:
    def __init__(self, port: int):
        self.port = port
        self.got: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = None

    def start(self):
        ae = AE(ae_title=WATCHER)
        ae.add_supported_context(UPS_EVENT)

        def on_report(event):
            with self.lock:
                info = event.event_information
                self.got.append((str(event.request.AffectedSOPInstanceUID), str(info.ProcedureStepState)))
            return 0x0000, None

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
        )
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()


def test_events_wait_for_a_watcher_that_is_down_and_then_arrive_in_order(node, settings, db):
    from node.db.schema import Job
    from node.ups.events import deliver, parse_address, run_round

    assoc = _assoc(settings.port, WATCHER, UPS_WATCH)
    info = Dataset()
    info.ReceivingAE = WATCHER
    info.DeletionLock = "FALSE"
    assert _status(assoc.send_n_action(info, 3, UPS_PUSH, GLOBAL_SUBSCRIPTION, meta_uid=UPS_WATCH)) == 0x0000
    assoc.release()

    job_id = make_study_job(db)
    run_round(db, settings)  # SCHEDULED: the watcher is down, the event stays
    with db.session() as s:
        job = s.get(Job, job_id)
        job.state, job.attempts = "done", 1
    now = dt.datetime.now(dt.UTC)
    run_round(db, settings, now)  # IN PROGRESS and COMPLETED queued behind it
    with db.session() as s:
        rows = s.scalars(select(UpsEvent).order_by(UpsEvent.id)).all()
        assert [r.state for r in rows] == ["pending"] * 3
        assert rows[0].attempts >= 1 and "not established" in (rows[0].last_error or "")

    watcher = _Watcher(parse_address(settings.ups_event_receivers[WATCHER])[1]).start()
    try:
        assert deliver(db, settings, now=now + dt.timedelta(minutes=10)) == 3
        with db.session() as s:
            uid = s.scalar(select(UpsEvent.workitem_uid))
        assert watcher.got == [(uid, "SCHEDULED"), (uid, "IN PROGRESS"), (uid, "COMPLETED")]
        assert deliver(db, settings, now=now + dt.timedelta(minutes=20)) == 0  # nothing twice
    finally:
        watcher.stop()


def test_on_postgresql_two_housekeeping_workers_make_one_workitem_and_one_event_per_change(settings, postgres_url):
    """Two workers' rounds at once: the second insert of a job's workitem waits for the first and meets
    its unique UID (that round skips it in a savepoint and goes on, no error, nothing rolled back), and a
    transition made by one worker is not made again by the other."""
    from node.db.database import Database
    from node.db.schema import Job, UpsSubscription, UpsWorkitem
    from node.ups.events import forget_old_events
    from node.ups.workitems import sync

    def in_thread(session, now):
        out: dict[str, object] = {}

        def run():
            try:
                out["n"] = sync(session, settings, now)
                session.commit()
            except Exception as e:
                session.rollback()
                out["error"] = e

        t = threading.Thread(target=run)
        t.start()
        return t, out

    db = Database(postgres_url)
    try:
        with db.session() as s:
            s.add(UpsSubscription(ae_title=WATCHER, workitem_uid=None, deletion_lock=False))
        job_id = make_study_job(db)
        now = dt.datetime.now(dt.UTC)
        for round_ in ("create", "start"):
            a, b = db.sessions(), db.sessions()
            try:
                assert sync(a, settings, now) == 1
                t, out = in_thread(b, now)
                t.join(1.0)
                assert t.is_alive()  # waits for the first worker's uncommitted row
                a.commit()
                t.join(20)
                assert not t.is_alive()
                # the second round skips what the first made: no error, nothing rolled back, nothing made twice
                assert out == {"n": 0}
                if round_ == "create":
                    with db.session() as s:
                        job = s.get(Job, job_id)
                        job.state, job.attempts = "processing", 1
            finally:
                a.close()
                b.close()
        with db.session() as s:
            assert [w.state for w in s.scalars(select(UpsWorkitem))] == ["IN PROGRESS"]
            states = [e.info["00741000"]["Value"][0] for e in s.scalars(select(UpsEvent).order_by(UpsEvent.id))]
            assert states == ["SCHEDULED", "IN PROGRESS"]
            for e in s.scalars(select(UpsEvent)):
                e.state, e.created_at = "sent", now - dt.timedelta(days=8)
        assert forget_old_events(db, now) == 2
    finally:
        db.dispose()
