"""The job machinery on a real SQLite database, in-process: lease, heartbeat, retries, dead state,
enqueue outbox, sweeper, idempotent results, retry command. (Worker processes: test_survival.py.)"""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import func, select, update

from node.db.database import utcnow
from node.db.schema import Finding, Job, JobInput, OutboxItem, ResultObject, Series
from node.errors import JobError
from node.jobs import lease as jobs
from node.jobs.listing import JobOut
from node.jobs.runner import execute_job
from support.jobs import SleepyRunner, make_study_job
from worklists.tables import AuditEvent

pytestmark = pytest.mark.unit


def _job(db, job_id) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def _series_states(db, job_id) -> set[str]:
    with db.session() as s:
        return set(
            s.scalars(
                select(Series.state).join(JobInput, JobInput.series_id == Series.id).where(JobInput.job_id == job_id)
            )
        )


def test_claim_is_exclusive_under_concurrency(db):
    job_id = make_study_job(db)
    barrier = threading.Barrier(8)
    won: list[jobs.Lease] = []

    def contender(k):
        barrier.wait()
        lease = jobs.claim(db, job_id, owner=f"w{k}", lease_seconds=30)
        if lease is not None:
            won.append(lease)

    threads = [threading.Thread(target=contender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    job = _job(db, job_id)
    assert job.state == "processing" and job.lease_owner == won[0].owner and job.attempts == 1
    assert job.enqueue_pending is False
    assert _series_states(db, job_id) == {"processing"}
    assert jobs.claim(db, job_id, owner="late", lease_seconds=30) is None


def test_claim_waits_for_not_before(db):
    job_id = make_study_job(db)
    now = utcnow()
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(not_before=now + dt.timedelta(seconds=60)))
    assert jobs.claim(db, job_id, owner="a", lease_seconds=5, now=now) is None
    assert jobs.claim(db, job_id, owner="a", lease_seconds=5, now=now + dt.timedelta(seconds=61)) is not None


def test_lease_keeper_renews_and_detects_loss(db):
    job_id = make_study_job(db)
    lease = jobs.claim(db, job_id, owner="keeper", lease_seconds=0.6)
    first_expiry = _job(db, job_id).lease_expires_at
    with jobs.LeaseKeeper(db, lease, lease_seconds=0.6) as keeper:
        time.sleep(1.0)
        keeper.check()  # still ours
        renewed = _job(db, job_id).lease_expires_at
        assert renewed > first_expiry
        # another worker takes over (as after an expiry + sweep + claim)
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(lease_owner="thief"))
        time.sleep(0.6)
        assert keeper.lost
        with pytest.raises(jobs.LeaseLost):
            keeper.check()


def test_long_job_keeps_its_lease_and_records_timings(db, settings):
    settings.job_lease_seconds = 0.6
    job_id = make_study_job(db)
    outcomes = []
    t = threading.Thread(
        target=lambda: outcomes.append(execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=1.5)))
    )
    t.start()
    deadline = time.monotonic() + 5
    while _job(db, job_id).step != "inference":  # progress is visible while it runs
        assert time.monotonic() < deadline, _job(db, job_id).step
        time.sleep(0.05)
    t.join()
    outcome = outcomes[0]
    assert outcome.state == "done" and _job(db, job_id).step is None
    job = _job(db, job_id)
    assert job.state == "done" and job.attempts == 1 and job.error is None
    assert job.lease_owner is None and job.finished_at is not None
    assert job.timings["inference"] >= 1.5 and job.timings["total"] >= job.timings["inference"]
    assert set(job.timings) >= {"load_context", "inference", "results", "total"}
    assert job.model_versions == {"fake.sleep": {"version": "1.0", "weights_sha256": "0" * 64}}
    assert _series_states(db, job_id) == {"done"}
    with db.session() as s:
        f = s.scalars(select(Finding).where(Finding.job_id == job_id)).one()
        assert (f.model_name, f.model_version, f.weights_sha256) == ("fake.sleep", "1.0", "0" * 64)
        assert s.scalars(select(JobInput.used_by).where(JobInput.job_id == job_id)).first() == ["fake.sleep"]
        actions = s.scalars(
            select(AuditEvent.action).where(AuditEvent.entity_type == "job", AuditEvent.entity_id == str(job_id))
        ).all()
    assert actions[:2] == ["job.processing", "job.done"]


