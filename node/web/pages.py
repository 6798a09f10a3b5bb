"""Server-rendered pages (Jinja2). Each shows what an ``/api`` route returns; forms carry a CSRF token."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from node.db.database import utcnow
from node.errors import UserError
from node.intake.routing import PIPELINE_ROLES
from node.jobs.listing import list_jobs
from node.web import admin_views, queries, rule_editor
from node.web.api import Anatomy, JobState, OutboxState, Priority, Status, audit_view
from node.web.auth import (
    COOKIE,
    CSRF_HEADER,
    LOGIN_COOKIE,
    NotAuthenticated,
    Principal,
    admin,
    check_csrf,
    client_address,
    cookie_secure,
    principal,
)
from node.web.users import authenticate, end_sessions, list_users
from worklists import audit, entries
from worklists.errors import InvalidChange
from worklists.feedback import study_feedback
from worklists.tables import PRIORITIES
from worklists.triage import PFIRRMANN_NAMES, level_key

router = APIRouter(include_in_schema=False)
ROUTING_PIPELINES = {name: list(roles) for name, roles in PIPELINE_ROLES.items()}
ops_router = APIRouter(tags=["operations"])  # no login, no patient data, no detail


def _ctx(request: Request):
    return request.app.state.ctx


def _render(request: Request, name: str, p: Principal | None, status_code: int = 200, **context) -> HTMLResponse:
    ctx = _ctx(request)
    base = {
        "user": p,
        "tz": str(ctx.tz),
        "priorities": PRIORITIES,
        "msg": request.query_params.get("msg"),
        "error": request.query_params.get("error"),
        "path": request.url.path,
    }
    return ctx.templates.TemplateResponse(request, name, base | context, status_code=status_code)


def _safe_next(target: str | None, default: str = "/worklist") -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def _back(target: str, *, msg: str | None = None, error: str | None = None) -> RedirectResponse:
    sep = "&" if "?" in target else "?"
    q = urlencode({k: v for k, v in (("msg", msg), ("error", error)) if v})
    return RedirectResponse(target + (sep + q if q else ""), status_code=303)


# ---- login -------------------------------------------------------------------------------


def _login_page(request: Request, next_target: str | None, status_code: int = 200, **context) -> HTMLResponse:
    """The login form with a fresh nonce; its cookie (an hour, HttpOnly, SameSite=Strict) goes only to /login."""
    cookie, nonce = _ctx(request).codec.login_nonce()
    r = _render(request, "login.html", None, status_code, next=_safe_next(next_target), nonce=nonce, **context)
    r.set_cookie(
        LOGIN_COOKIE,
        cookie,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=cookie_secure(request),
        path="/login",
    )
    return r


@router.get("/login")
def login_form(request: Request, next: str | None = None):
    return _login_page(request, next)


@router.post("/login")
def login(
    request: Request,
    username: str = Form(default="", max_length=64),
    password: str = Form(default="", max_length=1024),
    csrf_token: str = Form(default=""),
    next: str = Form(default="/worklist"),
):
    ctx = _ctx(request)
    if not ctx.codec.check_login_nonce(request.cookies.get(LOGIN_COOKIE), csrf_token):
        return _login_page(request, next, 400, error="the login form expired, please try again")
    address = client_address(request)
    wait_address = ctx.ip_throttle.retry_after(address)
    wait = wait_address or (ctx.throttle.retry_after(f"{username}\n{address}") if username else 0)
    user = None
    if not wait:
        with ctx.db.session() as s:
            user = authenticate(s, username, password) if username and password else None
            if user is None:
                ctx.throttle.failed(f"{username or '-'}\n{address}")
                ctx.ip_throttle.failed(address)
                audit.record(
                    s,
                    actor=(username or "-")[:64],
                    action="auth.login_failed",
                    entity_type="user",
                    entity_id=(username or "-")[:64],
                )
            else:
                ctx.throttle.succeeded(f"{user.username}\n{address}")
                audit.record(s, actor=user.username, action="auth.login", entity_type="user", entity_id=user.username)
                token, _principal = ctx.codec.issue(user.username, user.role, epoch=user.session_epoch)
    if user is None:
        error = (
            f"too many failed logins from this address; try again in {wait} s"
            if wait_address
            else f"too many failed logins for this user; try again in {wait} s"
            if wait
            else "wrong username or password, or the account is disabled"
        )
        r = _login_page(request, next, 429 if wait else 401, error=error, username=username)
        if wait:
            r.headers["Retry-After"] = str(wait)
        return r
    redirect = RedirectResponse(_safe_next(next), status_code=303)
    redirect.set_cookie(
        COOKIE,
        token,
        max_age=ctx.codec.max_age,
        httponly=True,
        samesite="strict",
        secure=cookie_secure(request),
        path="/",
    )
    redirect.delete_cookie(LOGIN_COOKIE, path="/login")
    return redirect


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form(default="", max_length=128)):
    """Ends the user's sessions (this cookie and every other session or token of the user: the session
    epoch is raised). POST only, with the session's CSRF token; a cookie that is no session any more is
    just cleared."""
    ctx = _ctx(request)
    token = request.cookies.get(COOKIE)
    p = None
    if token:
        try:
            p = principal(request, None, token)
        except NotAuthenticated:
            p = None
    if p is not None:
        check_csrf(p, csrf_token or request.headers.get(CSRF_HEADER))
        with ctx.db.session() as s:
            end_sessions(s, username=p.username, actor=p.username, action="auth.logout")
    r = RedirectResponse("/login?msg=" + quote("logged out"), status_code=303)
    r.delete_cookie(COOKIE, path="/")
    return r


# ---- worklist ------------------------------------------------------------------------------


@router.get("/")
def home(p: Principal = Depends(principal)):
    return RedirectResponse("/worklist", status_code=303)


def _worklist_data(request: Request, anatomy, priority, status):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        items = queries.worklist(
            s,
            policy=ctx.policy,
            tz=ctx.tz,
            now=utcnow(),
            anatomy=anatomy.value if anatomy else None,
            priority=priority.value if priority else None,
            status=status.value if status else None,
        )
        pending = queries.pending_studies(s, tz=ctx.tz)
    return items, pending


@router.get("/worklist")
def worklist_page(
    request: Request,
    anatomy: Anatomy | None = None,
    priority: Priority | None = None,
    status: Status | None = None,
    p: Principal = Depends(principal),
):
    items, pending = _worklist_data(request, anatomy, priority, status)
    counts = {pr: sum(1 for i in items if i["priority"] == pr and i["status"] == "unread") for pr in PRIORITIES}
    return _render(
        request,
        "worklist.html",
        p,
        items=items,
        pending=pending,
        counts=counts,
        rendered_at=queries.display_time(utcnow(), _ctx(request).tz, seconds=True),
        filters={
            "anatomy": anatomy.value if anatomy else "",
            "priority": priority.value if priority else "",
            "status": status.value if status else "",
        },
        anatomies=queries.ANATOMIES,
        query=request.url.query,
        policy_version=_ctx(request).policy.version,
    )


@router.get("/worklist/rows")
def worklist_rows(
    request: Request,
    anatomy: Anatomy | None = None,
    priority: Priority | None = None,
    status: Status | None = None,
    p: Principal = Depends(principal),
):
    """The table body alone, for the page's auto-refresh."""
    items, pending = _worklist_data(request, anatomy, priority, status)
    r = _render(request, "_worklist_rows.html", p, items=items, pending=pending)
    r.headers["X-Rendered-At"] = queries.display_time(utcnow(), _ctx(request).tz, seconds=True)
    return r


