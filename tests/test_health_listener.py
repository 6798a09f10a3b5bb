"""The detailed health's (``/api/health``) listener check against a listener with an allow-list: up, and no ERROR line."""

from __future__ import annotations

import logging

import pytest

from node.ops.health import HEALTH_AE_TITLE, check_listener, health_calling_ae
from node.settings import load_settings
from support.env import isolate_env
from support.listener import ListenerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    lp = ListenerProcess(
        tmp_path_factory.mktemp("health") / "data",
        env={"MSKNODE_ALLOWED_AE_TITLES": "PACS_AET,ECHOSCU", "MSKNODE_LISTENER_PROCESSES": "1"},
    )
    lp.start()
    yield lp
    lp.stop()


def _settings(monkeypatch, lp, allowed):
    isolate_env(monkeypatch, MSKNODE_DATA_DIR=lp.data_dir, MSKNODE_PORT=lp.port, MSKNODE_ALLOWED_AE_TITLES=allowed)
    return load_settings()


def _errors(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_allow_list_without_the_nodes_own_title_answers_without_an_error_line(listener, monkeypatch, caplog):
    settings = _settings(monkeypatch, listener, "PACS_AET,ECHOSCU")
    assert health_calling_ae(settings) == HEALTH_AE_TITLE
    caplog.set_level(logging.DEBUG)
    report = check_listener(settings)
    assert report["ok"], report
    assert "note" in report and "error" not in report
    assert not _errors(caplog), [r.getMessage() for r in _errors(caplog)]


def test_allow_list_with_the_nodes_own_title_is_a_full_c_echo(listener, monkeypatch, caplog):
    # the listener was started with PACS_AET,ECHOSCU; a second one that also allows its own title
    lp = ListenerProcess(
        listener.data_dir.parent / "own",
        env={"MSKNODE_ALLOWED_AE_TITLES": "PACS_AET,ECHOSCU,MSKNODE", "MSKNODE_LISTENER_PROCESSES": "1"},
    ).start()
    try:
        settings = _settings(monkeypatch, lp, "PACS_AET,MSKNODE")
        assert health_calling_ae(settings) == "MSKNODE"
        caplog.clear()  # the start's readiness polling
        caplog.set_level(logging.DEBUG)
        report = check_listener(settings)
        assert report["ok"] and "latency_ms" in report and "note" not in report, report
        assert report["calling_ae"] == "MSKNODE"
        assert not _errors(caplog)
    finally:
        lp.stop()


def test_health_endpoint_reports_the_listener_up_without_an_error_line(listener, monkeypatch, caplog):
    from starlette.testclient import TestClient

    from node.db.database import Database, upgrade
    from node.web.app import create_app
    from node.web.users import add_user

    settings = _settings(monkeypatch, listener, "PACS_AET,ECHOSCU")
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    with db.session() as s:
        add_user(s, username="ops", password="ops-password-1", role="admin")
    try:
        caplog.set_level(logging.INFO)
        with TestClient(create_app(settings, db), base_url="http://testserver") as client:
            assert client.get("/health").json() == {"status": "ok"}  # anonymous: liveness only
            tok = client.post("/api/auth/token", json={"username": "ops", "password": "ops-password-1"}).json()
            body = client.get("/api/health", headers={"Authorization": f"Bearer {tok['access_token']}"}).json()
    finally:
        db.dispose()
    assert body["components"]["listener"]["ok"], body
    assert not _errors(caplog), [r.getMessage() for r in _errors(caplog)]