def test_lost_lease_discards_the_attempt(db, settings):
    """A worker whose lease was taken over cannot commit: only the new owner's results count."""
    settings.job_lease_seconds = 0.5
    job_id = make_study_job(db)
    outcome: list = []

    def slow_worker():
        outcome.append(execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=2.0), owner="slow"))

    t = threading.Thread(target=slow_worker)
    t.start()
    time.sleep(0.3)
    # the slow worker looks dead to the others (its lease is made to expire, as after a long stall)
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    report = jobs.sweep(db, lease_seconds=0.5)
    assert report.requeued == [job_id]
    fast = execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=0.1), owner="fast")
    assert fast.state == "done"
    t.join()
    assert outcome[0].state == "lease_lost"
    job = _job(db, job_id)
    assert job.state == "done" and job.attempts == 2
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 1
        assert s.scalar(select(func.count()).select_from(Finding)) == 1


def test_transient_failures_back_off_then_dead(db, settings):
    settings.job_retry_backoff_seconds = 0.3
    job_id = make_study_job(db, max_attempts=3)
    runner = SleepyRunner(settings, seconds=0.0, fail_times=99)
    t0 = utcnow()
    out = execute_job(db, settings, job_id, runner=runner)
    assert out.state == "queued" and "transient failure on attempt 1" in out.error
    job = _job(db, job_id)
    assert job.enqueue_pending and job.attempts == 1
    assert 0.3 <= (job.not_before - job.started_at).total_seconds() <= 1.3  # base backoff after the failure
    assert job.not_before > t0
    assert _series_states(db, job_id) == {"queued"}
    assert execute_job(db, settings, job_id, runner=runner).state == "skipped"  # not due yet
    time.sleep(0.35)
    assert execute_job(db, settings, job_id, runner=runner).state == "queued"
    job = _job(db, job_id)
    assert 0.6 <= (job.not_before - job.started_at).total_seconds() <= 1.6  # doubled
    time.sleep(0.65)
    out = execute_job(db, settings, job_id, runner=runner)
    assert out.state == "dead"
    job = _job(db, job_id)
    assert job.state == "dead" and job.attempts == 3 and "attempt 3" in job.error and "step inference" in job.error
    assert _series_states(db, job_id) == {"failed"}
    assert execute_job(db, settings, job_id, runner=runner).state == "skipped"


def test_permanent_error_fails_at_once(db, settings):
    job_id = make_study_job(db)
    out = execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=0, permanent=True))
    assert out.state == "failed"
    job = _job(db, job_id)
    assert job.state == "failed" and job.attempts == 1 and "PermanentJobError" in job.error
    assert "not an image series" in job.error


def test_sweeper_requeues_expired_leases_and_kills_the_last_attempt(db, settings):
    a = make_study_job(db, max_attempts=3)
    b = make_study_job(db, max_attempts=1)
    now = utcnow()
    la = jobs.claim(db, a, owner="gone-a", lease_seconds=1, now=now)
    lb = jobs.claim(db, b, owner="gone-b", lease_seconds=1, now=now)
    assert la and lb
    assert jobs.sweep(db, now=now, lease_seconds=1).requeued == []  # not expired yet
    later = now + dt.timedelta(seconds=2)
    report = jobs.sweep(db, now=later, lease_seconds=1)
    assert report.requeued == [a] and report.dead == [b]
    ja, jb = _job(db, a), _job(db, b)
    assert ja.state == "queued" and ja.enqueue_pending and ja.lease_owner is None and "worker lost" in ja.error
    assert jb.state == "dead" and "last attempt" in jb.error
    assert _series_states(db, a) == {"queued"} and _series_states(db, b) == {"failed"}
    # the worker that lost its lease comes back: it cannot finish or fail the job any more
    with pytest.raises(jobs.LeaseLost):
        jobs.fail(db, la, error="late", retryable=True, backoff_base=1)
    with pytest.raises(jobs.LeaseLost), db.session() as s:
        jobs.mark_done(s, la, now=later)
    assert _job(db, a).state == "queued"


