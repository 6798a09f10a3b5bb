"""Jobs as JSON: the one shape ``msknode jobs --json`` and the web API share.

`list_jobs` and `jobs_json` return plain dicts with the keys of `JobOut` (the web API declares
it as its response model, so OpenAPI documents it). Before this shape was shared, the command
line and the web API each had their own; it is the union of both, so a script written against
either keeps working:

- from the command line: ``study_uid``, ``input_series`` (series UID, role, models that used it),
  ``input_fingerprint``, ``enqueued_at``, ``not_before``, ``step``;
- from the web API: ``study_id`` and ``dispatch`` (the job's result objects by outbox state,
  and a ``status``: ``no results sent``, ``sending``, ``sent`` or ``failed``).

Times are ISO 8601 with their offset: in UTC from the command line (as before, to the
microsecond), in the site's time zone to the second from the web (``settings.site_timezone``).
``timings`` and ``model_versions`` are objects, empty when nothing was recorded.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.schema import Job, JobInput, OutboxItem, ResultObject, Series, Study


class InputSeriesOut(BaseModel):
    series_uid: str
    role: str | None = Field(description="the series' role in the pipeline, e.g. sag_fluid")
    used_by: list[str] | None = Field(description="the models that used the series (once the job is done)")


class DispatchOut(BaseModel):
    """The job's result objects by outbox state (one per object and destination)."""

    model_config = ConfigDict(extra="allow")

    total: int
    status: str = Field(description="no results sent, sending, sent or failed")
    sent: int
    pending: int
    sending: int
    dead: int


class JobOut(BaseModel):
    """One job (one per study and anatomy)."""

    id: int
    study_id: int
    study_uid: str
    pipeline: str
    state: str = Field(description="pending, queued, processing, done, failed, dead or superseded")
    queue: str | None
    attempts: int
    max_attempts: int
    input_series: list[InputSeriesOut]
    supersedes_job_id: int | None
    input_fingerprint: str | None
    created_at: str | None
    enqueued_at: str | None
    started_at: str | None
    finished_at: str | None
    not_before: str | None
    lease_owner: str | None
    lease_expires_at: str | None
    step: str | None
    timings: dict[str, Any] = Field(description="seconds per step")
    model_versions: dict[str, Any] = Field(description="model name -> version and weights hash")
    error: str | None
    dispatch: DispatchOut


def json_time(value: dt.datetime | None, tz: ZoneInfo | None) -> str | None:
    """A node timestamp as ISO 8601: UTC to the microsecond (``tz`` None), else in ``tz`` to the second."""
    if value is None:
        return None
    if tz is None:
        return value.isoformat()
    return value.astimezone(tz).isoformat(timespec="seconds")


def dispatch_by_job(session: Session, job_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Job id -> its result objects by outbox state (``total``, ``sent``, ``pending``, ``sending``, ``dead``)."""
    out: dict[int, dict[str, int]] = defaultdict(lambda: {"total": 0, "sent": 0, "pending": 0, "sending": 0, "dead": 0})
    if not job_ids:
        return out
    rows = session.execute(
        select(ResultObject.job_id, OutboxItem.state, func.count())
        .join(OutboxItem, OutboxItem.result_object_id == ResultObject.id)
        .where(ResultObject.job_id.in_(list(job_ids)))
        .group_by(ResultObject.job_id, OutboxItem.state)
    ).all()
    for job_id, state, n in rows:
        d = out[job_id]
        d[state] = d.get(state, 0) + n
        d["total"] += n
    return out


def dispatch_status(d: Mapping[str, int] | None) -> str:
    if not d or not d.get("total"):
        return "no results sent"
    if d.get("dead"):
        return "failed"
    if d.get("sent") == d["total"]:
        return "sent"
    return "sending"


def dispatch_json(d: Mapping[str, int] | None) -> dict[str, Any]:
    """The ``dispatch`` object of a job: counts by outbox state and a ``status``."""
    counts = {"total": 0, "sent": 0, "pending": 0, "sending": 0, "dead": 0}
    return {**counts, **(d or {}), "status": dispatch_status(d)}


def jobs_json(session: Session, jobs: Sequence[Job], *, tz: ZoneInfo | None) -> list[dict[str, Any]]:
    """``jobs`` as `JobOut` dicts, in the order given (times in UTC when ``tz`` is None)."""
    ids = [j.id for j in jobs]
    inputs: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    study_uids: dict[int, str] = {}
    if ids:
        for job_id, series_uid, role, used_by in session.execute(
            select(JobInput.job_id, Series.series_uid, JobInput.role, JobInput.used_by)
            .join(Series, Series.id == JobInput.series_id)
            .where(JobInput.job_id.in_(ids))
            .order_by(JobInput.job_id, Series.series_number, Series.id)
        ):
            inputs[job_id].append({"series_uid": series_uid, "role": role, "used_by": used_by})
        study_ids = sorted({j.study_id for j in jobs})
        study_uids = dict(session.execute(select(Study.id, Study.study_uid).where(Study.id.in_(study_ids))).all())
    dispatch = dispatch_by_job(session, ids)
    return [
        {
            "id": j.id,
            "study_id": j.study_id,
            "study_uid": study_uids.get(j.study_id),
            "pipeline": j.pipeline,
            "state": j.state,
            "queue": j.queue,
            "attempts": j.attempts,
            "max_attempts": j.max_attempts,
            "input_series": inputs[j.id],
            "supersedes_job_id": j.supersedes_job_id,
            "input_fingerprint": j.input_fingerprint,
            "created_at": json_time(j.created_at, tz),
            "enqueued_at": json_time(j.enqueued_at, tz),
            "started_at": json_time(j.started_at, tz),
            "finished_at": json_time(j.finished_at, tz),
            "not_before": json_time(j.not_before, tz),
            "lease_owner": j.lease_owner,
            "lease_expires_at": json_time(j.lease_expires_at, tz),
            "step": j.step,
            "timings": j.timings or {},
            "model_versions": j.model_versions or {},
            "error": j.error,
            "dispatch": dispatch_json(dispatch.get(j.id)),
        }
        for j in jobs
    ]


def list_jobs(
    session: Session,
    *,
    tz: ZoneInfo | None,
    state: str | None = None,
    study_uid: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Jobs newest first, as `JobOut` dicts (``state``, ``study_uid`` filter; at most ``limit``)."""
    q = select(Job).order_by(Job.id.desc())
    if state:
        q = q.where(Job.state == state)
    if study_uid:
        q = q.join(Study, Study.id == Job.study_id).where(Study.study_uid == study_uid)
    if limit:
        q = q.limit(limit)
    return jobs_json(session, session.scalars(q).all(), tz=tz)