@router.get("/worklist/next")
def worklist_next(request: Request, p: Principal = Depends(principal)):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        for item in queries.worklist(s, policy=ctx.policy, tz=ctx.tz, now=utcnow(), status="unread"):
            if item["assigned_to"] in (None, p.username):
                return RedirectResponse(f"/studies/{item['study_id']}", status_code=303)
    return _back("/worklist", msg="no unread study is waiting")


# ---- study ---------------------------------------------------------------------------------

# the lumbar levels every spine study's table lists (a model that located no disc at one leaves its cells empty)
LUMBAR_LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
# the findings graded per level and their column in the study page's level table
LEVEL_COLUMNS = {"spinal_stenosis": "stenosis", "disc_degeneration": "degeneration", "disc_herniation": "herniation"}


def level_rows(findings: list[dict]) -> tuple[list[dict], list[dict]]:
    """The per-level table of a spine study and the findings it does not hold.

    One row per vertebral level, L1-L2 ... L5-S1 always (and any other level a model named, such as
    T12-L1, in head-to-feet order), each with its stenosis, disc degeneration (Pfirrmann) and disc
    herniation findings; a cell is a list (a shadow version's finding sits beside the active one's).
    Findings without a level, or with a level but no column, are returned apart.
    """
    rows: dict[str, dict] = {}
    rest = []
    for f in findings:
        key = level_key(f.get("level"))
        column = LEVEL_COLUMNS.get(f["code"])
        if key is None or column is None:
            rest.append(f)
            continue
        rows.setdefault(key, {"level": key, "stenosis": [], "degeneration": [], "herniation": []})[column].append(f)
    if not rows:
        return [], rest
    for key in LUMBAR_LEVELS:
        rows.setdefault(key, {"level": key, "stenosis": [], "degeneration": [], "herniation": []})

    def order(level: str) -> tuple[int, int, str]:
        region = {"C": 0, "T": 1, "L": 2, "S": 3}.get(level[:1], 4)
        digits = "".join(ch for ch in level.split("-")[0][1:] if ch.isdigit())
        return region, int(digits or 99), level

    return [rows[k] for k in sorted(rows, key=order)], rest


