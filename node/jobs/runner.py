"""The per-job runner: claim the job, run its steps, publish its findings, then store the rest.

`execute_job` is the plain function behind the Celery task (and what tests call):

1. claim the job by lease (`node.jobs.lease.claim`) and keep the lease alive (`LeaseKeeper`);
2. load the job's context: pipeline, input series with their roles and stored files, the
   results of the job it supersedes;
3. call the *runner* — a ``JobRunner`` callable ``(JobContext, Steps) -> JobProducts``.
   `ModelPipelineRunner` is the real one (models.io → models.pipelines → worklists.triage →
   node.results); tests pass their own;
4. *findings first*: once the runner has its findings objects (SR, SEG(s), overlays) on disk it
   calls ``steps.publish(products)``: ONE transaction that re-checks the lease and writes those
   findings rows, their ``result_objects`` and ``outbox`` rows and runs the *finalizers* (the
   worklist entry), leaving the job ``processing`` (step ``published``). The outbox sends them at
   once, while the runner goes on with super-resolution;
5. the final commit, ONE transaction that re-checks the lease: the remaining findings rows (the
   informational ``superres`` ones), ``result_objects`` and ``outbox`` rows (the super-resolved
   series), the job ``done`` with timings (``publish`` among them) and model versions. A runner that
   never publishes has everything written here, with the finalizers, as one transaction;
6. on error: a failed attempt (retry with backoff, ``dead`` after max attempts, ``failed`` at
   once for bad input). What an attempt published stays published (it is in the PACS already).

Idempotent: result UIDs are derived from the job's input fingerprint and model versions, and
``result_objects.sop_instance_uid`` and ``outbox (result_object_id, destination)`` are unique, so a
re-leased job never creates a second SR/SEG: a worker that dies between the publication and the final
commit leaves a ``processing`` job whose lease expires; the next attempt computes the same objects,
publishes them again (nothing new is stored or queued; the job's findings rows are replaced) and commits
the rest. An attempt whose lease was lost cannot publish or commit.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.db.database import Database, utcnow
from node.db.schema import Finding, Instance, Job, JobInput, OutboxItem, ResultObject, Series, Study
from node.jobs.lease import (
    Lease,
    LeaseKeeper,
    LeaseLost,
    PermanentJobError,
    claim,
    fail,
    locked_job,
    mark_done,
    new_lease_owner,
    set_step,
)
from node.results.objects import ResultRef
from node.settings import REPORT_DESTINATION_TYPES, Settings

log = logging.getLogger(__name__)

#: derived result objects (super-resolved instances) written and committed at a time after the publication
RELEASE_CHUNK = 16
#: the step of a job whose findings are published (committed, being sent) while the rest is computed
PUBLISHED_STEP = "published"


# ---- what a runner gets and returns -----------------------------------------------------------


@dataclass(frozen=True)
class InputSeries:
    series_id: int
    series_uid: str
    role: str | None
    series_number: int | None
    paths: tuple[Path, ...]  # stored files, sorted by instance number


@dataclass(frozen=True)
class JobContext:
    job_id: int
    pipeline: str
    study_uid: str
    input_fingerprint: str
    attempt: int
    inputs: tuple[InputSeries, ...]
    predecessors: tuple[ResultRef, ...] = ()  # the result objects of the job this one supersedes
    max_attempts: int = 1

    def source_files(self) -> dict[str, list[Path]]:
        """Series UID → stored files, for the result writers."""
        return {i.series_uid: list(i.paths) for i in self.inputs}


@dataclass
class FindingRecord:
    """One ``findings`` row: a model output (or a 'not evaluated' with the QC reason)."""

    model_name: str
    model_version: str
    weights_sha256: str
    code: str
    label: str
    series_uid: str | None = None
    evaluated: bool = True
    qc_reason: str | None = None
    qc_message: str | None = None
    probability: float | None = None
    uncertainty: float | None = None
    positive: bool | None = None
    grade: str | None = None
    level: str | None = None
    site: str | None = None
    laterality: str | None = None
    details: dict[str, Any] | None = None
    shadow: bool = False  # the model runs in shadow at this site (node.jobs.deployments)


@dataclass(frozen=True)
class ResultRecord:
    """A DICOM object written to disk for the job; becomes a ``result_objects`` row + outbox rows."""

    kind: str  # sr, seg, superres, sc
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    path: Path


@dataclass
class JobProducts:
    findings: list[FindingRecord] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)
    model_versions: dict[str, Any] = field(default_factory=dict)  # model name -> {version, weights_sha256}
    used_by: dict[str, list[str]] = field(default_factory=dict)  # series UID -> model names that used it


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    state: str  # done, queued (retry later), failed, dead, skipped, lease_lost
    error: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


class Steps:
    """Times named steps (``with steps.step("inference"): ...``) and checks the lease between them.

    `publish` hands the findings of the job to `execute_job` before the runner goes on (findings first);
    without ``on_publish`` (a runner called on its own) it does nothing and everything is committed at the end.
    """

    def __init__(
        self,
        keeper: LeaseKeeper | None = None,
        on_step: Callable[[str], object] | None = None,
        on_publish: Callable[[JobProducts], object] | None = None,
        on_release: Callable[[list[ResultRecord]], object] | None = None,
    ):
        self.keeper = keeper
        self.on_step = on_step
        self.on_publish = on_publish
        self.on_release = on_release
        self.timings: dict[str, float] = {}
        self.current: str | None = None
        self.published: JobProducts | None = None

    def publish(self, products: JobProducts) -> bool:
        """Commits ``products`` (the findings rows and findings objects, saved) as the job's published results, in
        the step ``publish``; the job stays ``processing``. Once per attempt. True if they were published; raises
        `LeaseLost` when the lease is gone (nothing is written then)."""
        if self.on_publish is None:
            return False
        if self.published is not None:
            raise RuntimeError("a job's findings are published once per attempt")
        with self.step("publish"):
            self.on_publish(products)
        self.published = products
        return True

    def release(self, records: list[ResultRecord]) -> bool:
        """Commits derived result objects (saved) after the findings were published, so the outbox sends them
        while the runner writes the rest (a long super-resolved series leaves in parts as it is written). True
        if they were committed; False before `publish` or without ``on_release`` (then everything is committed
        at the end); raises `LeaseLost` when the lease is gone. What is released stays (in the PACS too) if the
        attempt fails later; the next attempt makes the same objects."""
        if self.on_release is None or self.published is None or not records:
            return False
        self.check()
        self.on_release(records)
        return True

    def check(self) -> None:
        if self.keeper is not None:
            self.keeper.check()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.check()
        self.current = name
        if self.on_step is not None:
            self.on_step(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)
        self.current = None
        self.check()


class JobRunner(Protocol):
    def __call__(self, ctx: JobContext, steps: Steps) -> JobProducts: ...


#: called inside the commit transaction after the job is marked done (e.g. the worklist entry)
Finalizer = Callable[[Session, JobContext, dt.datetime], None]


# ---- loading the context --------------------------------------------------------------------


def _resolve(settings: Settings, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else settings.store_dir / p


def load_context(db: Database, settings: Settings, lease: Lease) -> JobContext:
    with db.session() as s:
        job = s.get(Job, lease.job_id)
        if job is None:
            raise PermanentJobError(f"job {lease.job_id} does not exist")
        study_uid = s.scalar(select(Study.study_uid).where(Study.id == job.study_id))
        rows = s.execute(
            select(JobInput.series_id, JobInput.role, Series.series_uid, Series.series_number)
            .join(Series, Series.id == JobInput.series_id)
            .where(JobInput.job_id == job.id)
            .order_by(Series.series_number, Series.id)
        ).all()
        inputs = []
        for series_id, role, series_uid, series_number in rows:
            paths = (
                s.execute(
                    select(Instance.path)
                    .where(Instance.series_id == series_id)
                    .order_by(Instance.instance_number, Instance.id)
                )
                .scalars()
                .all()
            )
            inputs.append(
                InputSeries(series_id, series_uid, role, series_number, tuple(_resolve(settings, p) for p in paths))
            )
        predecessors: list[ResultRef] = []
        if job.supersedes_job_id is not None:
            for ro in s.scalars(
                select(ResultObject).where(ResultObject.job_id == job.supersedes_job_id).order_by(ResultObject.id)
            ):
                predecessors.append(
                    ResultRef(
                        sop_instance_uid=ro.sop_instance_uid,
                        series_uid=ro.series_uid,
                        study_uid=study_uid or "",
                        sop_class_uid=ro.sop_class_uid,
                        kind=ro.kind,
                    )
                )
        return JobContext(
            job_id=job.id,
            pipeline=job.pipeline,
            study_uid=study_uid or "",
            input_fingerprint=job.input_fingerprint or f"job-{job.id}",
            attempt=lease.attempt,
            max_attempts=lease.max_attempts,
            inputs=tuple(inputs),
            predecessors=tuple(predecessors),
        )


# ---- committing ------------------------------------------------------------------------------


def store_products(
    session: Session,
    settings: Settings,
    ctx: JobContext,
    lease: Lease,
    products: JobProducts,
    *,
    timings: Mapping[str, float] | None,
    now: dt.datetime,
    finalizers: Sequence[Finalizer] = (),
    stage: str = "all",
) -> None:
    """Writes what a job produced, inside the caller's transaction (raises `LeaseLost` if not ours).

    ``stage``: ``all`` — everything, the job ``done``, the job's findings rows replaced, the finalizers;
    ``publish`` — the findings first: the job's findings rows replaced by ``products.findings``, their
    objects and outbox rows, the finalizers, the job left ``processing`` at step ``published`` (with the
    model versions known so far); ``final`` — after a publication: ``products.findings`` are added to the
    published rows, the job ``done`` (the finalizers ran at the publication); ``derived`` — between the two:
    ``products.results`` alone (objects and outbox rows; no findings), the job unchanged (`Steps.release`).
    Result objects and outbox rows are written once per SOP instance and destination in every stage.
    """
    if stage not in ("all", "publish", "final", "derived"):
        raise ValueError(f"unknown stage {stage!r}")
    if stage == "publish":
        job = locked_job(session, lease)
        job.step = PUBLISHED_STEP
        job.model_versions = dict(products.model_versions)
        if timings is not None:
            job.timings = dict(timings)
    elif stage == "derived":
        if products.findings:
            raise ValueError("derived results are released without findings rows")
        locked_job(session, lease)  # still ours
    else:
        mark_done(session, lease, now=now, timings=timings, model_versions=products.model_versions)
    if stage in ("all", "publish"):
        session.execute(delete(Finding).where(Finding.job_id == ctx.job_id))
    for f in products.findings:
        session.add(Finding(job_id=ctx.job_id, **f.__dict__))
    destinations = [d.key for d in settings.destinations]
    # HL7 and FHIR destinations get one report per job, hung on its SR (the message is built from the job)
    report_destinations = {d.key for d in settings.destinations if d.type in REPORT_DESTINATION_TYPES}
    for r in products.results:
        ro = session.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == r.sop_instance_uid))
        if ro is None:
            ro = ResultObject(
                job_id=ctx.job_id,
                kind=r.kind,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_uid=r.series_uid,
                path=str(r.path),
            )
            session.add(ro)
            session.flush()
        elif ro.job_id != ctx.job_id:
            # the same inputs and model versions as an earlier job: the same object, already known
            log.info("job %s: result %s already stored by job %s", ctx.job_id, r.sop_instance_uid, ro.job_id)
        have = set(session.scalars(select(OutboxItem.destination).where(OutboxItem.result_object_id == ro.id)))
        for dest in destinations:
            if dest in report_destinations and r.kind != "sr":
                continue
            if dest not in have:
                session.add(OutboxItem(result_object_id=ro.id, destination=dest, state="pending", next_attempt_at=now))
    if products.used_by:
        for ji in session.scalars(select(JobInput).where(JobInput.job_id == ctx.job_id)):
            uid = next((i.series_uid for i in ctx.inputs if i.series_id == ji.series_id), None)
            if uid in products.used_by:
                ji.used_by = list(products.used_by[uid])
    session.flush()
    if stage in ("final", "derived"):
        return
    for fin in finalizers:
        fin(session, ctx, now)


# ---- the runner loop for one job -------------------------------------------------------------


def default_permanent_errors() -> tuple[type[BaseException], ...]:
    """Errors another attempt cannot fix: bad input volumes, an unknown pipeline or role, missing or
    corrupt weights, inputs the result writers cannot make valid. (``msknode jobs retry`` after a fix.)"""
    from models.errors import PipelineError, RegistryError, VolumeError
    from node.errors import ResultsError

    return (PermanentJobError, ResultsError, VolumeError, PipelineError, RegistryError)


def _describe(exc: BaseException, steps: Steps, settings: Settings) -> str:
    name = type(exc).__name__
    where = f" in step {steps.current}" if steps.current else ""
    if name == "SoftTimeLimitExceeded":
        return f"time limit of {settings.job_soft_time_limit:g} s exceeded{where}"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}{where}: {msg}" if msg else f"{name}{where}"


def execute_job(
    db: Database,
    settings: Settings,
    job_id: int,
    *,
    runner: JobRunner,
    finalizers: Sequence[Finalizer] = (),
    owner: str | None = None,
    permanent_errors: tuple[type[BaseException], ...] | None = None,
    logger: logging.Logger | None = None,
) -> JobOutcome:
    """Runs one job if it can be claimed now; returns what happened. Never raises for a job's own failure."""
    logger = logger or log
    owner = owner or new_lease_owner()
    lease = claim(db, job_id, owner=owner, lease_seconds=settings.job_lease_seconds)
    if lease is None:
        logger.info("job %s: not claimable now (taken, not due or finished); wake-up ignored", job_id)
        return JobOutcome(job_id, "skipped")
    logger.info("job %s: attempt %s of %s started by %s", job_id, lease.attempt, lease.max_attempts, owner)
    permanent = permanent_errors if permanent_errors is not None else default_permanent_errors()
    t_start = time.perf_counter()
    with LeaseKeeper(db, lease, lease_seconds=settings.job_lease_seconds, logger=logger) as keeper:
        loaded: list[JobContext] = []
        marks: dict[str, float] = {}  # published_after: seconds from the claim to the published findings

        def on_step(name: str) -> None:
            # after the publication the step says so (the job stays processing while the rest is computed)
            set_step(db, lease, name if steps.published is None else f"{PUBLISHED_STEP}: {name}"[:32])

        def on_publish(products: JobProducts) -> None:
            if not loaded:
                raise RuntimeError("publish before the job's context is loaded")
            marks["published_after"] = round(time.perf_counter() - t_start, 4)
            timings = {**steps.timings, **marks}
            with db.session() as s:
                store_products(
                    s,
                    settings,
                    loaded[0],
                    lease,
                    products,
                    timings=timings,
                    now=utcnow(),
                    finalizers=finalizers,
                    stage="publish",
                )
            logger.info(
                "job %s: findings published after %.2f s (%d objects; attempt %s)",
                job_id,
                marks["published_after"],
                len(products.results),
                lease.attempt,
            )

        def on_release(records: list[ResultRecord]) -> None:
            with db.session() as s:
                store_products(
                    s,
                    settings,
                    loaded[0],
                    lease,
                    JobProducts(findings=[], results=list(records), model_versions={}, used_by={}),
                    timings=None,
                    now=utcnow(),
                    stage="derived",
                )

        steps = Steps(keeper, on_step=on_step, on_publish=on_publish, on_release=on_release)
        try:
            with steps.step("load_context"):
                ctx = load_context(db, settings, lease)
            loaded.append(ctx)
            products = runner(ctx, steps)
            steps.check()
            timings = dict(steps.timings)
            timings["total"] = round(time.perf_counter() - t_start, 4)
            timings.update(marks)
            published = steps.published
            now = utcnow()
            with db.session() as s:
                if published is None:
                    store_products(s, settings, ctx, lease, products, timings=timings, now=now, finalizers=finalizers)
                else:
                    # the findings rows already published are not written again (feedback may point at them)
                    done_ids = {id(f) for f in published.findings}
                    rest = JobProducts(
                        findings=[f for f in products.findings if id(f) not in done_ids],
                        results=list(products.results),
                        model_versions=products.model_versions,
                        used_by=products.used_by,
                    )
                    store_products(s, settings, ctx, lease, rest, timings=timings, now=now, stage="final")
            logger.info("job %s: done in %.2f s (attempt %s)", job_id, timings["total"], lease.attempt)
            return JobOutcome(job_id, "done", timings=timings)
        except LeaseLost as e:
            kept = "; its published findings stay (the next attempt makes the same objects)" if steps.published else ""
            logger.warning("job %s: %s; results of this attempt discarded%s", job_id, e, kept)
            return JobOutcome(job_id, "lease_lost", error=str(e))
        except Exception as e:
            error = _describe(e, steps, settings)
            retryable = not isinstance(e, permanent)
            timings = dict(steps.timings)
            timings["total"] = round(time.perf_counter() - t_start, 4)
            if retryable:
                logger.exception("job %s: attempt %s failed: %s", job_id, lease.attempt, error)
            else:
                logger.error("job %s: attempt %s failed permanently: %s", job_id, lease.attempt, error)
            try:
                state = fail(
                    db,
                    lease,
                    error=error,
                    retryable=retryable,
                    backoff_base=settings.job_retry_backoff_seconds,
                    timings=timings,
                )
            except LeaseLost as lost:
                logger.warning("job %s: %s", job_id, lost)
                return JobOutcome(job_id, "lease_lost", error=error)
            return JobOutcome(job_id, state, error=error, timings=timings)


