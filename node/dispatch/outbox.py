"""Reliable delivery of result objects: the durable outbox (the senders are `node.dispatch.senders`).

An ``outbox`` row is one result object for one destination; it is forgotten only once
the destination acknowledged it (state ``sent``). `process_outbox`:

1. claims due items in one transaction — ``pending`` ones whose ``next_attempt_at`` has
   come, and ``sending`` ones whose lease expired (a sender that died: a restart resumes
   them) — by setting a lease (owner + expiry) on each;
2. sends them per destination, findings first: the SR and SEG objects of the batch over one
   association (or HTTP session), and only once they are answered the derived objects (overlays,
   super-resolved series) over up to ``MSKNODE_DISPATCH_ASSOCIATIONS`` associations at once, so a
   PACS shows the findings of a study before its derived series and a long series is not sent
   one instance after another over a single association;
3. records each outcome in its own transaction as soon as the destination answered, only while
   the lease is still ours (a long batch extends the leases of its remaining items):
   - acknowledged (0x0000 or a warning 0xB000/0xB006/0xB007, STOW 200/202 with the instance
     in the Referenced SOP Sequence) → ``sent``; never sent again;
   - transient failure (connection refused or timed out, association rejected-transient or
     aborted, 0xA7xx out of resources, 0x0110 processing failure, HTTP 5xx/408/429) →
     ``pending`` again with exponential backoff, ``dead`` after `RetryPolicy.max_attempts`;
   - permanent refusal (0x0122 SOP class not supported / no presentation context accepted,
     association rejected-permanent, 0xA9xx, 0xCxxx, 0x0124, HTTP 4xx) → ``dead`` at once
     with the reason.

Dead-lettered items are listed by ``msknode outbox --json`` and re-queued by
``msknode outbox retry ID`` (`retry_item`). Delivery is at least once; the only window
for a repeat is a crash between the acknowledgement and its commit, and the repeat
carries the same SOP Instance UID, which a PACS stores once.

Errors: `node.errors.DispatchError` (+ Transient/Permanent) for refused retries.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, bindparam, case, or_, select
from sqlalchemy.orm import Session

from node.db.database import Database, utcnow
from node.db.driver import DriverStatement
from node.db.schema import Job, OutboxItem, ResultObject, Study
from node.dispatch.senders import SENDERS, Claimed, Outcome, Sender
from node.errors import DispatchError, PermanentDispatchError, TransientDispatchError
from node.settings import Settings

log = logging.getLogger(__name__)

SENT, PENDING, SENDING, DEAD = "sent", "pending", "sending", "dead"

#: the order result objects are sent in: findings (SR, then SEG) before derived objects
KIND_ORDER = {"sr": 0, "seg": 1, "sc": 2, "superres": 3}
#: the kinds sent first, over one association, before any derived object of the batch
FINDINGS_KINDS = frozenset({"sr", "seg"})
#: destination types whose derived objects may go over several associations (sessions) at once
PARALLEL_TYPES = frozenset({"dimse", "stow"})


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures: base * 2**(attempts-1), capped; dead after max_attempts."""

    base_delay: float = 5.0
    max_delay: float = 1800.0
    max_attempts: int = 30
    lease_seconds: float = 300.0

    def delay(self, attempts: int) -> float:
        return float(min(self.max_delay, self.base_delay * (2 ** max(0, attempts - 1))))


@dataclass
class DispatchReport:
    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    dead: int = 0
    lease_lost: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed,
            "sent": self.sent,
            "retrying": self.retrying,
            "dead": self.dead,
            "lease_lost": self.lease_lost,
            "errors": list(self.errors),
        }


# ---- the outbox ------------------------------------------------------------------------------------


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _due(now: Any):
    return or_(
        and_(OutboxItem.state == PENDING, or_(OutboxItem.next_attempt_at.is_(None), OutboxItem.next_attempt_at <= now)),
        and_(
            OutboxItem.state == SENDING, or_(OutboxItem.lease_expires_at.is_(None), OutboxItem.lease_expires_at < now)
        ),
    )


def anything_due(engine: Engine, now: dt.datetime) -> bool:
    """Whether any outbox item is due (`claim` would take something), asked so that it never waits for or takes
    SQLite's write lock: on a plain DB-API connection outside a transaction (the node's sessions begin
    IMMEDIATE). The dispatch loop asks it many times a second and claims only when it says yes. On other
    databases the claim's own read takes no lock: always True there."""
    if engine.dialect.name != "sqlite":
        return True
    statement = _DUE_STATEMENTS.get(engine.dialect.name)
    if statement is None:
        due = select(OutboxItem.id).where(_due(bindparam("now", type_=OutboxItem.next_attempt_at.type))).limit(1)
        statement = _DUE_STATEMENTS.setdefault(engine.dialect.name, DriverStatement(due, engine.dialect))
    conn = engine.raw_connection()
    try:
        return bool(statement.fetchall(conn.driver_connection, {"now": now}))
    finally:
        conn.close()