@router.get("/studies/{study_id}")
def study_page(request: Request, study_id: int, p: Principal = Depends(principal)):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        d = queries.study_detail(s, study_id, policy=ctx.policy, tz=ctx.tz, now=utcnow())
        if d is None:
            return _render(request, "error.html", p, 404, status=404, reason=f"study {study_id} not found")
        audit_view(s, p, study_id, "page")
        answers = study_feedback(s, study_id, user=p.username)
        users = [u["username"] for u in list_users(s) if u["active"]] if p.is_admin else []
    levels, other = level_rows(d["findings"])
    return _render(
        request,
        "study.html",
        p,
        study=d,
        levels=levels,
        other_findings=other,
        pfirrmann=PFIRRMANN_NAMES,
        users=users,
        feedback=answers,
    )


@router.post("/studies/{study_id}/read")
def study_read(
    request: Request,
    study_id: int,
    entry_id: int = Form(...),
    read: str = Form(default="1"),
    csrf_token: str = Form(default=""),
    p: Principal = Depends(principal),
):
    check_csrf(p, csrf_token)
    ctx = _ctx(request)
    with ctx.db.session() as s:
        e = entries.mark_read(s, entry_id=entry_id, actor=p.username, now=utcnow(), read=read == "1")
        status = e.status
    return _back(f"/studies/{study_id}", msg=f"marked {status}")


@router.post("/admin/entries/{entry_id}/priority")
def priority_form(
    request: Request,
    entry_id: int,
    priority: str = Form(default=""),
    reason: str = Form(default=""),
    csrf_token: str = Form(default=""),
    next: str = Form(default="/worklist"),
    p: Principal = Depends(admin),
):
    check_csrf(p, csrf_token)
    ctx = _ctx(request)
    target = _safe_next(next)
    new = priority or None
    if new is not None and new not in PRIORITIES:
        return _back(target, error=f"unknown priority {priority!r}")
    try:
        with ctx.db.session() as s:
            e = entries.override_priority(
                s, entry_id=entry_id, priority=new, reason=reason, actor=p.username, now=utcnow()
            )
            result = e.priority
    except InvalidChange as exc:
        return _back(target, error=str(exc))
    return _back(target, msg=f"priority set to {result}")


@router.post("/admin/entries/{entry_id}/assign")
def assign_form(
    request: Request,
    entry_id: int,
    username: str = Form(default=""),
    csrf_token: str = Form(default=""),
    next: str = Form(default="/worklist"),
    p: Principal = Depends(admin),
):
    check_csrf(p, csrf_token)
    ctx = _ctx(request)
    target = _safe_next(next)
    try:
        with ctx.db.session() as s:
            e = entries.assign(s, entry_id=entry_id, assignee=username or None, actor=p.username, now=utcnow())
            who = e.assigned_to
    except InvalidChange as exc:
        return _back(target, error=str(exc))
    return _back(target, msg=f"assigned to {who}" if who else "unassigned")


# ---- admin ---------------------------------------------------------------------------------


@router.get("/admin")
def admin_home(p: Principal = Depends(admin)):
    return RedirectResponse("/admin/priorities", status_code=303)


@router.get("/admin/priorities")
def admin_priorities(request: Request, p: Principal = Depends(admin)):
    """Unread studies in reading order, each with a priority form (the API is POST /api/entries/{id}/priority)."""
    ctx = _ctx(request)
    with ctx.db.session() as s:
        items = queries.worklist(s, policy=ctx.policy, tz=ctx.tz, now=utcnow(), status="unread")
    return _render(request, "admin_priorities.html", p, items=items)


