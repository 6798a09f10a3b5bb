"""The JSON API (``/api``): everything the pages show and every change they make.

Authentication: the browser's session cookie (changes need the ``X-CSRF-Token`` header)
or ``Authorization: Bearer`` with a token from ``POST /api/auth/token``. Admin routes
answer 403 to radiologists. Bad input answers 4xx with a ``detail`` that says why.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from node.db.database import utcnow
from node.errors import UserError
from node.jobs.listing import list_jobs
from node.web import admin_views, imaging, queries, responses, rule_editor
from node.web.auth import COOKIE, Principal, admin, api_admin_csrf, api_csrf, client_address, principal
from node.web.users import authenticate, end_sessions, list_users, set_password
from worklists import audit, entries
from worklists.errors import EntryNotFound
from worklists.tables import PRIORITIES, WorklistEntry

router = APIRouter(prefix="/api")


class Priority(str, Enum):
    STAT = "STAT"
    URGENT = "URGENT"
    ROUTINE = "ROUTINE"


class Anatomy(str, Enum):
    knee = "knee"
    shoulder = "shoulder"
    lumbar_spine = "lumbar_spine"


class Status(str, Enum):
    unread = "unread"
    read = "read"
    review = "review"


class JobState(str, Enum):
    pending = "pending"
    queued = "queued"
    processing = "processing"
    done = "done"
    failed = "failed"
    dead = "dead"
    superseded = "superseded"


class OutboxState(str, Enum):
    pending = "pending"
    sending = "sending"
    sent = "sent"
    dead = "dead"


class TokenRequest(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: float
    role: str


class PasswordChange(BaseModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024)


class SessionsEnded(BaseModel):
    username: str
    detail: str


class HealthOut(BaseModel):
    """The detailed health report (`node.ops.health.health_report`), at most `health_interval_seconds` old."""

    model_config = {"extra": "allow"}
    ok: bool
    status: str
    checked_at: str | None = None
    age_seconds: float | None = None
    components: dict = Field(default_factory=dict)


class PriorityChange(BaseModel):
    priority: Priority | None = Field(
        description="the new priority; null clears the override (back to the AI priority)"
    )
    reason: str = Field(min_length=1, max_length=500, description="why (required, audited)")


class AssignChange(BaseModel):
    username: str | None = Field(default=None, max_length=64, description="a user, or null to unassign")


class ReadChange(BaseModel):
    read: bool = True


class RuleRequest(BaseModel):
    """A ``[[rule]]`` made from a series (see ``GET /api/admin/series/{id}/routing`` for the prefilled draft)."""

    name: str = Field(min_length=1, max_length=100, description="the rule's name (unique in the file, audited)")
    pipeline: Anatomy
    role: str = Field(min_length=1, max_length=32, description="a role of the pipeline, e.g. sag_fluid")
    anatomy: str | None = Field(
        default=None, max_length=32, description='a pipeline name or "any"; default the pipeline'
    )
    plane: str | None = Field(default=None, max_length=32, description="e.g. sagittal (when the rules take a plane)")
    contrast: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=list, max_length=8, description="contrast classes, e.g. pd_fs, t2_fs, stir"
    )
    description: str | None = Field(default=None, max_length=200, description="a regex on the SeriesDescription")
    reroute: bool = Field(default=True, description="route the series again now if it is unrouted")


def ctx_of(request: Request):
    return request.app.state.ctx


# ---- auth ----------------------------------------------------------------------------------


@router.post(
    "/auth/token",
    response_model=TokenResponse,
    tags=["auth"],
    responses={401: {"description": "wrong credentials"}, 429: {"description": "too many failed attempts"}},
)
def token(body: TokenRequest, request: Request):
    """A bearer token for scripts (expires after MSKNODE_SESSION_MINUTES)."""
    ctx = ctx_of(request)
    address = client_address(request)
    key = f"{body.username}\n{address}"  # per name and address: nobody else can lock an account
    wait_address = ctx.ip_throttle.retry_after(address)
    wait = wait_address or ctx.throttle.retry_after(key)
    if wait:
        return JSONResponse(
            {
                "detail": f"too many failed logins from this address; try again in {wait} s"
                if wait_address
                else f"too many failed logins for this user; try again in {wait} s"
            },
            status_code=429,
            headers={"Retry-After": str(wait)},
        )
    with ctx.db.session() as s:
        user = authenticate(s, body.username, body.password)
        if user is None:
            ctx.throttle.failed(key)
            ctx.ip_throttle.failed(address)
            audit.record(
                s,
                actor=body.username[:64],
                action="auth.token_failed",
                entity_type="user",
                entity_id=body.username[:64],
            )
            return JSONResponse({"detail": "wrong username or password, or the account is disabled"}, status_code=401)
        ctx.throttle.succeeded(f"{user.username}\n{address}")
        audit.record(s, actor=user.username, action="auth.token", entity_type="user", entity_id=user.username)
        tok, p = ctx.codec.issue(user.username, user.role, kind="token", epoch=user.session_epoch)
    return TokenResponse(access_token=tok, expires_at=p.expires_at, role=p.role)


def _signed_out(username: str, detail: str) -> JSONResponse:
    """The answer once the caller's sessions ended: the session cookie is removed too."""
    r = JSONResponse({"username": username, "detail": detail})
    r.delete_cookie(COOKIE, path="/")
    return r


