"""The web app over HTTP (in-process ASGI client): authentication, roles, CSRF, bad input, data and pixels.

The database is seeded with real rows and real DICOM files (tests/support/web_seed.py): an MR
series written with pydicom, a fractional SEG written with highdicom, a super-resolved
derived series, jobs, findings, result objects and outbox rows; worklist entries come
from the real `worklists.entries.upsert_for_job`.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import time

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from support import web_seed as ws
from support.web_client import bearer, client, csrf_of, login

pytestmark = pytest.mark.unit

ADMIN = ("alice", "alice-password-1")
READER = ("rob", "rob-password-12")
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    data = tmp_path_factory.mktemp("web") / "data"
    with ws.isolated_node(
        data,
        site_timezone="Europe/Berlin",
        session_minutes=30,
        destinations=[
            {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "name": "pacs"},
            {"type": "stow", "url": "http://127.0.0.1:8042/dicom-web", "password": "s3cret-pass"},
        ],
    ) as (settings, db, policy):
        seeded = {
            "normal": ws.seed_study(
                db,
                settings,
                policy,
                findings=ws.knee_normal(),
                patient_name="NORMAL^KNEE",
                patient_id="PIDNORM",
                received_at=NOW - dt.timedelta(hours=3),
                seed=1,
            ),
            "acl": ws.seed_study(
                db,
                settings,
                policy,
                findings=ws.acl_complete(),
                patient_name="DOE^JANE",
                patient_id="PIDACL",
                received_at=NOW - dt.timedelta(minutes=30),
                outbox_states=("sent", "dead"),
                seed=2,
            ),
            "spine": ws.seed_study(
                db,
                settings,
                policy,
                anatomy="lumbar_spine",
                findings=ws.spine_severe(),
                patient_name="ROSSI^MARIA",
                patient_id="PIDSPINE",
                received_at=NOW - dt.timedelta(hours=1),
                with_superres=False,
                seed=3,
            ),
            "failed": ws.seed_study(
                db,
                settings,
                policy,
                findings=[],
                patient_name="FAIL^JOB",
                patient_id="PIDFAIL",
                job_state="failed",
                with_seg=False,
                with_superres=False,
                outbox_states=(),
                seed=4,
            ),
        }
        ws.add_users(db, admin=ADMIN, radiologist=READER)
        from node.web.app import create_app

        app = create_app(settings, db)
        yield {"settings": settings, "db": db, "app": app, "seeded": seeded}


def audit_rows(env, **where):
    from worklists.tables import AuditEvent

    with env["db"].session() as s:
        q = select(AuditEvent).order_by(AuditEvent.id)
        for k, v in where.items():
            q = q.where(getattr(AuditEvent, k) == v)
        return [(a.actor, a.action, a.entity_id, a.old_value, a.new_value, a.reason) for a in s.scalars(q)]


# ---- nothing answers without a session ----------------------------------------------------------

PUBLIC = {"/login", "/logout", "/health", "/metrics", "/api/auth/token"}


def api_routes(app):
    """Every APIRoute of the app, also inside included routers (FastAPI nests them)."""
    from fastapi.routing import APIRoute

    def walk(routes, prefix=""):
        for r in routes:
            if isinstance(r, APIRoute):
                yield prefix, r
            elif hasattr(r, "original_router"):
                yield from walk(r.original_router.routes, prefix + (r.include_context.prefix or ""))
            elif hasattr(r, "routes") and not hasattr(r, "app"):
                yield from walk(r.routes, prefix)

    return [(prefix + r.path, r) for prefix, r in walk(app.routes)]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_but_the_public_ones_refuses_anonymous_requests(env):
    c = client(env["app"])
    checked = 0
    for path, route in api_routes(env["app"]):
        if path in PUBLIC:
            continue
        for method in route.methods:
            r = c.request(method, _concrete(path), follow_redirects=False)
            # the machine interfaces (JSON API, UPS-RS, DICOMweb) answer 401; pages send to the login form
            if path.startswith(("/api/", "/ups-rs/", "/dicomweb/")) or path == "/openapi.json" or method != "GET":
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["detail"] == "authentication required"
            else:
                assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), (method, path)
            assert "DOE" not in r.text and "PIDACL" not in r.text
            checked += 1
    assert checked >= 30


def test_public_endpoints_hold_no_patient_data(env):
    c = client(env["app"])
    for path in ("/health", "/metrics", "/login", "/static/app.css"):
        r = c.get(path)
        assert r.status_code in (200, 503), path
        for phi in ("DOE", "JANE", "PIDACL", "ROSSI", "19800101"):
            assert phi not in r.text, (path, phi)
    assert "msknode" in c.get("/metrics").text
    assert c.get("/openapi.json").status_code == 401  # the API's map is for logged-in users
    spec = login(env["app"], READER).get("/openapi.json").json()
    assert "/api/worklist" in spec["paths"] and "/api/entries/{entry_id}/priority" in spec["paths"]
    assert c.get("/docs").status_code == 404  # no Swagger UI (it would load scripts from a CDN)


def test_openapi_documents_every_json_answer(env):
    """Every JSON route under /api declares its response model; the job shape is the one the CLI prints."""
    from node.jobs.listing import JobOut

    spec = client(env["app"]).get("/openapi.json", headers=bearer(env["app"], READER)).json()
    undocumented = []
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/") or path.endswith(".png"):
            continue
        for method, op in ops.items():
            ok = next(code for code in op["responses"] if code.startswith("2"))
            schema = op["responses"][ok].get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" not in schema:
                undocumented.append(f"{method.upper()} {path}")
    assert not undocumented, undocumented
    assert set(spec["components"]["schemas"]["JobOut"]["properties"]) == set(JobOut.model_fields)
    jobs = client(env["app"]).get("/api/admin/jobs", headers=bearer(env["app"], ADMIN)).json()["jobs"]
    assert jobs and all(set(j) == set(JobOut.model_fields) for j in jobs)


def test_security_headers(env):
    r = login(env["app"], READER).get("/worklist")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"


# ---- login and sessions ----------------------------------------------------------------------


def test_login_failures_and_audit(env):
    c = client(env["app"])
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": ADMIN[0], "password": "wrong-password", "csrf_token": nonce})
    assert r.status_code == 401 and "wrong username or password" in r.text
    assert "msknode_session" not in c.cookies
    r = client(env["app"]).post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": "forged"})
    assert r.status_code == 400 and "login form expired" in r.text
    assert (ADMIN[0], "auth.login_failed", ADMIN[0], None, None, None) in audit_rows(env, action="auth.login_failed")
    r = client(env["app"]).post("/api/auth/token", json={"username": ADMIN[0], "password": "nope-nope-nope"})
    assert r.status_code == 401 and "wrong username or password" in r.json()["detail"]
    assert client(env["app"]).post("/api/auth/token", json={"username": ""}).status_code == 422


def test_login_cookie_flags_and_safe_redirect(env):
    c = client(env["app"])
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post(
        "/login",
        data={"username": READER[0], "password": READER[1], "csrf_token": nonce, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/worklist"
    cookie = r.headers["set-cookie"]
    assert (
        "msknode_session=" in cookie
        and "HttpOnly" in cookie
        and "SameSite=strict" in cookie.replace("Strict", "strict")
    )
    assert f"Max-Age={30 * 60}" in cookie


def test_expired_tampered_and_disabled_sessions_are_refused(env, monkeypatch):
    from node.web.users import set_active

    codec = env["app"].state.ctx.codec
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 31 * 60)
    old_token, _ = codec.issue(READER[0], "radiologist")
    old_bearer, _ = codec.issue(READER[0], "radiologist", kind="token")
    monkeypatch.setattr(time, "time", real)

    c = client(env["app"])
    c.cookies.set("msknode_session", old_token)
    r = c.get("/api/worklist")
    assert r.status_code == 401 and r.json()["detail"] == "session expired, please log in again"
    r = c.get("/worklist", follow_redirects=False)
    assert r.status_code == 303 and "session%20expired" in r.headers["location"]
    r = client(env["app"]).get("/api/worklist", headers={"Authorization": f"Bearer {old_bearer}"})
    assert r.status_code == 401 and "expired" in r.json()["detail"]

    fresh, _ = codec.issue(READER[0], "radiologist")
    c = client(env["app"])
    c.cookies.set("msknode_session", fresh[:-3] + ("AAA" if not fresh.endswith("AAA") else "BBB"))
    assert c.get("/api/worklist").json()["detail"] == "invalid session"
    # a cookie token is not a bearer token (different signing salt)
    assert client(env["app"]).get("/api/me", headers={"Authorization": f"Bearer {fresh}"}).status_code == 401

    c = login(env["app"], READER)
    assert c.get("/api/me").json()["username"] == READER[0]
    with env["db"].session() as s:
        set_active(s, username=READER[0], active=False)
    try:
        assert c.get("/api/me").json()["detail"] == "this account is disabled"
    finally:
        with env["db"].session() as s:
            set_active(s, username=READER[0], active=True)


def test_logout_clears_the_cookie(env):
    c = login(env["app"], READER)
    r = c.post("/logout", data={"csrf_token": csrf_of(c)}, follow_redirects=False)
    assert r.status_code == 303
    assert 'msknode_session=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
    assert c.get("/api/me").status_code == 401
    assert (READER[0], "auth.logout") in [(a[0], a[1]) for a in audit_rows(env, action="auth.logout")]


# ---- roles and CSRF ------------------------------------------------------------------------------


def test_radiologist_gets_403_from_every_admin_route(env):
    c = login(env["app"], READER)
    csrf = csrf_of(c)
    admin_routes = [
        (p, r)
        for p, r in api_routes(env["app"])
        if p.startswith(("/admin", "/api/admin")) or "/priority" in p or "/assign" in p
    ]
    assert len(admin_routes) >= 20
    for raw, route in admin_routes:
        for method in route.methods:
            path = _concrete(raw)
            if method == "POST":
                r = (
                    c.post(
                        path,
                        json={"priority": "STAT", "reason": "x", "username": None},
                        data=None,
                        headers={"X-CSRF-Token": csrf},
                        follow_redirects=False,
                    )
                    if path.startswith("/api/")
                    else c.post(
                        path, data={"csrf_token": csrf, "priority": "STAT", "reason": "x"}, follow_redirects=False
                    )
                )
            else:
                r = c.get(path, follow_redirects=False)
            assert r.status_code == 403, (method, path, r.status_code, r.text[:200])
            if path.startswith("/api/"):
                assert r.json()["detail"] == "admin role required"
    page = c.get(f"/studies/{env['seeded']['acl'].study_id}")
    assert 'id="priority-form"' not in page.text and "/admin/jobs" not in page.text
    assert 'id="mark-read"' in page.text


def test_cookie_changes_need_the_csrf_token_bearer_changes_do_not(env):
    entry = env["seeded"]["normal"].entry_id
    c = login(env["app"], READER)
    r = c.post(f"/api/entries/{entry}/read", json={"read": True})
    assert r.status_code == 403 and r.json()["detail"] == "missing or wrong CSRF token"
    r = c.post(f"/api/entries/{entry}/read", json={"read": True}, headers={"X-CSRF-Token": "not-it"})
    assert r.status_code == 403
    r = c.post(
        f"/studies/{env['seeded']['normal'].study_id}/read",
        data={"entry_id": entry, "read": "1"},
        follow_redirects=False,
    )
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post(f"/api/entries/{entry}/read", json={"read": True}, headers={"X-CSRF-Token": csrf_of(c)})
    assert r.status_code == 200 and r.json() == {"entry_id": entry, "status": "read", "read_by": READER[0]}
    r = client(env["app"]).post(f"/api/entries/{entry}/read", json={"read": False}, headers=bearer(env["app"], READER))
    assert r.status_code == 200 and r.json()["status"] == "unread"
    acts = [(a[0], a[3], a[4]) for a in audit_rows(env, action="worklist.status", entity_id=str(entry))]
    assert acts[-2:] == [(READER[0], "unread", "read"), (READER[0], "read", "unread")]


# ---- bad input answers 4xx with a reason --------------------------------------------------------


def test_bad_input_is_refused_with_a_reason(env):
    h = bearer(env["app"], ADMIN)
    c = client(env["app"])
    acl = env["seeded"]["acl"]

    def check(r, status, text):
        assert r.status_code == status, (r.status_code, r.text)
        assert text in r.json()["detail"], r.json()

    check(
        c.post(f"/api/entries/{acl.entry_id}/priority", json={"priority": "HIGH", "reason": "x"}, headers=h),
        422,
        "priority",
    )
    check(
        c.post(f"/api/entries/{acl.entry_id}/priority", json={"priority": "STAT", "reason": ""}, headers=h),
        422,
        "reason",
    )
    check(
        c.post(f"/api/entries/{acl.entry_id}/priority", json={"priority": "STAT"}, headers=h),
        422,
        "reason: Field required",
    )
    check(
        c.post(
            f"/api/entries/{acl.entry_id}/priority",
            content=b"{not json",
            headers={**h, "Content-Type": "application/json"},
        ),
        422,
        "JSON",
    )
    check(
        c.post("/api/entries/99999/priority", json={"priority": "STAT", "reason": "x"}, headers=h),
        404,
        "worklist entry 99999 not found",
    )
    check(c.post("/api/entries/0/priority", json={"priority": "STAT", "reason": "x"}, headers=h), 422, "entry_id")
    check(
        c.post(f"/api/entries/{acl.entry_id}/assign", json={"username": "nobody"}, headers=h),
        422,
        "no active user 'nobody'",
    )
    check(c.get("/api/worklist?priority=HIGH", headers=h), 422, "query.priority")
    check(c.get("/api/worklist?anatomy=elbow", headers=h), 422, "query.anatomy")
    check(c.get("/api/studies/abc", headers=h), 422, "path.study_id")
    check(c.get("/api/studies/4242", headers=h), 404, "study 4242 not found")
    check(
        c.get(f"/api/studies/{acl.study_id}/series/{acl.series_id}/slices/99.png", headers=h),
        404,
        "slice 99 is out of range 0..11",
    )
    spine = env["seeded"]["spine"]
    check(c.get(f"/api/studies/{acl.study_id}/series/{spine.series_id}/slices/0.png", headers=h), 404, "not found")
    check(
        c.get(f"/api/studies/{acl.study_id}/viewer?series_id={spine.series_id}", headers=h),
        404,
        "is not an image series of study",
    )
    check(c.get(f"/api/studies/{acl.study_id}/superres/1.2.3/slices/0.png", headers=h), 404, "no super-resolved series")
    check(c.get(f"/api/studies/{acl.study_id}/superres/abc/slices/0.png", headers=h), 422, "series_uid")
    failed = env["seeded"]["failed"]
    failed.source_paths[3].unlink()  # a stored file lost from disk
    check(
        c.get(f"/api/studies/{failed.study_id}/viewer", headers=h),
        422,
        "cannot display: 1 stored file(s) of the series are missing",
    )
    done_job = env["seeded"]["normal"].job_id
    check(c.post(f"/api/admin/jobs/{done_job}/retry", headers=h), 409, "only failed or dead jobs can be retried")
    check(c.post("/api/admin/jobs/777/retry", headers=h), 409, "no job with id 777")
    check(c.get("/api/admin/jobs?state=lost", headers=h), 422, "query.state")
    check(c.get("/api/admin/audit?limit=0", headers=h), 422, "query.limit")
    check(c.get("/api/worklist?limit=0", headers=h), 422, "query.limit")


# ---- what the pages and the API show -------------------------------------------------------------


def test_worklist_api_order_fields_and_times(env):
    c = client(env["app"])
    h = bearer(env["app"], READER)
    body = c.get("/api/worklist", headers=h).json()
    assert body["timezone"] == "Europe/Berlin"
    names = [e["patient_name"] for e in body["entries"]]
    # two URGENT (spine waited longer than the ACL study), then the routine knee
    assert names[:3] == ["ROSSI, MARIA", "DOE, JANE", "NORMAL, KNEE"]
    first = body["entries"][0]
    assert first["priority"] == "URGENT" and first["reasons"][0].startswith("URGENT: Central canal stenosis L4-L5 95 %")
    assert first["study_datetime_as_sent"] == "2024-03-05 14:22:10"  # as sent, no offset invented
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0[12]:00$", first["received_at"])  # Berlin time with its offset
    acl = body["entries"][1]
    assert acl["dispatch"]["status"] == "failed" and acl["dispatch"]["dead"] >= 1
    assert acl["job"]["state"] == "done" and acl["anatomy"] == "knee"
    assert {f["code"] for f in acl["findings"]} == {"acl_tear", "meniscal_tear"}
    assert [i["patient_name"] for i in body["in_progress"]] == ["FAIL, JOB"]
    only_spine = c.get("/api/worklist?anatomy=lumbar_spine", headers=h).json()["entries"]
    assert [e["patient_name"] for e in only_spine] == ["ROSSI, MARIA"]
    assert c.get("/api/worklist?priority=ROUTINE", headers=h).json()["entries"][0]["patient_name"] == "NORMAL, KNEE"
    nxt = c.get("/api/worklist/next", headers=h).json()
    assert nxt["study_id"] == env["seeded"]["spine"].study_id


def test_worklist_page_shows_names_only_after_login(env):
    anon = client(env["app"]).get("/worklist", follow_redirects=True)
    assert "DOE" not in anon.text and 'id="login-form"' in anon.text
    page = login(env["app"], READER).get("/worklist")
    assert page.status_code == 200
    for text in ("DOE, JANE", "PIDACL", "2024-03-05 14:22:10", "as sent by the modality", "Europe/Berlin", "URGENT"):
        assert text in page.text
    rows = re.findall(r'<tr class="entry prio-(\w+)', page.text)
    assert rows[:3] == ["URGENT", "URGENT", "ROUTINE"]
    frag = login(env["app"], READER).get("/worklist/rows?anatomy=knee")
    assert (
        frag.status_code == 200 and "<html" not in frag.text and "DOE, JANE" in frag.text and "ROSSI" not in frag.text
    )


def test_study_api_and_page_are_audited_views(env):
    spine = env["seeded"]["spine"]
    h = bearer(env["app"], READER)
    d = client(env["app"]).get(f"/api/studies/{spine.study_id}", headers=h).json()
    levels = {f["level"]: f["grade"] for f in d["findings"] if f["level"]}
    assert levels == {"L1-L2": "normal", "L2-L3": "mild", "L3-L4": "moderate", "L4-L5": "severe", "L5-S1": "mild"}
    assert d["models"][0]["model"] == "lumbar_spine.stenosis" and d["models"][0]["weights_sha256"] == "ab" * 32
    assert d["demo_weights"] and "Not for diagnostic use" in d["notice"]
    page = login(env["app"], READER).get(f"/studies/{spine.study_id}")
    assert 'id="demo-notice"' in page.text and "NOT FOR DIAGNOSTIC USE" in page.text
    assert 'id="stenosis-levels"' in page.text and "grade-severe" in page.text
    views = [(a[0], a[2]) for a in audit_rows(env, action="study.view")]
    assert views.count((READER[0], str(spine.study_id))) >= 2


def test_original_slices_are_sorted_by_position_and_decoded(env):
    import pydicom

    acl = env["seeded"]["acl"]
    c = client(env["app"])
    h = bearer(env["app"], READER)
    v = c.get(f"/api/studies/{acl.study_id}/viewer", headers=h).json()
    assert v["selected"]["id"] == acl.series_id and v["selected"]["slices"] == 12
    assert v["overlays"] and v["overlays"][0]["segments"][0]["label"] == "ACL tear"
    # slices are ordered along the normal row x col = (0,1,0) x (0,0,-1) = -x: seed slice k is viewer slice 11 - k
    assert v["overlay_slices"] == sorted(11 - k for k in acl.seg_slices) and v["start_slice"] in v["overlay_slices"]
    assert v["superres"]["slices"] == 23 and len(v["superres"]["map"]) == 12 and v["superres"]["map"][3] == 6
    datasets = [pydicom.dcmread(p) for p in acl.source_paths]
    normal = np.cross(
        [float(x) for x in datasets[0].ImageOrientationPatient[:3]],
        [float(x) for x in datasets[0].ImageOrientationPatient[3:]],
    )
    by_pos = sorted(datasets, key=lambda ds: float(np.dot([float(x) for x in ds.ImagePositionPatient], normal)))
    assert float(by_pos[0].ImagePositionPatient[0]) > float(by_pos[-1].ImagePositionPatient[0])
    for k in (0, 5, 11):
        r = c.get(f"/api/studies/{acl.study_id}/series/{acl.series_id}/slices/{k}.png", headers=h)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = np.asarray(Image.open(io.BytesIO(r.content)))
        assert img.shape == (96, 96)
        src = by_pos[k].pixel_array.astype(float)
        assert np.corrcoef(img.ravel(), src.ravel())[0, 1] > 0.95  # the same slice, windowed


def test_overlay_comes_from_the_seg_and_sits_on_the_right_slices(env):
    acl = env["seeded"]["acl"]
    c = client(env["app"])
    h = bearer(env["app"], READER)
    rid = c.get(f"/api/studies/{acl.study_id}/viewer", headers=h).json()["overlays"][0]["result_id"]
    alpha = {}
    for k in range(12):
        r = c.get(f"/api/studies/{acl.study_id}/series/{acl.series_id}/overlay/{rid}/{k}.png", headers=h)
        img = np.asarray(Image.open(io.BytesIO(r.content)))
        assert img.shape == (96, 96, 4)
        alpha[k] = int(img[..., 3].max())
    centre = 11 - 6  # the seed's evidence centre (slice 6 along +x) in viewer order
    assert alpha[centre] > 200 and alpha[0] == 0 and alpha[11] == 0
    assert alpha[centre] == max(alpha.values()) and alpha[centre - 1] == alpha[centre + 1]
    img = np.asarray(
        Image.open(
            io.BytesIO(
                c.get(
                    f"/api/studies/{acl.study_id}/series/{acl.series_id}/overlay/{rid}/{centre}.png", headers=h
                ).content
            )
        )
    )
    peak = np.unravel_index(np.argmax(img[..., 3]), img.shape[:2])
    assert abs(peak[0] - 48) <= 2 and abs(peak[1] - 43) <= 2  # where the seed put the evidence
    assert (
        c.get(
            f"/api/studies/{acl.study_id}/series/{acl.series_id}/overlay/{rid}/6.png?segment=1", headers=h
        ).status_code
        == 200
    )
    r = c.get(f"/api/studies/{acl.study_id}/series/{acl.series_id}/overlay/{rid}/6.png?segment=7", headers=h)
    assert r.status_code == 404 and "no segment 7" in r.json()["detail"]


def test_admin_views_and_retries(env):
    h = bearer(env["app"], ADMIN)
    c = client(env["app"])
    jobs = c.get("/api/admin/jobs", headers=h).json()["jobs"]
    failed = next(j for j in jobs if j["state"] == "failed")
    assert failed["error"] == "model crashed: test"
    r = c.post(f"/api/admin/jobs/{failed['id']}/retry", headers=h)
    assert r.status_code == 200 and r.json() == {"id": failed["id"], "state": "queued"}
    assert (ADMIN[0], "job.retry", str(failed["id"]), "failed", "queued", None) in audit_rows(env, action="job.retry")

    dead = c.get("/api/admin/outbox?state=dead", headers=h).json()["items"]
    assert dead and dead[0]["last_error"].startswith("0x0122")
    r = c.post(f"/api/admin/outbox/{dead[0]['id']}/retry", headers=h)
    assert r.status_code == 200 and r.json()["state"] == "pending" and r.json()["previous_state"] == "dead"
    assert (ADMIN[0], "outbox.retry", str(dead[0]["id"]), "dead", "pending", None) in audit_rows(
        env, action="outbox.retry"
    )
    sent = c.get("/api/admin/outbox?state=sent", headers=h).json()["items"][0]
    r = c.post(f"/api/admin/outbox/{sent['id']}/retry", headers=h)
    assert r.status_code == 409 and "it is not sent again" in r.json()["detail"]
    r = c.post("/api/admin/outbox/99999/retry", headers=h)
    assert r.status_code == 409 and "no outbox item with id 99999" in r.json()["detail"]

    routing = c.get("/api/admin/routing", headers=h).json()
    stow = next(d for d in routing["destinations"] if d["type"] == "stow")
    assert stow["password"] == "***" and "s3cret" not in str(routing)
    assert routing["routing"]["path"].endswith(".toml")
    models = c.get("/api/admin/models", headers=h).json()
    assert {m["model"] for m in models["seen_in_findings"]} >= {"knee.acl", "lumbar_spine.stenosis"}
    pol = c.get("/api/admin/policy", headers=h).json()
    assert any(r["id"] == "acl_complete" for r in pol["rules"])
    assert {u["username"] for u in c.get("/api/admin/users", headers=h).json()["users"]} == {ADMIN[0], READER[0]}
    browser = login(env["app"], ADMIN)
    for page in (
        "/admin/priorities",
        "/admin/jobs",
        "/admin/outbox",
        "/admin/routing",
        "/admin/models",
        "/admin/audit",
        "/admin/users",
    ):
        r = browser.get(page)
        assert r.status_code == 200, page
        assert "s3cret" not in r.text


def test_admin_priority_change_via_api_reorders_and_is_audited(env):
    normal = env["seeded"]["normal"]
    c = login(env["app"], ADMIN)
    csrf = csrf_of(c)
    r = c.post(
        f"/api/entries/{normal.entry_id}/priority",
        json={"priority": "STAT", "reason": "orthopaedics on the phone"},
        headers={"X-CSRF-Token": csrf},
    )
    assert r.status_code == 200 and r.json()["priority"] == "STAT" and r.json()["ai_priority"] == "ROUTINE"
    top = c.get("/api/worklist").json()["entries"][0]
    assert top["patient_name"] == "NORMAL, KNEE" and top["override"]["reason"] == "orthopaedics on the phone"
    events = c.get(f"/api/admin/audit?action=worklist.override&entity_id={normal.entry_id}").json()["events"]
    assert events[0]["actor"] == ADMIN[0] and (events[0]["old"], events[0]["new"]) == ("ROUTINE", "STAT")
    assert events[0]["reason"] == "orthopaedics on the phone"
    assert events[0]["at"][-6:] in ("+01:00", "+02:00")  # node time in the site's zone (Europe/Berlin)
    r = c.post(
        f"/api/entries/{normal.entry_id}/priority",
        json={"priority": None, "reason": "done"},
        headers={"X-CSRF-Token": csrf},
    )
    assert r.json()["priority"] == "ROUTINE" and r.json()["override"] is None


# ---- users command ---------------------------------------------------------------------------------


def test_users_command(settings, db, monkeypatch, capsys):
    from node.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("first-admin-pass\n"))
    assert main(["users", "add", "root", "--role", "admin", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "add", "r2", "--role", "radiologist", "--password-stdin"]) == 1
    assert "at least 10 characters" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("another-password\n"))
    assert main(["users", "add", "root", "--role", "radiologist", "--password-stdin"]) == 1
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("another-password\n"))
    assert main(["users", "add", "bad name", "--role", "radiologist", "--password-stdin"]) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["users", "add", "r3", "--role", "radiologist", "--password-stdin"]) == 1
    assert "no password on standard input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["users", "add", "r4", "--role", "superuser", "--password-stdin"])
    capsys.readouterr()
    assert main(["users", "list", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [(r["username"], r["role"], r["active"]) for r in rows] == [("root", "admin", True)]
    from node.web.users import authenticate
    from worklists.tables import User

    with db.session() as s:
        assert authenticate(s, "root", "first-admin-pass") is not None
        assert authenticate(s, "root", "wrong-password") is None
        assert s.scalars(select(User)).one().password_hash.startswith("$argon2id$")
    assert main(["users", "disable", "root"]) == 0
    with db.session() as s:
        assert authenticate(s, "root", "first-admin-pass") is None


def test_web_command_refuses_an_invalid_triage_policy(settings, tmp_path, monkeypatch, capsys):
    from node.cli import main

    bad = tmp_path / "policy.toml"
    bad.write_text('[[rule]]\nid = "x"\ncode = "acl_tear"\nwhy = "w"\nmin_probability = 0.5\npriority = "SOON"\n')
    monkeypatch.setenv("MSKNODE_TRIAGE_POLICY", str(bad))
    monkeypatch.setenv("MSKNODE_WEB_PORT", "1")  # never reached: the policy is checked before serving
    assert main(["web"]) == 1
    err = capsys.readouterr().err
    assert "rule[0].priority: priority must be one of STAT, URGENT, ROUTINE, got 'SOON'" in err


def test_priority_form_on_the_admin_page(env):
    spine = env["seeded"]["spine"]
    c = login(env["app"], ADMIN)
    page = c.get("/admin/priorities")
    assert page.status_code == 200 and f'id="prio-{spine.entry_id}"' in page.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    url = f"/admin/entries/{spine.entry_id}/priority"
    r = c.post(
        url,
        data={"csrf_token": csrf, "priority": "ROUTINE", "reason": "  ", "next": "/admin/priorities"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and "error=a+reason+is+required" in r.headers["location"]
    r = c.post(
        url,
        data={
            "csrf_token": csrf,
            "priority": "ROUTINE",
            "reason": "known chronic finding, compared to 2023",
            "next": "https://evil.example/",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"].startswith("/worklist?msg=priority+set+to+ROUTINE")
    items = {e["entry_id"]: e for e in c.get("/api/worklist").json()["entries"]}
    assert items[spine.entry_id]["priority"] == "ROUTINE" and items[spine.entry_id]["ai_priority"] == "URGENT"
    r = c.post(url, data={"csrf_token": csrf, "priority": "", "reason": "back to AI priority"}, follow_redirects=False)
    assert "priority+set+to+URGENT" in r.headers["location"]


def test_repeated_failed_logins_lock_the_name_for_a_while(env):
    from node.web.auth import LoginThrottle
    from node.web.users import add_user

    with env["db"].session() as s:
        add_user(s, username="mallory-target", password="target-password-1", role="radiologist")
    c = client(env["app"])
    for _ in range(5):
        assert (
            c.post("/api/auth/token", json={"username": "mallory-target", "password": "guess-guess"}).status_code == 401
        )
    r = c.post("/api/auth/token", json={"username": "mallory-target", "password": "target-password-1"})
    assert r.status_code == 429 and "too many failed logins" in r.json()["detail"] and int(r.headers["retry-after"]) > 0
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": "MALLORY-TARGET", "password": "target-password-1", "csrf_token": nonce})
    assert r.status_code == 429 and "too many failed logins" in r.text
    # other users are not affected
    assert c.post("/api/auth/token", json={"username": READER[0], "password": READER[1]}).status_code == 200
    # the lock ends after the lockout period and a success clears the count
    t = LoginThrottle(failures=2, window=60, lockout=10)
    t.failed("u", now=0)
    t.failed("u", now=1)
    assert t.retry_after("u", now=2) == 9 and t.retry_after("u", now=12) == 0
    t.succeeded("u")
    assert t.retry_after("u", now=2) == 0


def test_header_values_are_escaped_in_pages(env):
    from worklists.triage import load_policy

    s = env["settings"]
    evil = ws.seed_study(
        env["db"],
        s,
        load_policy(s.triage_policy),
        findings=ws.knee_normal(),
        patient_name='<script>alert(1)</script>^"X',
        patient_id="<b>P</b>",
        with_seg=False,
        with_superres=False,
        seed=9,
    )
    c = login(env["app"], READER)
    for page in ("/worklist", f"/studies/{evil.study_id}"):
        text = c.get(page).text
        assert "<script>alert" not in text and "<b>P</b>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;P&lt;/b&gt;" in text
