"""The admin's model dashboard and the reading targets (`worklists.monitoring`, `worklists.targets`).

``GET /admin/dashboard`` (page) and ``GET /api/admin/monitor`` (JSON, what ``msknode monitor
--json`` prints) show the same report; ``POST /admin/targets`` and ``POST
/api/admin/targets/{priority}`` change a reading target (admin, reason required, audited).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field

from node.db.database import utcnow
from node.web.auth import Principal, admin, api_admin_csrf, check_csrf
from node.web.pages import _render
from worklists import monitoring, targets
from worklists.errors import InvalidChange

router = APIRouter()


def monitor_report(settings, db, policy) -> dict[str, Any]:
    """The monitoring report of `worklists.monitoring.node_report` for this node."""
    return monitoring.node_report(settings, db, policy, utcnow())


class TargetChange(BaseModel):
    minutes: int | None = Field(
        default=None, ge=1, le=targets.MAX_MINUTES, description="minutes, or null for the policy's"
    )
    reason: str = Field(min_length=1, max_length=targets.MAX_REASON, description="why (required, audited)")


class MonitorOut(BaseModel):
    """The monitoring report (`worklists.monitoring.report`; docs/monitoring.md describes each part)."""

    status: str = Field(description="ok, or alert when any alert is raised")
    generated_at: str
    windows: dict[str, Any]
    alerts: list[dict[str, Any]] = Field(description="kind, message, and the model/version, pipeline or priority")
    models: list[dict[str, Any]] = Field(description="per model and version: rates, feedback figures, checks, weeks")
    silence: list[dict[str, Any]]
    overdue: dict[str, Any]
    turnaround: dict[str, Any]
    drift: list[dict[str, Any]]


class TargetOut(BaseModel):
    priority: str
    minutes: float
    policy_minutes: float
    source: str = Field(description="site (set by an admin) or policy")
    updated_by: str | None
    updated_at: str | None


class TargetsOut(BaseModel):
    targets: list[TargetOut]


def _ctx(request: Request):
    return request.app.state.ctx


@router.get("/api/admin/monitor", tags=["monitoring"], response_model=MonitorOut)
def api_monitor(request: Request, p: Principal = Depends(admin)):
    """Per model version figures with control bands, silence, drift, turnaround, overdue studies and alerts."""
    ctx = _ctx(request)
    return monitor_report(ctx.settings, ctx.db, ctx.policy)


@router.post("/api/admin/targets/{priority}", tags=["monitoring"], response_model=TargetsOut, responses={422: {}})
def api_target(request: Request, priority: str, body: TargetChange, p: Principal = Depends(api_admin_csrf)):
    """Sets the site's reading target of a priority (null: back to the triage policy's); audited."""
    ctx = _ctx(request)
    with ctx.db.session() as s:
        targets.set_target(
            s, priority=priority, minutes=body.minutes, actor=p.username, reason=body.reason, now=utcnow()
        )
        return {"targets": targets.target_rows(s, ctx.policy)}


@router.get("/admin/dashboard", include_in_schema=False)
def dashboard_page(request: Request, p: Principal = Depends(admin)):
    ctx = _ctx(request)
    rep = monitor_report(ctx.settings, ctx.db, ctx.policy)
    with ctx.db.session() as s:
        rows = targets.target_rows(s, ctx.policy)
    return _render(request, "admin_dashboard.html", p, report=rep, target_rows=rows)


@router.post("/admin/targets", include_in_schema=False)
def target_form(
    request: Request,
    priority: str = Form(default="", max_length=16),
    minutes: str = Form(default="", max_length=8),
    reason: str = Form(default="", max_length=targets.MAX_REASON),
    csrf_token: str = Form(default="", max_length=128),
    p: Principal = Depends(admin),
):
    check_csrf(p, csrf_token)
    ctx = _ctx(request)
    try:
        value = int(minutes) if minutes.strip() else None
    except ValueError:
        return RedirectResponse("/admin/dashboard?error=minutes+must+be+a+whole+number#targets", status_code=303)
    try:
        with ctx.db.session() as s:
            targets.set_target(s, priority=priority, minutes=value, actor=p.username, reason=reason, now=utcnow())
    except InvalidChange as exc:
        from urllib.parse import quote

        return RedirectResponse(f"/admin/dashboard?error={quote(str(exc))}#targets", status_code=303)
    return RedirectResponse("/admin/dashboard?msg=reading+target+saved#targets", status_code=303)
