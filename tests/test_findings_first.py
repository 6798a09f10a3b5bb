"""Findings first, with the real node: ``msknode listen``, a real worker (`support.gated_worker`: the production
runner whose super-resolution waits at a gate), a real Orthanc as the PACS, a knee phantom study sent with storescu.

A job publishes its findings (SR, SEG, overlays: rows, result objects, outbox rows, worklist entry) before
super-resolution runs; the outbox sends them while the job is still processing; the super-resolved series follows
in the final commit. A worker SIGKILLed between the publication and the final commit loses nothing and sends
nothing twice: the next attempt computes the same objects, and every object reaches the PACS exactly once."""

from __future__ import annotations

import json
from collections import Counter

import pydicom
import pytest
from sqlalchemy import func, select

from node.db.schema import Finding, Job, OutboxItem, ResultObject
from support.env import free_port
from support.gated_worker import GATE_ENV, GatedWorker, waiting_marker
from support.jobs import ListenerProcess, storescu, wait_for
from support.node_stack import node_env
from support.orthanc import OrthancServer
from support.results_data import assert_valid
from worklists.tables import WorklistEntry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINDINGS = ("sr", "seg", "sc")


def _job(db, study_uid):
    from node.db.schema import Study

    with db.session() as s:
        return s.scalars(select(Job).join(Study, Study.id == Job.study_id).where(Study.study_uid == study_uid)).first()


def _results(db, job_id) -> list[tuple[str, str, str]]:
    """(kind, SOP Instance UID, path) of the job's result objects."""
    with db.session() as s:
        return [
            (r.kind, r.sop_instance_uid, r.path)
            for r in s.scalars(select(ResultObject).where(ResultObject.job_id == job_id).order_by(ResultObject.id))
        ]


def _outbox(db, job_id) -> list[tuple[str, str, str]]:
    """(kind, SOP Instance UID, state) of the job's outbox rows."""
    with db.session() as s:
        return [
            tuple(r)
            for r in s.execute(
                select(ResultObject.kind, ResultObject.sop_instance_uid, OutboxItem.state)
                .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
                .where(ResultObject.job_id == job_id)
            ).all()
        ]