@router.post("/auth/logout", tags=["auth"], response_model=SessionsEnded)
def api_logout(request: Request, p: Principal = Depends(api_csrf)):
    """Ends every session and token of the caller (this one included)."""
    with ctx_of(request).db.session() as s:
        end_sessions(s, username=p.username, actor=p.username, action="auth.logout")
    return _signed_out(p.username, "logged out: every session and token of this user ended")


@router.post(
    "/auth/password",
    tags=["auth"],
    response_model=SessionsEnded,
    responses={401: {"description": "wrong current password"}, 422: {"description": "the new password is refused"}},
)
def change_password(request: Request, body: PasswordChange, p: Principal = Depends(api_csrf)):
    """Changes the caller's password; every session and token issued before ends (log in again)."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        if authenticate(s, p.username, body.current_password) is None:
            return JSONResponse({"detail": "the current password is wrong"}, status_code=401)
        try:
            set_password(s, username=p.username, password=body.new_password, actor=p.username)
        except UserError as e:
            s.rollback()
            return JSONResponse({"detail": str(e)}, status_code=422)
    return _signed_out(p.username, "password changed: log in again")


@router.post(
    "/admin/users/{username}/signout",
    tags=["admin"],
    response_model=SessionsEnded,
    responses={404: {"description": "no such user"}},
)
def sign_out_everywhere(request: Request, username: str = Path(max_length=64), p: Principal = Depends(api_admin_csrf)):
    """Ends every session and token of `username`."""
    try:
        with ctx_of(request).db.session() as s:
            end_sessions(s, username=username, actor=p.username)
    except UserError as e:
        return JSONResponse({"detail": str(e)}, status_code=404)
    return {"username": username, "detail": "every session and token of this user ended"}


@router.get("/health", tags=["operations"], response_model=HealthOut, responses={503: {"model": HealthOut}})
def health_details(request: Request, p: Principal = Depends(principal)):
    """The detailed health report (listener C-ECHO, broker, database, disk, workers, job counts), from the
    background check that runs at most every ``MSKNODE_HEALTH_INTERVAL_SECONDS``; 503 when not ok."""
    report = ctx_of(request).health.latest()
    return JSONResponse(report, status_code=200 if report.get("ok") else 503)


@router.get("/me", tags=["auth"], response_model=responses.MeOut)
def me(p: Principal = Depends(principal)):
    return {
        "username": p.username,
        "role": p.role,
        "expires_at": p.expires_at,
        "csrf_token": p.csrf if p.via == "cookie" else None,
    }


# ---- worklist ------------------------------------------------------------------------------


@router.get("/worklist", tags=["worklist"], response_model=responses.WorklistOut)
def worklist(
    request: Request,
    anatomy: Anatomy | None = None,
    priority: Priority | None = None,
    status: Status | None = None,
    limit: int = Query(default=500, ge=1, le=5000, description="at most this many entries (unread first)"),
    p: Principal = Depends(principal),
):
    """Entries in reading order: priority (after ageing), then waiting time, then score."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        items = queries.worklist(
            s,
            policy=ctx.policy,
            tz=ctx.tz,
            now=utcnow(),
            anatomy=anatomy.value if anatomy else None,
            priority=priority.value if priority else None,
            status=status.value if status else None,
            limit=limit,
        )
        pending = queries.pending_studies(s, tz=ctx.tz)
    if not p.is_admin:
        items = [queries.hide_model_messages(i) for i in items]
    return {"timezone": str(ctx.tz), "policy_version": ctx.policy.version, "entries": items, "in_progress": pending}


