"""Reliable delivery of result objects: the durable outbox, C-STORE and STOW-RS senders.

An ``outbox`` row is one result object for one destination; it is forgotten only once
the destination acknowledged it (state ``sent``). `process_outbox`:

1. claims due items in one transaction — ``pending`` ones whose ``next_attempt_at`` has
   come, and ``sending`` ones whose lease expired (a sender that died: a restart resumes
   them) — by setting a lease (owner + expiry) on each;
2. sends them, one association (or HTTP session) per destination;
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
import socket
import ssl
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from node.db.database import Database, utcnow
from node.errors import DispatchError, PermanentDispatchError, TransientDispatchError
from node.settings import DimseDestination, Settings, StowDestination
from node.db.schema import Job, OutboxItem, ResultObject, Study

log = logging.getLogger(__name__)

SENT, PENDING, SENDING, DEAD = "sent", "pending", "sending", "dead"
_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures: base * 2**(attempts-1), capped; dead after max_attempts."""

    base_delay: float = 5.0
    max_delay: float = 1800.0
    max_attempts: int = 30
    lease_seconds: float = 300.0

    def delay(self, attempts: int) -> float:
        return float(min(self.max_delay, self.base_delay * (2 ** max(0, attempts - 1))))


@dataclass(frozen=True)
class Outcome:
    """What a destination said about one object."""

    ok: bool
    permanent: bool = False
    status: int | None = None
    error: str | None = None

    @classmethod
    def sent(cls, status: int | None = 0) -> "Outcome":
        return cls(True, status=status)

    @classmethod
    def transient(cls, error: str, status: int | None = None) -> "Outcome":
        return cls(False, False, status, error)

    @classmethod
    def permanent_failure(cls, error: str, status: int | None = None) -> "Outcome":
        return cls(False, True, status, error)


@dataclass(frozen=True)
class Claimed:
    """An outbox item this process holds the lease on."""

    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    attempts: int


@dataclass
class DispatchReport:
    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    dead: int = 0
    lease_lost: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"claimed": self.claimed, "sent": self.sent, "retrying": self.retrying, "dead": self.dead,
                "lease_lost": self.lease_lost, "errors": list(self.errors)}


Sender = Callable[[Any, Sequence[Claimed], Settings], Iterable[tuple[int, Outcome]]]


# ---- status classification --------------------------------------------------------------------


def classify_status(status: int) -> Outcome:
    """A C-STORE response status (PS3.4 B.2.3, PS3.7 C) as an outcome."""
    if status in _OK_STATUSES:
        return Outcome.sent(status)
    hexs = f"0x{status:04X}"
    if 0xA700 <= status <= 0xA7FF:
        return Outcome.transient(f"{hexs} refused: out of resources", status)
    if status == 0x0122:
        return Outcome.permanent_failure(f"{hexs} SOP class not supported", status)
    if status == 0x0124:
        return Outcome.permanent_failure(f"{hexs} not authorized", status)
    if status == 0x0117:
        return Outcome.permanent_failure(f"{hexs} invalid SOP instance", status)
    if 0xA900 <= status <= 0xA9FF:
        return Outcome.permanent_failure(f"{hexs} data set does not match SOP class", status)
    if 0xC000 <= status <= 0xCFFF:
        return Outcome.permanent_failure(f"{hexs} cannot understand", status)
    if status == 0x0110:
        return Outcome.transient(f"{hexs} processing failure", status)
    return Outcome.transient(f"{hexs} failure", status)


# ---- DIMSE (C-STORE) ----------------------------------------------------------------------------


def _tls_context(dest: DimseDestination) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca_file)
    if dest.tls_cert_file:
        ctx.load_cert_chain(dest.tls_cert_file, dest.tls_key_file)
    return ctx