@pytest.fixture
def stack(settings, db, tmp_path):
    """Orthanc (with its reception log), the listener and a gated worker; the knee phantom study to send."""
    from models.phantoms import write_study

    pacs = OrthancServer(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port()).start()
    dest = {"type": "dimse", "name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
    port = free_port()
    gate = tmp_path / "gate"
    env = node_env(
        settings,
        port,
        MSKNODE_DESTINATIONS=json.dumps([dest]),
        MSKNODE_ACTIVATE_MODELS="all",  # the shipped knee models live (not in shadow), so results go out
        MSKNODE_JOB_LEASE_SECONDS="6",
        **{GATE_ENV: str(gate)},
    )
    files = write_study("knee", tmp_path / "study", 31, acl="complete")
    study_uid = str(pydicom.dcmread(files["sag_fluid"][0], stop_before_pixels=True).StudyInstanceUID)
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    workers: list[GatedWorker] = []

    def start_worker() -> GatedWorker:
        w = GatedWorker(env, tmp_path / f"worker{len(workers)}.log").start()
        workers.append(w)
        return w

    try:
        listener.wait_ready(port)
        start_worker()
        assert storescu(port, [p for paths in files.values() for p in paths]).wait(120) == 0
        yield dict(
            pacs=pacs,
            gate=gate,
            study_uid=study_uid,
            start_worker=start_worker,
            workers=workers,
            source_slices=len(files["sag_fluid"]),  # the main model's series, super-resolved through-plane x2
        )
    finally:
        for w in workers:
            w.stop(graceful=False)
        listener.stop()
        pacs.stop()


def _published_and_sent(db, stack) -> int:
    """Waits until the job waits at the gate with its findings published and sent; returns the job id."""
    try:
        wait_for(lambda: waiting_marker(stack["gate"]).exists(), 400, interval=0.5, what="super-resolution reached")
    except AssertionError:
        print(stack["workers"][-1].output()[-4000:])
        raise
    job = _job(db, stack["study_uid"])
    assert job.state == "processing" and job.step == "published: superres"
    assert job.timings and job.timings["published_after"] > 0 and "results" in job.timings
    kinds = Counter(k for k, _u, _p in _results(db, job.id))
    assert set(kinds) == set(FINDINGS) and kinds["sr"] == 1  # the findings objects, no super-resolved series yet
    with db.session() as s:  # findings rows and the worklist entry are there while the job is processing
        assert s.scalar(select(func.count()).select_from(Finding).where(Finding.job_id == job.id)) > 0
        assert s.scalar(select(Finding.id).where(Finding.job_id == job.id, Finding.code == "superres")) is None
        assert s.scalar(select(WorklistEntry.job_id).where(WorklistEntry.study_id == job.study_id)) == job.id
    # the outbox sends them at once, though the job is not done
    wait_for(lambda: {st for _k, _u, st in _outbox(db, job.id)} == {"sent"}, 120, interval=0.2, what="findings sent")
    received = stack["pacs"].received()
    for kind, uid, _p in _results(db, job.id):
        assert received[uid] == 1, kind
    stored = _stored(stack)
    assert {u for _k, u, _p in _results(db, job.id)} <= stored
    assert _job(db, stack["study_uid"]).state == "processing"
    return job.id


def _stored(stack) -> set[str]:
    """The SOP Instance UIDs Orthanc holds in the study."""
    return {u for uids in stack["pacs"].study_series(stack["study_uid"]).values() for u in uids}


def _sr_mentions_superres(path) -> bool:
    text = []

    def walk(items):
        for it in items:
            if "TextValue" in it:
                text.append(str(it.TextValue))
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                if seq in it:
                    text.append(str(it[seq][0].CodeMeaning))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(pydicom.dcmread(path).ContentSequence)
    return any("uper-resol" in t or "consistency" in t for t in text)


def test_sr_and_seg_reach_the_pacs_while_super_resolution_runs(db, stack):
    job_id = _published_and_sent(db, stack)
    (sr_path,) = [p for k, _u, p in _results(db, job_id) if k == "sr"]
    assert_valid(sr_path, "findings-first SR")
    assert not _sr_mentions_superres(sr_path)

    stack["gate"].touch()  # super-resolution may run now
    job = wait_for(lambda: (j := _job(db, stack["study_uid"])).state == "done" and j, 400, interval=0.5, what="done")
    assert job.attempts == 1 and job.step is None
    assert {"publish", "superres", "superres_results", "published_after"} <= set(job.timings)
    assert job.model_versions["superres"]["superres"][0]["accepted"] is True
    with db.session() as s:  # the super-resolution check is a findings row, as before
        (check,) = s.scalars(select(Finding).where(Finding.job_id == job.id, Finding.code == "superres")).all()
        assert check.details["consistency_passed"] is True
    results = _results(db, job.id)
    derived = {u for k, u, _p in results if k == "superres"}
    assert len(derived) >= 2 * stack["source_slices"] - 1
    wait_for(lambda: {st for _k, _u, st in _outbox(db, job.id)} == {"sent"}, 300, interval=0.5, what="all sent")
    received = stack["pacs"].received()
    counts = {u: received[u] for _k, u, _p in results if received[u] != 1}
    if counts:  # what the outbox knows of them (attempts, last error), to tell a resend from a lost log line
        with db.session() as s:
            rows = s.execute(
                select(ResultObject.sop_instance_uid, OutboxItem.attempts, OutboxItem.last_error)
                .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
                .where(ResultObject.sop_instance_uid.in_(list(counts)))
            ).all()
        raise AssertionError(f"received other than once: {counts}; outbox: {[tuple(r) for r in rows]}")


def test_a_worker_killed_after_publishing_loses_nothing_and_sends_nothing_twice(db, stack):
    job_id = _published_and_sent(db, stack)
    published = {u for _k, u, _p in _results(db, job_id)}
    with db.session() as s:
        findings_before = sorted(
            (f.model_name, f.code, f.series_uid or "", f.level or "")
            for f in s.scalars(select(Finding).where(Finding.job_id == job_id))
        )
    stack["workers"][-1].kill9()  # dies between the publication and the final commit
    stack["gate"].touch()
    stack["start_worker"]()
    try:
        job = wait_for(
            lambda: (j := _job(db, stack["study_uid"])).state == "done" and j, 400, interval=0.5, what="done"
        )
    except AssertionError:
        print(stack["workers"][-1].output()[-4000:])
        raise
    assert job.attempts == 2  # the lease expired, the sweeper requeued it, the new worker ran it again
    results = _results(db, job_id)
    uids = [u for _k, u, _p in results]
    assert len(uids) == len(set(uids)) and published <= set(uids)  # the same objects, once each
    assert Counter(k for k, _u, _p in results)["superres"] >= 2 * stack["source_slices"] - 1
    rows = _outbox(db, job_id)
    assert len(rows) == len(uids)  # one outbox row per object and destination
    wait_for(lambda: {st for _k, _u, st in _outbox(db, job_id)} == {"sent"}, 300, interval=0.5, what="all sent")
    received = stack["pacs"].received()
    assert {u: received[u] for u in uids} == dict.fromkeys(uids, 1)  # every object reached the PACS exactly once
    stored = _stored(stack)
    assert set(uids) <= stored
    with db.session() as s:  # the published findings rows were replaced by the same ones, plus the superres check
        findings_after = sorted(
            (f.model_name, f.code, f.series_uid or "", f.level or "")
            for f in s.scalars(select(Finding).where(Finding.job_id == job_id, Finding.code != "superres"))
        )
        assert s.scalar(select(func.count()).select_from(Finding).where(Finding.code == "superres")) == 1
    assert findings_after == findings_before


def test_a_super_resolution_that_cannot_be_done_leaves_the_job_done_with_its_findings(db, stack):
    """The findings are in the PACS already: a permanent error in super-resolution does not fail the job (nor send
    anything again); it ends done without the derived series, and its super-resolution row says why."""
    job_id = _published_and_sent(db, stack)
    published = _results(db, job_id)
    stack["gate"].write_text("fail")
    job = wait_for(lambda: (j := _job(db, stack["study_uid"])).state == "done" and j, 400, interval=0.5, what="done")
    assert job.attempts == 1 and job.error is None
    assert _results(db, job_id) == published  # no derived series, the published objects unchanged
    with db.session() as s:
        (row,) = s.scalars(select(Finding).where(Finding.job_id == job_id, Finding.code == "superres")).all()
        assert row.evaluated is False and row.qc_reason == "error"
        assert "cannot be super-resolved" in row.qc_message and "VolumeError" in row.label
    received = stack["pacs"].received()
    assert all(received[u] == 1 for _k, u, _p in published)
    assert "super-resolution not done after the findings were published" in stack["workers"][-1].output()