@router.get(
    "/worklist/next",
    tags=["worklist"],
    response_model=responses.NextStudyOut,
    responses={404: {"description": "no unread study is waiting"}},
)
def next_study(request: Request, p: Principal = Depends(principal)):
    """The first unread study for this reader (assigned to them or to nobody)."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        for item in queries.worklist(s, policy=ctx.policy, tz=ctx.tz, now=utcnow(), status="unread"):
            if item["assigned_to"] in (None, p.username):
                return {"entry_id": item["entry_id"], "study_id": item["study_id"], "priority": item["priority"]}
    return JSONResponse({"detail": "no unread study is waiting"}, status_code=404)


def _entry_or_404(s, entry_id: int) -> WorklistEntry:
    e = s.get(WorklistEntry, entry_id)
    if e is None:
        raise EntryNotFound(f"worklist entry {entry_id} not found")
    return e


@router.post(
    "/entries/{entry_id}/priority",
    tags=["worklist"],
    response_model=responses.PriorityOut,
    responses={403: {}, 404: {}, 422: {}},
)
def set_priority(
    request: Request, body: PriorityChange, entry_id: int = Path(ge=1), p: Principal = Depends(api_admin_csrf)
):
    """Admin override of an entry's priority (with a reason); null priority clears it."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        e = entries.override_priority(
            s,
            entry_id=entry_id,
            priority=body.priority.value if body.priority else None,
            reason=body.reason,
            actor=p.username,
            now=utcnow(),
        )
        from node.ups.workitems import follow_worklist_priority  # the study's UPS workitems follow, subscribers hear

        follow_worklist_priority(s, utcnow(), study_id=e.study_id)
        return {"entry_id": e.id, "priority": e.priority, "ai_priority": e.ai_priority, "override": e.override_priority}


@router.post(
    "/entries/{entry_id}/assign",
    tags=["worklist"],
    response_model=responses.AssignOut,
    responses={403: {}, 404: {}, 422: {}},
)
def set_assignee(
    request: Request, body: AssignChange, entry_id: int = Path(ge=1), p: Principal = Depends(api_admin_csrf)
):
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        e = entries.assign(s, entry_id=entry_id, assignee=body.username or None, actor=p.username, now=utcnow())
        return {"entry_id": e.id, "assigned_to": e.assigned_to}


@router.post("/entries/{entry_id}/read", tags=["worklist"], response_model=responses.ReadOut, responses={404: {}})
def set_read(request: Request, body: ReadChange, entry_id: int = Path(ge=1), p: Principal = Depends(api_csrf)):
    """Marks a study read (or unread again)."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        e = entries.mark_read(s, entry_id=entry_id, actor=p.username, now=utcnow(), read=body.read)
        return {"entry_id": e.id, "status": e.status, "read_by": e.read_by}


# ---- study and pixels ----------------------------------------------------------------------


def audit_view(s, p: Principal, study_id: int, via: str) -> None:
    audit.record(
        s, actor=p.username, action="study.view", entity_type="study", entity_id=study_id, details={"via": via}
    )


@router.get("/studies/{study_id}", tags=["study"], response_model=responses.StudyOut, responses={404: {}})
def study(request: Request, study_id: int = Path(ge=1), p: Principal = Depends(principal)):
    """A study with its entry, findings, models, series, results and history (the view is audited)."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        d = queries.study_detail(s, study_id, policy=ctx.policy, tz=ctx.tz, now=utcnow())
        if d is None:
            return JSONResponse({"detail": f"study {study_id} not found"}, status_code=404)
        audit_view(s, p, study_id, "api")
    return d if p.is_admin else queries.hide_model_messages(d)


