"""Anonymous /health floods cost the PACS nothing and tell an attacker nothing.

Before: every anonymous ``GET /health`` opened a DICOM association to the listener (40 clients for 8 s
made real PACS echoes fail and wrote an association row per call) and answered the disk size, the AE
title and the worker names. Now /health is a cached liveness answer without detail, and the detailed
report (``/api/health``, behind login) comes from a background check run at most every
``MSKNODE_HEALTH_INTERVAL_SECONDS``. A real listener, the real web server, real echoscu.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from sqlalchemy import func, select

from support.env import isolate_env
from support.listener import ListenerProcess
from support.web_server import WebServer, token

pytestmark = [pytest.mark.integration]

USER = ("ops", "ops-password-12")
INTERVAL = 2.0


@pytest.fixture
def node(tmp_path, monkeypatch):
    lp = ListenerProcess(tmp_path / "data", env={"MSKNODE_LISTENER_PROCESSES": "1"}).start()
    isolate_env(
        monkeypatch, MSKNODE_DATA_DIR=lp.data_dir, MSKNODE_PORT=lp.port, MSKNODE_HEALTH_INTERVAL_SECONDS=INTERVAL
    )
    from node.db.database import Database
    from node.settings import load_settings
    from node.web.users import add_user

    settings = load_settings()
    db = Database(settings.database_url)
    with db.session() as s:
        add_user(s, username=USER[0], password=USER[1], role="radiologist")
    web = WebServer(settings, db).start()
    yield lp, web, db
    web.stop()
    db.dispose()
    lp.stop()


def _associations(db) -> int:
    from node.db.schema import Association

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Association))


def _flood(web, path: str, seconds: float, clients: int, headers=None) -> list[int]:
    """`clients` threads GET `path` as fast as they can for `seconds`; the status codes."""
    codes: list[int] = []
    lock = threading.Lock()
    pool = [web.client() for _ in range(clients)]  # made first: an HTTP client's TLS setup is slow
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(c):
        start.wait()
        while time.monotonic() < stop_at[0]:
            code = c.get(path, headers=headers).status_code
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=run, args=(c,)) for c in pool]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    start.wait()
    for t in threads:
        t.join()
    for c in pool:
        c.close()
    return codes


def _echo(port: int) -> bool:
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run(
        ["echoscu", "-aet", "PACS", "-aec", "MSKNODE", "-to", "5", "127.0.0.1", str(port)],
        env=env,
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


def test_anonymous_health_opens_no_association_and_shows_no_detail(node):
    lp, web, db = node
    before = _associations(db)
    echoes: list[bool] = []
    pacs = threading.Thread(target=lambda: echoes.extend(_echo(lp.port) for _ in range(6)))
    pacs.start()
    codes = _flood(web, "/health", seconds=3.0, clients=16)
    pacs.join()
    assert len(codes) > 50 and set(codes) == {200}, (len(codes), set(codes))
    assert all(echoes), echoes  # the PACS's own echoes are unaffected
    # the listener wrote a row for each PACS echo and none for the health answers
    assert _associations(db) - before == len(echoes)
    with web.client() as c:
        r = c.get("/health")
    assert r.json() == {"status": "ok"}
    for secret in ("MSKNODE", str(lp.port), "free_gb", "workers", "components"):
        assert secret not in r.text


def test_the_detailed_report_needs_a_login_and_probes_at_most_once_per_interval(node):
    _lp, web, db = node
    with web.client() as c:
        assert c.get("/api/health").status_code == 401
    bearer = {"Authorization": f"Bearer {token(web.client(), *USER).json()['access_token']}"}
    before = _associations(db)
    t0 = time.monotonic()
    codes = _flood(web, "/api/health", seconds=5.0, clients=12, headers=bearer)
    elapsed = time.monotonic() - t0
    assert len(codes) > 30 and set(codes) <= {200, 503}
    time.sleep(1.0)  # the last probe's association row
    probes = web.app.state.ctx.health.probes
    assert probes <= elapsed / INTERVAL + 2, (probes, elapsed)
    assert _associations(db) - before <= probes
    with web.client() as c:
        body = c.get("/api/health", headers=bearer).json()
    # the documented keys of the detailed report
    assert {"ok", "status", "checked_at", "components", "age_seconds"} <= set(body)
    assert {"database", "disk", "broker", "listener", "workers"} <= set(body["components"])
    assert body["components"]["listener"]["ok"] and body["components"]["listener"]["ae_title"] == "MSKNODE"
    assert body["age_seconds"] <= INTERVAL + 5
