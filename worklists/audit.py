"""The audit trail: who changed what, when, from what to what, and why."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from worklists.tables import AuditEvent


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: Any = None,
    old: Any = None,
    new: Any = None,
    reason: str | None = None,
    details: dict | None = None,
) -> AuditEvent:
    """Adds one audit event to the caller's transaction (it commits with the change it describes)."""
    event = AuditEvent(
        actor=actor,
        action=action,
        entity_type=entity_type,
        entity_id=None if entity_id is None else str(entity_id),
        old_value=None if old is None else str(old),
        new_value=None if new is None else str(new),
        reason=reason,
        details=details,
    )
    session.add(event)
    return event
