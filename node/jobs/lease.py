"""Jobs in the database: lease, heartbeat, finish/fail with bounded retries, the enqueue outbox, the sweeper.

The database is the record of every job; the broker only carries wake-ups (a job id).

- A worker *claims* a queued job with one conditional UPDATE (state ``queued`` and
  ``not_before`` passed → ``processing`` with ``lease_owner`` and ``lease_expires_at``);
  only one claimer can win. While it works, a `LeaseKeeper` thread renews the lease.
- The job is finished (``done``) or failed in a transaction that checks the lease is
  still ours, so a worker that lost its lease can never commit.
- A failed attempt goes back to ``queued`` with ``not_before`` = now + backoff until
  ``max_attempts``; then the job is ``dead`` (visible, retried only by ``msknode jobs
  retry ID``). A permanent error (bad input) makes it ``failed`` at once.
- *Enqueue outbox*: a job is sent to the broker only after its row is committed
  (``enqueue_pending``); `enqueue_pending_jobs` sends and then clears the flag, so a
  broker that is down only delays the job.
- The *sweeper* requeues jobs whose lease expired (worker killed) and re-sends
  wake-ups for queued jobs whose message was lost.

Every function takes the `Database` (or a session) and the time; nothing here talks
to Celery directly (the broker is a ``send(job_id, queue)`` callable).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, aliased

from node.db.database import Database, execute_dml, utcnow
from node.db.schema import Job, JobInput, Series, WorkerRecord
from node.errors import JobError

log = logging.getLogger(__name__)

#: job states a person may retry with ``msknode jobs retry ID``
RETRYABLE_STATES = ("failed", "dead")
#: the longest wait between two attempts
MAX_BACKOFF_SECONDS = 3600.0


class LeaseLost(JobError):
    """The job's lease is no longer ours (expired and taken by another worker, or retried)."""


class PermanentJobError(JobError):
    """An error that another attempt cannot fix (bad input); the job becomes ``failed`` at once."""


@dataclass(frozen=True)
class Lease:
    """A claimed job: who holds it and which attempt this is."""

    job_id: int
    owner: str
    attempt: int
    max_attempts: int
    expires_at: dt.datetime


@dataclass
class EnqueueReport:
    sent: list[int] = field(default_factory=list)
    error: str | None = None  # the broker error that stopped this round, if any


@dataclass
class SweepReport:
    requeued: list[int] = field(default_factory=list)  # lease expired, back to queued
    dead: list[int] = field(default_factory=list)  # lease expired on the last attempt
    resent: list[int] = field(default_factory=list)  # wake-up lost, will be sent again


def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def new_lease_owner() -> str:
    """A lease owner token unique to one attempt: ``host:pid:random``."""
    return f"{worker_name()}:{uuid.uuid4().hex[:12]}"


def backoff_seconds(attempt: int, base: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): base, 2·base, 4·base … capped."""
    return min(base * (2 ** max(attempt - 1, 0)), MAX_BACKOFF_SECONDS)


def _audit(session: Session, action: str, job_id: int, old: str | None, new: str | None, **details) -> None:
    from worklists.audit import record

    record(
        session,
        actor="system",
        action=action,
        entity_type="job",
        entity_id=job_id,
        old=old,
        new=new,
        details={k: v for k, v in details.items() if v is not None} or None,
    )


def _set_series_state(session: Session, job_id: int, state: str, *, only_from: Iterable[str]) -> None:
    """Sets the state of the job's input series, except those a newer job has taken over."""
    ids = select(JobInput.series_id).where(JobInput.job_id == job_id)
    newer = aliased(JobInput)
    taken_over = (
        select(newer.series_id)
        .join(Job, Job.id == newer.job_id)
        .where(newer.series_id == Series.id, Job.id > job_id, Job.state != "superseded")
        .exists()
    )
    session.execute(
        update(Series)
        .where(Series.id.in_(ids), Series.state.in_(tuple(only_from)), ~taken_over)
        .values(state=state)
        .execution_options(synchronize_session=False)
    )


# ---- claim, renew, finish, fail ------------------------------------------------------------


def claim(
    db: Database, job_id: int, *, owner: str, lease_seconds: float, now: dt.datetime | None = None
) -> Lease | None:
    """Takes the job if it is queued and due; returns the lease, or None if someone else has it / it is not due."""
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=lease_seconds)
    with db.session() as s:
        res = execute_dml(
            s,
            update(Job)
            .where(
                Job.id == job_id,
                Job.state == "queued",
                or_(Job.not_before.is_(None), Job.not_before <= now),
            )
            .values(
                state="processing",
                lease_owner=owner,
                lease_expires_at=expires,
                attempts=Job.attempts + 1,
                started_at=now,
                finished_at=None,
                enqueue_pending=False,
                step=None,
            )
            .execution_options(synchronize_session=False),
        )
        if res.rowcount != 1:
            return None
        attempts, max_attempts = s.execute(select(Job.attempts, Job.max_attempts).where(Job.id == job_id)).one()
        _set_series_state(s, job_id, "processing", only_from=("queued", "complete", "failed", "processing"))
        _audit(s, "job.processing", job_id, "queued", "processing", attempt=attempts, owner=owner)
    return Lease(job_id=job_id, owner=owner, attempt=attempts, max_attempts=max_attempts, expires_at=expires)