#: dialect name -> the compiled statement of `anything_due` (compiled once per process)
_DUE_STATEMENTS: dict[str, DriverStatement] = {}


def claim(session: Session, *, now: dt.datetime, owner: str, limit: int, lease_seconds: float) -> list[Claimed]:
    """Leases up to ``limit`` due items to ``owner`` (inside the caller's transaction), findings first."""
    return [c for c, _ in claim_with_kinds(session, now=now, owner=owner, limit=limit, lease_seconds=lease_seconds)]


def _kind_rank():
    return case(KIND_ORDER, value=ResultObject.kind, else_=len(KIND_ORDER))


def claim_with_kinds(
    session: Session, *, now: dt.datetime, owner: str, limit: int, lease_seconds: float
) -> list[tuple[Claimed, str]]:
    """`claim`, each item with its result object's kind; in order of due time, then SR, SEG, SC, super-resolved."""
    q = (
        select(OutboxItem, ResultObject)
        .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
        .where(_due(now))
        .order_by(OutboxItem.next_attempt_at, _kind_rank(), OutboxItem.id)
        .limit(limit)
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=OutboxItem)
    claimed = []
    expires = now + dt.timedelta(seconds=lease_seconds)
    for item, ro in session.execute(q).all():
        already = session.scalar(
            select(OutboxItem.id)
            .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
            .where(
                ResultObject.sop_instance_uid == ro.sop_instance_uid,
                OutboxItem.destination == item.destination,
                OutboxItem.state == SENT,
                OutboxItem.id != item.id,
            )
            .limit(1)
        )
        if already is not None:  # the same SOP instance was acknowledged by this destination
            item.state, item.sent_at, item.lease_owner, item.lease_expires_at = SENT, now, None, None
            item.last_error = f"already acknowledged (outbox item {already})"
            continue
        item.state = SENDING
        item.lease_owner = owner
        item.lease_expires_at = expires
        claimed.append(
            (
                Claimed(item.id, item.destination, ro.sop_instance_uid, ro.sop_class_uid, Path(ro.path), item.attempts),
                ro.kind,
            )
        )
    return claimed


def record(
    session: Session, c: Claimed, outcome: Outcome, *, owner: str, now: dt.datetime, policy: RetryPolicy
) -> str | None:
    """Stores one outcome if the lease is still ours; returns the new state (None: lease lost)."""
    pg = session.bind is not None and session.bind.dialect.name == "postgresql"
    item = session.get(OutboxItem, c.id, with_for_update=True if pg else None)
    if item is None or item.state != SENDING or item.lease_owner != owner:
        return None
    item.attempts = (item.attempts or 0) + 1
    item.last_status = outcome.status
    item.lease_owner = None
    item.lease_expires_at = None
    if outcome.ok:
        item.state = SENT
        item.sent_at = now
        item.last_error = None
        item.next_attempt_at = None
    elif outcome.permanent:
        item.state = DEAD
        item.last_error = outcome.error
        item.next_attempt_at = None
    elif item.attempts >= policy.max_attempts:
        item.state = DEAD
        item.last_error = f"gave up after {item.attempts} attempts: {outcome.error}"
        item.next_attempt_at = None
    else:
        item.state = PENDING
        item.last_error = outcome.error
        item.next_attempt_at = now + dt.timedelta(seconds=policy.delay(item.attempts))
    return item.state


def extend_leases(session: Session, ids: Iterable[int], *, owner: str, until: dt.datetime) -> None:
    for item in session.scalars(
        select(OutboxItem).where(
            OutboxItem.id.in_(list(ids)), OutboxItem.lease_owner == owner, OutboxItem.state == SENDING
        )
    ):
        item.lease_expires_at = until


def _count(report: DispatchReport, c: Claimed, state: str | None, outcome: Outcome) -> None:
    if state is None:
        report.lease_lost += 1
        log.warning("outbox %s (%s): lease lost before the outcome was stored", c.id, c.sop_instance_uid)
    elif state == SENT:
        report.sent += 1
        log.debug("sent %s to %s", c.sop_instance_uid, c.destination)
    elif state == DEAD:
        report.dead += 1
        report.errors.append(f"{c.sop_instance_uid}: {outcome.error}")
        log.error("outbox %s (%s) dead-lettered: %s", c.id, c.sop_instance_uid, outcome.error)
    else:
        report.retrying += 1
        report.errors.append(f"{c.sop_instance_uid}: {outcome.error}")
        log.warning("outbox %s (%s) will be retried: %s", c.id, c.sop_instance_uid, outcome.error)


