"""Survival of the job machinery with real worker processes on the embedded default
(SQLite WAL + kombu filesystem transport): retries through the broker, kill -9 mid-job.

The worker runs `tests/support/jobs.py` (`main`): the real `node.jobs.worker.run_worker` (Celery prefork
worker + periodic loop) with a step function that sleeps and writes rows instead of the models.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from node.db.schema import Finding, Job, ResultObject, Study, WorkerRecord
from support.jobs import WorkerProcess, job_states, make_study_job, read_runs, wait_for, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE = 3.0


@pytest.fixture
def embedded(settings, db, tmp_path):
    base = {
        "MSKNODE_DATA_DIR": str(settings.data_dir),
        "MSKNODE_JOB_LEASE_SECONDS": str(LEASE),
        "MSKNODE_SWEEP_INTERVAL_SECONDS": "0.5",
        "MSKNODE_JOB_RETRY_BACKOFF_SECONDS": "0.5",
        "MSKNODE_LOG_LEVEL": "INFO",
    }
    workers: list[WorkerProcess] = []

    def start(env: dict | None = None, **kw) -> WorkerProcess:
        w = WorkerProcess(worker_env({**base, **(env or {})}), tmp_path / f"worker{len(workers)}.log", **kw).start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop(graceful=False)


def _count(db, table) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(table))


def test_worker_retries_through_the_broker_and_runs_each_job_once(embedded, settings, db):
    ids = [make_study_job(db) for _ in range(3)]
    w = embedded(sleep=0.2, fail_times=1)  # the first attempt of every job fails
    try:
        wait_for(lambda: set(job_states(db).values()) == {"done"}, 40, what="all jobs done")
    except AssertionError:
        print(w.output()[-4000:])
        raise
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.id.in_(ids))):
            assert job.attempts == 2, (job.id, job.attempts, job.error)
            assert job.error is None and job.timings["inference"] >= 0.2
        assert s.scalar(select(func.count()).select_from(WorkerRecord)) == 1
    runs = read_runs(settings.data_dir)
    ends = sorted(j for kind, j, attempt, _ in runs if kind == "end")
    assert ends == sorted(ids)  # each job finished exactly once, on its second attempt
    assert all(attempt == 2 for kind, _, attempt, _ in runs if kind == "end")
    assert _count(db, ResultObject) == 3 and _count(db, Finding) == 3


def test_kill9_worker_mid_job_then_new_worker_completes_it_once(embedded, settings, db):
    job_id = make_study_job(db)
    w1 = embedded(sleep=6.0)
    wait_for(lambda: any(k == "start" for k, *_ in read_runs(settings.data_dir)), 30, what="job started")
    time.sleep(1.0)
    w1.kill9()
    killed_at = time.monotonic()
    assert job_states(db)[job_id] == "processing"

    w2 = embedded(sleep=1.0)
    try:
        wait_for(lambda: job_states(db)[job_id] == "done", LEASE + 1.0 + 15, what="job done after restart")
    except AssertionError:
        print(w2.output()[-4000:])
        raise
    elapsed = time.monotonic() - killed_at
    print(f"job done {elapsed:.1f} s after kill -9 (lease {LEASE} s, run 1 s)")
    # lease expiry + the 1 s run + worker start-up + a few seconds
    assert elapsed < LEASE + 1.0 + 8, elapsed
    runs = read_runs(settings.data_dir)
    assert [(k, a) for k, j, a, _ in runs] == [("start", 1), ("start", 2), ("end", 2)]
    assert runs[0][3] != runs[1][3]  # a different process
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 2 and job.error is None
    assert _count(db, ResultObject) == 1 and _count(db, Finding) == 1


def test_soft_and_hard_time_limits_end_in_a_visible_dead_state(embedded, settings, db):
    polite = make_study_job(db, max_attempts=1)
    stubborn = make_study_job(db, pipeline="stubborn", max_attempts=1)
    w = embedded(env={"MSKNODE_JOB_SOFT_TIME_LIMIT": "1.5", "MSKNODE_JOB_TIME_LIMIT": "3"}, sleep=30.0)
    try:
        wait_for(lambda: {job_states(db)[j] for j in (polite, stubborn)} == {"dead"}, 45, what="both jobs dead")
    except AssertionError:
        print(w.output()[-4000:])
        raise
    with db.session() as s:
        p, st = s.get(Job, polite), s.get(Job, stubborn)
        # the soft limit raised inside the step: the job failed its (only) attempt with a clear reason
        assert p.error == "time limit of 1.5 s exceeded in step inference", p.error
        assert p.timings["inference"] < 3
        # the hard limit killed the process: the lease expired and the sweeper declared it dead
        assert "worker lost on the last attempt" in st.error and st.attempts == 1
    runs = read_runs(settings.data_dir)
    assert ("ignored", stubborn) in {(k, j) for k, j, *_ in runs}
    assert not [r for r in runs if r[0] == "end"]
    assert w.alive()  # the pool replaced its killed process


def test_load_8_associations_x_40_instances_all_stored_and_processed_once(embedded, settings, db, tmp_path):
    """8 concurrent storescu associations × 40 instances while the worker runs (listener + completeness + worker)."""
    from node.db.schema import Instance, JobInput, Series
    from support.env import free_port
    from support.jobs import ListenerProcess, storescu, write_phantom_series

    port = free_port()
    env = {"MSKNODE_PORT": str(port), "MSKNODE_QUIET_SECONDS": "1", "MSKNODE_STUDY_QUIET_SECONDS": "1"}
    series_files = [write_phantom_series(tmp_path / f"s{k}", seed=100 + k) for k in range(8)]
    listener = ListenerProcess(
        worker_env({"MSKNODE_DATA_DIR": str(settings.data_dir), "MSKNODE_LOG_LEVEL": "INFO", **env}),
        tmp_path / "listener.log",
    ).start()
    try:
        listener.wait_ready(port)
        w = embedded(env=env, sleep=0.3)
        t0 = time.monotonic()
        senders = [storescu(port, files) for files in series_files]
        outs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in senders]
        sent_in = time.monotonic() - t0
        assert [p.returncode for p in senders] == [0] * 8, outs
        try:
            wait_for(
                lambda: len(job_states(db)) == 8 and set(job_states(db).values()) == {"done"}, 90, what="8 jobs done"
            )
        except AssertionError:
            print(w.output()[-3000:], listener.output()[-3000:])
            raise
        print(
            f"320 instances sent in {sent_in:.1f} s; all 8 studies processed {time.monotonic() - t0:.1f} s after the first send"
        )
    finally:
        listener.stop()

    with db.session() as s:
        instances = s.scalars(select(Instance)).all()
        assert len(instances) == 320
        for inst in instances:
            path = inst.path if inst.path.startswith("/") else str(settings.store_dir / inst.path)
            assert __import__("os").path.getsize(path) == inst.size
        series = s.scalars(select(Series)).all()
        assert len(series) == 8 and {se.state for se in series} == {"done"} and {se.instances for se in series} == {40}
        per_series = s.execute(select(JobInput.series_id, func.count()).group_by(JobInput.series_id)).all()
        assert sorted(n for _, n in per_series) == [1] * 8  # every series in exactly one job
        assert set(s.scalars(select(Job.attempts))) == {1}
    runs = read_runs(settings.data_dir)
    assert sorted(j for k, j, *_ in runs if k == "end") == sorted(job_states(db))  # each job ran once
    assert len([r for r in runs if r[0] == "start"]) == 8


def test_queues_by_work_type_keep_inference_off_the_housekeeping_worker(embedded, settings, db):
    """The listener host's worker (queue ingest) never runs inference; a gpu worker takes the gpu jobs."""
    import os

    gpu_jobs = [make_study_job(db, queue="gpu") for _ in range(3)]
    cpu_job = make_study_job(db, queue="cpu")
    housekeeping = embedded(queues="ingest", sleep=0.2)

    def all_sent():
        with db.session() as s:
            return not any(s.scalars(select(Job.enqueue_pending)))

    wait_for(all_sent, 40, what="wake-ups sent by the housekeeping worker")
    time.sleep(1.5)  # ... but it takes no inference job
    assert set(job_states(db).values()) == {"queued"}
    gpu = embedded(queues="gpu", sleep=0.2)
    try:
        wait_for(lambda: all(job_states(db)[j] == "done" for j in gpu_jobs), 40, what="gpu jobs done")
    except AssertionError:
        print(housekeeping.output()[-3000:], gpu.output()[-3000:])
        raise
    time.sleep(1.0)
    assert job_states(db)[cpu_job] == "queued"  # nobody consumes "cpu" here
    pids = {pid for k, _, _, pid in read_runs(settings.data_dir)}
    assert {os.getpgid(p) for p in pids} == {gpu.pid}  # run by the gpu worker's pool
    with db.session() as s:
        queues = {w.pid: w.queues for w in s.scalars(select(WorkerRecord))}
    assert queues == {housekeeping.pid: ["ingest"], gpu.pid: ["gpu"]}