def _stack(ctx, paths: list[str]) -> imaging.SliceStack:
    key = ctx.images.key_for("stack", paths)
    return ctx.images.get(key, lambda: imaging.load_stack(paths))


def _seg_refs(path: str) -> dict:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    series = [str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])]
    segs = [
        {"number": int(x.SegmentNumber), "label": str(x.get("SegmentLabel", "") or f"segment {x.SegmentNumber}")}
        for x in ds.get("SegmentSequence", [])
    ]
    return {"series": series, "segments": segs}


def _superres_source_series(path: str, s) -> str | None:
    from node.db.schema import Instance, Series

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for ref in ds.get("SourceImageSequence", []):
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == str(ref.ReferencedSOPInstanceUID))).first()
        if inst is not None:
            return s.get(Series, inst.series_id).series_uid
    for ref in ds.get("ReferencedSeriesSequence", []):
        return str(ref.SeriesInstanceUID)
    return None


@router.get(
    "/studies/{study_id}/viewer", tags=["study"], response_model=responses.ViewerOut, responses={404: {}, 422: {}}
)
def viewer(
    request: Request,
    study_id: int = Path(ge=1),
    series_id: int | None = Query(default=None, ge=1),
    p: Principal = Depends(principal),
):
    """What the slice viewer shows: the original series, its SEG overlays and the super-resolved series."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        d = queries.study_detail(s, study_id, policy=ctx.policy, tz=ctx.tz, now=utcnow())
        if d is None:
            return JSONResponse({"detail": f"study {study_id} not found"}, status_code=404)
        originals = [x for x in d["series"] if not x["own_object"] and x["instances"]]
        if not originals:
            return JSONResponse({"detail": "the study has no stored image series"}, status_code=404)
        segs = []
        for g in d["results"]:
            if g["kind"] == "seg":
                for rid in g["result_ids"]:
                    path = queries.result_paths(s, study_id, kind="seg", result_id=rid)
                    if path:
                        try:
                            segs.append({"result_id": rid, **_seg_refs(path[0])})
                        except Exception:  # broad on purpose: listed as unreadable
                            segs.append({"result_id": rid, "series": [], "segments": [], "error": "unreadable SEG"})
        by_uid = {x["series_uid"]: x for x in originals}
        if series_id is None:
            referenced = [u for sg in segs for u in sg["series"] if u in by_uid]
            used = [x for x in originals if x["used_by"]]
            chosen = by_uid[referenced[0]] if referenced else (used[0] if used else originals[0])
        else:
            chosen = next((x for x in originals if x["id"] == series_id), None)
            if chosen is None:
                return JSONResponse(
                    {"detail": f"series {series_id} is not an image series of study {study_id}"}, status_code=404
                )
        paths = queries.series_paths(s, study_id, chosen["id"]) or []
        superres = []
        for g in d["results"]:
            if g["kind"] == "superres":
                sr_paths = queries.result_paths(s, study_id, kind="superres", series_uid=g["series_uid"])
                src = _superres_source_series(sr_paths[0], s) if sr_paths else None
                superres.append({"series_uid": g["series_uid"], "source_series_uid": src, "paths": sr_paths})
    stack = _stack(ctx, paths)
    overlays = [
        {"result_id": sg["result_id"], "segments": sg["segments"]}
        for sg in segs
        if chosen["series_uid"] in sg["series"]
    ]
    sr_out = None
    for sr in superres:
        if sr["source_series_uid"] in (None, chosen["series_uid"]):
            sr_stack = _stack(ctx, sr["paths"])
            sr_out = {
                "series_uid": sr["series_uid"],
                "slices": sr_stack.n,
                "rows": int(sr_stack.array.shape[1]),
                "cols": int(sr_stack.array.shape[2]),
                "map": imaging.slice_map(stack, sr_stack),
            }
            break
    overlay_slices: list[int] = []
    if overlays:
        ov = _overlay(ctx, study_id, overlays[0]["result_id"], paths, stack)
        overlay_slices = [k for k in range(stack.n) if float(ov.array[k].max()) >= 0.05]
    return {
        "study_id": study_id,
        "series": [
            {"id": x["id"], "description": x["description"], "number": x["number"], "role": x["role"]}
            for x in originals
        ],
        "selected": {
            "id": chosen["id"],
            "series_uid": chosen["series_uid"],
            "description": chosen["description"],
            "slices": stack.n,
            "rows": int(stack.array.shape[1]),
            "cols": int(stack.array.shape[2]),
        },
        "overlays": overlays,
        "overlay_slices": overlay_slices,
        "start_slice": overlay_slices[len(overlay_slices) // 2] if overlay_slices else stack.n // 2,
        "superres": sr_out,
        "unmatched_segs": [sg for sg in segs if chosen["series_uid"] not in sg["series"]],
    }


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})  # patient images: no cache


def _slice_index(k: int, n: int) -> None:
    if not 0 <= k < n:
        raise HTTPException(status_code=404, detail=f"slice {k} is out of range 0..{n - 1}")


@router.get(
    "/studies/{study_id}/series/{series_id}/slices/{k}.png",
    tags=["study"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {}, 422: {}},
)
def slice_png(
    request: Request,
    study_id: int = Path(ge=1),
    series_id: int = Path(ge=1),
    k: int = Path(ge=0),
    p: Principal = Depends(principal),
):
    """One original slice (sorted by position), windowed, as an 8-bit PNG."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        paths = queries.series_paths(s, study_id, series_id)
    if not paths:
        return JSONResponse({"detail": f"series {series_id} of study {study_id} not found or empty"}, status_code=404)
    stack = _stack(ctx, paths)
    _slice_index(k, stack.n)
    return _png(imaging.gray_png(stack, k))