def _destinations(settings: Settings) -> dict[str, Any]:
    return {d.key: d for d in settings.destinations}


def process_outbox(
    db: Database,
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    limit: int = 200,
    owner: str | None = None,
    policy: RetryPolicy | None = None,
    senders: dict[str, Sender] | None = None,
) -> DispatchReport:
    """Sends every due outbox item once (see the module docstring); returns what happened."""
    now = now or utcnow()
    owner = owner or new_owner()
    policy = policy or RetryPolicy()
    senders = senders or SENDERS
    report = DispatchReport()
    with db.session() as s:
        claimed_kinds = claim_with_kinds(s, now=now, owner=owner, limit=limit, lease_seconds=policy.lease_seconds)
    claimed = [c for c, _ in claimed_kinds]
    kinds = {c.id: k for c, k in claimed_kinds}
    report.claimed = len(claimed)
    if not claimed:
        return report
    dests = _destinations(settings)
    by_dest: dict[str, list[Claimed]] = defaultdict(list)
    for c in claimed:
        by_dest[c.destination].append(c)
    started = time.monotonic()
    last_extension = started
    pending_ids = {c.id for c in claimed}
    by_id = {c.id: c for c in claimed}
    associations = max(1, int(getattr(settings, "dispatch_associations", 1)))

    def store(c: Claimed, outcome: Outcome) -> None:
        nonlocal last_extension
        pending_ids.discard(c.id)
        with db.session() as s:
            state = record(s, c, outcome, owner=owner, now=now, policy=policy)
        _count(report, c, state, outcome)
        # long batches keep their leases: the rest is extended when a third of the lease has passed
        if pending_ids and time.monotonic() - last_extension > policy.lease_seconds / 3:
            last_extension = time.monotonic()
            until = now + dt.timedelta(seconds=(last_extension - started) + policy.lease_seconds)
            with db.session() as s:
                extend_leases(s, pending_ids, owner=owner, until=until)

    def settle(key: str, items: list[Claimed], error: BaseException | None) -> None:
        if error is not None:  # a sender bug must not strand leased items
            log.error("dispatch to %s failed", key, exc_info=error)
            for c in items:
                if c.id in pending_ids:
                    store(c, Outcome.transient(f"{key}: {type(error).__name__}: {error}"[:500]))
        for c in items:
            if c.id in pending_ids:
                store(c, Outcome.transient(f"{key}: no outcome reported"))

    def send_one(key: str, sender: Sender, dest: Any, items: list[Claimed]) -> None:
        """Sends ``items`` over one association in this thread, storing each outcome as it comes."""
        error: BaseException | None = None
        try:
            for item_id, outcome in sender(dest, items, settings):
                if item_id in pending_ids:
                    store(by_id[item_id], outcome)
        except Exception as e:
            error = e
        settle(key, items, error)

    def send_parallel(key: str, sender: Sender, dest: Any, chunks: list[list[Claimed]]) -> None:
        """Sends each chunk over its own association (a thread each); the outcomes are stored here, in this
        thread, as they come (the database sessions stay in one thread)."""
        answers: queue.Queue[tuple[int, Any]] = queue.Queue()

        def run(n: int, chunk: list[Claimed]) -> None:
            try:
                for item_id, outcome in sender(dest, chunk, settings):
                    answers.put((n, (item_id, outcome)))
            except Exception as e:
                answers.put((n, e))
            finally:
                answers.put((n, None))

        threads = [
            threading.Thread(target=run, args=(n, chunk), name=f"msknode-dispatch-{key}-{n}", daemon=True)
            for n, chunk in enumerate(chunks)
        ]
        for t in threads:
            t.start()
        errors: dict[int, BaseException] = {}
        running = len(threads)
        while running:
            n, answer = answers.get()
            if answer is None:
                running -= 1
            elif isinstance(answer, BaseException):
                errors[n] = answer
            else:
                item_id, outcome = answer
                if item_id in pending_ids:
                    store(by_id[item_id], outcome)
        for t in threads:
            t.join()
        for n, chunk in enumerate(chunks):
            settle(key, chunk, errors.get(n))

    for key, items in by_dest.items():
        dest = dests.get(key)
        if dest is None:
            for c in items:
                store(c, Outcome.permanent_failure(f"destination {key!r} is not configured (MSKNODE_DESTINATIONS)"))
            continue
        sender = senders[dest.type]
        # the findings first, on their own association: the PACS has them before any derived object
        findings = [c for c in items if kinds.get(c.id) in FINDINGS_KINDS]
        derived = [c for c in items if kinds.get(c.id) not in FINDINGS_KINDS]
        if findings:
            send_one(key, sender, dest, findings)
        if not derived:
            continue
        n = min(associations, len(derived)) if dest.type in PARALLEL_TYPES else 1
        if n <= 1:
            send_one(key, sender, dest, derived)
        else:  # round robin keeps each association's share in the batch's order
            send_parallel(key, sender, dest, [derived[i::n] for i in range(n)])
    if report.sent:
        _log_finished_jobs(db, [c.id for c in claimed])
    return report


