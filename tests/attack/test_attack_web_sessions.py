"""A stolen or left-behind session ends when its user logs out, changes the password or is signed out.

Sessions are signed, not stored: before the session epoch, an old cookie or bearer token kept working
for up to ``MSKNODE_SESSION_MINUTES`` after logout or a password change. Real HTTP against the node's
web server (uvicorn on localhost) with real cookies and tokens.
"""

from __future__ import annotations

import pytest

from support.env import isolate_env
from support.web_server import WebServer, login_form, token

pytestmark = [pytest.mark.integration]

ADMIN = ("ada", "ada-password-12")
READER = ("rob", "rob-password-12")


@pytest.fixture
def web(tmp_path, monkeypatch):
    isolate_env(monkeypatch, MSKNODE_DATA_DIR=tmp_path / "data")
    from node.db.database import Database
    from node.settings import load_settings
    from node.web.users import add_user

    settings = load_settings()
    settings.ensure_dirs()
    db = Database(settings.database_url)
    with db.session() as s:
        add_user(s, username=ADMIN[0], password=ADMIN[1], role="admin")
        add_user(s, username=READER[0], password=READER[1], role="radiologist")
    server = WebServer(settings, db).start()
    yield server
    server.stop()
    db.dispose()


def _sessions(web, who):
    """A browser session (cookie value and its CSRF token) and a bearer token of `who`."""
    browser = web.client()
    r = login_form(browser, *who)
    assert r.status_code == 303, r.text
    cookie = browser.cookies["msknode_session"]
    csrf = browser.get("/api/me").json()["csrf_token"]
    bearer = token(web.client(), *who).json()["access_token"]
    return browser, cookie, csrf, bearer


def _me(web, *, cookie=None, bearer=None) -> int:
    with web.client() as c:
        if cookie:
            c.cookies.set("msknode_session", cookie)
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        return c.get("/api/me", headers=headers).status_code


def test_logout_ends_the_old_cookie_and_the_old_bearer_token(web):
    browser, cookie, csrf, bearer = _sessions(web, READER)
    assert _me(web, cookie=cookie) == 200 and _me(web, bearer=bearer) == 200
    r = browser.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    # a copy of the cookie (stolen, or kept by another tab) and the token no longer work
    assert _me(web, cookie=cookie) == 401
    assert _me(web, bearer=bearer) == 401
    with web.client() as c:
        c.cookies.set("msknode_session", cookie)
        assert "session has ended" in c.get("/api/me").json()["detail"]
    # logging in again works
    assert _sessions(web, READER)[0].get("/api/me").status_code == 200


def test_logout_is_post_only_and_needs_the_csrf_token(web):
    browser, cookie, _csrf, bearer = _sessions(web, READER)
    # a link or image on another site (GET) or a forged form (no token) does not log the user out
    assert browser.get("/logout", follow_redirects=False).status_code == 405
    assert browser.post("/logout", data={"csrf_token": "forged"}, follow_redirects=False).status_code == 403
    assert _me(web, cookie=cookie) == 200 and _me(web, bearer=bearer) == 200


def test_a_password_change_ends_every_earlier_session(web):
    browser, cookie, csrf, bearer = _sessions(web, READER)
    r = browser.post(
        "/api/auth/password",
        json={"current_password": READER[1], "new_password": "rob-new-password-34"},
        headers={"X-CSRF-Token": csrf},
    )
    assert r.status_code == 200, r.text
    assert _me(web, cookie=cookie) == 401
    assert _me(web, bearer=bearer) == 401
    assert token(web.client(), *READER).status_code == 401
    assert token(web.client(), READER[0], "rob-new-password-34").status_code == 200


def test_a_password_set_by_the_cli_ends_every_earlier_session(web):
    from node.web.users import set_password

    _browser, cookie, _csrf, bearer = _sessions(web, READER)
    with web.db.session() as s:
        set_password(s, username=READER[0], password="rob-cli-password-56", actor="cli")
    assert _me(web, cookie=cookie) == 401 and _me(web, bearer=bearer) == 401


def test_a_wrong_current_password_changes_nothing(web):
    _browser, cookie, _csrf, bearer = _sessions(web, READER)
    r = web.client().post(
        "/api/auth/password",
        json={"current_password": "not-my-password", "new_password": "rob-new-password-34"},
        headers={"Authorization": f"Bearer {bearer}"},
    )
    assert r.status_code == 401
    assert _me(web, cookie=cookie) == 200 and _me(web, bearer=bearer) == 200


def test_an_admin_signs_a_user_out_everywhere(web):
    _browser, cookie, _csrf, bearer = _sessions(web, READER)
    admin_browser, _admin_cookie, admin_csrf, admin_bearer = _sessions(web, ADMIN)
    # a radiologist cannot sign anyone out
    r = web.client().post(f"/api/admin/users/{ADMIN[0]}/signout", headers={"Authorization": f"Bearer {bearer}"})
    assert r.status_code == 403
    r = web.client().post(f"/api/admin/users/{READER[0]}/signout", headers={"Authorization": f"Bearer {admin_bearer}"})
    assert r.status_code == 200, r.text
    assert _me(web, cookie=cookie) == 401 and _me(web, bearer=bearer) == 401
    assert _me(web, bearer=admin_bearer) == 200  # the admin's own sessions go on
    # the users page's button does the same
    _b2, cookie2, _c2, bearer2 = _sessions(web, READER)
    r = admin_browser.post(f"/admin/users/{READER[0]}/signout", data={"csrf_token": admin_csrf}, follow_redirects=False)
    assert r.status_code == 303 and "error" not in r.headers["location"], r.headers["location"]
    assert _me(web, cookie=cookie2) == 401 and _me(web, bearer=bearer2) == 401
    with web.db.session() as s:
        from sqlalchemy import select

        from worklists.tables import AuditEvent

        actions = [(a.actor, a.action, a.entity_id) for a in s.scalars(select(AuditEvent))]
    assert (ADMIN[0], "user.sessions_ended", READER[0]) in actions