def renew(db: Database, lease: Lease, *, lease_seconds: float, now: dt.datetime | None = None) -> dt.datetime | None:
    """Extends the lease; returns the new expiry, or None if the lease is no longer ours."""
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=lease_seconds)
    return expires if _update_leased(db, lease, lease_expires_at=expires) else None


def set_step(db: Database, lease: Lease, step: str | None) -> bool:
    """Records the step the attempt is in (shown as progress); False if the lease is no longer ours."""
    return _update_leased(db, lease, step=step)


def _update_leased(db: Database, lease: Lease, **values) -> bool:
    """Sets columns of the job in one transaction if the lease is still ours (False otherwise)."""
    with db.session() as s:
        res = execute_dml(
            s,
            update(Job)
            .where(Job.id == lease.job_id, Job.state == "processing", Job.lease_owner == lease.owner)
            .values(**values)
            .execution_options(synchronize_session=False),
        )
        return res.rowcount == 1


def _locked_job(session: Session, lease: Lease) -> Job:
    job = session.get(Job, lease.job_id, with_for_update=True, populate_existing=True)
    if job is None or job.state != "processing" or job.lease_owner != lease.owner:
        raise LeaseLost(f"job {lease.job_id}: lease {lease.owner} is no longer held")
    return job


def locked_job(session: Session, lease: Lease) -> Job:
    """The leased job, locked for the caller's transaction (e.g. to publish its findings before it is done);
    raises `LeaseLost` if the lease is no longer ours, which rolls the whole transaction back."""
    return _locked_job(session, lease)


def mark_done(
    session: Session,
    lease: Lease,
    *,
    now: dt.datetime,
    timings: Mapping[str, float] | None = None,
    model_versions: Mapping[str, object] | None = None,
) -> Job:
    """Marks the job done inside the caller's transaction (the one that stores its results).

    Raises `LeaseLost` if the lease is no longer ours, which rolls the whole transaction back.
    """
    job = _locked_job(session, lease)
    newer_done = session.scalar(select(Job.id).where(Job.supersedes_job_id == job.id, Job.state == "done").limit(1))
    # a later job over the study finished first: this one is history as soon as it is done
    job.state = "superseded" if newer_done is not None else "done"
    job.step = None
    job.finished_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    job.not_before = None
    job.error = None
    if timings is not None:
        job.timings = dict(timings)
    if model_versions is not None:
        job.model_versions = dict(model_versions)
    _set_series_state(session, job.id, "done", only_from=("processing", "queued", "failed"))
    if job.supersedes_job_id is not None:
        session.execute(
            update(Job)
            .where(Job.id == job.supersedes_job_id, Job.state.in_(("done", "failed", "dead")))
            .values(state="superseded")
            .execution_options(synchronize_session=False)
        )
        _audit(session, "job.superseded", job.supersedes_job_id, None, "superseded", by_job=job.id)
    _audit(session, "job.done", job.id, "processing", job.state, attempt=lease.attempt)
    return job


def fail(
    db: Database,
    lease: Lease,
    *,
    error: str,
    retryable: bool,
    backoff_base: float,
    now: dt.datetime | None = None,
    timings: Mapping[str, float] | None = None,
) -> str:
    """Records a failed attempt; returns the new state: ``queued`` (retry later), ``dead`` or ``failed``.

    Raises `LeaseLost` if the lease is no longer ours (nothing is changed then).
    """
    now = now or utcnow()
    with db.session() as s:
        job = _locked_job(s, lease)
        job.error = error[:4000]
        job.step = None
        job.lease_owner = None
        job.lease_expires_at = None
        if timings is not None:
            job.timings = dict(timings)
        retry_at: dt.datetime | None = None
        if not retryable:
            job.state = "failed"
            job.finished_at = now
        elif job.attempts >= job.max_attempts:
            job.state = "dead"
            job.finished_at = now
        else:
            retry_at = now + dt.timedelta(seconds=backoff_seconds(job.attempts, backoff_base))
            job.state = "queued"
            job.not_before = retry_at
            job.enqueue_pending = True
        if retry_at is not None:  # queued again
            _set_series_state(s, job.id, "queued", only_from=("processing",))
            _audit(
                s,
                "job.retry_scheduled",
                job.id,
                "processing",
                "queued",
                attempt=job.attempts,
                error=job.error,
                not_before=retry_at.isoformat(),
            )
        else:
            _set_series_state(s, job.id, "failed", only_from=("processing", "queued"))
            _audit(s, f"job.{job.state}", job.id, "processing", job.state, attempt=job.attempts, error=job.error)
        return job.state


