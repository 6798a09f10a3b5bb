"""Findings first, in-process on a real SQLite database: `execute_job` with a two-stage runner that publishes its
findings (`Steps.publish`) before its second stage. The publication commits the findings rows, their result
objects and outbox rows and the worklist entry while the job stays processing; the final commit adds the rest
without touching the published rows; a lost lease publishes nothing; an attempt that dies after publishing is
retried without a second object or outbox row. (The real worker, models and PACS: test_findings_first.py.)"""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select, update

from node.db.schema import Finding, Job, OutboxItem, ResultObject
from node.jobs.runner import (
    PUBLISHED_STEP,
    FindingRecord,
    JobContext,
    JobProducts,
    ResultRecord,
    Steps,
    default_finalizers,
    execute_job,
)
from support.jobs import make_study_job
from worklists.tables import WorklistEntry

pytestmark = pytest.mark.unit

DESTINATIONS = '[{"ae_title": "PACS", "host": "127.0.0.1", "port": 11113}]'


def _finding(ctx: JobContext, code: str, model: str = "fake.cls") -> FindingRecord:
    return FindingRecord(
        model_name=model,
        model_version="1.0",
        weights_sha256="0" * 64,
        code=code,
        label=code,
        series_uid=ctx.inputs[0].series_uid,
        probability=0.9 if code != "superres" else None,
        positive=code != "superres" or None,
    )


def _result(settings, ctx: JobContext, kind: str, n: int = 0) -> ResultRecord:
    uid = "2.25." + str(int(hashlib.sha256(f"{ctx.input_fingerprint}|{kind}|{n}".encode()).hexdigest()[:30], 16))
    path = settings.results_dir / f"{uid}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"result")
    return ResultRecord(kind, "1.2.840.10008.5.1.4.1.1.88.34", uid, uid + ".1", path)


class TwoStageRunner:
    """Publishes an SR and a SEG with one finding, then (stage two) adds two derived objects and a superres row.

    ``between(ctx, steps)`` runs between the two stages (a test's probe or its crash)."""

    def __init__(self, settings, between=None):
        self.settings = settings
        self.between = between

    def __call__(self, ctx: JobContext, steps: Steps) -> JobProducts:
        findings = [_finding(ctx, "acl_tear")]
        results = [_result(self.settings, ctx, "sr"), _result(self.settings, ctx, "seg")]
        versions = {"fake.cls": {"version": "1.0", "weights_sha256": "0" * 64}}
        steps.publish(JobProducts(findings=list(findings), results=list(results), model_versions=dict(versions)))
        if self.between is not None:
            self.between(ctx, steps)
        with steps.step("superres"):
            findings.append(_finding(ctx, "superres", model="superres"))
            results += [_result(self.settings, ctx, "superres", n) for n in range(2)]
        versions["superres"] = {"version": "2", "weights_sha256": "1" * 64}
        return JobProducts(findings=findings, results=results, model_versions=versions)


@pytest.fixture
def settings(settings, monkeypatch):
    monkeypatch.setenv("MSKNODE_DESTINATIONS", DESTINATIONS)
    from node.settings import load_settings

    return load_settings()


def _rows(db, job_id):
    with db.session() as s:
        job = s.get(Job, job_id)
        findings = {f.id: f.code for f in s.scalars(select(Finding).where(Finding.job_id == job_id))}
        kinds = sorted(s.scalars(select(ResultObject.kind).where(ResultObject.job_id == job_id)))
        outbox = s.scalar(select(func.count()).select_from(OutboxItem))
        entry = s.scalar(select(WorklistEntry.job_id).where(WorklistEntry.study_id == job.study_id))
        return job.state, job.step, findings, kinds, outbox, entry


def test_published_findings_are_committed_while_the_job_processes(db, settings):
    job_id = make_study_job(db)
    seen = {}

    def probe(ctx, steps):
        seen["published"] = _rows(db, job_id)

    outcome = execute_job(
        db, settings, job_id, runner=TwoStageRunner(settings, probe), finalizers=default_finalizers(settings)
    )
    assert outcome.state == "done"
    state, step, findings, kinds, outbox, entry = seen["published"]
    assert (state, step) == ("processing", PUBLISHED_STEP)
    assert sorted(findings.values()) == ["acl_tear"] and kinds == ["seg", "sr"] and outbox == 2
    assert entry == job_id  # the worklist entry is there with the findings
    state, step, final_findings, kinds, outbox, entry = _rows(db, job_id)
    assert (state, step) == ("done", None)
    assert kinds == ["seg", "sr", "superres", "superres"] and outbox == 4
    # the published rows are kept as they are (feedback may point at them); the superres row is added
    assert {i: c for i, c in final_findings.items() if c != "superres"} == findings
    assert sorted(final_findings.values()) == ["acl_tear", "superres"]
    job = _job(db, job_id)
    assert {"publish", "superres", "published_after", "total"} <= set(job.timings)
    assert set(job.model_versions) == {"fake.cls", "superres"}


