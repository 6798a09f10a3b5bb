"""Routing in the web UI over HTTP: why a series went where it went, the "Unrouted series" view, and
turning a series into a rule (validated, written atomically into the site's rules file, audited,
reloaded, the series routed again).

The series are index rows routed by the real completeness tick with the real rules (a site
copy of the shipped file in a temporary folder); the shipped file itself is never changed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from support import web_seed as ws
from support.index_rows import at, make_study, send_series
from support.web_client import bearer, client, csrf_of, login

pytestmark = pytest.mark.unit

ADMIN = ("alice", "alice-password-1")
READER = ("rob", "rob-password-12")
Q = 0.5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("webrouting")
    site = base / "site"
    site.mkdir()
    from node.intake.completeness import tick
    from node.intake.routing import load_rules
    from node.settings import DEFAULT_ROUTING_RULES
    from node.web.app import create_app

    rules_path = site / "routing_rules.toml"
    shutil.copyfile(DEFAULT_ROUTING_RULES, rules_path)
    node = ws.isolated_node(base / "data", routing_rules=rules_path, quiet_seconds=Q, study_quiet_seconds=Q)
    with node as (settings, db, _policy):
        with db.session() as s:
            st = make_study(s, description="ANONYMIZED STUDY")
            st.patient_name, st.patient_id = "SECRET^PATIENT", "PID-SECRET"
            sag = send_series(s, st, description="PD_TSE_FS_SAG", count=12, now=at(0), number=2)
            anon = send_series(s, st, description="ANONYMIZED_SERIES", count=10, now=at(0.1), number=3)
            other = send_series(s, st, description="T1 MPRAGE", body_part="HEAD", count=8, now=at(0.2), number=4)
            ours = send_series(
                s, st, description="AI findings", modality="SR", count=1, series_uid=settings.uid_root + "7.7"
            )
            ids = {"study": st.id, "sag": sag.id, "anon": anon.id, "other": other.id, "ours": ours.id}
            uids = {"sag": sag.series_uid, "anon": anon.series_uid}
        rules = load_rules(rules_path)
        with db.session() as s:
            tick(s, settings, at(5.0), rules)
        ws.add_users(db, admin=ADMIN, radiologist=READER)
        app = create_app(settings, db)
        shipped = create_app(settings.model_copy(update={"routing_rules": DEFAULT_ROUTING_RULES}), db)
        yield {
            "settings": settings,
            "db": db,
            "app": app,
            "shipped_app": shipped,
            "ids": ids,
            "uids": uids,
            "rules_path": rules_path,
            "shipped_path": DEFAULT_ROUTING_RULES,
        }


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def series_row(env, key):
    from node.db.schema import Series

    with env["db"].session() as s:
        se = s.get(Series, env["ids"][key])
        return se.state, se.pipeline, se.role, se.routing_rule


# ---- the explanation -----------------------------------------------------------------------------
def test_routing_explanation_reads_the_recorded_shape_and_says_what_is_missing():
    from node.web.queries import routing_explanation

    recorded = {
        "decision": {"pipeline": "knee", "role": "sag_fluid", "rule": "knee sagittal", "routed": True},
        "plane": {
            "value": "sagittal",
            "source": "ImageOrientationPatient",
            "detail": "normal (0.97, 0.23, 0.06), 14° oblique",
        },
        "contrast": {"value": "pd_fs", "source": "acquisition parameters", "detail": "TE 40 ms, TR 3060 ms, FS"},
        "anatomy": {"value": "knee", "source": "BodyPartExamined", "detail": "KNEE"},
        "flags": ["oblique"],
        "signals": [
            {"name": "ScanOptions", "value": "PFP\\SAT1\\FS", "source": "header", "used": True},
            {"name": "SeriesDescription", "value": "ANONYMIZED SERIES", "source": "header", "used": False},
        ],
    }
    se = SimpleNamespace(
        state="complete", pipeline="knee", role="sag_fluid", routing_rule="knee sagittal", routing_explanation=recorded
    )
    r = routing_explanation(se)
    assert r["recorded"] and r["decision"] == {
        "routed": True,
        "pipeline": "knee",
        "role": "sag_fluid",
        "rule": "knee sagittal",
        "pending": False,
    }
    assert r["facts"]["plane"] == {
        "value": "sagittal",
        "source": "ImageOrientationPatient",
        "detail": "normal (0.97, 0.23, 0.06), 14° oblique",
    }
    assert r["flags"] == ["oblique"] and [s["used"] for s in r["signals"]] == [True, False]
    # nothing recorded (a series routed before the node recorded its reasons)
    bare = routing_explanation(
        SimpleNamespace(state="unrouted", pipeline=None, role=None, routing_rule="unrouted:no_rule")
    )
    assert not bare["recorded"] and bare["signals"] == [] and bare["flags"] == []
    assert bare["decision"]["routed"] is False and bare["decision"]["rule"] == "unrouted:no_rule"
    assert all(f == {"value": None, "source": "not recorded", "detail": ""} for f in bare["facts"].values())
    receiving = routing_explanation(SimpleNamespace(state="receiving", pipeline=None, role=None, routing_rule=None))
    assert receiving["decision"]["pending"] is True
    # a malformed explanation does not break the page, long values are cut
    odd = routing_explanation(
        SimpleNamespace(
            state="complete",
            pipeline="knee",
            role="sag_pd",
            routing_rule="r",
            routing_explanation={
                "signals": [{"name": "x", "value": "y" * 5000}, 3],
                "flags": "not a list",
                "plane": "sagittal",
            },
        )
    )
    assert len(odd["signals"]) == 1 and len(odd["signals"][0]["value"]) == 200 and odd["flags"] == []
    assert odd["facts"]["plane"]["source"] == "not recorded"


# ---- pages and API -------------------------------------------------------------------------------
def test_unrouted_view_lists_unrouted_series_with_why_and_no_patient_data(env):
    h = bearer(env["app"], ADMIN)
    c = client(env["app"])
    page = c.get("/api/admin/unrouted", headers=h).json()
    listed = {s["id"]: s for s in page["series"]}
    assert set(listed) == {env["ids"]["anon"], env["ids"]["other"]}  # our own SR is not listed
    assert page["total"] == 2 and page["next_before_id"] is None
    anon = listed[env["ids"]["anon"]]
    assert anon["description"] == "ANONYMIZED_SERIES" and anon["body_part"] == "KNEE" and anon["instances"] == 10
    assert anon["routing"]["decision"] == {
        "routed": False,
        "pipeline": None,
        "role": None,
        "rule": "unrouted:no_rule",
        "pending": False,
    }
    # what routing recorded when it completed the series: the plane from its geometry, the anatomy from its header
    assert anon["routing"]["recorded"] is True
    plane, anatomy = anon["routing"]["facts"]["plane"], anon["routing"]["facts"]["anatomy"]
    assert plane["value"] == "sagittal" and "ImageOrientationPatient" in plane["source"]
    assert anatomy["value"] == "knee" and "BodyPartExamined" in anatomy["source"]
    signals = {s["name"]: s for s in anon["routing"]["signals"]}
    assert any("ImageOrientationPatient" in s["source"] and s["used"] for s in signals.values()), signals
    assert listed[env["ids"]["other"]]["routing"]["decision"]["rule"] == "unrouted:other_anatomy"
    assert "SECRET" not in str(page) and "PID-SECRET" not in str(page)
    first = c.get("/api/admin/unrouted?limit=1", headers=h).json()
    assert [s["id"] for s in first["series"]] == [env["ids"]["other"]] and first["next_before_id"] == env["ids"][
        "other"
    ]
    second = c.get(f"/api/admin/unrouted?limit=1&before_id={first['next_before_id']}", headers=h).json()
    assert [s["id"] for s in second["series"]] == [env["ids"]["anon"]] and second["next_before_id"] is None
    assert c.get("/api/admin/unrouted?limit=0", headers=h).status_code == 422
    assert c.get("/api/admin/unrouted?limit=1000", headers=h).status_code == 422

    browser = login(env["app"], ADMIN)
    r = browser.get("/admin/unrouted")
    assert r.status_code == 200
    assert 'id="unrouted"' in r.text and "ANONYMIZED_SERIES" in r.text and "unrouted:no_rule" in r.text
    assert (
        f'id="signals-{env["ids"]["anon"]}"' in r.text and f'href="/admin/series/{env["ids"]["anon"]}/rule"' in r.text
    )
    assert 'class="ftable signals-table"' in r.text and "ImageOrientationPatient" in r.text
    assert "SECRET" not in r.text and "PID-SECRET" not in r.text
    assert 'id="nav-unrouted"' in r.text

    reader = login(env["app"], READER)
    assert reader.get("/admin/unrouted", follow_redirects=False).status_code == 403
    assert client(env["app"]).get("/api/admin/unrouted", headers=bearer(env["app"], READER)).status_code == 403


def test_study_page_shows_each_series_decision_and_its_signals(env):
    study = env["ids"]["study"]
    h = bearer(env["app"], READER)
    d = client(env["app"]).get(f"/api/studies/{study}", headers=h).json()
    by_uid = {s["series_uid"]: s for s in d["series"]}
    sag = by_uid[env["uids"]["sag"]]["routing"]
    assert sag["decision"]["routed"] and (sag["decision"]["pipeline"], sag["decision"]["role"]) == ("knee", "sag_fluid")
    assert sag["decision"]["rule"] == "knee sagittal fat-suppressed PD/T2 or STIR"
    assert by_uid[env["uids"]["anon"]]["routing"]["decision"]["rule"] == "unrouted:no_rule"
    page = login(env["app"], READER).get(f"/studies/{study}")
    assert page.status_code == 200 and 'id="series-routing"' in page.text
    assert "knee / sag_fluid" in page.text and "unrouted:no_rule" in page.text
    assert f'id="signals-{env["ids"]["sag"]}"' in page.text and "<summary>" in page.text
    assert "make a rule" not in page.text  # admins only
    admin_page = login(env["app"], ADMIN).get(f"/studies/{study}")
    assert f'href="/admin/series/{env["ids"]["anon"]}/rule"' in admin_page.text


def test_rule_form_is_prefilled_from_the_series(env):
    c = login(env["app"], ADMIN)
    r = c.get(f"/admin/series/{env['ids']['anon']}/rule")
    assert r.status_code == 200
    assert 'id="rule-form"' in r.text and "ANONYMIZED_SERIES" in r.text
    assert 'value="^ANONYMIZED SERIES$"' in r.text  # exactly its description, as the rules read it
    assert re.search(r'id="rule-plane" name="plane" value="sagittal"', r.text)  # recognised from its geometry
    assert re.search(r'<option value="knee" selected>knee</option>', r.text)  # anatomy from BodyPartExamined KNEE
    assert 'id="rule-reroute"' in r.text and "checked" in r.text
    assert env["rules_path"].name in r.text and 'id="rules-readonly-note"' not in r.text
    api = (
        client(env["app"])
        .get(f"/api/admin/series/{env['ids']['anon']}/routing", headers=bearer(env["app"], ADMIN))
        .json()
    )
    assert (
        api["draft"]["pipeline"] == "knee" and api["draft"]["anatomy"] == "knee" and api["draft"]["plane"] == "sagittal"
    )
    assert api["rules_file"]["fact_keys"] == ["plane", "contrast"]
    assert api["draft"]["description"] == "^ANONYMIZED SERIES$" and len(api["draft"]["name"]) <= 100
    assert api["rules_file"] == {
        "path": str(env["rules_path"]),
        "shipped_default": False,
        "writable": True,
        "fact_keys": api["rules_file"]["fact_keys"],
    }
    assert api["series"]["routing"]["decision"]["rule"] == "unrouted:no_rule"
    assert (
        client(env["app"]).get("/api/admin/series/99999/routing", headers=bearer(env["app"], ADMIN)).status_code == 404
    )
    assert c.get("/admin/series/99999/rule").status_code == 404


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"name": "r", "pipeline": "knee", "role": "sag_fluid"}, 422, "a rule needs a condition"),
        (
            {"name": "r", "pipeline": "knee", "role": "sag_t2", "description": "anonymized"},
            422,
            "is not a role of knee",
        ),
        ({"name": "r", "pipeline": "elbow", "role": "sag_fluid", "description": "x"}, 422, "pipeline"),
        (
            {"name": "r", "pipeline": "knee", "role": "cor_fluid", "description": "anonymized (series"},
            422,
            "invalid regex",
        ),
        (
            {"name": "knee localizer", "pipeline": "knee", "role": "cor_fluid", "description": "anonymized"},
            422,
            "the name 'knee localizer' is used twice",
        ),
        (
            {"name": "r", "pipeline": "knee", "role": "cor_fluid", "description": "^something else$"},
            422,
            "does not match series",
        ),
        (
            {"name": "r", "pipeline": "shoulder", "role": "cor_fluid", "description": "anonymized"},
            422,
            "does not match series",
        ),
        (
            {"name": "r", "pipeline": "knee", "role": "cor_fluid", "anatomy": "elbow", "description": "x"},
            422,
            "anatomy",
        ),
        ({"name": "x" * 101, "pipeline": "knee", "role": "cor_fluid", "description": "x"}, 422, "name"),
        ({"name": "r\nx", "pipeline": "knee", "role": "cor_fluid", "description": "x"}, 422, "no control characters"),
        ({"name": "r", "pipeline": "knee", "role": "cor_fluid", "description": "x" * 201}, 422, "description"),
        (
            {"name": "r", "pipeline": "knee", "role": "cor_fluid", "contrast": ["a"] * 9, "description": "x"},
            422,
            "contrast",
        ),
    ],
)
def test_invalid_rules_are_refused_with_a_reason_and_the_file_stays(env, body, status, reason):
    before = sha(env["rules_path"])
    r = client(env["app"]).post(
        f"/api/admin/series/{env['ids']['anon']}/rule", json=body, headers=bearer(env["app"], ADMIN)
    )
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"], r.json()
    assert sha(env["rules_path"]) == before
    assert series_row(env, "anon")[0] == "unrouted"


def test_the_form_refuses_without_csrf_and_shows_a_refusal_with_the_input_kept(env):
    c = login(env["app"], ADMIN)
    url = f"/admin/series/{env['ids']['anon']}/rule"
    form = {
        "name": "site anonymised knee",
        "pipeline": "knee",
        "role": "cor_fluid",
        "anatomy": "knee",
        "description": "^something else$",
        "reroute": "1",
    }
    before = sha(env["rules_path"])
    assert c.post(url, data=form, follow_redirects=False).status_code == 403  # no CSRF token
    r = c.post(url, data={**form, "csrf_token": csrf_of(c)}, follow_redirects=False)
    assert r.status_code == 422 and 'id="rule-error"' in r.text and "does not match series" in r.text
    assert 'value="^something else$"' in r.text and 'value="site anonymised knee"' in r.text
    r = c.post(url, data={**form, "description": "x" * 300, "csrf_token": csrf_of(c)}, follow_redirects=False)
    assert r.status_code == 422 and "description" in r.text
    assert sha(env["rules_path"]) == before


def test_the_shipped_default_is_never_changed_409_with_the_block_to_paste(env):
    shipped_before = sha(env["shipped_path"])
    body = {
        "name": "site anonymised knee",
        "pipeline": "knee",
        "role": "cor_fluid",
        "description": "^anonymized series$",
    }
    r = client(env["shipped_app"]).post(
        f"/api/admin/series/{env['ids']['anon']}/rule", json=body, headers=bearer(env["shipped_app"], ADMIN)
    )
    assert r.status_code == 409, r.text
    out = r.json()
    assert "shipped default" in out["detail"] and "MSKNODE_ROUTING_RULES" in out["how"]
    assert out["block"].splitlines()[1] == "[[rule]]" and 'name = "site anonymised knee"' in out["block"]
    assert tomllib.loads(out["block"])["rule"][0]["description"] == "^anonymized series$"
    c = login(env["shipped_app"], ADMIN)
    page = c.get(f"/admin/series/{env['ids']['anon']}/rule")
    assert 'id="rules-readonly-note"' in page.text
    r = c.post(
        f"/admin/series/{env['ids']['anon']}/rule",
        data={**body, "anatomy": "knee", "csrf_token": csrf_of(c)},
        follow_redirects=False,
    )
    assert r.status_code == 409 and 'id="rule-block"' in r.text and "MSKNODE_ROUTING_RULES" in r.text
    assert sha(env["shipped_path"]) == shipped_before
    assert series_row(env, "anon")[0] == "unrouted"


def test_a_file_the_node_cannot_write_is_refused_409(env, monkeypatch):
    from node.web import rule_editor

    def refuse(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rule_editor, "_replace", refuse)
    before = sha(env["rules_path"])
    body = {
        "name": "site anonymised knee",
        "pipeline": "knee",
        "role": "cor_fluid",
        "description": "^anonymized series$",
    }
    r = client(env["app"]).post(
        f"/api/admin/series/{env['ids']['anon']}/rule", json=body, headers=bearer(env["app"], ADMIN)
    )
    assert r.status_code == 409 and "cannot be written" in r.json()["detail"] and r.json()["block"]
    assert sha(env["rules_path"]) == before and series_row(env, "anon")[0] == "unrouted"


def test_a_rule_from_the_form_is_written_first_audited_reloaded_and_routes_the_series(env):
    """Runs after the refusals above (same module state): the first change of the site file."""
    from node.db.database import utcnow
    from node.db.schema import Job, JobInput, Series
    from node.intake.completeness import tick
    from node.intake.routing import RulesFile
    from worklists.tables import AuditEvent

    path = env["rules_path"]
    watcher = RulesFile(path)  # as the worker's loop holds it
    old_rules = watcher.current()
    old_text = path.read_text()
    c = login(env["app"], ADMIN)
    form = {
        "name": "site anonymised knee coronal",
        "pipeline": "knee",
        "role": "cor_fluid",
        "anatomy": "knee",
        "description": "^anonymized series$",
        "reroute": "1",
        "csrf_token": csrf_of(c),
    }
    r = c.post(f"/admin/series/{env['ids']['anon']}/rule", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"].startswith("/admin/unrouted?msg=")
    followed = c.get(r.headers["location"])
    assert "site anonymised knee coronal" in followed.text and "routed knee/cor_fluid" in followed.text

    text = path.read_text()
    block_at = text.index('[[rule]]\nname = "site anonymised knee coronal"')
    assert block_at < text.index("# ---- never processed")  # before the first rule and the comment above it
    assert text.replace(text[text.index("# added from series") : text.index("# ---- never processed")], "") == old_text
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed over the rules
    new_rules = watcher.current()  # reloaded: its modification time and size changed
    assert new_rules is not old_rules and new_rules.rules[0].name == "site anonymised knee coronal"
    assert len(new_rules.rules) == len(old_rules.rules) + 1 and watcher.last_error is None

    with env["db"].session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "routing.rule_add")).one()
        assert (ev.actor, ev.entity_type, ev.entity_id) == (ADMIN[0], "routing_rule", "site anonymised knee coronal")
        assert ev.at is not None and ev.new_value == "knee/cor_fluid" and "[[rule]]" in ev.details["block"]
        assert ev.details["series_uid"] == env["uids"]["anon"] and ev.details["path"] == str(path.resolve())
        assert ev.details["sha256"] == new_rules.digest
        assert ev.details["rerouted"] == {
            "routed": True,
            "pipeline": "knee",
            "role": "cor_fluid",
            "rule": "site anonymised knee coronal",
        }
    assert series_row(env, "anon") == ("complete", "knee", "cor_fluid", "site anonymised knee coronal")
    api = client(env["app"]).get("/api/admin/audit?action=routing.", headers=bearer(env["app"], ADMIN)).json()
    assert api["events"][0]["entity_id"] == "site anonymised knee coronal"

    # the next completeness round settles the study again: a job that takes the series as cor_fluid
    with env["db"].session() as s:
        first_jobs = s.scalars(select(Job.id)).all()
    with env["db"].session() as s:
        created = tick(s, env["settings"], utcnow() + dt.timedelta(hours=1), new_rules)
    assert len(created) == 1
    with env["db"].session() as s:
        job = s.get(Job, created[0])
        roles = sorted(
            (ji.role, s.get(Series, ji.series_id).series_uid)
            for ji in s.scalars(select(JobInput).where(JobInput.job_id == job.id))
        )
        assert job.supersedes_job_id in first_jobs
    assert roles == sorted([("cor_fluid", env["uids"]["anon"]), ("sag_fluid", env["uids"]["sag"])])

    # the same name again is refused by the rules themselves; the series is no longer listed as unrouted
    again = client(env["app"]).post(
        f"/api/admin/series/{env['ids']['anon']}/rule",
        headers=bearer(env["app"], ADMIN),
        json={k: v for k, v in form.items() if k not in ("csrf_token", "reroute")},
    )
    assert again.status_code == 422 and "is used twice" in again.json()["detail"]
    listed = client(env["app"]).get("/api/admin/unrouted", headers=bearer(env["app"], ADMIN)).json()
    assert env["ids"]["anon"] not in [s["id"] for s in listed["series"]]


def test_a_rule_via_the_api_without_reroute(env):
    """The JSON API: 201 with the rule, the file's digest and the block; the series left as it is."""
    body = {
        "name": "site head MPRAGE never",
        "pipeline": "knee",
        "role": "ax_fluid",
        "anatomy": "any",
        "description": "^t1 mprage$",
        "reroute": False,
    }
    h = bearer(env["app"], ADMIN)
    r = client(env["app"]).post(f"/api/admin/series/{env['ids']['other']}/rule", json=body, headers=h)
    # a HEAD series: its BodyPartExamined names another anatomy, so "any" is needed for the rule to match it
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["rule"]["name"] == body["name"] and out["rerouted"] is None
    assert out["sha256"] == hashlib.sha256(env["rules_path"].read_bytes()).hexdigest()
    assert tomllib.loads(env["rules_path"].read_text())["rule"][0]["name"] == body["name"]
    assert series_row(env, "other")[0] == "unrouted"


