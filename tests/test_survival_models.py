"""kill -9 of the worker in the middle of inference, with the real node: ``msknode listen``,
``msknode worker`` (model pipeline, result writers, dispatch), a knee phantom study sent with
storescu, and a real Orthanc as the PACS. After a new worker starts, the job completes once and
exactly one set of results reaches Orthanc."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from sqlalchemy import select

from node.db.schema import Job, OutboxItem, ResultObject, Study
from support.env import free_port
from support.jobs import ListenerProcess, WorkerProcess, job_states, storescu, wait_for
from support.node_stack import NodeWorker, node_env
from support.orthanc import OrthancPacs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE = 5.0


def test_kill9_mid_inference_job_completes_once_and_results_reach_orthanc_once(settings, db, tmp_path):
    from models.phantoms import write_study

    pacs = OrthancPacs(tmp_path / "orthanc").start()
    port = free_port()
    env = node_env(
        settings,
        port,
        MSKNODE_DESTINATIONS=json.dumps([pacs.destination]),
        MSKNODE_JOB_LEASE_SECONDS=str(LEASE),
        # the shipped models live, as the demo runs them (at a site they start in shadow: nothing sent)
        MSKNODE_ACTIVATE_MODELS="all",
    )
    files = write_study("knee", tmp_path / "study", 11, acl="complete")
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    workers: list[WorkerProcess] = []
    try:
        listener.wait_ready(port)
        workers.append(NodeWorker(env, tmp_path / "worker1.log").start())
        assert storescu(port, [p for paths in files.values() for p in paths]).wait(120) == 0

        def in_inference():
            with db.session() as s:
                return s.scalars(select(Job).where(Job.step == "inference")).first()

        try:
            job = wait_for(in_inference, 120, what="the job in its inference step")
        except AssertionError:
            print(workers[0].output()[-4000:])
            raise
        time.sleep(1.0)
        workers[0].kill9()
        killed_at = dt.datetime.now(dt.UTC)
        with db.session() as s:
            assert s.get(Job, job.id).state == "processing"
            assert not s.scalars(select(ResultObject)).all()  # nothing committed by the killed attempt

        workers.append(NodeWorker(env, tmp_path / "worker2.log").start())

        def delivered():
            with db.session() as s:
                items = s.scalars(select(OutboxItem)).all()
            return job_states(db)[job.id] == "done" and items and {i.state for i in items} == {"sent"}

        try:
            wait_for(delivered, 240, what="job done and its results sent")
        except AssertionError:
            print(workers[1].output()[-4000:])
            raise
        with db.session() as s:
            done = s.get(Job, job.id)
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == done.study_id))
            results = s.scalars(select(ResultObject).where(ResultObject.job_id == job.id)).all()
            jobs_total = len(s.scalars(select(Job)).all())
        assert jobs_total == 1 and done.attempts == 2 and done.error is None
        # the new attempt started within the lease expiry + the new worker's start-up + a few seconds
        restart_delay = (done.started_at - killed_at).total_seconds()
        print(f"attempt 2 started {restart_delay:.1f} s after kill -9 (lease {LEASE:g} s); timings {done.timings}")
        assert restart_delay < LEASE + 20, restart_delay
        kinds = sorted(r.kind for r in results)
        assert kinds.count("sr") == 1 and len({r.sop_instance_uid for r in results}) == len(results)
        in_pacs = pacs.instances_of_study(study_uid)
        assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in in_pacs) == sorted(
            r.sop_instance_uid for r in results
        )
        assert pacs.get("/statistics")["CountInstances"] == len(results)  # one set, nothing else
    finally:
        for w in workers:
            w.stop(graceful=False)
        listener.stop()
        pacs.stop()