def _log_finished_jobs(db: Database, item_ids: list[int]) -> None:
    """One INFO line per job and destination whose every result object this batch finished sending (the per-
    object lines are DEBUG): ``study UID: results of job N sent to DEST (K objects)``."""
    with db.session() as s:
        touched = s.execute(
            select(ResultObject.job_id, OutboxItem.destination)
            .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
            .where(OutboxItem.id.in_(item_ids), OutboxItem.state == SENT)
            .distinct()
        ).all()
        for job_id, dest in touched:
            rows = s.execute(
                select(OutboxItem.state, Study.study_uid, Job.state)
                .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
                .join(Job, Job.id == ResultObject.job_id)
                .join(Study, Study.id == Job.study_id)
                .where(ResultObject.job_id == job_id, OutboxItem.destination == dest)
            ).all()
            # a job still processing has published its findings only: its line comes once the rest is sent too
            if rows and all(state == SENT and job_state != "processing" for state, _, job_state in rows):
                log.info("study %s: results of job %d sent to %s (%d objects)", rows[0][1], job_id, dest, len(rows))


# ---- listing and manual retry ------------------------------------------------------------------------


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


def list_items(session: Session, *, state: str | None = None, ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Outbox items with their object and study, newest first (JSON-ready dicts)."""
    q = (
        select(OutboxItem, ResultObject, Job.id, Study.study_uid)
        .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
        .join(Job, Job.id == ResultObject.job_id)
        .join(Study, Study.id == Job.study_id)
        .order_by(OutboxItem.id.desc())
    )
    if state:
        q = q.where(OutboxItem.state == state)
    if ids is not None:
        q = q.where(OutboxItem.id.in_(list(ids)))
    rows = []
    for item, ro, job_id, study_uid in session.execute(q).all():
        rows.append(
            {
                "id": item.id,
                "state": item.state,
                "destination": item.destination,
                "attempts": item.attempts,
                "last_error": item.last_error,
                "last_status": item.last_status,
                "sop_instance_uid": ro.sop_instance_uid,
                "sop_class_uid": ro.sop_class_uid,
                "kind": ro.kind,
                "series_uid": ro.series_uid,
                "study_uid": study_uid,
                "job_id": job_id,
                "next_attempt_at": _iso(item.next_attempt_at),
                "sent_at": _iso(item.sent_at),
                "created_at": _iso(item.created_at),
            }
        )
    return rows


def retry_item(
    db: Database, settings: Settings, item_id: int, *, actor: str = "cli", now: dt.datetime | None = None
) -> dict[str, Any]:
    """Puts a dead (or waiting) item back in the queue, due now; audited. Never re-sends an acknowledged one."""
    from worklists import audit

    now = now or utcnow()
    with db.session() as s:
        item = s.get(OutboxItem, item_id)
        if item is None:
            raise DispatchError(f"no outbox item with id {item_id}")
        if item.state == SENT:
            raise PermanentDispatchError(
                f"outbox item {item_id} was acknowledged at {_iso(item.sent_at)}; it is not sent again"
            )
        if item.state == SENDING and item.lease_expires_at and item.lease_expires_at > now:
            raise TransientDispatchError(f"outbox item {item_id} is being sent right now")
        old = item.state
        previous_error = item.last_error
        item.state = PENDING
        item.attempts = 0
        item.next_attempt_at = now
        item.lease_owner = None
        item.lease_expires_at = None
        audit.record(
            s,
            actor=actor,
            action="outbox.retry",
            entity_type="outbox",
            entity_id=item_id,
            old=old,
            new=PENDING,
            details={"previous_error": previous_error, "destination": item.destination},
        )
        return {"id": item_id, "state": PENDING, "previous_state": old, "previous_error": previous_error}
