"""No admin page or API answer shows a credential inside a destination URL.

A STOW-RS or DICOMweb destination may carry its credentials in the URL (``https://user:pass@host``,
``?token=...``). The password and token fields were masked, but the URL itself, the destination key
made from it (shown with every outbox row) and error messages quoting it were shown as they are.
Real HTTP against the node's web server, as an admin.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import update

from support import web_seed as ws
from support.env import isolate_env
from support.web_server import WebServer, login_form

pytestmark = [pytest.mark.integration]

ADMIN = ("ada", "ada-password-12")
SECRETS = ("s3cr3t-pw", "tok-abc123", "sig-9f8e7d")
STOW = "https://pacsuser:s3cr3t-pw@pacs.example.org/dicom-web?token=tok-abc123"
WADO = "https://dicomweb.example.org/wado?page=1&signature=sig-9f8e7d"


@pytest.fixture
def web(tmp_path, monkeypatch):
    import json

    isolate_env(
        monkeypatch,
        MSKNODE_DATA_DIR=tmp_path / "data",
        MSKNODE_DESTINATIONS=json.dumps(
            [
                {"type": "stow", "url": STOW},
                {"type": "stow", "name": "archive", "url": WADO, "password": "s3cr3t-pw"},
                {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            ]
        ),
    )
    from node.db.database import Database
    from node.db.schema import OutboxItem
    from node.settings import load_settings
    from node.web.users import add_user
    from worklists.triage import load_policy

    settings = load_settings()
    settings.ensure_dirs()
    db = Database(settings.database_url)
    seeded = ws.seed_study(
        db,
        settings,
        load_policy(settings.triage_policy),
        findings=ws.acl_complete(),
        received_at=dt.datetime.now(dt.UTC),
        outbox_states=("sent", "dead"),
        with_superres=False,
    )
    with db.session() as s:
        add_user(s, username=ADMIN[0], password=ADMIN[1], role="admin")
        s.execute(update(OutboxItem).where(OutboxItem.destination == "dest0").values(destination=f"stow:{STOW}"))
        s.execute(
            update(OutboxItem)
            .where(OutboxItem.destination == "dest1")
            .values(destination="archive", last_error=f"HTTP 401 from {STOW}; retry via {WADO}")
        )
    server = WebServer(settings, db).start()
    yield server, seeded
    server.stop()
    db.dispose()


def test_no_page_or_answer_shows_a_url_credential(web):
    server, seeded = web
    c = server.client()
    assert login_form(c, *ADMIN).status_code == 303
    pages = {}
    for path in (
        "/admin/routing",
        "/api/admin/routing",
        "/admin/outbox",
        "/api/admin/outbox",
        "/admin/outbox?state=dead",
        "/admin/jobs",
        "/api/admin/jobs",
        f"/studies/{seeded.study_id}",
        f"/api/studies/{seeded.study_id}",
    ):
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code)
        for secret in SECRETS:
            assert secret not in r.text, (path, secret)
        pages[path] = r.text
    # still shown, masked: which destination it is stays readable
    assert "https://***@pacs.example.org/dicom-web?token=***" in pages["/admin/routing"]
    assert "signature=***" in pages["/api/admin/routing"]
    assert "stow:https://***@pacs.example.org" in pages["/api/admin/outbox"]
    assert "HTTP 401 from https://***@pacs.example.org" in pages["/admin/outbox?state=dead"]