class LeaseKeeper:
    """A heartbeat thread that renews a job's lease every third of the lease time.

    `check()` raises `LeaseLost` once a renewal found the lease taken; the pipeline calls it
    between steps, and the final commit checks the lease again in its transaction.
    """

    def __init__(self, db: Database, lease: Lease, *, lease_seconds: float, logger: logging.Logger | None = None):
        self.db = db
        self.lease = lease
        self.lease_seconds = lease_seconds
        self.interval = max(lease_seconds / 3.0, 0.05)
        self.log = logger or log
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.lease_seconds)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        if self._lost.is_set():
            raise LeaseLost(f"job {self.lease.job_id}: lease {self.lease.owner} was lost")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if renew(self.db, self.lease, lease_seconds=self.lease_seconds) is None:
                    self.log.warning(
                        "job %s: lease %s lost; this attempt will not commit", self.lease.job_id, self.lease.owner
                    )
                    self._lost.set()
                    return
            except Exception as e:  # a database hiccup: keep trying until the lease would expire
                self.log.warning("job %s: lease renewal failed: %s", self.lease.job_id, e)


# ---- enqueue outbox and sweeper -------------------------------------------------------------


def enqueue_pending_jobs(
    db: Database,
    send: Callable[[int, str], None],
    *,
    now: dt.datetime | None = None,
    limit: int = 200,
) -> EnqueueReport:
    """Sends a wake-up for every committed job with ``enqueue_pending`` that is due, then clears the flag.

    The send happens before the flag is cleared: a crash in between only sends a duplicate
    (harmless, the claim is conditional). A broker error stops the round; the jobs stay pending.
    """
    now = now or utcnow()
    report = EnqueueReport()
    with db.session() as s:
        rows = s.execute(
            select(Job.id, Job.queue)
            .where(
                Job.state == "queued",
                Job.enqueue_pending.is_(True),
                or_(Job.not_before.is_(None), Job.not_before <= now),
            )
            .order_by(Job.id)
            .limit(limit)
        ).all()
    for job_id, queue in rows:
        try:
            send(job_id, queue)
        except Exception as e:
            report.error = f"{type(e).__name__}: {e}"
            log.debug("broker unavailable, job %s stays pending: %s", job_id, report.error)
            break
        report.sent.append(job_id)
    if report.sent:
        with db.session() as s:
            s.execute(
                update(Job)
                .where(Job.id.in_(report.sent), Job.enqueue_pending.is_(True))
                .values(enqueue_pending=False, enqueued_at=now)
                .execution_options(synchronize_session=False)
            )
    return report