def _probe(host: str, port: int) -> str:
    """Why an association could not be made, as far as TCP tells."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return "association aborted or not answered"
    except ConnectionRefusedError:
        return "connection refused"
    except socket.timeout:
        return "connection timed out"
    except OSError as e:
        return f"connection failed: {e.strerror or e}"


def _read(item: Claimed) -> "pydicom.Dataset | Outcome":
    import pydicom  # imported when sending: listing and retrying stay fast

    try:
        return pydicom.dcmread(item.path)
    except FileNotFoundError:
        return Outcome.permanent_failure(f"result file missing: {item.path}")
    except Exception as e:  # a file we wrote ourselves and cannot read: nothing a retry fixes
        return Outcome.permanent_failure(f"result file unreadable: {item.path}: {e}")


def send_dimse(dest: DimseDestination, items: Sequence[Claimed], settings: Settings) -> Iterator[tuple[int, Outcome]]:
    """C-STORE of ``items`` over one association; yields (item id, outcome) as each answer comes."""
    from pynetdicom import AE, build_context
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    # our result files are uncompressed (Explicit VR Little Endian); pynetdicom re-encodes for Implicit
    sop_classes = list(dict.fromkeys(it.sop_class_uid for it in items))[:128]
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = min(settings.network_timeout, 30.0)
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.requested_contexts = [build_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for sop in sop_classes]
    tls_args = (_tls_context(dest), dest.host) if dest.tls else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as e:
        for it in items:
            yield it.id, Outcome.transient(f"{dest.key}: {e}")
        return
    try:
        if assoc.is_established:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            for it in items:
                if it.sop_class_uid not in accepted:
                    yield it.id, Outcome.permanent_failure(
                        f"0x0122 SOP class not supported: no presentation context accepted for {it.sop_class_uid}", 0x0122
                    )
                    continue
                if not assoc.is_established:
                    yield it.id, Outcome.transient(f"{dest.key}: association aborted during the transfer")
                    continue
                ds = _read(it)  # one file in memory at a time
                if isinstance(ds, Outcome):
                    yield it.id, ds
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, ValueError, OSError) as e:
                    yield it.id, Outcome.transient(f"{dest.key}: C-STORE failed: {e}")
                    continue
                if not status or "Status" not in status:
                    yield it.id, Outcome.transient(f"{dest.key}: no C-STORE response (association aborted or timed out)")
                    continue
                yield it.id, classify_status(int(status.Status))
            if assoc.is_established:
                assoc.release()
        elif assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            result = getattr(rsp, "result", None)
            why = f"{getattr(rsp, 'result_str', '')}; source: {getattr(rsp, 'source_str', '')}; reason: {getattr(rsp, 'reason_str', '')}"
            for it in items:
                if result == 0x01:
                    yield it.id, Outcome.permanent_failure(f"{dest.key}: association rejected (permanent): {why}")
                else:
                    yield it.id, Outcome.transient(f"{dest.key}: association rejected (transient): {why}")
        elif assoc.rejected_contexts and not assoc.accepted_contexts:
            for it in items:
                yield it.id, Outcome.permanent_failure(
                    f"0x0122 SOP class not supported: {dest.key} accepted no presentation context for {it.sop_class_uid}",
                    0x0122,
                )
        else:
            reason = _probe(dest.host, dest.port)
            for it in items:
                yield it.id, Outcome.transient(f"{dest.key}: {reason}")
    finally:
        if assoc.is_established:
            assoc.abort()


# ---- STOW-RS ---------------------------------------------------------------------------------------


def _stow_client(dest: StowDestination):
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if dest.username is not None:
        session.auth = (dest.username, dest.password or "")
    session.verify = dest.verify_tls
    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    client = DICOMwebClient(url=dest.url, session=session, headers=headers)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff
    return client


def _stow_outcome(response: Any, sop_uid: str) -> Outcome:
    """The STOW-RS response data set for one instance."""
    if response is None:
        return Outcome.sent(None)
    for item in response.get("FailedSOPSequence", []) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            reason = int(item.get("FailureReason", 0x0110) or 0x0110)
            out = classify_status(reason)
            return Outcome(False, out.permanent, reason, f"STOW-RS failure: {out.error}")
    for item in response.get("ReferencedSOPSequence", []) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            return Outcome.sent(int(item.get("WarningReason", 0) or 0))
    return Outcome.transient("STOW-RS response does not mention the instance")


def send_stow(dest: StowDestination, items: Sequence[Claimed], settings: Settings) -> Iterator[tuple[int, Outcome]]:
    """STOW-RS of ``items``, one request per instance so each gets its own status; yields as it goes."""
    import requests

    client = _stow_client(dest)
    for it in items:
        ds = _read(it)
        if isinstance(ds, Outcome):
            yield it.id, ds
            continue
        try:
            response = client.store_instances(datasets=[ds])
            outcome = _stow_outcome(response, it.sop_instance_uid)
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else None
            text = f"{dest.key}: HTTP {code}: {(e.response.text[:200] if e.response is not None else str(e))}"
            if code is None or code >= 500 or code in (408, 429):
                outcome = Outcome.transient(text)
            else:
                outcome = Outcome.permanent_failure(text)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            outcome = Outcome.transient(f"{dest.key}: {type(e).__name__}: {e}"[:500])
        except requests.exceptions.RequestException as e:
            outcome = Outcome.transient(f"{dest.key}: {e}"[:500])
        yield it.id, outcome


SENDERS: dict[str, Sender] = {"dimse": send_dimse, "stow": send_stow}  # type: ignore[dict-item]


# ---- the outbox ------------------------------------------------------------------------------------


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _due(now: dt.datetime):
    return or_(
        and_(OutboxItem.state == PENDING, or_(OutboxItem.next_attempt_at.is_(None), OutboxItem.next_attempt_at <= now)),
        and_(OutboxItem.state == SENDING, or_(OutboxItem.lease_expires_at.is_(None), OutboxItem.lease_expires_at < now)),
    )


def claim(session: Session, *, now: dt.datetime, owner: str, limit: int, lease_seconds: float) -> list[Claimed]:
    """Leases up to ``limit`` due items to ``owner`` (inside the caller's transaction)."""
    q = (
        select(OutboxItem, ResultObject)
        .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
        .where(_due(now))
        .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
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
            .where(ResultObject.sop_instance_uid == ro.sop_instance_uid, OutboxItem.destination == item.destination,
                   OutboxItem.state == SENT, OutboxItem.id != item.id)
            .limit(1)
        )
        if already is not None:  # the same SOP instance was acknowledged by this destination
            item.state, item.sent_at, item.lease_owner, item.lease_expires_at = SENT, now, None, None
            item.last_error = f"already acknowledged (outbox item {already})"
            continue
        item.state = SENDING
        item.lease_owner = owner
        item.lease_expires_at = expires
        claimed.append(Claimed(item.id, item.destination, ro.sop_instance_uid, ro.sop_class_uid, Path(ro.path), item.attempts))
    return claimed


def record(session: Session, c: Claimed, outcome: Outcome, *, owner: str, now: dt.datetime, policy: RetryPolicy) -> str | None:
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
    for item in session.scalars(select(OutboxItem).where(OutboxItem.id.in_(list(ids)), OutboxItem.lease_owner == owner,
                                                         OutboxItem.state == SENDING)):
        item.lease_expires_at = until


def _count(report: DispatchReport, c: Claimed, state: str | None, outcome: Outcome) -> None:
    if state is None:
        report.lease_lost += 1
        log.warning("outbox %s (%s): lease lost before the outcome was stored", c.id, c.sop_instance_uid)
    elif state == SENT:
        report.sent += 1
        log.info("sent %s to %s", c.sop_instance_uid, c.destination)
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
        claimed = claim(s, now=now, owner=owner, limit=limit, lease_seconds=policy.lease_seconds)
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

    for key, items in by_dest.items():
        dest = dests.get(key)
        if dest is None:
            for c in items:
                store(c, Outcome.permanent_failure(f"destination {key!r} is not configured (MSKNODE_DESTINATIONS)"))
            continue
        try:
            for item_id, outcome in senders[dest.type](dest, items, settings):
                if item_id in pending_ids:
                    store(by_id[item_id], outcome)
        except Exception as e:  # a sender bug must not strand leased items
            log.exception("dispatch to %s failed", key)
            for c in items:
                if c.id in pending_ids:
                    store(c, Outcome.transient(f"{key}: {type(e).__name__}: {e}"[:500]))
        for c in items:
            if c.id in pending_ids:
                store(c, Outcome.transient(f"{key}: no outcome reported"))
    return report


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


def retry_item(db: Database, settings: Settings, item_id: int, *, actor: str = "cli", now: dt.datetime | None = None) -> dict[str, Any]:
    """Puts a dead (or waiting) item back in the queue, due now; audited. Never re-sends an acknowledged one."""
    now = now or utcnow()
    with db.session() as s:
        item = s.get(OutboxItem, item_id)
        if item is None:
            raise DispatchError(f"no outbox item with id {item_id}")
        if item.state == SENT:
            raise PermanentDispatchError(f"outbox item {item_id} was acknowledged at {_iso(item.sent_at)}; it is not sent again")
        if item.state == SENDING and item.lease_expires_at and item.lease_expires_at > now:
            raise TransientDispatchError(f"outbox item {item_id} is being sent right now")
        old = item.state
        previous_error = item.last_error
        item.state = PENDING
        item.attempts = 0
        item.next_attempt_at = now
        item.lease_owner = None
        item.lease_expires_at = None
        try:
            from worklists import audit

            audit.record(s, actor=actor, action="outbox.retry", entity_type="outbox", entity_id=item_id, old=old,
                         new=PENDING, details={"previous_error": previous_error, "destination": item.destination})
        except ImportError:  # pragma: no cover - the worklists package ships with the node
            pass
        return {"id": item_id, "state": PENDING, "previous_state": old, "previous_error": previous_error}
