"""Shadow mode with the real node: ``msknode listen``, the production ``msknode worker`` and a real Orthanc as the
PACS, knee phantom studies sent with storescu.

At a new site the shipped knee models (no real-data validation on their cards) run in shadow: their findings are
stored and shown labelled SHADOW (API and study page), the worklist priority ignores them and nothing reaches the
PACS. After an admin activates knee.acl on the Models page (audited), the next study's ACL finding sets the
priority and its SR reaches Orthanc, while the meniscus model, still in shadow, is left out of that SR."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.db.schema import Finding, OutboxItem, ResultObject
from support.env import free_port
from support.jobs import ListenerProcess, storescu, wait_for
from support.node_stack import NodeWorker, node_env, study_job
from support.orthanc import OrthancPacs
from support.web_client import login

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN = ("dora", "correct-horse-battery-staple-1")


def _sr_texts(path: Path) -> str:
    """Every text, code meaning and UID of an SR's content tree, as one string."""
    out: list[str] = []

    def walk(items):
        for it in items:
            for kw in ("TextValue", "UID"):
                if kw in it:
                    out.append(str(it[kw].value))
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                if seq in it:
                    out.append(str(it[seq][0].CodeMeaning))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(pydicom.dcmread(path).ContentSequence)
    return "\n".join(out)


def test_shadow_models_store_and_label_but_change_no_priority_and_send_nothing(settings, db, tmp_path):
    from models.phantoms import write_study
    from node.web.app import create_app
    from node.web.users import add_user
    from worklists.tables import AuditEvent, WorklistEntry
    from worklists.triage import load_policy

    policy = load_policy(settings.triage_policy)
    pacs = OrthancPacs(tmp_path / "orthanc").start()
    port = free_port()
    env = node_env(
        settings,
        port,
        MSKNODE_DESTINATIONS=json.dumps([pacs.destination]),
    )
    assert "MSKNODE_ACTIVATE_MODELS" not in env  # a new site: nothing activated by configuration
    first = write_study("knee", tmp_path / "first", 11, acl="complete")
    second = write_study("knee", tmp_path / "second", 12, acl="complete")
    uid_first = str(pydicom.dcmread(first["sag_fluid"][0], stop_before_pixels=True).StudyInstanceUID)
    uid_second = str(pydicom.dcmread(second["sag_fluid"][0], stop_before_pixels=True).StudyInstanceUID)
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    worker = None
    try:
        listener.wait_ready(port)
        worker = NodeWorker(env, tmp_path / "worker.log").start()
        assert storescu(port, [p for paths in first.values() for p in paths]).wait(120) == 0
        try:
            job = wait_for(lambda: study_job(db, uid_first), 300, interval=0.5, what="the first study's job done")
        except AssertionError:
            print(worker.output()[-4000:])
            raise

        with db.session() as s:
            findings = s.scalars(select(Finding).where(Finding.job_id == job.id)).all()
            classifier = [f for f in findings if f.model_name in ("knee.acl", "knee.meniscus")]
            assert classifier and all(f.shadow for f in classifier)
            acl = next(f for f in classifier if f.code == "acl_tear")
            assert acl.evaluated and acl.positive  # the model saw the tear: only shadow keeps it from the worklist
            assert not s.scalars(select(ResultObject).where(ResultObject.job_id == job.id)).all()
            assert not s.scalars(select(OutboxItem)).all()
            entry = s.scalars(select(WorklistEntry).where(WorklistEntry.study_id == job.study_id)).one()
            assert entry.ai_priority == policy.default_priority
            assert not any("ACL" in r or "acl" in r for r in entry.reasons or [])
            assert (job.model_versions or {})["knee.acl"]["state"] == "shadow"
            started = s.scalars(select(AuditEvent).where(AuditEvent.action == "model.deploy")).all()
            assert {(e.actor, e.entity_id, e.new_value) for e in started} == {
                ("system", "knee/knee.acl", "1.0.0 shadow"),
                ("system", "knee/knee.meniscus", "1.0.0 shadow"),
            }
        assert pacs.instances_of_study(uid_first) == []
        assert pacs.get("/statistics")["CountInstances"] == 0
        assert "every model of pipeline knee is in shadow" in worker.output()

        # shown, labelled, on the API and the study page; then activated by an admin on the Models page
        with db.session() as s:
            add_user(s, username=ADMIN[0], password=ADMIN[1], role="admin")
        app = create_app(settings, db)
        c = login(app, ADMIN)
        study = c.get(f"/api/studies/{job.study_id}").json()
        shown = [f for f in study["findings"] if f["model"] == "knee.acl"]
        assert shown and all(f["shadow"] and f["display"]["text"].startswith("SHADOW · ") for f in shown)
        assert "SHADOW · " in c.get(f"/studies/{job.study_id}").text
        page = c.get("/admin/models")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = c.post(
            "/admin/deployments",
            data={
                "pipeline": "knee",
                "model": "knee.acl",
                "version": "1.0.0",
                "state": "active",
                "reason": "agreement in the silent trial",
                "csrf_token": csrf,
            },
            follow_redirects=False,
        )
        assert r.status_code == 303 and "error" not in r.headers["location"]

        assert storescu(port, [p for paths in second.values() for p in paths]).wait(120) == 0
        job2 = wait_for(lambda: study_job(db, uid_second), 300, interval=0.5, what="the second study's job done")

        def sent():
            with db.session() as s:
                items = s.scalars(select(OutboxItem)).all()
            return items and {i.state for i in items} == {"sent"}

        wait_for(sent, 120, interval=0.5, what="the second study's results sent")
        with db.session() as s:
            f2 = s.scalars(select(Finding).where(Finding.job_id == job2.id)).all()
            assert {f.model_name: f.shadow for f in f2 if f.model_name.startswith("knee.")} == {
                "knee.acl": False,
                "knee.meniscus": True,
            }
            entry2 = s.scalars(select(WorklistEntry).where(WorklistEntry.study_id == job2.study_id)).one()
            acl2 = next(f for f in f2 if f.code == "acl_tear")
            if acl2.positive:
                assert entry2.ai_priority != policy.default_priority
            srs = s.scalars(select(ResultObject).where(ResultObject.job_id == job2.id, ResultObject.kind == "sr")).all()
            assert len(srs) == 1
            sr_path = Path(srs[0].path)
            sr_uid = srs[0].sop_instance_uid
        text = _sr_texts(sr_path if sr_path.is_absolute() else settings.data_dir / sr_path)
        assert "knee.acl" in text and "knee.meniscus" not in text
        in_pacs = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances_of_study(uid_second)}
        assert sr_uid in in_pacs
        assert pacs.instances_of_study(uid_first) == []  # the shadow study's results never left
    finally:
        if worker is not None:
            worker.stop(graceful=False)
        listener.stop()
        pacs.stop()
