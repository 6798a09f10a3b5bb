"""The answers to AI findings over HTTP (in-process ASGI client): the page form, the JSON API, CSRF, roles, locks.

A knee whose ACL tear the model grades "partial", with its AI SR row (so a RIS can name the
finding by the SR's SOP Instance UID); answers are stored by the real `worklists.feedback`.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from support import web_seed as ws
from support.web_client import bearer, client, login

pytestmark = pytest.mark.unit

ADMIN = ("alice", "alice-password-1")
READER = ("rob", "rob-password-12")
SR_UID = "1.2.826.0.1.3680043.10.1447.99.777"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from node.db.schema import ResultObject
    from node.web.app import create_app

    with ws.isolated_node(tmp_path_factory.mktemp("feedback") / "data") as (settings, db, policy):
        findings = ws.acl_misgraded()
        acl = ws.seed_study(db, settings, policy, findings=findings, with_seg=False, with_superres=False, seed=5)
        other = ws.seed_study(db, settings, policy, findings=findings, with_seg=False, with_superres=False, seed=6)
        with db.session() as s:
            s.add(
                ResultObject(
                    job_id=acl.job_id,
                    kind="sr",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    sop_instance_uid=SR_UID,
                    series_uid=SR_UID + ".1",
                    path=str(settings.results_dir / "sr.dcm"),
                )
            )
        ws.add_users(db, admin=ADMIN, radiologist=READER)
        app = create_app(settings, db)
        yield {"db": db, "app": app, "acl": acl, "other": other}


def finding_ids(env, study) -> dict[str, int]:
    r = client(env["app"]).get(f"/api/studies/{study.study_id}/feedback", headers=bearer(env["app"], READER))
    assert r.status_code == 200, r.text
    return {i["finding_key"]: i["finding_id"] for i in r.json()["items"]}


def test_a_ris_answers_by_the_ai_sr_uid_and_finding_key_with_a_bearer_token(env):
    c = client(env["app"])
    h = bearer(env["app"], READER)
    r = c.post(
        "/api/feedback",
        headers=h,
        json={"sr_sop_instance_uid": SR_UID, "finding_key": "acl_tear", "agree": False, "answer": "complete"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["study_id"], body["sr_sop_instance_uid"], body["source"]) == (env["acl"].study_id, SR_UID, "api")
    assert (body["ai_answer"], body["answer"], body["created_by"]) == ("partial", "complete", READER[0])
    for bad, status, why in (
        ({"sr_sop_instance_uid": "1.2.3", "finding_key": "acl_tear", "agree": True}, 404, "no AI SR 1.2.3"),
        ({"finding_key": "acl_tear", "agree": True}, 422, "sr_sop_instance_uid or study_uid is required"),
        ({"sr_sop_instance_uid": SR_UID, "finding_key": "pcl_tear", "agree": True}, 404, "'pcl_tear' is not"),
        ({"sr_sop_instance_uid": SR_UID, "finding_key": "acl_tear", "agree": False, "answer": "torn"}, 422, "scale"),
        ({"sr_sop_instance_uid": SR_UID, "finding_key": "acl_tear", "agree": True, "comment": "x" * 1001}, 422, ""),
    ):
        r = c.post("/api/feedback", headers=h, json=bad)
        assert r.status_code == status and why in r.json()["detail"], (bad, r.status_code, r.text)


def test_cookie_sessions_need_the_csrf_header_and_anonymous_requests_are_refused(env):
    ids = finding_ids(env, env["other"])
    url = f"/api/studies/{env['other'].study_id}/feedback/{ids['meniscal_tear']}"
    assert client(env["app"]).post(url, json={"agree": True}).status_code == 401
    c = login(env["app"], ADMIN)
    r = c.post(url, json={"agree": True})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    csrf = c.get("/api/me").json()["csrf_token"]
    r = c.post(url, json={"agree": True}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["source"] == "web" and r.json()["answer"] == "none"


def test_the_page_form_saves_and_the_study_page_shows_it_until_the_read_locks_it(env):
    from node.db.schema import FindingFeedback

    st = env["other"]
    ids = finding_ids(env, st)
    c = login(env["app"], READER)
    page = c.get(f"/studies/{st.study_id}")
    assert page.status_code == 200 and 'id="feedback"' in page.text and 'data-ai="partial"' in page.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    form = {"csrf_token": csrf, "finding_id": ids["acl_tear"], "agree": "0", "answer": "intact", "comment": "mucoid"}
    r = c.post(f"/studies/{st.study_id}/feedback", data=form, follow_redirects=False)
    assert r.status_code == 303 and "msg=feedback%20saved" in r.headers["location"]
    assert "You disagreed: <b>intact</b>" in c.get(f"/studies/{st.study_id}").text
    # without the form's token nothing is stored
    r = c.post(f"/studies/{st.study_id}/feedback", data={**form, "csrf_token": "x", "answer": "complete"})
    assert r.status_code == 403
    with env["db"].session() as s:
        (row,) = s.scalars(
            select(FindingFeedback).where(
                FindingFeedback.study_id == st.study_id, FindingFeedback.created_by == READER[0]
            )
        ).all()
        assert (row.answer, row.comment, row.answer_positive) == ("intact", "mucoid", False)
    # marked read: the answer is locked (the page says so, the API answers 409)
    c.post(f"/studies/{st.study_id}/read", data={"csrf_token": csrf, "entry_id": st.entry_id, "read": "1"})
    page = c.get(f"/studies/{st.study_id}").text
    assert 'id="feedback-locked"' in page
    r = client(env["app"]).post(
        f"/api/studies/{st.study_id}/feedback/{ids['acl_tear']}",
        headers=bearer(env["app"], READER),
        json={"agree": True},
    )
    assert r.status_code == 409 and "locked" in r.json()["detail"]


def test_the_dashboard_and_the_target_api_are_for_admins(env):
    r = client(env["app"]).get("/api/admin/monitor", headers=bearer(env["app"], READER))
    assert r.status_code == 403
    h = bearer(env["app"], ADMIN)
    r = client(env["app"]).get("/api/admin/monitor", headers=h)
    assert r.status_code == 200 and r.json()["status"] in ("ok", "alert")
    r = client(env["app"]).post("/api/admin/targets/URGENT", headers=h, json={"minutes": 90})
    assert r.status_code == 422  # no reason
    r = client(env["app"]).post("/api/admin/targets/URGENT", headers=h, json={"minutes": 90, "reason": "night shift"})
    assert r.status_code == 200
    row = next(t for t in r.json()["targets"] if t["priority"] == "URGENT")
    assert (row["minutes"], row["source"], row["updated_by"]) == (90.0, "site", ADMIN[0])
    wl = client(env["app"]).get("/api/worklist", headers=h).json()["entries"]
    urgent = [e for e in wl if e["priority"] == "URGENT" and e["status"] == "unread"]
    assert urgent and all(e["target_minutes"] == 90.0 and e["due_at"] for e in urgent)
    r = client(env["app"]).post(
        "/api/admin/targets/URGENT", headers=h, json={"minutes": None, "reason": "back to policy"}
    )
    assert next(t for t in r.json()["targets"] if t["priority"] == "URGENT")["source"] == "policy"
