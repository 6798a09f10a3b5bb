"""The FastAPI app: worklist, study viewer, admin pages and the JSON API behind each of them.

`create_app(settings, db)` builds an app bound to one database; `run_web(settings)`
serves it with uvicorn on ``settings.web_host:web_port``. Without a valid session
only these answer: /login, ``POST /logout``, /static/*, /health (liveness only), /metrics
and ``POST /api/auth/token``; /openapi.json and the detailed ``/api/health`` need a login.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from node.db.finite import finite
from node.web.admin_views import OpsError, mask_strings, mask_urls
from node.web.auth import (
    COOKIE,
    CsrfError,
    Forbidden,
    LoginThrottle,
    NotAuthenticated,
    Principal,
    SessionCodec,
    principal,
)
from node.web.imaging import ImageCache, ImagingError
from node.web.queries import display_time
from worklists.errors import EntryNotFound, InvalidChange, WorklistError
from worklists.triage import TriagePolicy, load_policy, percent, spread

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class SafeJSONResponse(JSONResponse):
    """JSON whose non-finite floats (NaN, inf) are null (JSON has none, and a bare NaN would be a 500)
    and whose strings show no credential inside a URL (`node.web.admin_views.mask_urls`)."""

    def render(self, content) -> bytes:
        return super().render(mask_strings(finite(content)))


@dataclass
class WebContext:
    """What every request handler needs, built once per app (no module-level state)."""

    settings: object
    db: object
    policy: TriagePolicy
    codec: SessionCodec
    throttle: LoginThrottle
    images: ImageCache
    tz: ZoneInfo
    templates: Jinja2Templates
    ip_throttle: LoginThrottle
    health: object  # node.ops.health.HealthMonitor
    _live: tuple[float, bool] = (0.0, False)
    _live_lock: threading.Lock = field(default_factory=threading.Lock)
    _live_check: Callable[[], bool] | None = None

    def liveness(self, max_age: float = 1.0) -> bool:
        """The anonymous /health answer (database and disk), computed at most once per `max_age` seconds."""
        with self._live_lock:
            at, ok = self._live
            if time.monotonic() - at >= max_age:
                from node.ops.health import liveness

                ok = liveness(self.settings, self.db)  # type: ignore[arg-type]
                self._live = (time.monotonic(), ok)
            return ok


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/openapi.json"


def _fmt_wait(minutes: int | None) -> str:
    if minutes is None:
        return "—"
    if minutes < 60:
        return f"{minutes} min"
    h, m = divmod(minutes, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def _pct(p: float | None) -> str:
    return "—" if p is None else percent(p)


def _finalize(v):
    """Every value a template prints, with the credentials inside URLs masked (Markup stays Markup)."""
    if isinstance(v, str):
        masked = mask_urls(v)
        if masked != v:
            return Markup(masked) if isinstance(v, Markup) else masked
    return v


def _templates(tz: ZoneInfo) -> Jinja2Templates:
    t = Jinja2Templates(directory=str(WEB_DIR / "templates"))
    # every value a page shows: no credential inside a URL (destination keys, settings, error messages)
    t.env.finalize = _finalize
    t.env.filters["local"] = lambda value, with_seconds=False: display_time(value, tz, seconds=with_seconds)
    t.env.filters["wait"] = _fmt_wait
    t.env.filters["pct"] = _pct
    t.env.filters["spread"] = spread
    t.env.filters["short"] = lambda s, n=12: (s[:n] + "…") if s and len(s) > n else (s or "—")
    t.env.filters["label"] = lambda s: (s or "").replace("_", " ")
    return t


def create_app(settings, db, *, policy: TriagePolicy | None = None) -> FastAPI:
    """The web app for one node database. Raises `WorklistError` for an invalid triage policy."""
    from node.ops.health import HealthMonitor
    from node.web import api, dashboard, feedback_routes, pages

    policy = policy or load_policy(settings.triage_policy)
    tz = ZoneInfo(settings.site_timezone)
    ctx = WebContext(
        settings=settings,
        db=db,
        policy=policy,
        codec=SessionCodec(settings.effective_secret_key(), settings.session_minutes),
        throttle=LoginThrottle(),
        images=ImageCache(),
        tz=tz,
        templates=_templates(tz),
        ip_throttle=LoginThrottle(
            failures=settings.login_ip_max_failures,
            window=settings.login_ip_window_seconds,
            lockout=settings.login_ip_window_seconds,
        ),
        health=HealthMonitor(settings, db, interval=settings.health_interval_seconds),
    )
    app = FastAPI(
        default_response_class=SafeJSONResponse,
        openapi_url=None,  # served below, behind login
        title="msknode",
        summary="Triage worklist, study viewer and administration of an MSK MRI AI node",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        telemetry={"tracing": False, "metrics": False},
    )
    app.state.ctx = ctx
    app.router.on_shutdown.append(ctx.health.stop)  # type: ignore[attr-defined]

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(p: Principal = Depends(principal)):
        return SafeJSONResponse(app.openapi())

    app.mount("/static", StaticFiles(directory=str(WEB_DIR / "static")), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(pages.ops_router)
    from node.web import deployment_routes  # model versions per pipeline: shadow or active

    app.include_router(deployment_routes.router)
    from node.ups import rest as ups_rest  # UPS-RS (PS3.18): the AI workitems

    app.include_router(ups_rest.router)
    app.include_router(feedback_routes.router)
    app.include_router(dashboard.router)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy", CSP)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(NotAuthenticated)
    async def _unauth(request: Request, exc: NotAuthenticated):
        r: Response
        if _is_api(request) or request.method != "GET":
            r = JSONResponse({"detail": exc.reason}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        else:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            msg = "" if exc.reason == "authentication required" else f"&error={quote(exc.reason)}"
            r = RedirectResponse(f"/login?next={quote(target)}{msg}", status_code=303)
        if request.cookies.get(COOKIE):
            r.delete_cookie(COOKIE, path="/")
        return r

    def _refuse(request: Request, status: int, reason: str):
        if _is_api(request):
            return JSONResponse({"detail": reason}, status_code=status)
        p = getattr(request.state, "principal", None)
        return ctx.templates.TemplateResponse(
            request,
            "error.html",
            {
                "user": p,
                "status": status,
                "reason": reason,
                "path": request.url.path,
                "tz": str(ctx.tz),
                "msg": None,
                "error": None,
            },
            status_code=status,
        )

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden):
        return _refuse(request, 403, exc.reason)

    @app.exception_handler(CsrfError)
    async def _csrf(request: Request, exc: CsrfError):
        return _refuse(request, 403, exc.reason)

    @app.exception_handler(EntryNotFound)
    async def _missing(request: Request, exc: EntryNotFound):
        return _refuse(request, 404, str(exc))

    @app.exception_handler(InvalidChange)
    async def _invalid(request: Request, exc: InvalidChange):
        return _refuse(request, 422, str(exc))

    @app.exception_handler(OpsError)
    async def _ops(request: Request, exc: OpsError):
        return _refuse(request, 409, str(exc))

    @app.exception_handler(ImagingError)
    async def _imaging(request: Request, exc: ImagingError):
        return _refuse(request, 422, f"cannot display: {exc}")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        reason = "; ".join(parts) or "invalid request"
        if _is_api(request):
            return JSONResponse(
                {"detail": reason, "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors]},
                status_code=422,
            )
        return _refuse(request, 422, reason)

    return app


def run_web(settings) -> int:
    """Serves the web app with uvicorn until interrupted."""
    import uvicorn

    from node.db.database import Database
    from node.errors import SettingsError

    db = Database(settings.database_url)
    try:
        app = create_app(settings, db)
    except WorklistError as e:
        raise SettingsError(str(e)) from None
    log.info("web UI on http://%s:%s/", settings.web_host, settings.web_port)
    uvicorn.Server(uvicorn_config(settings, app)).run()
    db.dispose()
    return 0


def uvicorn_config(settings, app, *, port: int | None = None):
    """uvicorn's configuration of the node's web server: forwarded headers (client address, scheme)
    are believed only from `MSKNODE_TRUSTED_PROXIES`; without any, they are ignored."""
    import uvicorn

    trusted = list(settings.trusted_proxies)
    return uvicorn.Config(
        app,
        host=settings.web_host,
        port=settings.web_port if port is None else port,
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )
