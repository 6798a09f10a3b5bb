"""Operations seen from the web: health, metrics, retries, routing rules, destinations, models.

Where another part of the node owns the logic (``node.health``, ``node.metrics``,
``node.jobs.retry_job``, ``node.dispatch``, ``models.registry``) the web calls it; the
fallbacks here only read the database, so the pages work in any installation.
Nothing here returns patient data: health and metrics answer without login.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tomllib
from typing import Any

from sqlalchemy import func, select, text

from node.db.database import utcnow
from node.errors import NodeError
from node.optional import optional_module
from node.db.schema import Finding, Job, OutboxItem

log = logging.getLogger(__name__)

SECRET_KEYS = {"password", "token", "secret", "tls_key_file"}


class OpsError(NodeError):
    """An operation requested from the web was refused (the message says why)."""


# ---- health and metrics ------------------------------------------------------------------


def health(settings, db) -> tuple[dict, bool]:
    """(report, healthy): ``node.health.health_report`` when installed, else a database + disk check."""
    mod = optional_module("node.health")
    if mod is not None:
        report = mod.health_report(settings, db)
        return report, bool(report.get("ok"))
    report: dict[str, Any] = {"components": {}}
    try:
        with db.session() as s:
            s.execute(text("SELECT 1"))
        report["components"]["database"] = {"ok": True}
    except Exception as e:  # noqa: BLE001 - the report says what failed
        report["components"]["database"] = {"ok": False, "error": type(e).__name__}
    try:
        free = shutil.disk_usage(settings.data_dir).free / 1e9
        report["components"]["disk"] = {"ok": free >= settings.min_free_gb, "free_gb": round(free, 2)}
    except OSError as e:
        report["components"]["disk"] = {"ok": False, "error": type(e).__name__}
    ok = all(c.get("ok") for c in report["components"].values())
    report.update(ok=ok, status="ok" if ok else "down")
    return report, ok


def metrics(settings, db) -> tuple[bytes, str]:
    """Prometheus exposition (body, content type): ``node.metrics.render`` when installed."""
    mod = optional_module("node.metrics")
    if mod is not None:
        return mod.render(settings, db)
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    jobs_g = Gauge("msknode_jobs", "Jobs by state", ["state"], registry=reg)
    out_g = Gauge("msknode_outbox_items", "Outbox items by state", ["state"], registry=reg)
    with db.session() as s:
        for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs_g.labels(state).set(n)
        for state, n in s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)):
            out_g.labels(state).set(n)
    return generate_latest(reg), CONTENT_TYPE_LATEST


# ---- retries -----------------------------------------------------------------------------


def retry_job(db, job_id: int, *, actor: str, now: dt.datetime | None = None) -> dict:
    """Puts a failed/dead job back in the queue (``node.jobs.retry_job``)."""
    jobs_mod = optional_module("node.jobs")
    fn = getattr(jobs_mod, "retry_job", None) if jobs_mod else None
    if fn is None:
        raise OpsError("job retry is not available in this installation (node.jobs is missing)")
    try:
        job = fn(db, job_id, actor=actor, now=now or utcnow())
    except NodeError as e:
        raise OpsError(str(e)) from None
    return {"id": job.id, "state": job.state}


def retry_outbox(db, settings, item_id: int, *, actor: str, now: dt.datetime | None = None) -> dict:
    """Re-queues an outbox item, due now (``node.dispatch.retry_item``; an acknowledged item is never re-sent)."""
    dispatch = optional_module("node.dispatch")
    fn = getattr(dispatch, "retry_item", None) if dispatch else None
    if fn is None:
        raise OpsError("outbox retry is not available in this installation (node.dispatch is missing)")
    try:
        out = fn(db, settings, item_id, actor=actor, now=now or utcnow())
    except NodeError as e:
        raise OpsError(str(e)) from None
    return {"id": item_id, "state": out.get("state"), "previous_state": out.get("previous_state")}


# ---- configuration views -------------------------------------------------------------------


def mask(d: dict) -> dict:
    return {k: ("***" if k in SECRET_KEYS and v else v) for k, v in d.items()}


def destinations(settings) -> list[dict]:
    return [{"key": d.key, **mask(d.model_dump())} for d in settings.destinations]


def routing(settings) -> dict:
    path = settings.routing_rules
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError:
        return {"path": str(path), "exists": False, "text": "", "rules": [], "error": "file not found"}
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as e:
        return {"path": str(path), "exists": True, "text": raw, "rules": [], "error": f"invalid TOML: {e}"}
    rules = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                rules.append({"table": key, **{k: v[k] for k in v}})
    return {"path": str(path), "exists": True, "text": raw, "rules": rules, "error": None}


def _card(card: Any) -> dict:
    """A model card as a plain dict (the registry may return dicts, dataclasses or objects with to_dict)."""
    import dataclasses

    if isinstance(card, dict):
        return card
    if dataclasses.is_dataclass(card):
        return dataclasses.asdict(card)
    if hasattr(card, "to_dict"):
        return card.to_dict()
    return dict(card)


def models(settings, db) -> dict:
    """The registry's model cards (``models.registry``) and the versions seen in findings."""
    registry: list[dict] = []
    error = None
    mod = optional_module("models.registry")
    if mod is not None and hasattr(mod, "Registry"):
        try:
            registry = [_card(c) for c in mod.Registry(settings.weights_dir).list()]
        except Exception as e:  # noqa: BLE001 - shown on the page
            error = f"{type(e).__name__}: {e}"
    else:
        error = "models.registry is not installed"
    with db.session() as s:
        seen = [
            {"model": m, "version": v, "weights_sha256": h, "findings": n, "last_job_id": last}
            for m, v, h, n, last in s.execute(
                select(Finding.model_name, Finding.model_version, Finding.weights_sha256, func.count(), func.max(Finding.job_id))
                .group_by(Finding.model_name, Finding.model_version, Finding.weights_sha256)
                .order_by(Finding.model_name)
            )
        ]
    return {"registry": registry, "registry_error": error, "seen_in_findings": seen}