# ---- the real runner: models → triage → results ---------------------------------------------


def findings_from_output(output: Any) -> list[FindingRecord]:
    """``findings`` rows from a `models.types.PipelineOutput`: one per finding, one per refused model.

    Super-resolution adds one informational row per source series (code ``superres``: its QC and
    data-consistency check), which triage ignores.
    """
    rows: list[FindingRecord] = []
    for mo in output.outputs:
        info = mo.model
        base = dict(
            model_name=info.name,
            model_version=info.version,
            weights_sha256=info.weights_sha256,
            series_uid=mo.series_uid or None,
        )
        if not mo.qc.accepted:
            rows.append(
                FindingRecord(
                    **base,
                    code=info.name,
                    label=f"{info.name}: not evaluated ({mo.qc.reason or 'quality check failed'})",
                    evaluated=False,
                    qc_reason=mo.qc.reason,
                    qc_message=mo.qc.message,
                    details={"qc_metrics": dict(mo.qc.metrics)} if mo.qc.metrics else None,
                )
            )
            continue
        # what the QC gate measured on the accepted input (voxel size, intensity, embedding distance ...):
        # the input-drift figures of the model dashboard (worklists.monitoring)
        qc_metrics = {k: float(v) for k, v in (mo.qc.metrics or {}).items() if isinstance(v, (int, float))}
        qc_metrics = {k: v for k, v in qc_metrics.items() if math.isfinite(v)}
        for f in mo.findings:
            details: dict[str, Any] = {}
            if qc_metrics:
                details["qc_metrics"] = qc_metrics
            if f.threshold is not None:
                details["threshold"] = f.threshold
            if f.grade_probabilities:
                details["grade_probabilities"] = dict(f.grade_probabilities)
            if f.location is not None:
                details["location"] = [int(v) for v in f.location]
            if f.location_mm is not None:
                details["location_mm"] = [float(v) for v in f.location_mm]
            rows.append(
                FindingRecord(
                    **base,
                    code=f.code,
                    label=f.label,
                    evaluated=True,
                    probability=None if f.probability is None else float(f.probability),
                    uncertainty=None if f.uncertainty is None else float(f.uncertainty),
                    positive=bool(f.positive),
                    grade=f.grade,
                    level=f.level,
                    site=f.site,
                    details=details or None,
                )
            )
    for sr in output.superres:
        info = sr.model
        rows.append(
            FindingRecord(
                model_name=info.name,
                model_version=info.version,
                weights_sha256=info.weights_sha256,
                series_uid=sr.source.series_uid or None,
                code="superres",
                label="Super-resolved series" if sr.qc.accepted else f"Super-resolution not done ({sr.qc.reason})",
                evaluated=bool(sr.qc.accepted),
                qc_reason=sr.qc.reason,
                qc_message=sr.qc.message,
                details={
                    "consistency_error": float(sr.consistency_error),
                    "consistency_tolerance": float(sr.consistency_tolerance),
                    "consistency_passed": bool(sr.consistency_passed),
                },
            )
        )
    return rows