def _job(db, job_id) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def test_a_lost_lease_publishes_nothing(db, settings):
    job_id = make_study_job(db)

    class Stolen(TwoStageRunner):
        def __call__(self, ctx, steps):
            with db.session() as s:  # another worker took the job over (its lease had expired)
                s.execute(update(Job).where(Job.id == job_id).values(lease_owner="someone-else"))
            return super().__call__(ctx, steps)

    assert execute_job(db, settings, job_id, runner=Stolen(settings)).state == "lease_lost"
    state, _step, findings, kinds, outbox, entry = _rows(db, job_id)
    assert state == "processing" and findings == {} and kinds == [] and outbox == 0 and entry is None


def test_an_attempt_that_dies_after_publishing_is_retried_without_duplicates(db, settings):
    job_id = make_study_job(db)

    def crash_once(ctx, steps):
        if ctx.attempt == 1:
            raise RuntimeError("worker lost between publication and final commit")

    runner = TwoStageRunner(settings, crash_once)
    assert execute_job(db, settings, job_id, runner=runner).state == "queued"
    state, _step, findings, kinds, outbox, _entry = _rows(db, job_id)
    assert state == "queued" and kinds == ["seg", "sr"] and outbox == 2  # what was published stays published
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    assert execute_job(db, settings, job_id, runner=runner).state == "done"
    state, _step, findings, kinds, outbox, _entry = _rows(db, job_id)
    assert state == "done" and _job(db, job_id).attempts == 2
    assert kinds == ["seg", "sr", "superres", "superres"] and outbox == 4  # the same objects once, one row each
    assert sorted(findings.values()) == ["acl_tear", "superres"]  # replaced, not doubled


class ReleasingRunner(TwoStageRunner):
    """Publishes like `TwoStageRunner`, then writes six derived objects in three released parts, probing the
    database after each part; ``fail_after``: the part after which it raises (a crash mid-series)."""

    def __init__(self, settings, probe, fail_after=None):
        super().__init__(settings)
        self.probe = probe
        self.fail_after = fail_after

    def __call__(self, ctx, steps):
        findings = [_finding(ctx, "acl_tear")]
        results = [_result(self.settings, ctx, "sr"), _result(self.settings, ctx, "seg")]
        versions = {"fake.cls": {"version": "1.0", "weights_sha256": "0" * 64}}
        assert not steps.release([_result(self.settings, ctx, "superres", 99)])  # nothing before the publication
        steps.publish(JobProducts(findings=list(findings), results=list(results), model_versions=dict(versions)))
        with steps.step("superres_results"):
            for part in range(3):
                records = [_result(self.settings, ctx, "superres", 2 * part + n) for n in range(2)]
                results += records
                assert steps.release(records)
                self.probe(part)
                if part == self.fail_after:
                    raise RuntimeError("disk gone while the derived series was written")
        findings.append(_finding(ctx, "superres", model="superres"))
        return JobProducts(findings=findings, results=results, model_versions=versions)


def test_derived_objects_are_released_in_parts_while_the_job_processes(db, settings):
    """Each released part is committed (result objects and outbox rows) while the job is still processing, so
    the outbox sends it while the next part is written; the final commit writes nothing twice."""
    job_id = make_study_job(db)
    seen = []
    runner = ReleasingRunner(settings, lambda part: seen.append(_rows(db, job_id)))
    assert execute_job(db, settings, job_id, runner=runner).state == "done"
    for part, (state, step, findings, kinds, outbox, _entry) in enumerate(seen):
        assert (state, step) == ("processing", f"{PUBLISHED_STEP}: superres_results")
        assert kinds == ["seg", "sr"] + ["superres"] * (2 * part + 2) and outbox == 4 + 2 * part
        assert sorted(findings.values()) == ["acl_tear"]
    state, step, findings, kinds, outbox, _entry = _rows(db, job_id)
    assert (state, step) == ("done", None)
    assert kinds == ["seg", "sr"] + ["superres"] * 6 and outbox == 8  # once each
    assert sorted(findings.values()) == ["acl_tear", "superres"]


def test_released_parts_stay_when_the_attempt_fails_and_the_retry_adds_the_rest_once(db, settings):
    job_id = make_study_job(db)
    runner = ReleasingRunner(settings, lambda part: None, fail_after=0)
    assert execute_job(db, settings, job_id, runner=runner).state == "queued"
    state, _step, _findings, kinds, outbox, _entry = _rows(db, job_id)
    assert kinds == ["seg", "sr", "superres", "superres"] and outbox == 4  # released: on its way already
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    runner.fail_after = None
    assert execute_job(db, settings, job_id, runner=runner).state == "done"
    state, _step, _findings, kinds, outbox, _entry = _rows(db, job_id)
    assert state == "done" and kinds == ["seg", "sr"] + ["superres"] * 6 and outbox == 8


def test_a_lost_lease_releases_nothing(db, settings):
    from node.jobs.lease import LeaseLost

    job_id = make_study_job(db)
    errors = []

    def steal(part):
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(lease_owner="someone-else"))

    class Probe(ReleasingRunner):
        def __call__(self, ctx, steps):
            try:
                return super().__call__(ctx, steps)
            except LeaseLost as e:
                errors.append(e)
                raise

    assert execute_job(db, settings, job_id, runner=Probe(settings, steal)).state == "lease_lost"
    assert errors  # the second part was refused
    _state, _step, _findings, kinds, outbox, _entry = _rows(db, job_id)
    assert kinds == ["seg", "sr", "superres", "superres"] and outbox == 4  # only what was released before
