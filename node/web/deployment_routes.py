"""Model deployments on the admin Models page and in the admin API: which version of each model a pipeline
runs, in shadow (silent trial) or active, with the shadow figures an admin decides on (`node.jobs.deployments`).

Admins only; a cookie session needs the CSRF token (form field or ``X-CSRF-Token``). Every change is an
audit event (``model.deploy``) under the admin's name, with the reason given.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field
from sqlalchemy import case, func, select

from node.db.schema import Finding, FindingFeedback
from node.web.auth import Principal, admin, api_admin_csrf, check_csrf

router = APIRouter()


class DeploymentChange(BaseModel):
    pipeline: str = Field(min_length=1, max_length=32)
    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    state: Literal["shadow", "active"]
    reason: str | None = Field(default=None, max_length=500, description="why (audit)")


class DeploymentFigures(BaseModel):
    findings: int = Field(description="evaluated findings of this version so far")
    shadow_findings: int = Field(description="of which made in shadow")
    positive_rate: float | None
    answered: int = Field(description="radiologists' answers to its findings")
    agreement: float | None = Field(description="share of the answers that agree with the model")


class DeploymentOut(BaseModel):
    pipeline: str
    model: str
    version: str
    weights_sha256: str
    weights_dir: str | None = Field(description="the folder of a registered site version; null: the registry's")
    state: str = Field(description="shadow or active")
    selected: bool = Field(description="the version the pipeline runs")
    real_data_validated: bool
    changed_by: str
    changed_at: str | None
    note: str | None
    figures: DeploymentFigures


class DeploymentsOut(BaseModel):
    deployments: list[DeploymentOut]


class DeploymentChanged(BaseModel):
    pipeline: str
    model: str
    version: str
    state: str
    selected: bool
    changed_by: str


def _ctx(request: Request):
    return request.app.state.ctx


def _figures(session, model: str, version: str) -> dict[str, Any]:
    """What a version did so far: evaluated findings (and in shadow), positive rate, radiologists' answers."""
    q = select(
        func.count(),
        func.sum(case((Finding.positive.is_(True), 1), else_=0)),
        func.sum(case((Finding.shadow.is_(True), 1), else_=0)),
    ).where(
        Finding.model_name == model,
        Finding.model_version == version,
        Finding.evaluated.is_(True),
        Finding.code != "superres",
    )
    n, positive, shadow = session.execute(q).one()
    answered, agreed = session.execute(
        select(func.count(), func.sum(case((FindingFeedback.agree.is_(True), 1), else_=0))).where(
            FindingFeedback.model_name == model, FindingFeedback.model_version == version
        )
    ).one()
    n, positive, shadow, answered, agreed = (int(x or 0) for x in (n, positive, shadow, answered, agreed))
    return {
        "findings": n,
        "shadow_findings": shadow,
        "positive_rate": round(positive / n, 4) if n else None,
        "answered": answered,
        "agreement": round(agreed / answered, 4) if answered else None,
    }


def panel(settings, db) -> list[dict[str, Any]]:
    """Every registered version per pipeline and model (rows created at first sight), with its figures."""
    from models.registry import Registry
    from node.jobs import deployments

    deployments.ensure_all(db, settings, Registry(settings.weights_dir))
    with db.session() as s:
        rows = deployments.listing(s)
        for r in rows:
            r["figures"] = _figures(s, r["model"], r["version"])
    return rows


def _change(request: Request, p: Principal, body: DeploymentChange) -> dict[str, Any]:
    from node.jobs import deployments

    ctx = _ctx(request)
    with ctx.db.session() as s:
        row = deployments.change(
            s,
            pipeline=body.pipeline,
            model_name=body.model,
            version=body.version,
            state=body.state,
            actor=p.username,
            reason=body.reason,
        )
        return {
            "pipeline": row.pipeline,
            "model": row.model_name,
            "version": row.version,
            "state": row.state,
            "selected": row.selected,
            "changed_by": row.changed_by,
        }


@router.get("/api/admin/deployments", tags=["admin"], response_model=DeploymentsOut)
def list_deployments(request: Request, p: Principal = Depends(admin)):
    """Model versions per pipeline: state (shadow or active), whether selected, who changed it, its figures."""
    ctx = _ctx(request)
    return {"deployments": panel(ctx.settings, ctx.db)}


@router.post("/api/admin/deployments", tags=["admin"], response_model=DeploymentChanged, responses={400: {}, 422: {}})
def change_deployment(request: Request, body: DeploymentChange, p: Principal = Depends(api_admin_csrf)):
    """Selects a version for a pipeline in shadow or active (audited)."""
    from node.jobs.deployments import DeploymentError

    try:
        return _change(request, p, body)
    except DeploymentError as e:
        return JSONResponse({"detail": str(e)}, status_code=400)


@router.post("/admin/deployments")
def change_deployment_form(
    request: Request,
    pipeline: str = Form(max_length=32),
    model: str = Form(max_length=64),
    version: str = Form(max_length=32),
    state: str = Form(max_length=16),
    reason: str = Form(default="", max_length=500),
    csrf_token: str = Form(default="", max_length=256),
    p: Principal = Depends(admin),
):
    """The admin Models page's form: activate a version, or select it in shadow."""
    from pydantic import ValidationError

    from node.jobs.deployments import DeploymentError

    check_csrf(p, csrf_token)
    try:
        body = DeploymentChange(pipeline=pipeline, model=model, version=version, state=state, reason=reason or None)
        out = _change(request, p, body)
        q = {"msg": f"{out['model']} {out['version']} is {out['state']} in pipeline {out['pipeline']}"}
    except (DeploymentError, ValidationError) as e:
        q = {"error": str(e).splitlines()[0]}
    return RedirectResponse("/admin/models?" + urlencode(q) + "#deployments", status_code=303)
