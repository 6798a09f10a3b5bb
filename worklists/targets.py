"""Reading targets: how long a study of each priority may wait for its read, and whether it did.

A target is minutes from the study's arrival at the node (its last image: the worklist's
waiting time) to "marked read". The triage policy's ``[targets]`` table sets them (the
defaults below when it has none); an admin may change one for the site (a `ReadingTarget`
row, audited), which wins. The worklist shows each unread study's due time; an unread study
past it is overdue.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worklists import audit
from worklists.errors import InvalidChange
from worklists.tables import PRIORITIES, ReadingTarget
from worklists.triage import TriagePolicy

DEFAULT_TARGETS: dict[str, float] = {"STAT": 30.0, "URGENT": 120.0, "ROUTINE": 1440.0}
MAX_MINUTES = 60 * 24 * 30
MAX_REASON = 500


def policy_targets(policy: TriagePolicy) -> dict[str, float]:
    return DEFAULT_TARGETS | dict(policy.targets)


def effective_targets(session: Session, policy: TriagePolicy) -> dict[str, float]:
    """Minutes per priority: the site's own (database) over the policy's over the defaults."""
    out = policy_targets(policy)
    for row in session.scalars(select(ReadingTarget)):
        if row.priority in out:
            out[row.priority] = float(row.minutes)
    return out


def target_rows(session: Session, policy: TriagePolicy) -> list[dict[str, Any]]:
    """Each priority's target and where it comes from (for the dashboard's editor)."""
    site = {r.priority: r for r in session.scalars(select(ReadingTarget))}
    pol = policy_targets(policy)
    out = []
    for p in PRIORITIES:
        r = site.get(p)
        out.append(
            {
                "priority": p,
                "minutes": float(r.minutes) if r else pol[p],
                "policy_minutes": pol[p],
                "source": "site" if r else "policy",
                "updated_by": r.updated_by if r else None,
                "updated_at": r.updated_at.isoformat() if r else None,
            }
        )
    return out


def set_target(
    session: Session, *, priority: str, minutes: int | None, actor: str, reason: str, now: dt.datetime
) -> dict[str, float]:
    """Sets the site's target for `priority` (None: back to the policy's); audited with the reason."""
    if priority not in PRIORITIES:
        raise InvalidChange(f"unknown priority {priority!r}")
    reason = (reason or "").strip()
    if not reason:
        raise InvalidChange("a reason is required to change a reading target")
    if len(reason) > MAX_REASON:
        raise InvalidChange(f"reason: at most {MAX_REASON} characters")
    if minutes is not None and not 1 <= minutes <= MAX_MINUTES:
        raise InvalidChange(f"a reading target is 1 to {MAX_MINUTES} minutes, not {minutes}")
    row = session.get(ReadingTarget, priority)
    old = row.minutes if row else None
    if minutes is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(ReadingTarget(priority=priority, minutes=minutes, updated_by=actor, updated_at=now))
    else:
        row.minutes, row.updated_by, row.updated_at = minutes, actor, now
    audit.record(
        session,
        actor=actor,
        action="targets.change",
        entity_type="reading_target",
        entity_id=priority,
        old=f"{old} min" if old is not None else "policy",
        new=f"{minutes} min" if minutes is not None else "policy",
        reason=reason,
    )
    session.flush()
    return {}


def due_state(priority: str, waiting_since: dt.datetime, now: dt.datetime, targets: dict[str, float], read: bool):
    """``due_at`` (UTC datetime), ``target_minutes`` and ``overdue`` (never for a read study)."""
    minutes = targets.get(priority)
    if minutes is None:
        return {"due_at": None, "target_minutes": None, "overdue": False}
    due = waiting_since + dt.timedelta(minutes=minutes)
    return {"due_at": due, "target_minutes": minutes, "overdue": (not read) and now > due}
