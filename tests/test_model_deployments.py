"""Model deployments (node.jobs.deployments): shadow at first use without real-data validation, activation by
configuration or by an admin (audited), site versions registered and selected per pipeline, the registry loading
the selected version, the CLI and the admin Models page / API."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
from sqlalchemy import select

from support import web_seed as ws
from support.env import ROOT, isolate_env
from support.web_client import login

pytestmark = [pytest.mark.unit]

ADMIN = ("dora", "correct-horse-battery-staple-1")
READER = ("rita", "correct-horse-battery-staple-2")


def _registry(weights_dir=None):
    from models.registry import Registry

    return Registry(weights_dir)


def _audit(db, action="model.deploy"):
    from worklists.tables import AuditEvent

    with db.session() as s:
        return [
            (a.actor, a.entity_id, a.old_value, a.new_value, a.reason)
            for a in s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        ]


def _site_copy(tmp_path, model="knee.acl", **card_changes):
    """A site weights folder holding a copy of the shipped weights of ``model`` with a changed card."""
    folder = tmp_path / "site" / model
    folder.mkdir(parents=True)
    for f in ("model.pt", "model.pt.sha256"):
        shutil.copy2(ROOT / "models" / "weights" / model / f, folder / f)
    card = json.loads((ROOT / "models" / "weights" / model / "card.json").read_text())
    card.update(card_changes)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_first_use_without_real_data_validation_is_shadow_and_audited(settings, db):
    from node.jobs import deployments

    card = _registry().card("knee.acl")
    assert "real_data" in card and not deployments.card_validated(card)  # unlabelled real scans do not count
    got = deployments.for_pipeline(db, settings, _registry(), "knee")
    assert set(got) == {"knee.acl", "knee.meniscus"}
    assert all(d.state == "shadow" and d.weights_dir is None for d in got.values())
    assert got["knee.acl"].version == _registry().info("knee.acl").version
    events = _audit(db)
    assert [e[1] for e in events] == ["knee/knee.acl", "knee/knee.meniscus"]
    assert all(e[0] == "system" and "silent trial" in e[4] for e in events)
    # a second job sees the same rows: nothing new
    deployments.for_pipeline(db, settings, _registry(), "knee")
    assert len(_audit(db)) == 2


def test_card_with_real_data_validation_starts_active(settings, db, tmp_path):
    from node.jobs import deployments

    site = _site_copy(tmp_path, real_data_validation={"data": "site PACS, 212 labelled studies", "auc": 0.91})
    got = deployments.for_pipeline(db, settings, _registry(site.parent), "knee")
    assert got["knee.acl"].state == "active" and got["knee.meniscus"].state == "shadow"


def test_configuration_activates_but_never_overrides_an_admin(data_dir, monkeypatch):
    from node.db.database import Database
    from node.jobs import deployments
    from node.settings import load_settings

    isolate_env(monkeypatch, MSKNODE_DATA_DIR=data_dir)
    plain = load_settings()
    db = Database(plain.database_url)
    try:
        assert deployments.for_pipeline(db, plain, _registry(), "shoulder")["shoulder.rotator_cuff"].shadow
        configured = load_settings(activate_models=["shoulder.rotator_cuff"])
        # shadow set by the system at first use: the configuration activates it
        assert deployments.for_pipeline(db, configured, _registry(), "shoulder")["shoulder.rotator_cuff"].state == (
            "active"
        )
        assert _audit(db)[-1][0] == "config"
        with db.session() as s:
            deployments.change(
                s,
                pipeline="shoulder",
                model_name="shoulder.rotator_cuff",
                version=_registry().info("shoulder.rotator_cuff").version,
                state="shadow",
                actor="dora",
                reason="agreement below the card",
            )
        # an admin's decision stands against the configuration
        assert deployments.for_pipeline(db, configured, _registry(), "shoulder")["shoulder.rotator_cuff"].shadow
        assert _audit(db)[-1][:1] == ("dora",) and _audit(db)[-1][4] == "agreement below the card"
    finally:
        db.dispose()


def test_register_select_activate_and_the_registry_loads_that_version(settings, db, tmp_path):
    from node.jobs import deployments
    from node.jobs.deployments import DeploymentError

    trained = _site_copy(tmp_path, demo_weights=False)  # stands for `msknode train --out DIR`
    deployments.ensure_all(db, settings, _registry())
    with db.session() as s:
        rows = deployments.register(
            s, settings, model_name="knee.acl", version="1.1.0-site", weights=trained, actor="dora"
        )
        assert [(r.pipeline, r.state, r.selected) for r in rows] == [("knee", "shadow", False)]
    folder = settings.data_dir / "model_versions" / "knee.acl" / "1.1.0-site"
    assert json.loads((folder / "card.json").read_text())["version"] == "1.1.0-site"
    # still the shipped version until an admin selects the new one
    assert deployments.for_pipeline(db, settings, _registry(), "knee")["knee.acl"].version == "1.0.0"
    with db.session() as s:
        deployments.change(
            s, pipeline="knee", model_name="knee.acl", version="1.1.0-site", state="active", actor="dora", reason="x"
        )
    got = deployments.for_pipeline(db, settings, _registry(), "knee")
    assert got["knee.acl"].version == "1.1.0-site" and got["knee.acl"].state == "active"
    reg = _registry()
    from models.registry import Registry

    site_reg = Registry(None, overrides=deployments.registry_overrides(got))
    assert site_reg.info("knee.acl").version == "1.1.0-site"
    assert site_reg.info("knee.meniscus").version == reg.info("knee.meniscus").version
    assert site_reg.get("knee.acl").info.version == "1.1.0-site"  # loaded, hash verified, named by its card
    with db.session() as s:
        listing = {
            (r["version"], r["selected"], r["state"]) for r in deployments.listing(s) if r["model"] == "knee.acl"
        }
    assert listing == {("1.0.0", False, "shadow"), ("1.1.0-site", True, "active")}
    with db.session() as s, pytest.raises(DeploymentError, match=r"no version '9\.9'"):
        deployments.change(s, pipeline="knee", model_name="knee.acl", version="9.9", state="active", actor="dora")
    with db.session() as s, pytest.raises(DeploymentError, match="already registered with other weights"):
        other = _site_copy(tmp_path / "b", model="knee.acl")
        (other / "model.pt").write_bytes(b"not the same")
        (other / "model.pt.sha256").write_text(hashlib.sha256(b"not the same").hexdigest() + "\n")
        card = json.loads((other / "card.json").read_text())
        card["weights_sha256"] = hashlib.sha256(b"not the same").hexdigest()
        (other / "card.json").write_text(json.dumps(card))
        deployments.register(s, settings, model_name="knee.acl", version="1.1.0-site", weights=other, actor="dora")


def test_cli_lists_registers_and_activates(settings, tmp_path, capsys):
    from node.cli import main

    assert main(["deployments", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["pipeline"], r["model"], r["state"], r["selected"]) for r in rows} >= {
        ("knee", "knee.acl", "shadow", True),
        ("lumbar_spine", "lumbar_spine.stenosis", "shadow", True),
    }
    trained = _site_copy(tmp_path)
    assert main(["deployments", "register", "knee.acl", "--weights", str(trained), "--version", "2.0-site"]) == 0
    assert "registered for knee" in capsys.readouterr().out
    rc = main(["deployments", "activate", "knee.acl", "--version", "2.0-site", "--pipeline", "knee", "--by", "dora"])
    assert rc == 0 and "2.0-site is now active in pipeline knee (by dora)" in capsys.readouterr().out
    assert main(["deployments", "activate", "knee.acl", "--version", "nope", "--pipeline", "knee"]) == 1
    assert "has no version 'nope'" in capsys.readouterr().err
    assert main(["deployments", "shadow", "knee.acl", "--version", "2.0-site", "--pipeline", "spine"]) == 1
    assert "unknown pipeline 'spine'" in capsys.readouterr().err


@pytest.fixture
def web(settings, db):
    from node.web.app import create_app

    ws.add_users(db, admin=ADMIN, radiologist=READER)
    return create_app(settings, db)


def test_admin_models_page_activates_with_csrf_and_the_api_needs_an_admin(web, db):
    admin = login(web, ADMIN)
    page = admin.get("/admin/models")
    assert page.status_code == 200 and 'id="deployments"' in page.text
    row = re.search(r'<tr class="deployment" data-pipeline="knee" data-model="knee.acl"[^>]*>', page.text).group(0)
    assert 'data-state="shadow"' in row and 'data-selected="yes"' in row
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    form = {"pipeline": "knee", "model": "knee.acl", "version": "1.0.0", "state": "active", "reason": "figures ok"}
    r = admin.post("/admin/deployments", data=form, follow_redirects=False)
    assert r.status_code == 403  # no CSRF token
    r = admin.post("/admin/deployments", data={**form, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and "is+active+in+pipeline+knee" in r.headers["location"]
    assert _audit(db)[-1] == ("dora", "knee/knee.acl", "1.0.0 shadow", "1.0.0 active", "figures ok")
    listed = {(d["model"], d["pipeline"]): d for d in admin.get("/api/admin/deployments").json()["deployments"]}
    assert listed[("knee.acl", "knee")]["state"] == "active" and listed[("knee.meniscus", "knee")]["state"] == "shadow"
    assert set(listed[("knee.acl", "knee")]["figures"]) >= {"findings", "positive_rate", "answered", "agreement"}
    # the JSON API: CSRF header for a cookie session, an admin only, a clear 400 for an unknown version
    body = {"pipeline": "knee", "model": "knee.acl", "version": "1.0.0", "state": "shadow"}
    assert admin.post("/api/admin/deployments", json=body).status_code == 403
    token = admin.get("/api/me").json()["csrf_token"]
    r = admin.post("/api/admin/deployments", json=body, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["state"] == "shadow"
    r = admin.post("/api/admin/deployments", json={**body, "version": "7"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and "no version '7'" in r.json()["detail"]
    reader = login(web, READER)
    assert reader.get("/api/admin/deployments").status_code == 403
    token = reader.get("/api/me").json()["csrf_token"]
    assert reader.post("/api/admin/deployments", json=body, headers={"X-CSRF-Token": token}).status_code == 403


def test_other_weights_under_the_selected_version_start_a_silent_trial_again(settings, db, tmp_path):
    from node.jobs import deployments

    site = _site_copy(tmp_path)  # the shipped weights copied into a site folder: the same hash, nothing changes
    reg = _registry(site.parent)
    deployments.for_pipeline(db, settings, reg, "knee")
    with db.session() as s:
        deployments.change(s, pipeline="knee", model_name="knee.acl", version="1.0.0", state="active", actor="dora")
    assert deployments.for_pipeline(db, settings, reg, "knee")["knee.acl"].state == "active"
    # someone drops other weights into the site folder under the same version
    data = b"other weights"
    digest = hashlib.sha256(data).hexdigest()
    (site / "model.pt").write_bytes(data)
    (site / "model.pt.sha256").write_text(digest + "\n")
    card = json.loads((site / "card.json").read_text())
    (site / "card.json").write_text(json.dumps({**card, "weights_sha256": digest}))
    got = deployments.for_pipeline(db, settings, _registry(site.parent), "knee")["knee.acl"]
    assert got.state == "shadow" and got.weights_sha256 == digest
    last = _audit(db)[-1]
    assert last[0] == "system" and last[2].startswith("1.0.0 active") and "weights in use changed" in last[4]