def model_versions_of(output: Any) -> dict[str, Any]:
    """Model name → version and weights hash (super-resolution also with its QC and consistency check)."""
    versions: dict[str, Any] = {}
    for mo in output.outputs:
        versions[mo.model.name] = {"version": mo.model.version, "weights_sha256": mo.model.weights_sha256}
    for sr in output.superres:
        entry = versions.setdefault(
            sr.model.name, {"version": sr.model.version, "weights_sha256": sr.model.weights_sha256}
        )
        entry.setdefault("superres", []).append(
            {
                "series_uid": sr.source.series_uid,
                "accepted": bool(sr.qc.accepted),
                "qc_reason": sr.qc.reason,
                "consistency_error": float(sr.consistency_error),
                "consistency_tolerance": float(sr.consistency_tolerance),
                "consistency_passed": bool(sr.consistency_passed),
            }
        )
    for lv in getattr(output, "levels", None) or []:  # the level segmentation (its SEG and the stenosis placement)
        versions.setdefault(lv.model.name, {"version": lv.model.version, "weights_sha256": lv.model.weights_sha256})[
            "levels"
        ] = {
            "series_uid": lv.series_uid,
            "accepted": bool(lv.qc.accepted),
            "qc_reason": lv.qc.reason,
            "found": list(lv.found),
            "estimated": list(lv.estimated),
        }
    return versions


