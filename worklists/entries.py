"""Worklist entries: one per study, written from a job's findings, changed by people, all audited.

Every function takes the caller's session (one transaction) and adds its audit event to
it, so a change and its record commit together. ``priority`` on an entry is the admin's
override when there is one, otherwise the AI priority; ageing is applied at read time
(`ordered`), because it depends on the clock.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db.schema import Finding, Job, Study
from worklists import audit
from worklists.errors import EntryNotFound, InvalidChange
from worklists.tables import PRIORITIES, User, WorklistEntry
from worklists.triage import Ageing, TriagePolicy, TriageSummary, age, compute, sort_key

log = logging.getLogger(__name__)

SYSTEM = "system"
MAX_REASON = 500
STATUSES = ("unread", "read")


def _entry(session: Session, entry_id: int) -> WorklistEntry:
    entry = session.get(WorklistEntry, entry_id)
    if entry is None:
        raise EntryNotFound(f"worklist entry {entry_id} not found")
    return entry


def _find_entry(session: Session, study_id: int) -> WorklistEntry | None:
    return session.scalars(select(WorklistEntry).where(WorklistEntry.study_id == study_id)).first()


def upsert_for_job(session: Session, *, job_id: int, policy: TriagePolicy, now: dt.datetime) -> WorklistEntry:
    """Writes the study's entry from the job's findings; keeps an admin override; audits as "system"."""
    job = session.get(Job, job_id)
    if job is None:
        raise EntryNotFound(f"job {job_id} not found")
    # findings of models in shadow (silent trial, node.jobs.deployments) never set a priority
    findings = session.scalars(
        select(Finding).where(Finding.job_id == job_id, Finding.shadow.is_(False)).order_by(Finding.id)
    ).all()
    summary = compute(findings, policy)
    entry = _find_entry(session, job.study_id)
    details = {
        "job_id": job_id,
        "pipeline": job.pipeline,
        "score": summary.score,
        "rules": list(summary.matched_rules),
        "policy_version": summary.policy_version,
        "needs_review": summary.needs_review,
    }
    if entry is None:
        entry = WorklistEntry(
            study_id=job.study_id,
            job_id=job_id,
            priority=summary.priority,
            ai_priority=summary.priority,
            score=summary.score,
            reasons=list(summary.reasons),
            needs_review=summary.needs_review,
            status="unread",
            created_at=now,
            updated_at=now,
        )
        try:
            with session.begin_nested():  # another job of the study may have created it meanwhile
                session.add(entry)
        except IntegrityError:
            entry = _find_entry(session, job.study_id)
            if entry is None:  # pragma: no cover - the constraint that failed is the study's entry
                raise
            log.info("worklist entry of study %s was created concurrently; updating it", job.study_id)
            return _update(session, entry, job, summary, details, now)
        audit.record(
            session,
            actor=SYSTEM,
            action="worklist.create",
            entity_type="worklist_entry",
            entity_id=entry.id,
            new=summary.priority,
            reason="; ".join(summary.reasons),
            details=details,
        )
        log.info("worklist entry %s created for job %s: %s", entry.id, job_id, summary.priority)
        return entry
    return _update(session, entry, job, summary, details, now)


def _update(
    session: Session, entry: WorklistEntry, job: Job, summary: TriageSummary, details: dict, now: dt.datetime
) -> WorklistEntry:
    """Updates an existing entry from a job (an older job never overwrites a newer one)."""
    job_id = job.id
    if entry.job_id is not None and entry.job_id != job_id:
        current = session.get(Job, entry.job_id)
        if job.state == "superseded" or (current is not None and current.id > job_id and current.state == "done"):
            log.info("job %s is older than job %s of worklist entry %s: entry kept", job_id, entry.job_id, entry.id)
            return entry

    old_ai, old_priority = entry.ai_priority, entry.priority
    new_results = entry.job_id != job_id
    entry.job_id = job_id
    entry.ai_priority = summary.priority
    entry.score = summary.score
    entry.reasons = list(summary.reasons)
    entry.needs_review = summary.needs_review
    entry.priority = entry.override_priority or summary.priority
    entry.updated_at = now
    if old_ai != summary.priority or new_results:
        audit.record(
            session,
            actor=SYSTEM,
            action="worklist.ai_priority",
            entity_type="worklist_entry",
            entity_id=entry.id,
            old=old_ai,
            new=summary.priority,
            reason="; ".join(summary.reasons),
            details={
                **details,
                "priority_before": old_priority,
                "priority_after": entry.priority,
                "override_kept": entry.override_priority is not None,
            },
        )
    if new_results and entry.status == "read":
        entry.status = "unread"
        audit.record(
            session,
            actor=SYSTEM,
            action="worklist.status",
            entity_type="worklist_entry",
            entity_id=entry.id,
            old="read",
            new="unread",
            reason=f"new AI results (job {job_id}) for a study already read",
        )
    return entry


def override_priority(
    session: Session, *, entry_id: int, priority: str | None, reason: str, actor: str, now: dt.datetime
) -> WorklistEntry:
    """Sets (or, with ``priority=None``, clears) an admin override; a reason is required."""
    entry = _entry(session, entry_id)
    if priority is not None and priority not in PRIORITIES:
        raise InvalidChange(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    reason = (reason or "").strip()
    if not reason:
        raise InvalidChange("a reason is required to change a priority")
    if len(reason) > MAX_REASON:
        raise InvalidChange(f"the reason is longer than {MAX_REASON} characters")
    old = entry.priority
    entry.override_priority = priority
    entry.override_reason = reason if priority is not None else None
    entry.priority = priority or entry.ai_priority
    entry.updated_at = now
    audit.record(
        session,
        actor=actor,
        action="worklist.override_priority" if priority is not None else "worklist.clear_override",
        entity_type="worklist_entry",
        entity_id=entry.id,
        old=old,
        new=entry.priority,
        reason=reason,
        details={"ai_priority": entry.ai_priority, "study_id": entry.study_id},
    )
    return entry


def assign(session: Session, *, entry_id: int, assignee: str | None, actor: str, now: dt.datetime) -> WorklistEntry:
    """Assigns the entry to an active user (``None`` unassigns)."""
    entry = _entry(session, entry_id)
    if assignee is not None:
        user = session.scalars(select(User).where(User.username == assignee)).first()
        if user is None or not user.active:
            raise InvalidChange(f"no active user {assignee!r}")
    old = entry.assigned_to
    entry.assigned_to = assignee
    entry.updated_at = now
    audit.record(
        session,
        actor=actor,
        action="worklist.assign",
        entity_type="worklist_entry",
        entity_id=entry.id,
        old=old,
        new=assignee,
        details={"study_id": entry.study_id},
    )
    return entry


def mark_read(session: Session, *, entry_id: int, actor: str, now: dt.datetime, read: bool = True) -> WorklistEntry:
    """Marks the entry read (or unread again)."""
    entry = _entry(session, entry_id)
    old = entry.status
    entry.status = "read" if read else "unread"
    entry.read_at = now if read else None
    entry.read_by = actor if read else None
    entry.updated_at = now
    audit.record(
        session,
        actor=actor,
        action="worklist.status",
        entity_type="worklist_entry",
        entity_id=entry.id,
        old=old,
        new=entry.status,
        details={"study_id": entry.study_id},
    )
    return entry


@dataclass(frozen=True)
class OrderedEntry:
    """An entry in reading order, with its effective priority (after ageing) and why."""

    entry: WorklistEntry
    study: Study
    job: Job | None
    effective_priority: str
    ageing_reason: str | None
    waiting_since: dt.datetime


def waiting_since(study: Study) -> dt.datetime:
    """Waiting time starts when the study's last image arrived at the node."""
    return study.last_received_at or study.first_received_at


