"""What the admin pages and API show and do: health, metrics, retries, routing rules, destinations, models.

The part of the node that owns the logic does the work (``node.ops.health``, ``node.ops.metrics``,
``node.jobs.lease.retry_job``, ``node.dispatch.outbox``, ``models.registry``); this module turns
its answers and errors into what the pages and the JSON API show.
Nothing here returns patient data: health and metrics answer without login.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import tomllib
from typing import Any

from sqlalchemy import func, select

from node.db.database import utcnow
from node.db.schema import Finding
from node.errors import NodeError

log = logging.getLogger(__name__)

SECRET_KEYS = {"password", "token", "secret", "tls_key_file"}

#: a URL's user information (``https://user:pass@host``): every part of it may be a credential
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]{0,15}://)(?P<userinfo>[^/?#\s@\"'<>]+)@")
#: query parameters that carry credentials (``?token=...``, ``&api_key=...``, signed URLs ...)
_URL_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:access_token|id_token|token|api[_-]?key|apikey|key|password|passwd|pwd|pass|secret"
    r"|client_secret|auth|authorization|sig|signature|x-amz-signature|x-amz-credential|code|session)=)"
    r"(?P<value>[^&#;\s\"'<>]+)",
    re.IGNORECASE,
)


def mask_urls(text: str) -> str:
    """`text` with the credentials inside any URL masked: user information and secret query parameters.

    ``https://user:pass@host/x?token=abc&page=2`` becomes ``https://***@host/x?token=***&page=2``.
    Used on every string the admin pages and the JSON API answer (`node.web.app`), so a destination
    URL in a setting, an outbox row's destination key or an error message shows no credential.
    """
    if "://" not in text and "=" not in text:
        return text
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    return _URL_SECRET_PARAM.sub(lambda m: m.group("name") + "***", text)


def mask_strings(value: Any) -> Any:
    """`mask_urls` on every string inside `value` (dicts, lists, tuples)."""
    if isinstance(value, str):
        return mask_urls(value)
    if isinstance(value, dict):
        return {k: mask_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_strings(v) for v in value]
    return value


class OpsError(NodeError):
    """An operation requested from the web was refused (the message says why)."""


# ---- health and metrics ------------------------------------------------------------------


def health(settings, db) -> tuple[dict, bool]:
    """(report, healthy): `node.ops.health.health_report`."""
    from node.ops.health import health_report

    report = health_report(settings, db)
    return report, bool(report.get("ok"))


def metrics(settings, db) -> tuple[bytes, str]:
    """Prometheus exposition (body, content type): `node.ops.metrics.render`."""
    from node.ops.metrics import render

    return render(settings, db)


# ---- retries -----------------------------------------------------------------------------


def retry_job(db, job_id: int, *, actor: str, now: dt.datetime | None = None) -> dict:
    """Puts a failed/dead job back in the queue (`node.jobs.lease.retry_job`)."""
    from node.jobs.lease import retry_job as retry

    try:
        job = retry(db, job_id, actor=actor, now=now or utcnow())
    except NodeError as e:
        raise OpsError(str(e)) from None
    return {"id": job.id, "state": job.state}


def retry_outbox(db, settings, item_id: int, *, actor: str, now: dt.datetime | None = None) -> dict:
    """Re-queues an outbox item, due now (`node.dispatch.outbox.retry_item`; an acknowledged item is never re-sent)."""
    from node.dispatch.outbox import retry_item

    try:
        out = retry_item(db, settings, item_id, actor=actor, now=now or utcnow())
    except NodeError as e:
        raise OpsError(str(e)) from None
    return {"id": item_id, "state": out.get("state"), "previous_state": out.get("previous_state")}


# ---- configuration views -------------------------------------------------------------------


def mask(d: dict) -> dict:
    return {k: ("***" if k in SECRET_KEYS and v else mask_strings(v)) for k, v in d.items()}


def destinations(settings) -> list[dict]:
    return [{"key": mask_urls(d.key), **mask(d.model_dump())} for d in settings.destinations]


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
    if dataclasses.is_dataclass(card) and not isinstance(card, type):  # an instance, not the class
        return dataclasses.asdict(card)
    if hasattr(card, "to_dict"):
        return card.to_dict()
    return dict(card)


def models(settings, db) -> dict:
    """The registry's model cards (``models.registry``) and the versions seen in findings."""
    from models.registry import Registry

    registry: list[dict] = []
    error = None
    try:
        registry = [_card(c) for c in Registry(settings.weights_dir).list()]
    except Exception as e:  # broad on purpose: shown on the page
        error = f"{type(e).__name__}: {e}"
    with db.session() as s:
        seen = [
            {"model": m, "version": v, "weights_sha256": h, "findings": n, "last_job_id": last}
            for m, v, h, n, last in s.execute(
                select(
                    Finding.model_name,
                    Finding.model_version,
                    Finding.weights_sha256,
                    func.count(),
                    func.max(Finding.job_id),
                )
                .group_by(Finding.model_name, Finding.model_version, Finding.weights_sha256)
                .order_by(Finding.model_name)
            )
        ]
    from node.web.deployment_routes import panel

    # the versions each pipeline runs, shadow or active (node.jobs.deployments)
    return {"registry": registry, "registry_error": error, "seen_in_findings": seen, "deployments": panel(settings, db)}