@router.get("/admin/jobs")
def admin_jobs(request: Request, state: JobState | None = None, p: Principal = Depends(admin)):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        rows = list_jobs(s, tz=ctx.tz, state=state.value if state else None, limit=200)
    return _render(
        request, "admin_jobs.html", p, jobs=rows, state=state.value if state else "", states=[x.value for x in JobState]
    )


@router.post("/admin/jobs/{job_id}/retry")
def admin_job_retry(request: Request, job_id: int, csrf_token: str = Form(default=""), p: Principal = Depends(admin)):
    check_csrf(p, csrf_token)
    try:
        out = admin_views.retry_job(_ctx(request).db, job_id, actor=p.username)
    except admin_views.OpsError as exc:
        return _back("/admin/jobs", error=str(exc))
    return _back("/admin/jobs", msg=f"job {job_id} is {out['state']}")


@router.get("/admin/outbox")
def admin_outbox(request: Request, state: OutboxState | None = None, p: Principal = Depends(admin)):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        rows = queries.outbox(s, tz=ctx.tz, state=state.value if state else None)
    return _render(
        request,
        "admin_outbox.html",
        p,
        items=rows,
        state=state.value if state else "",
        states=[x.value for x in OutboxState],
    )


@router.post("/admin/outbox/{item_id}/retry")
def admin_outbox_retry(
    request: Request, item_id: int, csrf_token: str = Form(default=""), p: Principal = Depends(admin)
):
    check_csrf(p, csrf_token)
    ctx = _ctx(request)
    try:
        out = admin_views.retry_outbox(ctx.db, ctx.settings, item_id, actor=p.username)
    except admin_views.OpsError as exc:
        return _back("/admin/outbox", error=str(exc))
    return _back("/admin/outbox", msg=f"outbox item {item_id} is {out['state']}")


@router.get("/admin/routing")
def admin_routing(request: Request, p: Principal = Depends(admin)):
    ctx = _ctx(request)
    return _render(
        request,
        "admin_routing.html",
        p,
        routing=admin_views.routing(ctx.settings),
        destinations=admin_views.destinations(ctx.settings),
        policy=ctx.policy,
    )


@router.get("/admin/unrouted")
def admin_unrouted(request: Request, before_id: int | None = Query(default=None, ge=1), p: Principal = Depends(admin)):
    """Recent unrouted series with why, each with "make a rule" (the API is GET /api/admin/unrouted)."""
    ctx = _ctx(request)
    with ctx.db.session() as s:
        page = queries.unrouted_series(s, tz=ctx.tz, limit=50, before_id=before_id)
    return _render(request, "admin_unrouted.html", p, page=page, before_id=before_id)


def _rule_page(
    request: Request,
    p: Principal,
    series_id: int,
    *,
    status_code: int = 200,
    draft: dict | None = None,
    reroute: bool = True,
    refusal: str | None = None,
    readonly: rule_editor.RulesReadOnly | None = None,
):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        d = queries.series_routing(s, series_id, tz=ctx.tz)
    if d is None:
        return _render(request, "error.html", p, 404, status=404, reason=f"series {series_id} not found")
    rules_file = rule_editor.rules_status(ctx.settings)
    if draft is None:
        hint = rule_editor.current_anatomy(ctx.db, ctx.settings, series_id)
        draft = rule_editor.draft_from_series(d, keys=rules_file["fact_keys"], anatomy_hint=hint).as_dict()
    return _render(
        request,
        "admin_rule.html",
        p,
        status_code,
        series=d,
        draft=draft,
        rules_file=rules_file,
        pipelines=ROUTING_PIPELINES,
        reroute=reroute,
        refusal=refusal,
        readonly=readonly,
        limits={"name": rule_editor.NAME_MAX, "regex": rule_editor.REGEX_MAX, "value": rule_editor.VALUE_MAX},
    )


@router.get("/admin/series/{series_id}/rule")
def admin_rule_form(request: Request, series_id: int, p: Principal = Depends(admin)):
    """A rule drafted from a series' facts (plane, contrast, anatomy, description), to check and save."""
    return _rule_page(request, p, series_id)