def test_whole_node_restart_with_jobs_queued_processing_and_in_the_outbox(embedded, settings, db, tmp_path):
    """kill -9 of listener + worker with one job done but undelivered (PACS down), one processing, one queued:
    after the restart everything finishes, nothing runs or arrives twice."""
    import json

    from node.db.schema import OutboxItem
    from support.env import free_port
    from support.jobs import ListenerProcess, storescu, write_phantom_series
    from support.orthanc import OrthancPacs

    pacs = OrthancPacs(tmp_path / "orthanc")  # ports reserved, not started: the PACS is down at first
    port = free_port()
    env = {
        "MSKNODE_PORT": str(port),
        "MSKNODE_QUIET_SECONDS": "0.5",
        "MSKNODE_STUDY_QUIET_SECONDS": "0.5",
        "MSKNODE_DESTINATIONS": json.dumps([pacs.destination]),
    }
    listener_env = worker_env({"MSKNODE_DATA_DIR": str(settings.data_dir), "MSKNODE_LOG_LEVEL": "INFO", **env})
    studies = [write_phantom_series(tmp_path / f"s{k}", seed=200 + k, slices=12) for k in range(3)]
    listener = ListenerProcess(listener_env, tmp_path / "listener1.log").start()
    try:
        listener.wait_ready(port)
        w1 = embedded(env=env, sleep=4.0)
        for files in studies:
            assert storescu(port, files).wait(60) == 0

        def mid_flight():
            states = sorted(job_states(db).values())
            with db.session() as s:
                tried = s.scalars(
                    select(OutboxItem).where(OutboxItem.attempts >= 1, OutboxItem.state == "pending")
                ).all()
            return states == ["done", "processing", "queued"] and len(tried) == 1

        wait_for(mid_flight, 60, what="one job done with its result undelivered, one processing, one queued")
        w1.kill9()
        listener.kill9()
        pacs.start()
        listener = ListenerProcess(listener_env, tmp_path / "listener2.log").start().wait_ready(port)
        w2 = embedded(env=env, sleep=1.0)

        def delivered():
            with db.session() as s:
                items = s.scalars(select(OutboxItem)).all()
            return set(job_states(db).values()) == {"done"} and len(items) == 3 and {i.state for i in items} == {"sent"}

        try:
            wait_for(delivered, 60, what="all jobs done and delivered")
        except AssertionError:
            print(w2.output()[-4000:])
            raise
        with db.session() as s:
            study_uids = dict(s.execute(select(Job.id, Study.study_uid).join(Study, Study.id == Job.study_id)).all())
            results = dict(s.execute(select(ResultObject.job_id, ResultObject.sop_instance_uid)).all())
        for job_id, study_uid in study_uids.items():
            found = [i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances_of_study(study_uid)]
            assert found == [results[job_id]]  # exactly one result object per study, the job's own
        assert pacs.get("/statistics")["CountInstances"] == 3
    finally:
        listener.stop()
        pacs.stop()

    runs = read_runs(settings.data_dir)
    ends = sorted(j for k, j, *_ in runs if k == "end")
    assert ends == sorted(job_states(db))  # every job finished exactly once
    assert len([r for r in runs if r[0] == "start"]) == 4  # the interrupted one started twice


def test_sigterm_lets_the_running_job_finish_and_stops_cleanly(embedded, settings, db):
    job_id = make_study_job(db)
    w = embedded(sleep=3.0)
    wait_for(lambda: any(k == "start" for k, *_ in read_runs(settings.data_dir)), 40, what="job started")
    import os
    import signal

    os.kill(w.pid, signal.SIGTERM)  # the main process only, as systemd or Ctrl-C would
    assert w.proc.wait(30) == 0, w.output()[-3000:]
    with db.session() as s:
        job = s.get(Job, job_id)
        rec = s.scalars(select(WorkerRecord)).one()
    assert job.state == "done" and job.attempts == 1  # warm shutdown: the job was not interrupted
    assert rec.stopped_at is not None
