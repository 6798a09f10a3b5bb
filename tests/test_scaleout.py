"""The scale-out deployment with real servers: Redis broker + PostgreSQL, several worker processes.

- two workers share the jobs; one is killed with SIGKILL mid-job: every job still finishes exactly once;
- the broker goes down (redis-server killed, no persistence: queued messages are lost too) while jobs
  are created: they wait in the database (enqueue outbox) and run once Redis is back.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from jobs_support import (
    WorkerProcess,
    job_states,
    make_study_job,
    read_runs,
    wait_for,
    worker_env,
)
from node.db import Database
from node.jobs import WorkerRecord, enqueue_pending_jobs
from node.tables import Job, ResultObject

LEASE = 3.0


@pytest.fixture
def scaleout(postgres_url, redis_server, data_dir, tmp_path, monkeypatch):
    """Settings, database and a Redis broker for one test, plus a factory of worker processes."""
    redis = redis_server
    db_url = postgres_url
    env_vars = {
        "MSKNODE_DATA_DIR": str(data_dir),
        "MSKNODE_DATABASE_URL": db_url,
        "MSKNODE_BROKER_URL": redis.url,
        "MSKNODE_JOB_LEASE_SECONDS": str(LEASE),
        "MSKNODE_SWEEP_INTERVAL_SECONDS": "0.5",
        "MSKNODE_JOB_RETRY_BACKOFF_SECONDS": "0.5",
        "MSKNODE_LOG_LEVEL": "INFO",
    }
    import os

    for k in list(os.environ):
        if k.startswith("MSKNODE_"):
            monkeypatch.delenv(k)
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    from node.settings import load_settings

    settings = load_settings()
    db = Database(settings.database_url)
    workers: list[WorkerProcess] = []

    class Node:
        pass

    node = Node()
    node.settings, node.db, node.redis, node.workers = settings, db, redis, workers

    def start_worker(**kw) -> WorkerProcess:
        w = WorkerProcess(worker_env(env_vars), tmp_path / f"worker{len(workers)}.log", **kw).start()
        workers.append(w)
        return w

    node.start_worker = start_worker
    yield node
    for w in workers:
        w.stop(graceful=False)
    db.dispose()


def _alive_workers(node) -> int:
    from node.health import check_workers

    return check_workers(node.db, node.settings)["alive"]


def _dump(node) -> str:
    return "\n".join(w.output()[-3000:] for w in node.workers)


def test_two_workers_one_killed_mid_job_every_job_runs_once(scaleout):
    node = scaleout
    ids = [make_study_job(node.db) for _ in range(6)]
    w1 = node.start_worker(sleep=2.0)
    w2 = node.start_worker(sleep=2.0)
    # wait until both workers hold a job, then crash the first one
    wait_for(lambda: len({pid for k, _, _, pid in read_runs(node.settings.data_dir) if k == "start"}) >= 2, 40,
             what="both workers busy")
    victim_pids = {pid for k, _, _, pid in read_runs(node.settings.data_dir)}
    w1.kill9()
    try:
        wait_for(lambda: set(job_states(node.db).values()) == {"done"}, 60, what="all jobs done")
    except AssertionError:
        print(_dump(node))
        raise
    runs = read_runs(node.settings.data_dir)
    ends = sorted(j for k, j, _, _ in runs if k == "end")
    assert ends == sorted(ids), runs  # every job finished exactly once
    with node.db.session() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == len(ids)
        attempts = dict(s.execute(select(Job.id, Job.attempts)).all())
        assert s.scalar(select(func.count()).select_from(WorkerRecord)) == 2
    interrupted = {j for k, j, a, pid in runs if k == "start" and a == 1} - {j for k, j, a, _ in runs if k == "end" and a == 1}
    assert interrupted, runs  # the killed worker was in the middle of a job ...
    assert all(attempts[j] == 2 for j in interrupted)  # ... which ran again, once
    assert victim_pids and w2.alive()


def test_broker_down_jobs_wait_in_the_database_and_run_when_it_is_back(scaleout):
    node = scaleout
    from node.celery_app import make_celery, send_job

    app = make_celery(node.settings)
    # a job whose wake-up reaches Redis while no worker runs ...
    early = make_study_job(node.db)
    assert enqueue_pending_jobs(node.db, lambda j, q: send_job(app, j, q)).sent == [early]
    # ... and is lost with the broker (no persistence)
    node.redis.stop()
    w = node.start_worker(sleep=0.3)
    late = [make_study_job(node.db) for _ in range(3)]
    # the worker is up (its heartbeat is in the database) and keeps trying; nothing can be enqueued
    wait_for(lambda: _alive_workers(node) == 1, 40, what="worker heartbeat")
    time.sleep(2.0)
    with node.db.session() as s:
        rows = {j.id: j for j in s.scalars(select(Job))}
    assert all(rows[j].state == "queued" and rows[j].enqueue_pending for j in late)
    assert rows[early].state == "queued" and not rows[early].enqueue_pending
    assert w.alive(), w.output()[-3000:]
    from node.health import health_report

    report = health_report(node.settings, node.db, check_listener_too=False)
    assert report["status"] == "degraded" and not report["components"]["broker"]["ok"]
    assert report["components"]["database"]["backend"] == "postgresql" and report["components"]["workers"]["alive"] == 1

    node.redis.start()  # same port, empty
    back = time.monotonic()
    try:
        wait_for(lambda: set(job_states(node.db).values()) == {"done"}, 60, what="all jobs done after broker restart")
    except AssertionError:
        print(_dump(node))
        raise
    print(f"all jobs done {time.monotonic() - back:.1f} s after the broker came back")
    runs = read_runs(node.settings.data_dir)
    assert sorted(j for k, j, _, _ in runs if k == "end") == sorted([early, *late])
    with node.db.session() as s:
        assert all(a == 1 for a in s.scalars(select(Job.attempts)))
    report = health_report(node.settings, node.db, check_listener_too=False)
    assert report["components"]["broker"]["ok"] and report["status"] == "ok"