@router.post("/admin/series/{series_id}/rule")
def admin_rule_add(
    request: Request,
    series_id: int,
    name: str = Form(default="", max_length=rule_editor.NAME_MAX),
    pipeline: str = Form(default="", max_length=32),
    role: str = Form(default="", max_length=32),
    anatomy: str = Form(default="", max_length=32),
    plane: str = Form(default="", max_length=rule_editor.VALUE_MAX),
    contrast: str = Form(default="", max_length=300),
    description: str = Form(default="", max_length=rule_editor.REGEX_MAX),
    reroute: str = Form(default="", max_length=8),
    csrf_token: str = Form(default="", max_length=128),
    p: Principal = Depends(admin),
):
    check_csrf(p, csrf_token)
    ctx = _ctx(request)
    fields = rule_editor.RuleRequestFields(
        name=name,
        pipeline=pipeline or None,
        role=role or None,
        anatomy=anatomy or None,
        plane=plane or None,
        contrast=contrast or None,
        description=description or None,
        reroute=reroute == "1",
    )
    entered = {
        "name": name,
        "pipeline": pipeline,
        "role": role,
        "anatomy": anatomy or pipeline,
        "plane": plane,
        "contrast": [c.strip() for c in contrast.split(",") if c.strip()],
        "description": description,
    }
    try:
        out = rule_editor.make_rule(ctx.db, ctx.settings, series_id, fields, actor=p.username, now=utcnow())
    except rule_editor.SeriesNotFound as exc:
        return _render(request, "error.html", p, 404, status=404, reason=str(exc))
    except rule_editor.RulesReadOnly as exc:
        return _rule_page(request, p, series_id, status_code=409, draft=entered, reroute=fields.reroute, readonly=exc)
    except rule_editor.RuleRefused as exc:
        return _rule_page(
            request, p, series_id, status_code=422, draft=entered, reroute=fields.reroute, refusal=str(exc)
        )
    msg = f"rule {name.strip()!r} added first in {out['path']} ({out['rules']} rules; the node reloads them by itself)"
    r = out["rerouted"]
    if r is not None:
        msg += f"; series {out['series_uid']} " + (
            f"routed {r['pipeline']}/{r['role']}" if r["routed"] else "still unrouted"
        )
    return _back("/admin/unrouted", msg=msg)


@router.get("/admin/models")
def admin_models(request: Request, p: Principal = Depends(admin)):
    ctx = _ctx(request)
    return _render(request, "admin_models.html", p, models=admin_views.models(ctx.settings, ctx.db))


@router.get("/admin/audit")
def admin_audit(
    request: Request,
    actor: str | None = Query(default=None, max_length=64),
    action: str | None = Query(default=None, max_length=64),
    before_id: int | None = Query(default=None, ge=1),
    p: Principal = Depends(admin),
):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        events = queries.audit_log(
            s, tz=ctx.tz, limit=200, before_id=before_id, actor=actor or None, action=action or None
        )
    return _render(request, "admin_audit.html", p, events=events, actor=actor or "", action=action or "")


@router.get("/admin/users")
def admin_users(request: Request, p: Principal = Depends(admin)):
    ctx = _ctx(request)
    with ctx.db.session() as s:
        rows = list_users(s)
    return _render(request, "admin_users.html", p, users=rows)


@router.post("/admin/users/{username}/signout")
def admin_user_signout(
    request: Request, username: str, csrf_token: str = Form(default="", max_length=128), p: Principal = Depends(admin)
):
    """Sign out everywhere: every session and token of the user ends (the user's session epoch is raised)."""
    check_csrf(p, csrf_token)
    try:
        with _ctx(request).db.session() as s:
            end_sessions(s, username=username, actor=p.username)
    except UserError as exc:
        return _back("/admin/users", error=str(exc))
    return _back("/admin/users", msg=f"every session of {username} ended")


# ---- unauthenticated operations -----------------------------------------------------------


@ops_router.get("/health", responses={503: {"description": "the node cannot accept anything"}})
def health(request: Request):
    """Liveness for load balancers and monitors: ``{"status": "ok"}``, or 503 ``{"status": "down"}`` when the
    database does not answer or the disk is full. Cached for a second; no DICOM association, no detail
    (the detailed report is ``GET /api/health``, behind login)."""
    ok = _ctx(request).liveness()
    return JSONResponse({"status": "ok" if ok else "down"}, status_code=200 if ok else 503)


@ops_router.get("/metrics", response_class=Response)
def metrics(request: Request):
    """Prometheus metrics (no patient data)."""
    ctx = _ctx(request)
    body, ctype = admin_views.metrics(ctx.settings, ctx.db)
    return Response(body, media_type=ctype)
