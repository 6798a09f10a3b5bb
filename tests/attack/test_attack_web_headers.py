"""What a browser, a shared cache or an anonymous client can keep or learn: the session cookie's
Secure flag (``MSKNODE_COOKIE_SECURE``, or https per a trusted proxy), ``Cache-Control: no-store``
on slice images and every page or answer with patient data, and the API's map behind login.
Real HTTP against the node's web server.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from support import web_seed as ws
from support.env import isolate_env
from support.web_server import WebServer, login_form, token

pytestmark = [pytest.mark.integration]

USER = ("rob", "rob-password-12")


def _server(tmp_path, monkeypatch, seed: bool = False, **env):
    isolate_env(monkeypatch, MSKNODE_DATA_DIR=tmp_path / "data", **env)
    from node.db.database import Database
    from node.settings import load_settings
    from node.web.users import add_user
    from worklists.triage import load_policy

    settings = load_settings()
    settings.ensure_dirs()
    db = Database(settings.database_url)
    with db.session() as s:
        add_user(s, username=USER[0], password=USER[1], role="radiologist")
    seeded = None
    if seed:
        seeded = ws.seed_study(
            db,
            settings,
            load_policy(settings.triage_policy),
            findings=ws.acl_complete(),
            patient_name="DOE^JANE",
            patient_id="PIDHDR",
            received_at=dt.datetime.now(dt.UTC),
            with_superres=False,
        )
    return WebServer(settings, db).start(), db, seeded


@pytest.fixture
def stop():
    items = []
    yield items.append
    for server, db, _ in items:
        server.stop()
        db.dispose()


def _login(c, headers=None):
    """The login form, with the nonce cookie sent back by hand: a browser returns a Secure cookie over
    https only, and here https is what the (trusted) proxy says, or what MSKNODE_COOKIE_SECURE assumes."""
    page = c.get("/login", headers=headers)
    nonce_cookie = next(v for k, v in page.headers.multi_items() if k == "set-cookie" and "msknode_login=" in v)
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return c.post(
        "/login",
        data={"username": USER[0], "password": USER[1], "csrf_token": nonce, "next": "/worklist"},
        headers={**(headers or {}), "Cookie": nonce_cookie.split(";")[0]},
        follow_redirects=False,
    )


def _session_cookie(r) -> str:
    return next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("msknode_session="))


def test_cookie_secure_setting_marks_the_session_cookie_secure_over_plain_http(tmp_path, monkeypatch, stop):
    started = _server(tmp_path, monkeypatch, MSKNODE_COOKIE_SECURE="true")
    stop(started)
    r = _login(started[0].client())
    assert r.status_code == 303, r.text
    cookie = _session_cookie(r)
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie, cookie


def test_without_the_setting_secure_follows_the_trusted_proxys_scheme(tmp_path, monkeypatch, stop):
    started = _server(tmp_path, monkeypatch, MSKNODE_TRUSTED_PROXIES="127.0.0.1")
    stop(started)
    web = started[0]
    assert "Secure" not in _session_cookie(login_form(web.client(), *USER))
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.2.2.2"}
    assert "Secure" in _session_cookie(_login(web.client(), headers=https))


def test_an_untrusted_peer_cannot_claim_https_or_an_address(tmp_path, monkeypatch, stop):
    started = _server(tmp_path, monkeypatch, MSKNODE_TRUSTED_PROXIES="")
    stop(started)
    r = _login(started[0].client(), headers={"X-Forwarded-Proto": "https"})
    assert "Secure" not in _session_cookie(r)


def test_openapi_and_docs_need_a_login(tmp_path, monkeypatch, stop):
    started = _server(tmp_path, monkeypatch)
    stop(started)
    web = started[0]
    anonymous = web.client()
    r = anonymous.get("/openapi.json")
    assert r.status_code == 401 and "paths" not in r.text
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert anonymous.get(path, follow_redirects=False).status_code in (303, 404), path
    bearer = token(web.client(), *USER).json()["access_token"]
    spec = web.client().get("/openapi.json", headers={"Authorization": f"Bearer {bearer}"}).json()
    assert "/api/worklist" in spec["paths"]


def test_slice_images_and_patient_pages_are_never_cached(tmp_path, monkeypatch, stop):
    started = _server(tmp_path, monkeypatch, seed=True)
    stop(started)
    web, _db, seeded = started
    c = web.client()
    assert login_form(c, *USER).status_code == 303
    sid = seeded.study_id
    for path in (
        f"/api/studies/{sid}/series/{seeded.series_id}/slices/0.png",
        f"/api/studies/{sid}",
        f"/studies/{sid}",
        "/worklist",
        "/api/worklist",
    ):
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code)
        assert r.headers["cache-control"] == "no-store", path
    png = c.get(f"/api/studies/{sid}/series/{seeded.series_id}/slices/0.png")
    assert png.headers["content-type"] == "image/png"