class ModelPipelineRunner:
    """The production runner: load volumes by role, run the pipeline, triage, write result objects.

    Each model runs in the version selected for the pipeline at this site, in its state
    (`node.jobs.deployments`): a model in shadow has its findings stored (``shadow``) but left out of
    triage and of every result object; when all of them are in shadow the job writes no result object.
    """

    def __init__(self, settings: Settings, *, registry: Any = None, db: Database | None = None):
        self.settings = settings
        # read by the super-resolution model when it is loaded (the setting may come from a settings file)
        os.environ["MSKNODE_SUPERRES_BF16"] = settings.superres_bf16
        self._registry = registry
        self._db = db
        self._registries: dict[tuple[tuple[str, str], ...], Any] = {}

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.settings.database_url, migrate=False)
        return self._db

    def registry_for(self, overrides: Mapping[str, Path]) -> Any:
        """The registry with the site versions ``overrides`` (model -> folder) in place, one per combination."""
        if not overrides:
            return self.registry
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in self._registries:
            from models.registry import Registry

            self._registries[key] = Registry(self.settings.weights_dir, overrides=overrides)
        return self._registries[key]

    @property
    def registry(self):
        if self._registry is None:
            from models.registry import Registry

            self._registry = Registry(self.settings.weights_dir)
        return self._registry

    def warm_up(self) -> None:
        """Imports the model code and torch and opens the registry (once per worker process)."""
        import torch

        from models import io, pipelines  # noqa: F401

        torch.set_num_threads(self.settings.torch_threads)
        _ = self.registry  # opened now, not by the first job
        from node.jobs import deployments

        deployments.log_configured(self.settings, log)  # which models this configuration activates, if any

    def __call__(self, ctx: JobContext, steps: Steps) -> JobProducts:
        settings = self.settings
        with steps.step("setup"):  # first job of a process: imports, model registry
            from models import io, pipelines

            if ctx.pipeline not in pipelines.PIPELINES:
                raise PermanentJobError(f"unknown pipeline {ctx.pipeline!r}")
            import torch

            torch.set_num_threads(settings.torch_threads)
            from node.jobs import deployments

            deployed = deployments.for_pipeline(self.db, settings, self.registry, ctx.pipeline)
            registry = self.registry_for(deployments.registry_overrides(deployed))
            shadow = {m for m, d in deployed.items() if d.shadow}

        volumes: dict[str, Any] = {}
        with steps.step("load"):
            from node.jobs import limits

            refused = limits.oversized(ctx.inputs, settings.max_series_voxels)  # never loaded: series_too_large
            for inp in ctx.inputs:
                if not inp.role or inp.role == "localizer" or inp.role in volumes or inp.role in refused:
                    continue
                if not inp.paths:
                    raise PermanentJobError(f"series {inp.series_uid} has no stored instances")
                volumes[inp.role] = io.load_series(list(inp.paths))
        with steps.step("inference"):  # the findings: classifiers, level segmentation (no super-resolution yet)
            output = limits.mark_refused(
                pipelines.run_pipeline(ctx.pipeline, volumes, registry=registry, superres=False),
                ctx.pipeline,
                refused,
            )
        for name, secs in (output.timings or {}).items():
            steps.timings[f"inference.{name}"] = round(float(secs), 4)

        findings = findings_from_output(output)
        for f in findings:
            f.shadow = f.model_name in shadow
        live = without_models(output, shadow)
        with steps.step("triage"):
            from worklists import triage

            policy = triage.load_policy(settings.triage_policy)
            summary = triage.compute(triage.findings_from_pipeline(live), policy)
        records: list[ResultRecord] = []
        writes = not (shadow and not live.outputs)
        sources: dict[str, Any] = {}  # source series read for the findings objects, reused for the derived series
        if not writes:
            log.info(
                "job %s: every model of pipeline %s is in shadow (%s); findings stored, no result object written",
                ctx.job_id,
                ctx.pipeline,
                ", ".join(sorted(shadow)),
            )
        else:
            with steps.step("results"):
                from node.results.build import build_findings

                predecessors = [r for r in ctx.predecessors if r.kind == "sr"]
                files = build_findings(
                    output=live,
                    source_files=ctx.source_files(),
                    triage=summary,
                    predecessors=predecessors,
                    settings=settings,
                    job_fingerprint=ctx.input_fingerprint,
                    sources_cache=sources,
                )
                records += _records(files, settings)

        def products_of(out: Any) -> JobProducts:
            used_by: dict[str, list[str]] = {}
            for model_name, series_uids in (out.used_series or {}).items():
                for uid in series_uids:
                    used_by.setdefault(uid, []).append(model_name)
            versions = model_versions_of(out)
            for name, d in deployed.items():
                if name in versions:
                    versions[name]["state"] = d.state
            return JobProducts(findings=list(findings), results=list(records), model_versions=versions, used_by=used_by)

        if not pipelines.PIPELINES[ctx.pipeline].superres:
            return products_of(output)
        # findings first: committed and on their way to the PACS while super-resolution runs
        steps.publish(products_of(output))

        published = len(records)
        try:
            with steps.step("superres"):
                output = self.super_resolve(ctx, output, volumes, registry)
            for name, secs in (output.timings or {}).items():
                steps.timings[f"inference.{name}"] = round(float(secs), 4)
            superres_rows = findings_from_output(replace(output, outputs=[], levels=[]))  # informational rows
            if writes and output.superres:
                with steps.step("superres_results"):
                    from node.results.build import build_superres

                    files = build_superres(
                        output=without_models(output, shadow),
                        source_files=ctx.source_files(),
                        settings=settings,
                        job_fingerprint=ctx.input_fingerprint,
                        sources_cache=sources,
                    )
                    # written and committed in parts: the outbox sends each part while the next is written
                    for start in range(0, len(files), RELEASE_CHUNK):
                        part = _records(files[start : start + RELEASE_CHUNK], settings)
                        records += part
                        steps.release(part)
        except LeaseLost:
            raise
        except Exception as e:
            # the findings are in the PACS already: a super-resolution that cannot be done (bad input, missing
            # weights) or failed on the last attempt leaves the job done without the derived series, saying why
            if not isinstance(e, default_permanent_errors()) and ctx.attempt < ctx.max_attempts:
                raise
            del records[published:]
            superres_rows = [superres_not_done(registry, steps.current or "superres", e)]
            log.error("job %s: super-resolution not done after the findings were published: %s", ctx.job_id, e)
        for f in superres_rows:
            f.shadow = f.model_name in shadow
        findings += superres_rows
        return products_of(output)

    def super_resolve(self, ctx: JobContext, output: Any, volumes: Mapping[str, Any], registry: Any) -> Any:
        """The second stage, after the findings are published: `models.pipelines.run_superres`."""
        from models import pipelines

        return pipelines.run_superres(output, volumes, registry=registry)


