"""UPS workitems in process: the state machine following real job rows, the events queued per
subscriber, priorities following the worklist, the rules a peer's requests meet (PS3.4 CC statuses),
C-FIND / UPS-RS matching and the setting of known event receivers."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom import Dataset
from sqlalchemy import select

from node.db.schema import Job, ResultObject, Study, UpsEvent, UpsSubscription, UpsWorkitem
from support.jobs import make_study_job

pytestmark = pytest.mark.unit

NOW = dt.datetime.now(dt.UTC)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _sync(db, settings, now=NOW) -> int:
    from node.ups.workitems import sync

    with db.session() as s:
        return sync(s, settings, now)


def _workitems(db) -> list[UpsWorkitem]:
    with db.session() as s:
        return list(s.scalars(select(UpsWorkitem).order_by(UpsWorkitem.id)))


def _events(db, ae: str = "WATCHER") -> list[tuple[str, str, str]]:
    with db.session() as s:
        rows = s.scalars(select(UpsEvent).where(UpsEvent.ae_title == ae).order_by(UpsEvent.id)).all()
        return [
            (r.workitem_uid, r.info["00741000"]["Value"][0], r.info["00741200"]["Value"][0])
            for r in rows
            if r.event_type == 1
        ]


def _set_job(db, job_id: int, **values) -> None:
    with db.session() as s:
        job = s.get(Job, job_id)
        for k, v in values.items():
            setattr(job, k, v)


def _subscribe_all(db, ae: str = "WATCHER") -> None:
    with db.session() as s:
        s.add(UpsSubscription(ae_title=ae, workitem_uid=None, deletion_lock=False))


def _add_result(db, job_id: int, uid: str) -> None:
    with db.session() as s:
        s.add(
            ResultObject(
                job_id=job_id, kind="sr", sop_class_uid=SR_CLASS, sop_instance_uid=uid, series_uid=uid + ".1", path="x"
            )
        )


def test_a_job_is_scheduled_in_progress_completed_with_its_inputs_and_results(db, settings):
    from node.ups.workitems import dataset_of

    _subscribe_all(db)
    job_id = make_study_job(db, n_series=2, instances=2)
    assert _sync(db, settings) == 1
    (w,) = _workitems(db)
    ds = dataset_of(w)
    with db.session() as s:
        study_uid = s.scalar(select(Study.study_uid))
    assert (w.state, w.priority, w.job_id) == ("SCHEDULED", "LOW", job_id)
    assert ds.ProcedureStepState == "SCHEDULED" and ds.InputReadinessState == "READY"
    assert [i.StudyInstanceUID for i in ds.InputInformationSequence] == [study_uid, study_uid]
    assert sum(len(i.ReferencedSOPSequence) for i in ds.InputInformationSequence) == 4
    assert _sync(db, settings) == 0  # nothing changed, nothing announced twice

    _set_job(db, job_id, state="processing", attempts=1)
    _sync(db, settings)
    (w,) = _workitems(db)
    assert w.state == "IN PROGRESS" and w.transaction_uid
    assert "TransactionUID" not in dataset_of(w)  # the node's claim is never shown to peers

    _add_result(db, job_id, "1.2.826.0.1.3680043.10.1447.99.77.1")
    _set_job(db, job_id, state="done", finished_at=NOW)
    _sync(db, settings)
    (w,) = _workitems(db)
    ds = dataset_of(w)
    assert w.state == "COMPLETED"
    performed = ds.UnifiedProcedureStepPerformedProcedureSequence[0]
    assert performed.PerformedProcedureStepStartDateTime and performed.PerformedProcedureStepEndDateTime
    (out,) = performed.OutputInformationSequence
    assert out.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.10.1447.99.77.1"
    assert out.ReferencedSOPSequence[0].ReferencedSOPClassUID == SR_CLASS
    assert [e[1] for e in _events(db)] == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]


def test_a_job_done_between_two_rounds_still_passes_through_every_state(db, settings):
    _subscribe_all(db)
    job_id = make_study_job(db)
    _set_job(db, job_id, state="done", attempts=1, finished_at=NOW)
    _sync(db, settings)
    assert [e[1] for e in _events(db)] == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]


def test_a_failed_job_is_canceled_with_its_reason_and_a_retry_gets_a_new_workitem(db, settings):
    from node.ups.workitems import dataset_of

    job_id = make_study_job(db)
    _sync(db, settings)
    _set_job(db, job_id, state="dead", attempts=3, error="VolumeError in step load: 2 slices", finished_at=NOW)
    _sync(db, settings)
    (w,) = _workitems(db)
    progress = dataset_of(w).ProcedureStepProgressInformationSequence[0]
    assert w.state == "CANCELED"
    assert "VolumeError in step load" in progress.ReasonForCancellation and progress.ProcedureStepCancellationDateTime
    _set_job(db, job_id, state="queued", attempts=0, error=None, finished_at=None)  # msknode jobs retry
    _sync(db, settings)
    old, new = _workitems(db)
    assert old.state == "CANCELED" and new.state == "SCHEDULED" and new.job_id == job_id
    assert dataset_of(new).ReplacedProcedureStepSequence[0].ReferencedSOPInstanceUID == old.sop_instance_uid


def test_priority_follows_the_worklist_and_subscribers_hear_it(db, settings):
    from node.ups.workitems import follow_worklist_priority
    from worklists.tables import WorklistEntry

    _subscribe_all(db)
    job_id = make_study_job(db)
    _sync(db, settings)
    with db.session() as s:
        study_id = s.get(Job, job_id).study_id
        s.add(WorklistEntry(study_id=study_id, job_id=job_id, priority="STAT", ai_priority="URGENT", updated_at=NOW))
    _sync(db, settings)
    (w,) = _workitems(db)
    assert w.priority == "HIGH"
    with db.session() as s:
        entry = s.scalar(select(WorklistEntry))
        entry.priority = "URGENT"
        assert follow_worklist_priority(s, NOW, study_id=study_id) == 1
    assert [(e[1], e[2]) for e in _events(db)] == [("SCHEDULED", "LOW"), ("SCHEDULED", "HIGH"), ("SCHEDULED", "MEDIUM")]


def test_peers_cannot_claim_or_change_the_nodes_own_workitems(db, settings):
    from node.ups.dimse import action_from_peer, set_from_peer
    from node.ups.errors import UpsRefused

    job_id = make_study_job(db)
    _sync(db, settings)
    (w,) = _workitems(db)
    claim = Dataset()
    claim.ProcedureStepState = "IN PROGRESS"
    claim.TransactionUID = "1.2.3.4"
    cancel = Dataset()
    with db.session() as s:
        with pytest.raises(UpsRefused) as e:
            action_from_peer(s, settings, w.sop_instance_uid, 1, claim, calling="OTHER")
        assert e.value.status == 0x0124
        with pytest.raises(UpsRefused) as e:
            action_from_peer(s, settings, w.sop_instance_uid, 2, cancel, calling="OTHER")
        assert e.value.status == 0xC313
        with pytest.raises(UpsRefused) as e:
            set_from_peer(s, s.get(UpsWorkitem, w.id), claim)
        assert e.value.status == 0x0124
        with pytest.raises(UpsRefused) as e:
            action_from_peer(s, settings, "1.2.3.999", 1, claim, calling="OTHER")
        assert e.value.status == 0xC307
    _set_job(db, job_id, state="processing", attempts=1)
    _sync(db, settings)
    with db.session() as s, pytest.raises(UpsRefused) as e:
        action_from_peer(s, settings, w.sop_instance_uid, 1, claim, calling="OTHER")
    assert e.value.status == 0xC301
    assert _workitems(db)[0].state == "IN PROGRESS"


def test_a_peers_workitem_follows_the_ups_rules(db, settings):
    from node.ups.dimse import action_from_peer, create_from_peer, set_from_peer
    from node.ups.errors import UpsRefused

    ds = Dataset()
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = "external task"
    ds.TransactionUID = "1.2.3"  # dropped: a new workitem has none
    with db.session() as s:
        w = create_from_peer(s, ds, "1.2.826.0.1.3680043.10.1447.99.5.1", calling="RIS")
        uid = w.sop_instance_uid
    with db.session() as s, pytest.raises(UpsRefused) as e:
        create_from_peer(s, ds, uid, calling="RIS")
    assert e.value.status == 0x0111
    bad = Dataset()
    bad.ProcedureStepState = "IN PROGRESS"
    with db.session() as s, pytest.raises(UpsRefused) as e:
        create_from_peer(s, bad, None, calling="RIS")
    assert e.value.status == 0xC309

    claim = Dataset()
    claim.ProcedureStepState = "IN PROGRESS"
    claim.TransactionUID = "1.2.826.0.1.3680043.10.1447.99.6.1"
    with db.session() as s:
        assert action_from_peer(s, settings, uid, 1, claim, calling="PERFORMER") == 0
    with db.session() as s, pytest.raises(UpsRefused) as e:
        action_from_peer(s, settings, uid, 1, claim, calling="OTHER")
    assert e.value.status == 0xC302
    complete = Dataset()
    complete.ProcedureStepState = "COMPLETED"
    complete.TransactionUID = "1.2.826.0.1.3680043.10.1447.99.6.1"
    with db.session() as s, pytest.raises(UpsRefused) as e:  # no Performed Procedure Sequence yet
        action_from_peer(s, settings, uid, 1, complete, calling="PERFORMER")
    assert e.value.status == 0xC304
    mods = Dataset()
    mods.ScheduledProcedureStepPriority = "HIGH"
    with db.session() as s, pytest.raises(UpsRefused) as e:  # IN PROGRESS: the Transaction UID is needed
        set_from_peer(s, s.scalar(select(UpsWorkitem)), mods)
    assert e.value.status == 0xC301
    performed = Dataset()
    performed.PerformedProcedureStepEndDateTime = "20261203080000"
    mods.UnifiedProcedureStepPerformedProcedureSequence = [performed]
    mods.TransactionUID = claim.TransactionUID
    with db.session() as s:
        set_from_peer(s, s.scalar(select(UpsWorkitem)), mods)
    wrong = Dataset()
    wrong.ProcedureStepState = "COMPLETED"
    wrong.TransactionUID = "1.2.9"
    with db.session() as s, pytest.raises(UpsRefused) as e:
        action_from_peer(s, settings, uid, 1, wrong, calling="OTHER")
    assert e.value.status == 0xC301
    with db.session() as s:
        assert action_from_peer(s, settings, uid, 1, complete, calling="PERFORMER") == 0
    with db.session() as s:
        assert action_from_peer(s, settings, uid, 1, complete, calling="PERFORMER") == 0xB306
        with pytest.raises(UpsRefused) as e:
            set_from_peer(s, s.scalar(select(UpsWorkitem)), mods)
        assert e.value.status == 0xC300
    (w,) = _workitems(db)
    assert (w.state, w.priority) == ("COMPLETED", "HIGH")


def test_subscriptions_need_a_known_receiving_ae(db, settings, monkeypatch):
    from node.ups.dimse import action_from_peer
    from node.ups.errors import UpsRefused
    from node.ups.workitems import GLOBAL_SUBSCRIPTION

    make_study_job(db)
    _sync(db, settings)
    info = Dataset()
    info.ReceivingAE = "RIS"
    info.DeletionLock = "FALSE"
    with db.session() as s, pytest.raises(UpsRefused) as e:
        action_from_peer(s, settings, GLOBAL_SUBSCRIPTION, 3, info, calling="RIS")
    assert e.value.status == 0xC308
    known = settings.model_copy(update={"ups_event_receivers": {"RIS": "127.0.0.1:104"}})
    with db.session() as s:
        assert action_from_peer(s, known, GLOBAL_SUBSCRIPTION, 3, info, calling="RIS") == 0
    # the current state of every open workitem at once
    assert [e[1] for e in _events(db, "RIS")] == ["SCHEDULED"]
    with db.session() as s:
        assert action_from_peer(s, known, GLOBAL_SUBSCRIPTION, 4, info, calling="RIS") == 0
        assert s.scalars(select(UpsSubscription)).all() == []


def test_settings_read_event_receivers_and_refuse_bad_ones(monkeypatch):
    from node.settings import load_settings

    monkeypatch.setenv("MSKNODE_UPS_EVENT_RECEIVERS", "RIS=ris.example.org:104, VIEWER=10.0.0.5:11112")
    assert load_settings().ups_event_receivers == {"RIS": "ris.example.org:104", "VIEWER": "10.0.0.5:11112"}
    monkeypatch.setenv("MSKNODE_UPS_EVENT_RECEIVERS", '{"RIS": "ris:104"}')
    assert load_settings().ups_event_receivers == {"RIS": "ris:104"}
    for bad in ("RIS=ris", "RIS=ris:0", "A_TITLE_LONGER_THAN_16=h:1", "RIS"):
        monkeypatch.setenv("MSKNODE_UPS_EVENT_RECEIVERS", bad)
        with pytest.raises(Exception, match=r"MSKNODE_UPS_EVENT_RECEIVERS|ups_event_receivers|host:port|AE"):
            load_settings()


def test_matching_as_c_find_does():
    from node.ups.query import match, response

    stored = {
        "00741000": {"vr": "CS", "Value": ["COMPLETED"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00404005": {"vr": "DT", "Value": ["20261203080000"]},
        "00080018": {"vr": "UI", "Value": ["1.2.3"]},
        "00404021": {"vr": "SQ", "Value": [{"0020000D": {"vr": "UI", "Value": ["9.8.7"]}}]},
    }
    assert match({"00741000": {"vr": "CS", "Value": ["COMPLETED"]}}, stored)
    assert not match({"00741000": {"vr": "CS", "Value": ["SCHEDULED"]}}, stored)
    assert match({"00741000": {"vr": "CS"}}, stored)  # universal
    assert match({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe*"}]}}, stored)
    assert not match({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Roe*"}]}}, stored)
    assert match({"00404005": {"vr": "DT", "Value": ["20261203-20261204"]}}, stored)
    assert not match({"00404005": {"vr": "DT", "Value": ["20261204-"]}}, stored)
    assert match({"00080018": {"vr": "UI", "Value": ["4.5\\1.2.3"]}}, stored)
    assert match({"00404021": {"vr": "SQ", "Value": [{"0020000D": {"vr": "UI", "Value": ["9.8.7"]}}]}}, stored)
    assert not match({"00404021": {"vr": "SQ", "Value": [{"0020000D": {"vr": "UI", "Value": ["1.1"]}}]}}, stored)
    out = response({"00741000": {"vr": "CS"}, "00741200": {"vr": "CS"}, "00081195": {"vr": "UI"}}, stored)
    assert out == {"00741000": {"vr": "CS", "Value": ["COMPLETED"]}, "00741200": {"vr": "CS"}}


def test_ups_rs_query_parameters():
    from node.ups.rest import query_from_params

    q = query_from_params(
        [("ProcedureStepState", "SCHEDULED"), ("InputInformationSequence.StudyInstanceUID", "1.2"), ("limit", "5")]
    )
    assert q == {
        "00741000": {"vr": "CS", "Value": ["SCHEDULED"]},
        "00404021": {"vr": "SQ", "Value": [{"0020000D": {"vr": "UI", "Value": ["1.2"]}}]},
    }
    assert query_from_params([("00741200", "HIGH")]) == {"00741200": {"vr": "CS", "Value": ["HIGH"]}}
    for bad in ([("NoSuchKeyword", "x")], [("InputInformationSequence", "x")], [("PatientName.PatientID", "x")]):
        with pytest.raises(ValueError):
            query_from_params(bad)


def test_triage_priority_is_announced_with_completed(db, settings):
    from worklists.tables import WorklistEntry

    _subscribe_all(db)
    job_id = make_study_job(db)
    _sync(db, settings)
    _set_job(db, job_id, state="processing", attempts=1)
    _sync(db, settings)
    with db.session() as s:  # the job's finalizer writes the worklist entry as the job is done
        job = s.get(Job, job_id)
        job.state, job.finished_at = "done", NOW
        s.add(WorklistEntry(study_id=job.study_id, job_id=job_id, priority="STAT", ai_priority="STAT", updated_at=NOW))
    _sync(db, settings)
    assert [(e[1], e[2]) for e in _events(db)] == [("SCHEDULED", "LOW"), ("IN PROGRESS", "LOW"), ("COMPLETED", "HIGH")]


def test_ups_rs_answers_dicom_json_to_an_authenticated_client_and_refuses_bad_requests(db, settings):
    import warnings

    from node.web.app import create_app
    from node.web.users import add_user

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    for _ in range(3):
        make_study_job(db)
    _sync(db, settings)
    uids = [w.sop_instance_uid for w in _workitems(db)]
    with db.session() as s:
        add_user(s, username="rob", password="rob-password-12", role="radiologist")
    with TestClient(create_app(settings, db)) as client:
        token = client.post("/api/auth/token", json={"username": "rob", "password": "rob-password-12"}).json()
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        r = client.get("/ups-rs/workitems", params={"ProcedureStepState": "SCHEDULED"}, headers=auth)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
        assert [i["00080018"]["Value"][0] for i in r.json()] == uids
        r = client.get(
            "/ups-rs/workitems", params={"ScheduledProcedureStepPriority": "LOW", "limit": 1, "offset": 1}, headers=auth
        )
        assert [i["00080018"]["Value"][0] for i in r.json()] == uids[1:2]
        assert (
            client.get("/ups-rs/workitems", params={"ProcedureStepState": "COMPLETED"}, headers=auth).status_code == 204
        )
        r = client.get("/ups-rs/workitems", params={"NoSuchKeyword": "x"}, headers=auth)
        assert r.status_code == 400 and "NoSuchKeyword" in r.json()["detail"]
        assert client.get("/ups-rs/workitems", params={"limit": 5000}, headers=auth).status_code == 422
        r = client.get(f"/ups-rs/workitems/{uids[0]}", headers=auth)
        assert r.status_code == 200 and r.json()[0]["00741000"]["Value"] == ["SCHEDULED"]
        assert client.get("/ups-rs/workitems/1.2.3.999", headers=auth).status_code == 404
        assert client.get("/ups-rs/workitems/not-a-uid", headers=auth).status_code == 400
        assert client.get(f"/ups-rs/workitems/{uids[0]}").status_code == 401
        bad = {"Authorization": "Bearer not-a-token"}
        assert client.get("/ups-rs/workitems", headers=bad).status_code == 401


def test_matching_reads_the_table_a_page_at_a_time(db, monkeypatch):
    from node.ups import query
    from node.ups.dimse import create_from_peer

    monkeypatch.setattr(query, "PAGE", 2)
    with db.session() as s:
        for k in range(5):
            ds = Dataset()
            ds.ProcedureStepState = "SCHEDULED"
            ds.ScheduledProcedureStepPriority = "HIGH" if k % 2 else "LOW"
            create_from_peer(s, ds, f"1.2.826.0.1.3680043.10.1447.99.9.{k}", calling="RIS")
    with db.session() as s:
        every = [w.sop_instance_uid for w in query.matches(s, {"00741000": {"vr": "CS", "Value": ["SCHEDULED"]}})]
        high = [w.sop_instance_uid for w in query.matches(s, {"00741200": {"vr": "CS", "Value": ["HIGH"]}})]
        low = [w.sop_instance_uid for w in query.matches(s, {"00741200": {"vr": "CS", "Value": ["L*"]}})]
    assert every == [f"1.2.826.0.1.3680043.10.1447.99.9.{k}" for k in range(5)]
    assert high == [f"1.2.826.0.1.3680043.10.1447.99.9.{k}" for k in (1, 3)]
    assert low == [f"1.2.826.0.1.3680043.10.1447.99.9.{k}" for k in (0, 2, 4)]


def test_a_running_jobs_steps_are_progress_reports(db, settings):
    from node.ups.workitems import dataset_of

    _subscribe_all(db)
    job_id = make_study_job(db)
    _set_job(db, job_id, state="processing", attempts=1, step="load")
    _sync(db, settings)
    _sync(db, settings)  # the same step is not reported twice
    _set_job(db, job_id, step="inference")
    _sync(db, settings)
    (w,) = _workitems(db)
    progress = dataset_of(w).ProcedureStepProgressInformationSequence[0]
    assert (progress.ProcedureStepProgress, progress.ProcedureStepProgressDescription) == (50, "AI job step: inference")
    with db.session() as s:
        reports = [
            (e.event_type, e.info["00741002"]["Value"][0]["00741004"]["Value"][0])
            for e in s.scalars(select(UpsEvent).order_by(UpsEvent.id))
            if e.event_type == 3
        ]
    assert reports == [(3, 20), (3, 50)]
    _set_job(db, job_id, step="published: superres")  # findings published, super-resolution running
    _sync(db, settings)
    (w,) = _workitems(db)
    progress = dataset_of(w).ProcedureStepProgressInformationSequence[0]
    assert progress.ProcedureStepProgress == 94
    _set_job(db, job_id, state="done", finished_at=NOW)
    _sync(db, settings)
    (w,) = _workitems(db)
    assert (
        w.state == "COMPLETED"
        and dataset_of(w).ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 100
    )
    assert [e[1] for e in _events(db)] == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]


def test_metrics_count_workitems_and_events_by_state(db, settings):
    from node.ops.metrics import render

    _subscribe_all(db)
    for _ in range(2):
        make_study_job(db)
    _sync(db, settings)
    with db.session() as s:
        s.scalars(select(UpsEvent)).first().state = "dead"
    body, _ = render(settings, db)
    text = body.decode()
    assert 'msknode_ups_workitems{state="SCHEDULED"} 2.0' in text
    assert 'msknode_ups_events{state="pending"} 1.0' in text and 'msknode_ups_events{state="dead"} 1.0' in text


def test_a_job_failed_before_any_attempt_is_canceled_from_scheduled(db, settings):
    _subscribe_all(db)
    job_id = make_study_job(db)
    _sync(db, settings)
    _set_job(db, job_id, state="failed", attempts=0, error="PermanentJobError: no input series")
    assert _sync(db, settings) == 1
    assert _sync(db, settings) == 0  # and never looked at again
    assert [e[1] for e in _events(db)] == ["SCHEDULED", "CANCELED"]


def test_a_workitem_another_worker_created_first_is_skipped_not_an_error(db, settings):
    """Two workers' rounds may both see a job without a workitem; the second insert meets the unique
    UID of the first (same job, same UID) and that round goes on without an error or a second item."""
    from node.ups.workitems import _create_once

    job_id = make_study_job(db, n_series=1, instances=1)
    assert _sync(db, settings) == 1  # the other worker's round, committed
    with db.session() as s:
        job = s.get(Job, job_id)
        assert _create_once(s, settings, job, NOW) == 0  # this round: skipped, the session still usable
        assert s.scalar(select(Job.state).where(Job.id == job_id)) == job.state
    assert [w.job_id for w in _workitems(db)] == [job_id]