def _overlay(ctx, study_id: int, result_id: int, series_paths: list[str], stack) -> imaging.Overlay:
    with ctx.db.session() as s:
        seg_paths = queries.result_paths(s, study_id, kind="seg", result_id=result_id)
    if not seg_paths:
        raise EntryNotFound(f"no SEG result {result_id} for study {study_id}")
    key = ctx.images.key_for("overlay", seg_paths + series_paths)
    return ctx.images.get(key, lambda: imaging.load_overlay(seg_paths[0], stack))


@router.get(
    "/studies/{study_id}/series/{series_id}/overlay/{result_id}/{k}.png",
    tags=["study"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {}, 422: {}},
)
def overlay_png(
    request: Request,
    study_id: int = Path(ge=1),
    series_id: int = Path(ge=1),
    result_id: int = Path(ge=1),
    k: int = Path(ge=0),
    segment: int | None = Query(default=None, ge=1),
    p: Principal = Depends(principal),
):
    """The SEG overlay on slice k of the original series (RGBA PNG; one segment or all)."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        paths = queries.series_paths(s, study_id, series_id)
    if not paths:
        return JSONResponse({"detail": f"series {series_id} of study {study_id} not found or empty"}, status_code=404)
    stack = _stack(ctx, paths)
    _slice_index(k, stack.n)
    ov = _overlay(ctx, study_id, result_id, paths, stack)
    if segment is not None:
        if segment not in ov.per_segment:
            return JSONResponse(
                {"detail": f"the SEG has no segment {segment} (has {sorted(ov.per_segment)})"}, status_code=404
            )
        return _png(imaging.heat_png(ov.per_segment[segment][k]))
    return _png(imaging.heat_png(ov.array[k]))


@router.get(
    "/studies/{study_id}/superres/{series_uid}/slices/{k}.png",
    tags=["study"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {}, 422: {}},
)
def superres_png(
    request: Request,
    study_id: int = Path(ge=1),
    series_uid: str = Path(max_length=64, pattern=r"^[0-9.]+$"),
    k: int = Path(ge=0),
    p: Principal = Depends(principal),
):
    """One slice of the super-resolved series (a derived series; the original is never replaced)."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        paths = queries.result_paths(s, study_id, kind="superres", series_uid=series_uid)
    if not paths:
        return JSONResponse({"detail": f"no super-resolved series {series_uid} in study {study_id}"}, status_code=404)
    stack = _stack(ctx, paths)
    _slice_index(k, stack.n)
    return _png(imaging.gray_png(stack, k))