def test_enqueue_outbox_keeps_jobs_until_the_broker_takes_them(db):
    ids = [make_study_job(db) for _ in range(3)]
    sent: list[tuple[int, str]] = []

    def broker_down(job_id, queue):
        raise ConnectionRefusedError("broker at 127.0.0.1:1 refused")

    report = jobs.enqueue_pending_jobs(db, broker_down)
    assert report.sent == [] and "ConnectionRefusedError" in report.error
    assert all(_job(db, i).enqueue_pending for i in ids)

    def flaky(job_id, queue):  # takes one message then goes down
        if sent:
            raise ConnectionError("lost")
        sent.append((job_id, queue))

    report = jobs.enqueue_pending_jobs(db, flaky)
    assert report.sent == [ids[0]]
    assert not _job(db, ids[0]).enqueue_pending and _job(db, ids[0]).enqueued_at is not None
    assert _job(db, ids[1]).enqueue_pending and _job(db, ids[2]).enqueue_pending

    report = jobs.enqueue_pending_jobs(db, lambda j, q: sent.append((j, q)))
    assert report.sent == ids[1:] and report.error is None
    assert sent == [(i, "cpu") for i in ids]
    # a job waiting for its backoff is not sent before it is due
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == ids[0])
            .values(enqueue_pending=True, not_before=utcnow() + dt.timedelta(seconds=60))
        )
    assert jobs.enqueue_pending_jobs(db, lambda j, q: sent.append((j, q))).sent == []


def test_sweeper_resends_lost_wakeups(db):
    a, b, c = (make_study_job(db) for _ in range(3))
    t0 = utcnow()
    jobs.enqueue_pending_jobs(db, lambda j, q: None, now=t0)
    later = t0 + dt.timedelta(seconds=5)
    # all three messages still in the broker: nothing lost
    assert jobs.sweep(db, now=later, lease_seconds=3, queue_depths={"cpu": 3}).resent == []
    # one message gone (e.g. a consumer died after taking it): the oldest waiting job is re-sent
    report = jobs.sweep(db, now=later, lease_seconds=3, queue_depths=lambda: {"cpu": 2})
    assert report.resent == [a]
    assert _job(db, a).enqueue_pending and not _job(db, b).enqueue_pending
    jobs.enqueue_pending_jobs(db, lambda j, q: None, now=later)
    # broker depth unknown: only wake-ups older than twice the lease are re-sent
    assert jobs.sweep(db, now=later + dt.timedelta(seconds=4), lease_seconds=3, queue_depths=None).resent == [b, c]

    def unreachable():
        raise ConnectionError("down")

    jobs.enqueue_pending_jobs(db, lambda j, q: None, now=later)
    assert jobs.sweep(db, now=later + dt.timedelta(seconds=7), lease_seconds=3, queue_depths=unreachable).resent == [
        a,
        b,
        c,
    ]


def test_results_are_stored_once_per_uid(db, settings, monkeypatch):
    """Running a job again (retry) reuses its result UIDs: one result object, one outbox row per destination."""
    monkeypatch.setenv(
        "MSKNODE_DESTINATIONS",
        '[{"ae_title": "PACS", "host": "127.0.0.1", "port": 11113},'
        ' {"type": "stow", "url": "http://127.0.0.1:8042/dicom-web"}]',
    )
    from node.settings import load_settings

    settings = load_settings()
    job_id = make_study_job(db)
    assert execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=0)).state == "done"
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state="failed"))  # e.g. an operator re-runs it
    jobs.retry_job(db, job_id, actor="admin")
    assert execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=0)).state == "done"
    # a second job over the same inputs (a re-opened study with nothing new) gets the same UIDs
    with db.session() as s:
        fp = s.get(Job, job_id).input_fingerprint
        study_id = s.get(Job, job_id).study_id
        twin = Job(study_id=study_id, pipeline="knee", state="queued", input_fingerprint=fp, supersedes_job_id=job_id)
        s.add(twin)
        s.flush()
        s.add(
            JobInput(
                job_id=twin.id, series_id=s.scalars(select(JobInput.series_id).where(JobInput.job_id == job_id)).first()
            )
        )
        twin_id = twin.id
    assert execute_job(db, settings, twin_id, runner=SleepyRunner(settings, seconds=0)).state == "done"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 1
        dests = s.scalars(select(OutboxItem.destination).order_by(OutboxItem.destination)).all()
        assert dests == ["dimse:PACS@127.0.0.1:11113", "stow:http://127.0.0.1:8042/dicom-web"]
        assert s.scalar(select(func.count()).select_from(Finding).where(Finding.job_id == job_id)) == 1
        assert s.get(Job, job_id).state == "superseded"