def ordered(
    session: Session,
    *,
    policy: TriagePolicy,
    now: dt.datetime,
    anatomy: str | None = None,
    priority: str | None = None,
    status: str | None = None,
    limit: int | None = None,
) -> list[OrderedEntry]:
    """The worklist in reading order (priority after ageing, then longest waiting, then score).

    With `limit`, unread entries come first and read ones fill the rest, most recently read first.
    """
    q = (
        select(WorklistEntry, Study, Job)
        .join(Study, Study.id == WorklistEntry.study_id)
        .outerjoin(Job, Job.id == WorklistEntry.job_id)
    )
    if anatomy:
        q = q.where(Job.pipeline == anatomy)
    if status == "review":
        q = q.where(WorklistEntry.needs_review.is_(True))
    elif status:
        q = q.where(WorklistEntry.status == status)
    out = []
    for entry, study, job in session.execute(q).all():
        since = waiting_since(study)
        aged: Ageing = age(entry.priority, waiting_since=since, now=now, policy=policy)
        if entry.status == "read":
            aged = Ageing(entry.priority, None)  # a read study no longer competes for attention
        if priority and aged.priority != priority:
            continue
        out.append(OrderedEntry(entry, study, job, aged.priority, aged.reason, since))
    out.sort(
        key=lambda o: (
            (o.entry.status == "read",) + sort_key(o.effective_priority, o.waiting_since, o.entry.score, o.entry.id)
        )
    )
    if limit is not None and len(out) > limit:
        unread = [o for o in out if o.entry.status != "read"]
        read = sorted(
            (o for o in out if o.entry.status == "read"),
            key=lambda o: o.entry.read_at or o.entry.updated_at,
            reverse=True,
        )
        keep = {id(o) for o in (unread + read)[:limit]}
        out = [o for o in out if id(o) in keep]
    return out