# ---- admin -----------------------------------------------------------------------------------


@router.get("/admin/jobs", tags=["admin"], response_model=responses.JobsOut)
def jobs(
    request: Request,
    state: JobState | None = None,
    limit: int = Query(default=200, ge=1, le=1000),
    p: Principal = Depends(admin),
):
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        return {"jobs": list_jobs(s, tz=ctx.tz, state=state.value if state else None, limit=limit)}


@router.post(
    "/admin/jobs/{job_id}/retry",
    tags=["admin"],
    response_model=responses.JobRetriedOut,
    responses={403: {}, 409: {"description": "not retryable"}},
)
def retry_job(request: Request, job_id: int = Path(ge=1), p: Principal = Depends(api_admin_csrf)):
    """Puts a failed or dead job back in the queue (audited)."""
    ctx = ctx_of(request)
    return admin_views.retry_job(ctx.db, job_id, actor=p.username)


@router.get("/admin/outbox", tags=["admin"], response_model=responses.OutboxOut)
def outbox(
    request: Request,
    state: OutboxState | None = None,
    limit: int = Query(default=200, ge=1, le=1000),
    p: Principal = Depends(admin),
):
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        return {"items": queries.outbox(s, tz=ctx.tz, state=state.value if state else None, limit=limit)}


@router.post(
    "/admin/outbox/{item_id}/retry",
    tags=["admin"],
    response_model=responses.OutboxRetriedOut,
    responses={403: {}, 409: {"description": "not dead"}},
)
def retry_outbox(request: Request, item_id: int = Path(ge=1), p: Principal = Depends(api_admin_csrf)):
    """Re-sends a dead-lettered result object (audited)."""
    ctx = ctx_of(request)
    return admin_views.retry_outbox(ctx.db, ctx.settings, item_id, actor=p.username)


@router.get("/admin/routing", tags=["admin"], response_model=responses.RoutingConfigOut)
def routing(request: Request, p: Principal = Depends(admin)):
    """Routing rules and result destinations (read-only; secrets masked)."""
    ctx = ctx_of(request)
    return {"routing": admin_views.routing(ctx.settings), "destinations": admin_views.destinations(ctx.settings)}


@router.get("/admin/unrouted", tags=["admin"], response_model=responses.UnroutedOut)
def unrouted(
    request: Request,
    limit: int = Query(default=50, ge=1, le=200),
    before_id: int | None = Query(default=None, ge=1),
    p: Principal = Depends(admin),
):
    """Recent series no rule routed, newest first, each with why (``next_before_id`` pages back)."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        return queries.unrouted_series(s, tz=ctx.tz, limit=limit, before_id=before_id)


@router.get(
    "/admin/series/{series_id}/routing",
    tags=["admin"],
    response_model=responses.SeriesRuleDraftOut,
    responses={404: {}},
)
def series_routing(request: Request, series_id: int = Path(ge=1), p: Principal = Depends(admin)):
    """A series' routing explanation, a rule drafted from its facts and where rules are written."""
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        d = queries.series_routing(s, series_id, tz=ctx.tz)
    if d is None:
        return JSONResponse({"detail": f"series {series_id} not found"}, status_code=404)
    status = rule_editor.rules_status(ctx.settings)
    draft = rule_editor.draft_from_series(
        d, keys=status["fact_keys"], anatomy_hint=rule_editor.current_anatomy(ctx.db, ctx.settings, series_id)
    )
    return {"series": d, "draft": draft.as_dict(), "rules_file": status}