# ---- the pieces ------------------------------------------------------------------------------------
def test_insert_before_first_rule_and_toml_block():
    from node.intake.routing import parse_rules
    from node.web.rule_editor import RuleDraft, check_draft, description_regex, insert_before_first_rule, toml_block

    text = 'version = 1\n\n[anatomy.knee]\nbody_part = "knee"\n\n# ---- first\n# more\n[[rule]]\nname = "a"\npipeline = "knee"\nrole = "sag_fluid"\ntext = "x"\n'
    draft = RuleDraft(
        name='it\'s "quoted"', pipeline="knee", role="cor_fluid", anatomy="knee", description="^o'brien \\(x\\)$"
    )
    block = toml_block(draft, comment="from series 1.2.3\nby someone")
    assert block.startswith("# from series 1.2.3 by someone\n[[rule]]\n")
    out = insert_before_first_rule(text, block)
    assert out.index("[[rule]]\nname = \"it's") < out.index("# ---- first")
    rules = parse_rules(out)
    assert [r.name for r in rules.rules] == ['it\'s "quoted"', "a"]
    assert rules.rules[0].description[0].pattern == "^o'brien \\(x\\)$"
    assert description_regex("T2_TSE (fs)  sag") == "^T2 TSE \\(fs\\) sag$"
    assert description_regex("") is None
    d = check_draft(
        name=" n ", pipeline="knee", role="sag_fluid", anatomy=None, plane=None, contrast=None, description="x", keys=()
    )
    assert d.anatomy == "knee" and d.name == "n"
    with pytest.raises(Exception, match="plane condition"):
        check_draft(
            name="n",
            pipeline="knee",
            role="sag_fluid",
            anatomy=None,
            plane="sagittal",
            contrast=None,
            description=None,
            keys=(),
        )