def superres_not_done(registry: Any, step: str, error: BaseException) -> FindingRecord:
    """The ``superres`` row of a job whose super-resolution failed for good after its findings were published."""
    from models.registry import MODEL_SUPERRES

    try:
        info = registry.info(MODEL_SUPERRES)
        name, version, sha = info.name, info.version, info.weights_sha256
    except Exception:  # the weights themselves may be what failed
        name, version, sha = MODEL_SUPERRES, "", ""
    reason = f"{type(error).__name__} in step {step}"
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else reason
    return FindingRecord(
        model_name=name,
        model_version=version,
        weights_sha256=sha,
        code="superres",
        label=f"Super-resolution not done (error: {reason})",
        evaluated=False,
        qc_reason="error",
        qc_message=message,
    )


def _records(files: Sequence[Any], settings: Settings) -> list[ResultRecord]:
    """Saves result files (`save_all`) and returns their records."""
    return [
        ResultRecord(rf.kind, rf.sop_class_uid, rf.sop_instance_uid, rf.series_uid, path)
        for rf, path in zip(files, save_all(files, settings))
    ]


#: threads that fsync a job's result files at once (the file system commits concurrent fsyncs together)
FSYNC_THREADS = 8


def save_all(files: Sequence[Any], settings: Any) -> list[Path]:
    """Writes a job's result objects (`node.results.ResultFile`) where `node.results.save` would, as durably,
    with fewer journal commits: every object to a temporary file beside its final path, then all of them
    fsync'd at once by a few threads, then each renamed into place and the directories fsync'd. Every
    object is on disk before this returns (before the outbox rows are committed); on an error nothing
    temporary is left behind and the error is raised."""
    import os
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from node.results import result_path
    from node.results.encode import BatchWriter

    staged: list[tuple[int, str, Path]] = []  # open fd, temporary path, final path
    writer = BatchWriter([rf.dataset for rf in files])  # the slices of a derived series share elements
    try:
        for rf in files:
            path = result_path(rf, settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
            staged.append((fd, tmp, path))
            with os.fdopen(os.dup(fd), "wb") as fh:
                writer.write(fh, rf.dataset)
        if len(staged) > 1:
            with ThreadPoolExecutor(min(FSYNC_THREADS, len(staged)), thread_name_prefix="msknode-fsync") as ex:
                list(ex.map(os.fsync, [fd for fd, _, _ in staged]))
        elif staged:
            os.fsync(staged[0][0])
        for _fd, tmp, path in staged:
            os.replace(tmp, path)
        for d in dict.fromkeys(path.parent for _, _, path in staged):
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return [path for _, _, path in staged]
    except BaseException:
        for _, tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        for fd, _, _ in staged:
            os.close(fd)


def without_models(output: Any, names: set[str]) -> Any:
    """The `PipelineOutput` without the outputs of the models ``names`` (the ones in shadow)."""
    if not names:
        return output
    import dataclasses

    return dataclasses.replace(
        output,
        outputs=[o for o in output.outputs if o.model.name not in names],
        used_series={k: v for k, v in (output.used_series or {}).items() if k not in names},
    )


def worklist_finalizer(settings: Settings) -> Finalizer:
    """Updates the study's worklist entry after a job is done."""
    from worklists import entries, triage

    policy_cache: dict[str, Any] = {}

    def finalize(session: Session, ctx: JobContext, now: dt.datetime) -> None:
        if "policy" not in policy_cache:
            policy_cache["policy"] = triage.load_policy(settings.triage_policy)
        entries.upsert_for_job(session, job_id=ctx.job_id, policy=policy_cache["policy"], now=now)

    return finalize


def default_finalizers(settings: Settings) -> list[Finalizer]:
    return [worklist_finalizer(settings)]
