"""The scale-out deployment with real servers: Redis broker + PostgreSQL, several worker processes.

- two workers share the jobs; one is killed with SIGKILL mid-job: every job still finishes exactly once;
- the broker goes down (redis-server killed, no persistence: queued messages are lost too) while jobs
  are created: they wait in the database (enqueue outbox) and run once Redis is back.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from node.db.database import Database
from node.db.schema import Job, ResultObject, WorkerRecord
from node.jobs.lease import enqueue_pending_jobs
from support.env import isolate_env
from support.jobs import (
    WorkerProcess,
    job_states,
    make_study_job,
    read_runs,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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
    isolate_env(monkeypatch, **env_vars)
    from node.settings import load_settings

    settings = load_settings()
    db = Database(settings.database_url)
    workers: list[WorkerProcess] = []

    class Node:
        pass

    node = Node()
    node.settings, node.db, node.redis, node.workers, node.env = settings, db, redis, workers, env_vars

    def start_worker(env: dict | None = None, **kw) -> WorkerProcess:
        w = WorkerProcess(worker_env({**env_vars, **(env or {})}), tmp_path / f"worker{len(workers)}.log", **kw).start()
        workers.append(w)
        return w

    node.start_worker = start_worker
    yield node
    for w in workers:
        w.stop(graceful=False)
    db.dispose()


def _alive_workers(node) -> int:
    from node.ops.health import check_workers

    return check_workers(node.db, node.settings)["alive"]


def _dump(node) -> str:
    return "\n".join(w.output()[-3000:] for w in node.workers)


def test_two_workers_one_killed_mid_job_every_job_runs_once(scaleout):
    node = scaleout
    ids = [make_study_job(node.db) for _ in range(6)]
    w1 = node.start_worker(sleep=2.0)
    w2 = node.start_worker(sleep=2.0)
    # wait until both workers hold a job, then crash the first one
    wait_for(
        lambda: len({pid for k, _, _, pid in read_runs(node.settings.data_dir) if k == "start"}) >= 2,
        40,
        what="both workers busy",
    )
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
    interrupted = {j for k, j, a, pid in runs if k == "start" and a == 1} - {
        j for k, j, a, _ in runs if k == "end" and a == 1
    }
    assert interrupted, runs  # the killed worker was in the middle of a job ...
    assert all(attempts[j] == 2 for j in interrupted)  # ... which ran again, once
    assert victim_pids and w2.alive()


def test_broker_down_series_keep_arriving_and_jobs_run_when_it_is_back(scaleout, tmp_path):
    """Redis killed: the listener keeps storing, completeness keeps creating jobs (in PostgreSQL), their
    wake-ups wait in the database; a wake-up that was inside Redis is lost with it and re-sent."""
    from node.db.schema import Instance, Series
    from node.jobs.celery_app import make_celery, send_job
    from node.ops.health import health_report
    from support.env import free_port
    from support.jobs import ListenerProcess, storescu, write_phantom_series

    node = scaleout
    app = make_celery(node.settings)
    # a job whose wake-up reaches Redis while no worker runs ...
    early = make_study_job(node.db)
    assert enqueue_pending_jobs(node.db, lambda j, q: send_job(app, j, q)).sent == [early]
    # ... and is lost with the broker (no persistence)
    node.redis.stop()
    port = free_port()
    extra = {"MSKNODE_PORT": str(port), "MSKNODE_QUIET_SECONDS": "0.5", "MSKNODE_STUDY_QUIET_SECONDS": "0.5"}
    listener = ListenerProcess(worker_env({**node.env, **extra}), tmp_path / "listener.log").start()
    try:
        listener.wait_ready(port)
        w = node.start_worker(sleep=0.3, env=extra)
        wait_for(lambda: _alive_workers(node) == 1, 40, what="worker heartbeat")
        for k in range(2):
            files = write_phantom_series(tmp_path / f"s{k}", seed=300 + k, slices=10)
            assert storescu(port, files).wait(60) == 0  # the listener does not need the broker

        def late_jobs():
            with node.db.session() as s:
                return list(s.scalars(select(Job).where(Job.id != early)))

        late = wait_for(lambda: len(late_jobs()) == 2 and late_jobs(), 40, what="jobs created while the broker is down")
        time.sleep(1.5)  # the worker keeps trying to enqueue them
        with node.db.session() as s:
            rows = {j.id: j for j in s.scalars(select(Job))}
            assert (
                s.scalar(select(func.count()).select_from(Instance)) == 3 + 20
            )  # the early job's rows + 2 × 10 stored
        assert all(rows[j.id].state == "queued" and rows[j.id].enqueue_pending for j in late)
        # its wake-up died with Redis; after twice the lease the sweeper marks it for re-sending
        assert rows[early].state == "queued"
        assert w.alive(), w.output()[-3000:]
        report = health_report(node.settings, node.db, check_listener_too=False)
        assert report["status"] == "degraded" and not report["components"]["broker"]["ok"]
        assert report["components"]["database"]["backend"] == "postgresql"
        assert report["components"]["workers"]["alive"] == 1

        node.redis.start()  # same port, empty
        back = time.monotonic()
        try:
            wait_for(
                lambda: set(job_states(node.db).values()) == {"done"}, 60, what="all jobs done after broker restart"
            )
        except AssertionError:
            print(_dump(node))
            raise
        print(f"all jobs done {time.monotonic() - back:.1f} s after the broker came back")
    finally:
        listener.stop()
    runs = read_runs(node.settings.data_dir)
    assert sorted(j for k, j, _, _ in runs if k == "end") == sorted([early, *(j.id for j in late)])
    with node.db.session() as s:
        assert all(a == 1 for a in s.scalars(select(Job.attempts)))
        assert set(s.scalars(select(Series.state))) == {"done"}
    report = health_report(node.settings, node.db, check_listener_too=False)
    assert report["components"]["broker"]["ok"] and report["status"] == "ok"