def test_retry_job(db, settings):
    job_id = make_study_job(db)
    with pytest.raises(JobError, match="is queued; only failed or dead"):
        jobs.retry_job(db, job_id)
    with pytest.raises(JobError, match="no job with id 999"):
        jobs.retry_job(db, 999)
    execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=0, permanent=True))
    assert _job(db, job_id).state == "failed"
    job = jobs.retry_job(db, job_id, actor="cli")
    assert job.state == "queued" and job.attempts == 0 and job.enqueue_pending and job.error is None
    assert _series_states(db, job_id) == {"queued"}
    with db.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.retry")).one()
    assert (ev.actor, ev.old_value, ev.new_value) == ("cli", "failed", "queued")
    assert "not an image series" in ev.details["previous_error"]
    assert execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=0)).state == "done"


def test_backoff_doubles_and_is_capped():
    assert [jobs.backoff_seconds(n, 10) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert jobs.backoff_seconds(30, 10) == jobs.MAX_BACKOFF_SECONDS


def test_older_job_finishing_late_does_not_touch_a_newer_jobs_series(db, settings):
    """A study re-opened while its first job runs: the first job's end leaves the new job's series queued."""
    old = make_study_job(db)
    lease = jobs.claim(db, old, owner="old", lease_seconds=30)
    with db.session() as s:
        j = s.get(Job, old)
        new = Job(
            study_id=j.study_id, pipeline="knee", state="queued", input_fingerprint="f" * 64, supersedes_job_id=old
        )
        s.add(new)
        s.flush()
        for ji in s.scalars(select(JobInput).where(JobInput.job_id == old)).all():
            s.add(JobInput(job_id=new.id, series_id=ji.series_id, role=ji.role))
        s.execute(update(Series).values(state="queued"))
        new_id = new.id
    with db.session() as s:
        jobs.mark_done(s, lease, now=utcnow())
    assert _job(db, old).state == "done"
    assert _series_states(db, new_id) == {"queued"}
    assert execute_job(db, settings, new_id, runner=SleepyRunner(settings, seconds=0)).state == "done"
    assert _series_states(db, new_id) == {"done"}
    assert _job(db, old).state == "superseded"


@pytest.mark.integration  # msknode's command line
def test_cli_jobs_retry(db, settings, capsys):
    import json

    from support.cli import msknode

    def run(*args: str):
        return msknode(capsys, "jobs", *args, MSKNODE_DATA_DIR=settings.data_dir)

    job_id = make_study_job(db)
    r = run("retry", str(job_id))
    assert r.returncode == 1 and f"job {job_id} is queued; only failed or dead jobs can be retried" in r.stderr
    execute_job(db, settings, job_id, runner=SleepyRunner(settings, seconds=0, fail_times=9))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state="dead"))
    r = run("retry", str(job_id))
    assert r.returncode == 0, r.stderr
    assert f"job {job_id} queued again" in r.stdout
    r = run("--json")
    row = next(j for j in json.loads(r.stdout) if j["id"] == job_id)
    assert row["state"] == "queued" and row["attempts"] == 0 and row["error"] is None
    assert set(row) == set(JobOut.model_fields)  # the shape the web API answers with
    with db.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.retry")).one()
    assert ev.actor.startswith("cli:") and ev.old_value == "dead"