def test_suggested_role_follows_plane_and_contrast():
    from node.web.rule_editor import suggest_role

    assert suggest_role("knee", "sagittal", ["pd_fs"]) == "sag_fluid"
    assert suggest_role("knee", "sagittal", ["pd"]) == "sag_pd"
    assert suggest_role("knee", "sagittal", ["t1"]) == "sag_pd"
    assert suggest_role("knee", "coronal", ["t1"]) == "cor_t1"
    assert suggest_role("knee", "axial", ["stir"]) == "ax_fluid"
    assert suggest_role("lumbar_spine", "sagittal", ["stir"]) == "sag_stir"
    assert suggest_role("lumbar_spine", "sagittal", ["t2"]) == "sag_t2"
    assert suggest_role("shoulder", "coronal_oblique", ["t2_fs"]) == "cor_fluid"
    assert suggest_role("knee", None, ["pd_fs"]) is None and suggest_role("knee", "sagittal", ["gre"]) is None


def test_concurrent_rule_additions_all_land(tmp_path):
    """Several admins save at once: the folder lock serialises read-modify-rename, no rule is lost."""
    import threading

    from node.intake.routing import load_rules
    from node.settings import DEFAULT_ROUTING_RULES
    from node.web.rule_editor import RuleDraft, add_rule, toml_block

    path = tmp_path / "rules.toml"
    shutil.copyfile(DEFAULT_ROUTING_RULES, path)
    before = len(load_rules(path).rules)
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def save(i: int) -> None:
        try:
            draft = RuleDraft(
                name=f"site rule {i}", pipeline="knee", role="sag_pd", anatomy="knee", description=f"^x{i}$"
            )
            barrier.wait()
            add_rule(path, draft, toml_block(draft))
        except BaseException as e:  # pragma: no cover - asserted below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    rules = load_rules(path)
    assert len(rules.rules) == before + 6
    assert {r.name for r in rules.rules[:6]} == {f"site rule {i}" for i in range(6)}
    assert not list(tmp_path.glob(".*.tmp"))
