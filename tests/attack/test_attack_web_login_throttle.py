"""Password guessing is limited per client address, and nobody can lock someone else's account.

Before: failed logins were counted per user name only, so a spray of random names was never slowed
(each still costing the server 0.3 s of Argon2), and five wrong passwords from anywhere locked the
real user out. Real HTTP against the node's web server; the client address comes from
``X-Forwarded-For`` only when the connection comes from a trusted proxy.
"""

from __future__ import annotations

import secrets
import time

import pytest

from support.env import isolate_env
from support.web_server import WebServer, login_form, token

pytestmark = [pytest.mark.integration]

USER = ("rob", "rob-password-12")
LIMIT = 4


def _server(tmp_path, monkeypatch, **env):
    isolate_env(
        monkeypatch,
        MSKNODE_DATA_DIR=tmp_path / "data",
        MSKNODE_LOGIN_IP_MAX_FAILURES=LIMIT,
        MSKNODE_LOGIN_IP_WINDOW_SECONDS=120,
        **env,
    )
    from node.db.database import Database
    from node.settings import load_settings
    from node.web.users import add_user

    settings = load_settings()
    settings.ensure_dirs()
    db = Database(settings.database_url)
    with db.session() as s:
        add_user(s, username=USER[0], password=USER[1], role="radiologist")
    return WebServer(settings, db).start(), db


@pytest.fixture
def direct(tmp_path, monkeypatch):
    """No trusted proxy: forwarded headers are ignored."""
    server, db = _server(tmp_path, monkeypatch, MSKNODE_TRUSTED_PROXIES="")
    yield server
    server.stop()
    db.dispose()


@pytest.fixture
def proxied(tmp_path, monkeypatch):
    """Behind a proxy on 127.0.0.1 (trusted): the client address is the forwarded one."""
    server, db = _server(tmp_path, monkeypatch, MSKNODE_TRUSTED_PROXIES="127.0.0.1")
    yield server
    server.stop()
    db.dispose()


def test_a_spray_of_random_names_from_one_address_gets_429(direct):
    c = direct.client()
    for _ in range(LIMIT):
        name = "nobody-" + secrets.token_hex(4)
        assert token(c, name, "guess-guess-1").status_code == 401
    t0 = time.perf_counter()
    r = token(c, "nobody-" + secrets.token_hex(4), "guess-guess-1")
    assert r.status_code == 429, r.text
    assert "this address" in r.json()["detail"] and 0 < int(r.headers["retry-after"]) <= 120
    # refused before any password hashing, and the login form is refused alike
    assert time.perf_counter() - t0 < 0.25
    r = login_form(c, USER[0], USER[1])
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "this address" in r.text
    # a forged X-Forwarded-For from an untrusted peer changes nothing
    r = token(c, USER[0], USER[1], headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 429


def test_behind_a_trusted_proxy_each_client_address_is_limited_on_its_own(proxied):
    c = proxied.client()
    attacker = {"X-Forwarded-For": "10.1.1.66"}
    victim = {"X-Forwarded-For": "10.1.1.7"}
    for _ in range(LIMIT):
        assert token(c, USER[0], "wrong-password-9", headers=attacker).status_code == 401
    assert token(c, USER[0], USER[1], headers=attacker).status_code == 429
    # the real user, from their own workstation, is not locked out by the attacker's failures
    assert token(c, USER[0], USER[1], headers=victim).status_code == 200
    r = login_form(c, USER[0], USER[1], headers=victim)
    assert r.status_code == 303, r.text
