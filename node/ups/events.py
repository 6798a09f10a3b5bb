"""Delivering UPS events: N-EVENT-REPORTs to subscribers (PS3.4 CC.2.4), from the ``ups_events`` table.

A subscriber's network address comes only from MSKNODE_UPS_EVENT_RECEIVERS (AE title → host:port);
a subscription names an AE title, never an address. Per subscriber, events leave in the order they
were queued over one association per round; an event the peer refuses or cannot take now is tried
again with backoff, and later events of that subscriber wait for it (a watcher never sees
COMPLETED before IN PROGRESS). After MAX_ATTEMPTS an event is ``dead`` (logged; the workitem itself
still says the truth to an N-GET or C-FIND).

`ups_duty`: the worker's loop runs `sync` (jobs → workitems) and `deliver` every round.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import delete, select

from node.db.database import Database, utcnow
from node.db.schema import UpsEvent
from node.settings import Settings
from node.ups import workitems

log = logging.getLogger("node.ups.events")

MAX_ATTEMPTS = 10
BACKOFF_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 300.0
BATCH = 200  # events per subscriber and round
CONNECT_TIMEOUT_SECONDS = 10.0
KEEP_EVENTS = dt.timedelta(days=7)  # delivered and dead events are kept this long (then deleted)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _backoff(attempts: int) -> dt.timedelta:
    return dt.timedelta(seconds=min(BACKOFF_SECONDS * (2 ** max(attempts - 1, 0)), MAX_BACKOFF_SECONDS))


def _send(
    settings: Settings, ae_title: str, events: list[tuple[int, str, int, dict[str, Any]]]
) -> dict[int, int | str]:
    """One association to the subscriber; event id → status (int) or an error text (str)."""
    from pynetdicom import AE

    host, port = parse_address(settings.ups_event_receivers[ae_title])
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(workitems.UPS_EVENT)
    ae.connection_timeout = CONNECT_TIMEOUT_SECONDS  # an unreachable host must not hold the loop
    ae.acse_timeout = min(settings.network_timeout, 30)
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    out: dict[int, int | str] = {}
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return {eid: f"association to {ae_title} at {host}:{port} not established" for eid, *_ in events}
    try:
        for eid, uid, event_type, info in events:
            status = assoc.send_n_event_report(
                workitems.from_json(info), event_type, workitems.UPS_PUSH, uid, meta_uid=workitems.UPS_EVENT
            )[0]
            if not status or "Status" not in status:
                out[eid] = "no response (association lost or DIMSE timeout)"
                break
            out[eid] = int(status.Status)
            if out[eid] != 0x0000:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def deliver(db: Database, settings: Settings, *, now: dt.datetime | None = None) -> int:
    """Sends the due events, per subscriber in order; returns how many were delivered."""
    now = now or utcnow()
    with db.session() as s:
        pending = s.execute(
            select(UpsEvent.id, UpsEvent.ae_title, UpsEvent.workitem_uid, UpsEvent.event_type, UpsEvent.info)
            .where(UpsEvent.state == "pending")
            .order_by(UpsEvent.id)
        ).all()
        blocked = {
            ae
            for ae, nxt in s.execute(
                select(UpsEvent.ae_title, UpsEvent.next_attempt_at).where(UpsEvent.state == "pending")
            ).all()
            if nxt is not None and nxt > now
        }
    per_ae: dict[str, list[tuple[int, str, int, dict[str, Any]]]] = {}
    for eid, ae, uid, event_type, info in pending:
        if ae in blocked:
            continue  # an earlier event of this subscriber waits for its retry: keep the order
        batch = per_ae.setdefault(ae, [])
        if len(batch) < BATCH:
            batch.append((eid, uid, event_type, info))
    sent = 0
    for ae, events in per_ae.items():
        if ae not in settings.ups_event_receivers:
            results: dict[int, int | str] = {eid: f"{ae} is no longer a known event receiver" for eid, *_ in events}
        else:
            try:
                results = _send(settings, ae, events)
            except Exception as e:  # an unreachable peer, a bad address: retried
                results = {events[0][0]: f"{type(e).__name__}: {e}"}
        with db.session() as s:
            for eid, _uid, _t, _i in events:
                if eid not in results:
                    break
                row = s.get(UpsEvent, eid)
                if row is None:
                    continue
                result = results[eid]
                row.attempts += 1
                if result == 0x0000:
                    row.state, row.sent_at, row.last_error = "sent", utcnow(), None
                    sent += 1
                    continue
                row.last_error = result if isinstance(result, str) else f"status 0x{result:04X}"
                if row.attempts >= MAX_ATTEMPTS:
                    row.state = "dead"
                    log.error("UPS event %s for %s dead after %d attempts: %s", eid, ae, row.attempts, row.last_error)
                    continue  # the next one may go
                row.next_attempt_at = now + _backoff(row.attempts)
                log.warning("UPS event %s for %s not delivered (%s); retried", eid, ae, row.last_error)
                break
    if sent:
        log.info("UPS: %d event(s) delivered", sent)
    return sent


def forget_old_events(db: Database, now: dt.datetime) -> int:
    """Deletes events delivered (or dead) longer than KEEP_EVENTS ago; the workitems stay."""
    with db.session() as s:
        res = s.execute(
            delete(UpsEvent).where(UpsEvent.state.in_(("sent", "dead")), UpsEvent.created_at < now - KEEP_EVENTS)
        )
        return int(getattr(res, "rowcount", 0) or 0)


def run_round(db: Database, settings: Settings, now: dt.datetime | None = None) -> int:
    """`sync` then `deliver` (the worker's UPS duty)."""
    now = now or utcnow()
    with db.session() as s:
        workitems.sync(s, settings, now)
    return deliver(db, settings, now=now)