def rule_refusal(exc: rule_editor.RuleEditError) -> JSONResponse:
    """The answer to a refused rule: 404, 422 (invalid) or 409 (with the block for a site copy)."""
    if isinstance(exc, rule_editor.SeriesNotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    if isinstance(exc, rule_editor.RulesReadOnly):
        return JSONResponse({"detail": str(exc), "block": exc.block, "how": exc.how}, status_code=409)
    return JSONResponse({"detail": str(exc)}, status_code=422)


@router.post(
    "/admin/series/{series_id}/rule",
    tags=["admin"],
    status_code=201,
    response_model=responses.RuleAddedOut,
    responses={
        403: {},
        404: {},
        409: {"description": "the rules file cannot be changed here (block to paste)"},
        422: {"description": "invalid rule, or it does not route the series"},
    },
)
def add_rule(request: Request, body: RuleRequest, series_id: int = Path(ge=1), p: Principal = Depends(api_admin_csrf)):
    """Inserts a rule made from this series before the first rule of the rules file (audited; the file reloads)."""
    ctx = ctx_of(request)
    fields = rule_editor.RuleRequestFields(
        name=body.name,
        pipeline=body.pipeline.value,
        role=body.role,
        anatomy=body.anatomy,
        plane=body.plane,
        contrast=body.contrast,
        description=body.description,
        reroute=body.reroute,
    )
    try:
        return rule_editor.make_rule(ctx.db, ctx.settings, series_id, fields, actor=p.username, now=utcnow())
    except rule_editor.RuleEditError as exc:
        return rule_refusal(exc)


@router.get("/admin/models", tags=["admin"], response_model=responses.ModelsOut)
def models(request: Request, p: Principal = Depends(admin)):
    ctx = ctx_of(request)
    return admin_views.models(ctx.settings, ctx.db)


@router.get("/admin/audit", tags=["admin"], response_model=responses.AuditOut)
def audit_log(
    request: Request,
    limit: int = Query(default=200, ge=1, le=1000),
    before_id: int | None = Query(default=None, ge=1),
    actor: str | None = Query(default=None, max_length=64),
    action: str | None = Query(default=None, max_length=64),
    entity_type: str | None = Query(default=None, max_length=32),
    entity_id: str | None = Query(default=None, max_length=128),
    p: Principal = Depends(admin),
):
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        return {
            "events": queries.audit_log(
                s,
                tz=ctx.tz,
                limit=limit,
                before_id=before_id,
                actor=actor,
                action=action,
                entity_type=entity_type,
                entity_id=entity_id,
            )
        }


@router.get("/admin/users", tags=["admin"], response_model=responses.UsersOut)
def users(request: Request, p: Principal = Depends(admin)):
    ctx = ctx_of(request)
    with ctx.db.session() as s:
        return {"users": list_users(s)}


@router.get("/admin/policy", tags=["admin"], response_model=responses.PolicyOut)
def policy(request: Request, p: Principal = Depends(admin)):
    """The triage policy in force."""
    ctx = ctx_of(request)
    pol = ctx.policy
    return {
        "version": pol.version,
        "source": pol.source,
        "default_priority": pol.default_priority,
        "priorities": list(PRIORITIES),
        "review": {
            "qc_failure_flag": pol.qc_failure_flag,
            "qc_failure_priority": pol.qc_failure_priority,
            "uncertainty_k": pol.uncertainty_k,
        },
        "ageing": [{"from": a.from_priority, "to": a.to_priority, "after_hours": a.after_hours} for a in pol.ageing],
        "rules": [r.__dict__ | {"grades": list(r.grades)} for r in pol.rules],
    }
