"""A too-short knee series end to end: super-resolution is skipped (its consistency error is NaN),
and the study and job answers are still 200, with null where there is no number.

Before: the NaN was stored in the finding's details and the job's model versions as a bare ``NaN``,
and ``GET /api/studies/{id}`` and ``GET /api/admin/jobs`` answered 500 ("Out of range float values
are not JSON compliant"). The real ``msknode listen`` and production ``msknode worker`` with the
shipped models; dcmtk storescu; the real web server over HTTP.
"""

from __future__ import annotations

import json
import math

import pydicom
import pytest
from sqlalchemy import select, text

from support.env import free_port
from support.jobs import ListenerProcess, storescu, wait_for, write_phantom_series
from support.node_stack import NodeWorker, node_env, study_job
from support.web_server import WebServer, token

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN = ("ada", "ada-password-12")


def test_a_skipped_super_resolution_answers_null_not_500(settings, db, tmp_path):
    from node.db.schema import Finding
    from node.web.users import add_user

    port = free_port()
    env = node_env(
        settings,
        port,
        MSKNODE_ACTIVATE_MODELS="all",
    )
    files = write_phantom_series(tmp_path / "short", seed=21, slices=5, matrix=64)  # too few slices
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    worker = None
    try:
        listener.wait_ready(port)
        worker = NodeWorker(env, tmp_path / "worker.log").start()
        assert storescu(port, files).wait(120) == 0
        try:
            job = wait_for(
                lambda: study_job(db, study_uid, ("done", "failed", "dead")),
                300,
                interval=0.5,
                what="the short series' job finished",
            )
        except AssertionError:
            print(worker.output()[-4000:])
            raise
        assert job.state == "done", worker.output()[-4000:]
    finally:
        if worker is not None:
            worker.stop()
        listener.stop()

    with db.session() as s:
        add_user(s, username=ADMIN[0], password=ADMIN[1], role="admin")
    with WebServer(settings, db) as web, web.client() as c:
        headers = {"Authorization": f"Bearer {token(c, *ADMIN).json()['access_token']}"}
        r = c.get(f"/api/studies/{job.study_id}", headers=headers)
        assert r.status_code == 200, r.text
        body = json.loads(r.text)  # strict: a NaN in the text would not parse as the standard's JSON
        superres = body["superres_checks"]
        assert superres and all(f["consistency_error"] is None for f in superres), superres
        assert "NaN" not in r.text and "Infinity" not in r.text
        r = c.get("/api/admin/jobs", headers=headers)
        assert r.status_code == 200, r.text
        jobs = r.json()["jobs"]
        assert any(j["id"] == job.id for j in jobs)
        assert "NaN" not in r.text
        assert c.get(f"/studies/{job.study_id}", headers=headers).status_code == 200
    with db.session() as s:
        sr = s.scalars(select(Finding).where(Finding.job_id == job.id, Finding.code == "superres")).one()
        assert not sr.evaluated and sr.details["consistency_error"] is None
        # stored as JSON null, not as a bare NaN that PostgreSQL and strict parsers refuse
        raw = [r[0] for r in s.execute(text("SELECT details FROM findings WHERE job_id = :j"), {"j": job.id})]
        raw += [s.execute(text("SELECT model_versions FROM jobs WHERE id = :j"), {"j": job.id}).scalar_one()]
        assert raw and not any("NaN" in str(r) or "Infinity" in str(r) for r in raw), raw
    json.dumps(job.model_versions, allow_nan=False)  # standard JSON: no NaN or Infinity inside

    # the floats that are there are finite
    for f in superres:
        assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in f.values())

    # what the listener and the worker wrote (database, store, broker, results, logs) is theirs alone
    leaky = {
        str(p.relative_to(settings.data_dir)): oct(p.lstat().st_mode & 0o777)
        for p in settings.data_dir.rglob("*")
        if p.lstat().st_mode & 0o077
    }
    assert not leaky and settings.data_dir.stat().st_mode & 0o777 == 0o700, leaky


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_non_finite_floats_are_stored_as_null_on_both_databases(backend, request, tmp_path):
    """Job metrics, finding details and plain Float columns: NaN and ±inf are stored as NULL / JSON null."""
    from node.db.database import Database
    from node.db.schema import Finding, Job
    from support.jobs import make_study_job

    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'n.db'}"
    db = Database(url)
    try:
        job_id = make_study_job(db)
        with db.session() as s:
            job = s.get(Job, job_id)
            job.timings = {"total_s": 1.5, "superres_s": math.nan, "per_series": [math.inf, 2.0]}
            job.model_versions = {"knee.superres": {"superres": [{"consistency_error": float("nan")}]}}
            s.add(
                Finding(
                    job_id=job_id,
                    model_name="knee.superres",
                    model_version="1",
                    weights_sha256="0" * 64,
                    code="superres",
                    label="Super-resolution not done",
                    evaluated=False,
                    probability=math.nan,
                    uncertainty=-math.inf,
                    details={"consistency_error": math.nan, "consistency_passed": False},
                )
            )
        with db.session() as s:
            raw = s.execute(text("SELECT timings, model_versions FROM jobs WHERE id = :j"), {"j": job_id}).one()
            assert not any("NaN" in str(v) or "Infinity" in str(v) for v in raw), raw
            job = s.get(Job, job_id)
            assert job.timings == {"total_s": 1.5, "superres_s": None, "per_series": [None, 2.0]}
            assert job.model_versions["knee.superres"]["superres"][0]["consistency_error"] is None
            f = s.scalars(select(Finding).where(Finding.job_id == job_id)).one()
            assert f.probability is None and f.uncertainty is None
            assert f.details == {"consistency_error": None, "consistency_passed": False}
    finally:
        db.dispose()
