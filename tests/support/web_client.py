"""The node's web app in process (Starlette's TestClient, no sockets): a client, a logged-in
session, a bearer token header and the session's CSRF token.

``who`` is a ``(username, password)`` pair of a user the test added.
"""

from __future__ import annotations

import re
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def client(app) -> TestClient:
    return TestClient(app, base_url="http://testserver")


def login(app, who) -> TestClient:
    """What a browser does: GET /login (nonce cookie), POST the form; the session is on the client."""
    c = client(app)
    page = c.get("/login")
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post(
        "/login",
        data={"username": who[0], "password": who[1], "csrf_token": nonce, "next": "/worklist"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/worklist", r.text
    return c


def bearer(app, who) -> dict:
    """The Authorization header of a token from ``POST /api/auth/token``."""
    r = client(app).post("/api/auth/token", json={"username": who[0], "password": who[1]})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def csrf_of(c: TestClient) -> str:
    """The CSRF token of the client's session (``GET /api/me``)."""
    return c.get("/api/me").json()["csrf_token"]
