"""Authentication for the web UI and the JSON API.

A login issues a signed, timestamped session (itsdangerous, key from
``settings.effective_secret_key()``) that expires after ``settings.session_minutes``:
as an HttpOnly cookie for the browser, or as a bearer token from ``POST /api/auth/token``
for scripts. Every request re-reads the user, so a disabled user or a changed role
takes effect at once. Each session also carries the user's session epoch (``users.session_epoch``):
logging out, a password change and an admin's "sign out everywhere" raise it, and every
session or token issued before is refused from then on. Cookie sessions carry a CSRF token that every state-changing
request must echo (form field ``csrf_token`` or header ``X-CSRF-Token``); bearer
tokens cannot be sent by a browser on its own and need none.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select

from worklists.tables import User

COOKIE = "msknode_session"
LOGIN_COOKIE = "msknode_login"
CSRF_HEADER = "X-CSRF-Token"

# declared for the OpenAPI schema (both optional here; `principal` decides)
BEARER = HTTPBearer(auto_error=False, description="a token from POST /api/auth/token")
SESSION_COOKIE = APIKeyCookie(
    name=COOKIE, auto_error=False, description="the browser session (changes need X-CSRF-Token)"
)


class NotAuthenticated(Exception):
    """No valid session: pages redirect to the login form, the API answers 401."""

    def __init__(self, reason: str = "authentication required"):
        super().__init__(reason)
        self.reason = reason


class Forbidden(Exception):
    """Authenticated, but the role does not allow this (403)."""

    def __init__(self, reason: str = "admin role required"):
        super().__init__(reason)
        self.reason = reason


class CsrfError(Exception):
    """A state-changing request without the session's CSRF token (403)."""

    def __init__(self, reason: str = "missing or wrong CSRF token"):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    csrf: str
    expires_at: float  # epoch seconds
    via: str  # "cookie" or "token"
    epoch: int = 0  # the user's session epoch when it was issued

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class SessionCodec:
    """Signs and checks session cookies, bearer tokens and the login form's CSRF nonce."""

    def __init__(self, secret: str, minutes: int):
        self.max_age = minutes * 60
        self._cookie = URLSafeTimedSerializer(secret, salt="msknode.web.session")
        self._token = URLSafeTimedSerializer(secret, salt="msknode.api.token")
        self._login = URLSafeTimedSerializer(secret, salt="msknode.web.login")

    def _serializer(self, kind: str) -> URLSafeTimedSerializer:
        return self._token if kind == "token" else self._cookie

    def issue(self, username: str, role: str, *, kind: str = "cookie", epoch: int = 0) -> tuple[str, Principal]:
        exp = time.time() + self.max_age
        csrf = secrets.token_urlsafe(24)
        token = self._serializer(kind).dumps({"u": username, "c": csrf, "x": exp, "e": int(epoch)})
        return token, Principal(username, role, csrf, exp, kind, int(epoch))

    def read(self, token: str, *, kind: str = "cookie") -> dict:
        try:
            data = self._serializer(kind).loads(token, max_age=self.max_age)
        except SignatureExpired:
            raise NotAuthenticated("session expired, please log in again") from None
        except BadSignature:
            raise NotAuthenticated("invalid session") from None
        if not isinstance(data, dict) or not {"u", "c", "x", "e"} <= set(data):
            raise NotAuthenticated("invalid session")
        if float(data["x"]) < time.time():
            raise NotAuthenticated("session expired, please log in again")
        return data

    def login_nonce(self) -> tuple[str, str]:
        """A nonce for the login form: (signed cookie value, form value)."""
        nonce = secrets.token_urlsafe(24)
        return self._login.dumps(nonce), nonce

    def check_login_nonce(self, cookie: str | None, form_value: str | None) -> bool:
        if not cookie or not form_value:
            return False
        try:
            nonce = self._login.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return hmac.compare_digest(str(nonce), form_value)


class LoginThrottle:
    """Refuses logins for a name after `failures` failed attempts within `window` seconds (per process)."""

    def __init__(self, failures: int = 5, window: float = 300.0, lockout: float = 60.0):
        self.failures, self.window, self.lockout = failures, window, lockout
        self._seen: dict[str, deque] = {}
        self._lock = threading.Lock()

    def retry_after(self, username: str, now: float | None = None) -> int:
        """Seconds until this name may try again (0 = now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._seen.get(username.lower())
            if not q:
                return 0
            while q and now - q[0] > self.window:
                q.popleft()
            if len(q) >= self.failures:
                return max(1, int(q[-1] + self.lockout - now + 0.999)) if now - q[-1] < self.lockout else 0
            return 0

    def failed(self, username: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._seen.setdefault(username.lower(), deque(maxlen=self.failures * 2)).append(now)
            if len(self._seen) > 10_000:  # bounded memory under a spray of names
                self._seen.pop(next(iter(self._seen)))

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._seen.pop(username.lower(), None)


def client_address(request: Request) -> str:
    """The client's address: the peer, or what a trusted proxy forwarded (`MSKNODE_TRUSTED_PROXIES`,
    applied by uvicorn's proxy-headers middleware, see `node.web.app.uvicorn_config`)."""
    return request.client.host if request.client else "-"


def cookie_secure(request: Request) -> bool:
    """The session cookie's Secure flag: always with `MSKNODE_COOKIE_SECURE`, else when the request came over https."""
    return bool(request.app.state.ctx.settings.cookie_secure) or request.url.scheme == "https"


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def principal(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(BEARER),
    cookie: str | None = Depends(SESSION_COOKIE),
) -> Principal:
    """The logged-in user of this request, or `NotAuthenticated`."""
    ctx = request.app.state.ctx
    token = _bearer(request)
    kind = "token"
    if token is None:
        token = cookie
        kind = "cookie"
    if not token:
        raise NotAuthenticated()
    data = ctx.codec.read(token, kind=kind)
    with ctx.db.session() as s:
        user = s.scalars(select(User).where(User.username == data["u"])).first()
        if user is None or not user.active:
            raise NotAuthenticated("this account is disabled")
        if data["e"] != user.session_epoch:
            raise NotAuthenticated("this session has ended (logged out or password changed), please log in again")
        role = user.role
    p = Principal(data["u"], role, data["c"], float(data["x"]), kind, int(data["e"]))
    request.state.principal = p
    return p


def admin(p: Principal = Depends(principal)) -> Principal:
    if not p.is_admin:
        raise Forbidden("admin role required")
    return p


def check_csrf(p: Principal, supplied: str | None) -> None:
    """Refuses a cookie-session change whose CSRF token is missing or wrong."""
    if p.via != "cookie":
        return
    if not supplied or not hmac.compare_digest(supplied, p.csrf):
        raise CsrfError()


def api_csrf(request: Request, p: Principal = Depends(principal)) -> Principal:
    """For JSON API changes: the CSRF header must match when the session is a cookie."""
    check_csrf(p, request.headers.get(CSRF_HEADER))
    return p


def api_admin_csrf(request: Request, p: Principal = Depends(admin)) -> Principal:
    check_csrf(p, request.headers.get(CSRF_HEADER))
    return p