def sweep(
    db: Database,
    *,
    now: dt.datetime | None = None,
    lease_seconds: float,
    queue_depths: Mapping[str, int] | Callable[[], Mapping[str, int]] | None = None,
) -> SweepReport:
    """Requeues jobs whose lease expired and marks lost wake-ups for re-sending.

    - ``processing`` with an expired lease: the worker died. Back to ``queued`` (sent again at
      once), or ``dead`` if that was the last attempt.
    - ``queued``, already sent, due, and sent more than ``lease_seconds`` ago: if the broker's
      queue holds fewer messages than the queue has waiting jobs (``queue_depths``), the oldest
      of them lost their message and are re-sent. Without depths (broker unreachable),
      a job is re-sent when its last wake-up is older than twice the lease time.
      ``queue_depths`` may be a callable, asked only when there is such a job.
    Safe to run in several processes at once: every change is a conditional UPDATE.
    """
    now = now or utcnow()
    report = SweepReport()
    with db.session() as s:
        expired = s.scalars(
            select(Job.id).where(Job.state == "processing", Job.lease_expires_at < now).order_by(Job.id)
        ).all()
    for job_id in expired:
        with db.session() as s:
            job = s.get(Job, job_id, with_for_update=True, populate_existing=True)
            if job is None or job.state != "processing" or job.lease_expires_at is None or job.lease_expires_at >= now:
                continue
            owner = job.lease_owner
            job.lease_owner = None
            job.lease_expires_at = None
            job.step = None
            if job.attempts >= job.max_attempts:
                job.state = "dead"
                job.finished_at = now
                job.error = (
                    f"worker lost on the last attempt ({job.attempts} of {job.max_attempts}); lease of {owner} expired"
                )
                _set_series_state(s, job_id, "failed", only_from=("processing",))
                _audit(s, "job.dead", job_id, "processing", "dead", attempt=job.attempts, error=job.error)
                report.dead.append(job_id)
            else:
                job.state = "queued"
                job.not_before = None
                job.enqueue_pending = True
                job.error = f"attempt {job.attempts}: worker lost (lease of {owner} expired)"
                _set_series_state(s, job_id, "queued", only_from=("processing",))
                _audit(s, "job.requeued", job_id, "processing", "queued", attempt=job.attempts, reason="lease expired")
                report.requeued.append(job_id)
        log.warning("job %s: lease expired, %s", job_id, "dead" if job_id in report.dead else "requeued")

    grace = dt.timedelta(seconds=lease_seconds)
    with db.session() as s:
        waiting = s.execute(
            select(Job.id, Job.queue, Job.enqueued_at)
            .where(
                Job.state == "queued",
                Job.enqueue_pending.is_(False),
                or_(Job.not_before.is_(None), Job.not_before <= now),
            )
            .order_by(Job.enqueued_at, Job.id)
        ).all()
    by_queue: dict[str, list[tuple[int, dt.datetime | None]]] = {}
    for job_id, queue, enqueued_at in waiting:
        by_queue.setdefault(queue, []).append((job_id, enqueued_at))
    resend: list[int] = []
    depths: Mapping[str, int] | None = None
    if callable(queue_depths) and any(at is None or at < now - grace for _, _, at in waiting):
        try:
            depths = queue_depths()
        except Exception as e:
            log.warning("broker queue depths unavailable: %s", e)
    elif not callable(queue_depths):
        depths = queue_depths
    for queue, jobs in by_queue.items():
        old = [j for j, at in jobs if at is None or at < now - grace]
        if not old:
            continue
        if depths is not None and queue in depths:
            missing = len(jobs) - depths[queue]
            resend.extend(old[: max(missing, 0)])
        else:
            resend.extend(j for j, at in jobs if at is None or at < now - 2 * grace)
    if resend:
        with db.session() as s:
            s.execute(
                update(Job)
                .where(Job.id.in_(resend), Job.state == "queued", Job.enqueue_pending.is_(False))
                .values(enqueue_pending=True)
                .execution_options(synchronize_session=False)
            )
        report.resent = resend
        log.warning("re-sending lost wake-ups for jobs %s", resend)
    return report


def retry_job(db: Database, job_id: int, *, actor: str = "system", now: dt.datetime | None = None) -> Job:
    """Puts a failed or dead job back in the queue with a fresh attempt budget (audited)."""
    now = now or utcnow()
    from worklists.audit import record

    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise JobError(f"no job with id {job_id}")
        if job.state not in RETRYABLE_STATES:
            raise JobError(f"job {job_id} is {job.state}; only {' or '.join(RETRYABLE_STATES)} jobs can be retried")
        old_state, old_error = job.state, job.error
        job.state = "queued"
        job.attempts = 0
        job.not_before = None
        job.lease_owner = None
        job.lease_expires_at = None
        job.finished_at = None
        job.error = None
        job.enqueue_pending = True
        _set_series_state(s, job_id, "queued", only_from=("failed", "processing", "done"))
        record(
            s,
            actor=actor,
            action="job.retry",
            entity_type="job",
            entity_id=job_id,
            old=old_state,
            new="queued",
            details={"previous_error": old_error} if old_error else None,
        )
        return job


# ---- worker heartbeats ------------------------------------------------------------------------


def heartbeat(db: Database, *, name: str, queues: list[str], now: dt.datetime | None = None) -> None:
    """Records that the worker ``name`` is alive (an upsert of its `WorkerRecord`)."""
    now = now or utcnow()
    hostname, _, pid = name.rpartition(":")
    with db.session() as s:
        rec = s.get(WorkerRecord, name)
        if rec is None:
            s.add(
                WorkerRecord(
                    name=name,
                    hostname=hostname,
                    pid=int(pid or 0),
                    queues=list(queues),
                    started_at=now,
                    last_seen_at=now,
                )
            )
        else:
            rec.last_seen_at = now
            rec.queues = list(queues)
            rec.stopped_at = None


def worker_stopped(db: Database, *, name: str, now: dt.datetime | None = None) -> None:
    with db.session() as s:
        s.execute(update(WorkerRecord).where(WorkerRecord.name == name).values(stopped_at=now or utcnow()))


def live_workers(session: Session, *, now: dt.datetime, stale_after: float) -> list[WorkerRecord]:
    """Workers that sent a heartbeat within ``stale_after`` seconds and did not stop."""
    return list(
        session.scalars(
            select(WorkerRecord)
            .where(
                and_(
                    WorkerRecord.stopped_at.is_(None),
                    WorkerRecord.last_seen_at >= now - dt.timedelta(seconds=stale_after),
                )
            )
            .order_by(WorkerRecord.name)
        ).all()
    )
