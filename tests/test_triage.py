"""Triage policy, priority computation, ageing, reading order and audited worklist changes."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.schema import Finding, Job, Study
from support.findings import misgraded_acl
from worklists import entries
from worklists.errors import EntryNotFound, InvalidChange, PolicyError
from worklists.tables import AuditEvent, User, WorklistEntry
from worklists.triage import (
    DEFAULT_POLICY_PATH,
    TriageFinding,
    age,
    compute,
    findings_from_pipeline,
    load_policy,
    parse_policy,
)

pytestmark = pytest.mark.unit

T0 = dt.datetime(2025, 3, 5, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def policy():
    return load_policy(DEFAULT_POLICY_PATH)


def acl(p_complete: float, *, p_tear: float = 0.85, u: float = 0.04) -> TriageFinding:
    rest = 1 - p_complete
    return TriageFinding(
        code="acl_tear",
        label="ACL tear",
        model_name="knee.acl",
        probability=p_tear,
        uncertainty=u,
        positive=p_tear >= 0.5,
        grade="complete" if p_complete >= 0.5 else "partial",
        grade_probabilities={"intact": 1 - p_tear, "partial": max(0.0, rest - (1 - p_tear)), "complete": p_complete},
    )


def stenosis(level: str, grade: str, p: float = 0.85, u: float = 0.05) -> TriageFinding:
    probs = dict.fromkeys(("normal", "mild", "moderate", "severe"), (1 - p) / 3)
    probs[grade] = p
    return TriageFinding(
        code="spinal_stenosis",
        label="Spinal stenosis",
        probability=1 - probs["normal"],
        uncertainty=u,
        positive=grade in ("moderate", "severe"),
        grade=grade,
        level=level,
        grade_probabilities=probs,
    )


# ---- the shipped policy ----------------------------------------------------------------------


def test_shipped_policy_is_the_settings_default_and_documents_itself(settings, policy):
    assert Path(settings.triage_policy).resolve() == DEFAULT_POLICY_PATH.resolve()
    assert policy.version and policy.default_priority == "ROUTINE"
    ids = {r.id for r in policy.rules}
    assert {"acl_complete", "cuff_full_thickness", "stenosis_severe", "stenosis_severe_multilevel"} <= ids
    assert [(a.from_priority, a.to_priority) for a in policy.ageing] == [("ROUTINE", "URGENT")]
    text = DEFAULT_POLICY_PATH.read_text()
    assert "Why these defaults" in text and "full-thickness" in text  # the documented reasoning ships with it
    assert not any(r.priority == "STAT" for r in policy.rules)  # STAT is a human decision by default


def test_complete_acl_tear_above_threshold_is_urgent_with_its_reason(policy):
    s = compute([acl(0.82)], policy)
    assert s.priority == "URGENT"
    assert "acl_complete" in s.matched_rules
    # the finding as every view writes it (headline P(tear), grade split), then the rule's own test
    assert s.reasons[0].startswith(
        "URGENT: ACL tear 85 % (complete 82 %, partial 3 %) (+/-4); P(complete) 82 % >= 70 %"
    )
    assert "early orthopaedic referral" in s.reasons[0]
    assert 0 < s.score <= 100 and not s.needs_review


def test_probable_tear_with_low_complete_probability_stays_routine_but_scores(policy):
    s = compute([acl(0.30, p_tear=0.85)], policy)
    assert s.priority == "ROUTINE"
    assert s.matched_rules == ("acl_tear",)
    assert s.score == pytest.approx(30 * 0.85, abs=0.1)
    assert any(r.startswith("score +26: ACL tear 85 % (partial 55 %, complete 30 %)") for r in s.reasons)


def test_a_sure_tear_of_either_grade_is_urgent_because_the_grade_is_unreliable(policy):
    # the model calls a complete tear "partial" (98 %): P(tear) decides, not the grade it names
    misgraded = misgraded_acl()
    s = compute([misgraded], policy)
    assert s.priority == "URGENT" and "acl_tear_high" in s.matched_rules and "acl_complete" not in s.matched_rules
    assert s.reasons[0].startswith(
        "URGENT: ACL tear 98 % (partial 71 %, complete 27 %) (+/-1); P(partial or complete) 98 % >= 90 %"
    )
    # below the threshold the grade rules decide as before
    assert compute([acl(0.30, p_tear=0.85)], policy).priority == "ROUTINE"
    # the threshold is the site's: a copy of the policy with a lower one raises the same study
    data = tomllib.loads(DEFAULT_POLICY_PATH.read_text())
    (rule,) = [r for r in data["rule"] if r["id"] == "acl_tear_high"]
    assert rule["priority"] == "URGENT" and set(rule["grades"]) == {"partial", "complete"}
    rule["min_probability"] = 0.80
    assert compute([acl(0.30, p_tear=0.85)], parse_policy(data)).priority == "URGENT"
    rule["min_probability"] = 0.99
    assert compute([misgraded], parse_policy(data)).priority == "ROUTINE"


def test_near_threshold_with_wide_uncertainty_is_flagged_not_promoted(policy):
    s = compute([acl(0.66, u=0.03)], policy)
    assert s.priority == "ROUTINE" and s.needs_review
    assert any(r.startswith("uncertain: ACL tear") and "acl_complete" in r for r in s.reasons)
    narrow = compute([acl(0.55, u=0.02)], policy)
    assert not narrow.needs_review  # 0.55 + 2 x 0.02 < 0.70


def test_severe_stenosis_at_any_level_is_urgent_and_names_levels(policy):
    one = compute([stenosis("L3-L4", "moderate"), stenosis("L4-L5", "severe"), stenosis("L5-S1", "mild")], policy)
    assert one.priority == "URGENT"
    assert "stenosis_severe" in one.matched_rules and "stenosis_severe_multilevel" not in one.matched_rules
    assert any(r.startswith("URGENT: Central canal stenosis L4-L5 95 % (severe 85 %,") for r in one.reasons)
    two = compute([stenosis("L3-L4", "severe"), stenosis("L4-L5", "severe")], policy)
    assert "stenosis_severe_multilevel" in two.matched_rules
    assert any("2 levels: L3-L4, L4-L5" in r for r in two.reasons)
    assert two.score > one.score
    moderate = compute([stenosis("L4-L5", "moderate")], policy)
    assert moderate.priority == "ROUTINE" and moderate.matched_rules == ("stenosis_moderate",)


def test_full_thickness_cuff_tear_needs_the_higher_threshold(policy):
    def cuff(p):
        return TriageFinding(
            code="rotator_cuff_tear",
            label="Supraspinatus tear",
            probability=0.95,
            uncertainty=0.03,
            positive=True,
            grade="full_thickness",
            grade_probabilities={"none": 0.05, "partial": 0.95 - p, "full_thickness": p},
        )

    assert compute([cuff(0.86)], policy).priority == "URGENT"
    assert compute([cuff(0.75)], policy).priority == "ROUTINE"


def test_qc_refusals_flag_review_and_silence_is_never_negative(policy):
    refused = TriageFinding(
        code="knee.acl", label="knee.acl", model_name="knee.acl", evaluated=False, qc_reason="wrong_anatomy"
    )
    s = compute([refused], policy)
    assert s.priority == "ROUTINE" and s.needs_review
    assert (
        "ACL tear not evaluated: the quality check could not confirm the expected body part in the images"
        " - needs human review" in s.reasons
    )
    assert any("no model could evaluate" in r for r in s.reasons)
    empty = compute([], policy)
    assert empty.needs_review and any("no AI result" in r for r in empty.reasons)
    # one model refused, another evaluated: still flagged, priority from the evaluated one
    mixed = compute([refused, acl(0.9)], policy)
    assert mixed.priority == "URGENT" and mixed.needs_review


def test_superres_is_informational(policy):
    sr_failed = TriageFinding(
        code="superres", label="Super-resolution not done (too_few_slices)", evaluated=False, qc_reason="too_few_slices"
    )
    s = compute([sr_failed, acl(0.1, p_tear=0.1)], policy)
    assert not s.needs_review and s.priority == "ROUTINE"
    assert any("does not change the priority" in r for r in s.reasons)
    # a study where only super-resolution ran has no diagnostic result
    assert compute([TriageFinding(code="superres", label="Super-resolved series")], policy).needs_review


def test_ageing_promotes_routine_after_the_window(policy):
    assert age("ROUTINE", waiting_since=T0, now=T0 + dt.timedelta(hours=47), policy=policy).reason is None
    aged = age("ROUTINE", waiting_since=T0, now=T0 + dt.timedelta(hours=49), policy=policy)
    assert aged.priority == "URGENT" and "ageing" in aged.reason and "49.0 h" in aged.reason
    assert age("URGENT", waiting_since=T0, now=T0 + dt.timedelta(days=9), policy=policy).priority == "URGENT"
    s = compute([acl(0.1, p_tear=0.1)], policy, waiting_since=T0, now=T0 + dt.timedelta(hours=50))
    assert s.priority == "URGENT" and "ageing" in s.reasons[-1]


def test_ageing_steps_chain():
    pol = parse_policy(
        {
            "ageing": [
                {"from": "ROUTINE", "to": "URGENT", "after_hours": 2},
                {"from": "URGENT", "to": "STAT", "after_hours": 4},
            ],
            "rule": [],
        }
    )
    assert age("ROUTINE", waiting_since=T0, now=T0 + dt.timedelta(hours=3), policy=pol).priority == "URGENT"
    assert age("ROUTINE", waiting_since=T0, now=T0 + dt.timedelta(hours=5), policy=pol).priority == "STAT"


def test_findings_from_a_pipeline_output(policy):
    from models.types import Finding as MFinding
    from models.types import ModelInfo, ModelOutput, PipelineOutput, QCResult

    info = ModelInfo(name="knee.acl", version="1", weights_sha256="0" * 64, task="binary", anatomy="knee")
    men = ModelInfo(name="knee.meniscus", version="1", weights_sha256="1" * 64, task="binary", anatomy="knee")
    out = PipelineOutput(
        pipeline="knee",
        outputs=[
            ModelOutput(
                model=info,
                series_uid="1.2",
                qc=QCResult(True),
                findings=[
                    MFinding(
                        code="acl_tear",
                        label="ACL tear",
                        probability=0.9,
                        uncertainty=0.03,
                        positive=True,
                        grade="complete",
                        grade_probabilities={"intact": 0.1, "partial": 0.1, "complete": 0.8},
                    )
                ],
            ),
            ModelOutput(model=men, series_uid="1.2", qc=QCResult(False, "low_snr", "SNR 2.1 below 4"), findings=[]),
        ],
        superres=[],
        used_series={},
    )
    tf = findings_from_pipeline(out)
    assert [(f.code, f.evaluated, f.model_name) for f in tf] == [
        ("acl_tear", True, "knee.acl"),
        ("knee.meniscus", False, "knee.meniscus"),
    ]
    s = compute(tf, policy)
    assert s.priority == "URGENT" and s.needs_review


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": []}, "unknown key 'rules'"),
        ({"default_priority": "HIGH"}, "default_priority: priority must be one of STAT, URGENT, ROUTINE"),
        (
            {"rule": [{"id": "a", "code": "x", "why": "w", "min_probability": 1.5, "priority": "URGENT"}]},
            "rule[0].min_probability: must be between 0 and 1",
        ),
        (
            {"rule": [{"id": "a", "code": "x", "why": "w", "min_probability": 0.5, "priority": "URGENT"}] * 2},
            "duplicate rule id 'a'",
        ),
        ({"rule": [{"id": "a", "code": "x", "min_probability": 0.5, "priority": "URGENT"}]}, "'why' is required"),
        (
            {
                "rule": [
                    {"id": "a", "code": "x", "why": "w", "min_probability": 0.5, "priority": "URGENT", "grade": "x"}
                ]
            },
            "unknown key 'grade'",
        ),
        (
            {
                "rule": [
                    {"id": "a", "code": "x", "why": "w", "min_probability": 0.5, "priority": "URGENT", "min_levels": 0}
                ]
            },
            "min_levels must be an integer >= 1",
        ),
        ({"ageing": [{"from": "URGENT", "to": "ROUTINE", "after_hours": 1}]}, "ageing must promote"),
        ({"review": {"uncertainty": 2}}, "unknown key review.uncertainty"),
    ],
)
def test_invalid_policies_are_refused_with_the_key_named(data, message):
    with pytest.raises(PolicyError) as e:
        parse_policy(data, source="p.toml")
    assert message in str(e.value)


def test_policy_file_errors(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\nid=")
    with pytest.raises(PolicyError, match="invalid TOML"):
        load_policy(bad)


# ---- entries in the database -------------------------------------------------------------------


def make_job(s, *, findings: list[dict], received: dt.datetime = T0, name: str = "X^Y", state: str = "done") -> Job:
    n = s.query(Study).count() + 1
    st = Study(
        study_uid=f"1.2.3.{n}",
        patient_name=name,
        patient_id=f"P{n}",
        first_received_at=received,
        last_received_at=received,
    )
    s.add(st)
    s.flush()
    job = Job(study_id=st.id, pipeline="knee", state=state, created_at=received)
    s.add(job)
    s.flush()
    for f in findings:
        s.add(Finding(job_id=job.id, model_name="knee.acl", model_version="1", weights_sha256="0" * 64, **f))
    s.flush()
    return job


COMPLETE = dict(
    code="acl_tear",
    label="ACL tear",
    probability=0.95,
    uncertainty=0.02,
    positive=True,
    grade="complete",
    details={"grade_probabilities": {"intact": 0.05, "partial": 0.1, "complete": 0.85}},
)
NORMAL = dict(code="acl_tear", label="ACL tear", probability=0.05, uncertainty=0.02, positive=False, grade="intact")
REFUSED = dict(code="knee.acl", label="knee.acl: not evaluated (low_snr)", evaluated=False, qc_reason="low_snr")


def events(s, entry_id):
    return s.scalars(
        select(AuditEvent)
        .where(AuditEvent.entity_type == "worklist_entry", AuditEvent.entity_id == str(entry_id))
        .order_by(AuditEvent.id)
    ).all()


def test_upsert_creates_entry_and_audits_as_system(db, policy):
    with db.session() as s:
        job = make_job(s, findings=[COMPLETE])
        e = entries.upsert_for_job(s, job_id=job.id, policy=policy, now=T0)
        assert (e.priority, e.ai_priority, e.status) == ("URGENT", "URGENT", "unread")
        assert e.reasons[0].startswith("URGENT: ACL tear 95 % (complete 85 %, partial 10 %)") and e.score > 0
        (ev,) = events(s, e.id)
        assert (ev.actor, ev.action, ev.old_value, ev.new_value) == ("system", "worklist.create", None, "URGENT")
        assert ev.details["job_id"] == job.id and ev.details["rules"][0] == "acl_complete"
        assert "P(complete) 85 %" in ev.reason


def test_upsert_is_idempotent_and_keeps_an_admin_override(db, policy):
    with db.session() as s:
        job = make_job(s, findings=[COMPLETE])
        e = entries.upsert_for_job(s, job_id=job.id, policy=policy, now=T0)
        entries.override_priority(
            s,
            entry_id=e.id,
            priority="STAT",
            reason="referrer called: locked knee",
            actor="alice",
            now=T0 + dt.timedelta(minutes=5),
        )
        again = entries.upsert_for_job(s, job_id=job.id, policy=policy, now=T0 + dt.timedelta(minutes=6))
        assert again.id == e.id and again.priority == "STAT" and again.override_priority == "STAT"
        assert [x.action for x in events(s, e.id)] == [
            "worklist.create",
            "worklist.override_priority",
        ]  # no change, no event
        assert s.query(WorklistEntry).count() == 1


def test_new_job_for_a_read_study_updates_priority_and_reopens(db, policy):
    with db.session() as s:
        old = make_job(s, findings=[NORMAL])
        e = entries.upsert_for_job(s, job_id=old.id, policy=policy, now=T0)
        assert e.priority == "ROUTINE"
        entries.mark_read(s, entry_id=e.id, actor="bob", now=T0 + dt.timedelta(hours=1))
        new = Job(study_id=old.study_id, pipeline="knee", state="done", supersedes_job_id=old.id)
        s.add(new)
        s.flush()
        s.add(Finding(job_id=new.id, model_name="knee.acl", model_version="1", weights_sha256="0" * 64, **COMPLETE))
        s.flush()
        e = entries.upsert_for_job(s, job_id=new.id, policy=policy, now=T0 + dt.timedelta(hours=2))
        assert (e.job_id, e.priority, e.status) == (new.id, "URGENT", "unread")
        acts = [(x.actor, x.action, x.old_value, x.new_value) for x in events(s, e.id)]
        assert ("system", "worklist.ai_priority", "ROUTINE", "URGENT") in acts
        assert ("system", "worklist.status", "read", "unread") in acts
        # the older job finishing late does not overwrite the newer result
        e = entries.upsert_for_job(s, job_id=old.id, policy=policy, now=T0 + dt.timedelta(hours=3))
        assert e.job_id == new.id and e.priority == "URGENT"


def test_override_assign_read_are_validated_and_audited(db, policy):
    with db.session() as s:
        s.add(User(username="carol", password_hash="x", role="radiologist", active=True))
        s.add(User(username="gone", password_hash="x", role="radiologist", active=False))
        e = entries.upsert_for_job(s, job_id=make_job(s, findings=[NORMAL]).id, policy=policy, now=T0)
        with pytest.raises(InvalidChange, match="reason is required"):
            entries.override_priority(s, entry_id=e.id, priority="URGENT", reason="  ", actor="alice", now=T0)
        with pytest.raises(InvalidChange, match="priority must be one of"):
            entries.override_priority(s, entry_id=e.id, priority="HIGH", reason="x", actor="alice", now=T0)
        with pytest.raises(InvalidChange, match="no active user 'gone'"):
            entries.assign(s, entry_id=e.id, assignee="gone", actor="alice", now=T0)
        with pytest.raises(EntryNotFound):
            entries.mark_read(s, entry_id=9999, actor="alice", now=T0)
        with pytest.raises(EntryNotFound, match="job 4242 not found"):
            entries.upsert_for_job(s, job_id=4242, policy=policy, now=T0)

        entries.override_priority(
            s, entry_id=e.id, priority="URGENT", reason="clinical question: infection?", actor="alice", now=T0
        )
        entries.assign(s, entry_id=e.id, assignee="carol", actor="alice", now=T0)
        entries.mark_read(s, entry_id=e.id, actor="carol", now=T0)
        entries.override_priority(s, entry_id=e.id, priority=None, reason="answered by phone", actor="alice", now=T0)
        assert (e.priority, e.override_priority, e.assigned_to, e.status, e.read_by) == (
            "ROUTINE",
            None,
            "carol",
            "read",
            "carol",
        )
        got = [(x.actor, x.action, x.old_value, x.new_value, x.reason) for x in events(s, e.id)][1:]
        assert got == [
            ("alice", "worklist.override_priority", "ROUTINE", "URGENT", "clinical question: infection?"),
            ("alice", "worklist.assign", None, "carol", None),
            ("carol", "worklist.status", "unread", "read", None),
            ("alice", "worklist.clear_override", "URGENT", "ROUTINE", "answered by phone"),
        ]
        assert all(x.at is not None for x in events(s, e.id))


def test_reading_order_is_priority_then_waiting_then_stable(db, policy):
    now = T0 + dt.timedelta(hours=10)
    with db.session() as s:
        ids = {}
        for name, findings, received in [
            ("routine_old", [NORMAL], T0),
            ("urgent_new", [COMPLETE], T0 + dt.timedelta(hours=9)),
            ("urgent_old", [COMPLETE], T0 + dt.timedelta(hours=1)),
            ("review", [REFUSED], T0 + dt.timedelta(hours=2)),
            ("aged", [NORMAL], T0 - dt.timedelta(hours=60)),
            ("tie_a", [NORMAL], T0 + dt.timedelta(hours=3)),
            ("tie_b", [NORMAL], T0 + dt.timedelta(hours=3)),
        ]:
            job = make_job(s, findings=findings, received=received, name=name)
            ids[name] = entries.upsert_for_job(s, job_id=job.id, policy=policy, now=received).id
        # a read urgent study sinks to the bottom
        read_job = make_job(s, findings=[COMPLETE], received=T0 - dt.timedelta(hours=1), name="read")
        ids["read"] = entries.upsert_for_job(s, job_id=read_job.id, policy=policy, now=T0).id
        entries.mark_read(s, entry_id=ids["read"], actor="bob", now=T0)
        order = [o.study.patient_name for o in entries.ordered(s, policy=policy, now=now)]
        assert order == ["aged", "urgent_old", "urgent_new", "routine_old", "review", "tie_a", "tie_b", "read"]
        again = [o.study.patient_name for o in entries.ordered(s, policy=policy, now=now)]
        assert again == order
        aged = next(o for o in entries.ordered(s, policy=policy, now=now) if o.study.patient_name == "aged")
        assert (
            aged.effective_priority == "URGENT" and aged.entry.priority == "ROUTINE" and "ageing" in aged.ageing_reason
        )
        urgent = [o.study.patient_name for o in entries.ordered(s, policy=policy, now=now, priority="URGENT")]
        assert urgent == ["aged", "urgent_old", "urgent_new", "read"]
        review = [o.study.patient_name for o in entries.ordered(s, policy=policy, now=now, status="review")]
        assert review == ["review"]
        # a limit keeps every unread entry before read ones
        limited = [o.study.patient_name for o in entries.ordered(s, policy=policy, now=now, limit=7)]
        assert limited == order[:7] and "read" not in limited
        # an admin's STAT goes to the very top
        entries.override_priority(
            s, entry_id=ids["tie_b"], priority="STAT", reason="surgeon waiting", actor="alice", now=now
        )
        assert entries.ordered(s, policy=policy, now=now)[0].study.patient_name == "tie_b"


def test_an_entry_created_concurrently_is_updated_not_duplicated(db, policy, monkeypatch):
    with db.session() as s:
        first = make_job(s, findings=[NORMAL])
        e = entries.upsert_for_job(s, job_id=first.id, policy=policy, now=T0)
        second = Job(study_id=first.study_id, pipeline="knee", state="done")
        s.add(second)
        s.flush()
        s.add(Finding(job_id=second.id, model_name="knee.acl", model_version="1", weights_sha256="0" * 64, **COMPLETE))
        s.flush()
        real = entries._find_entry
        calls = []

        def racing(session, study_id):  # the first look misses the entry another worker just committed
            calls.append(study_id)
            return None if len(calls) == 1 else real(session, study_id)

        monkeypatch.setattr(entries, "_find_entry", racing)
        got = entries.upsert_for_job(s, job_id=second.id, policy=policy, now=T0 + dt.timedelta(minutes=1))
        assert len(calls) == 2 and got.id == e.id and (got.job_id, got.priority) == (second.id, "URGENT")
        assert s.query(WorklistEntry).count() == 1
        assert [x.action for x in events(s, e.id)] == ["worklist.create", "worklist.ai_priority"]


def test_worklist_queries_on_postgresql(postgres_url, policy):
    """The same entries, order and web read models on PostgreSQL (the scale-out database)."""
    from zoneinfo import ZoneInfo

    from node.db.database import Database
    from node.jobs.listing import list_jobs
    from node.web import queries

    pg = Database(postgres_url)
    try:
        now = T0 + dt.timedelta(hours=10)
        with pg.session() as s:
            for name, findings, received in [
                ("routine", [NORMAL], T0),
                ("urgent", [COMPLETE], T0 + dt.timedelta(hours=9)),
                ("review", [REFUSED], T0 + dt.timedelta(hours=2)),
            ]:
                job = make_job(s, findings=findings, received=received, name=name)
                entries.upsert_for_job(s, job_id=job.id, policy=policy, now=received)
            make_job(s, findings=[], name="running", state="processing")
        with pg.session() as s:
            first = entries.ordered(s, policy=policy, now=now)[0]
            entries.override_priority(
                s, entry_id=first.entry.id, priority="ROUTINE", reason="seen on the phone", actor="alice", now=now
            )
        with pg.session() as s:
            tz = ZoneInfo("Europe/Berlin")
            rows = queries.worklist(s, policy=policy, tz=tz, now=now)
            assert [r["patient_name"] for r in rows] == ["routine", "review", "urgent"]
            assert rows[2]["override"] == {"priority": "ROUTINE", "reason": "seen on the phone"}
            assert [p["patient_name"] for p in queries.pending_studies(s, tz=tz)] == ["running"]
            detail = queries.study_detail(s, rows[0]["study_id"], policy=policy, tz=tz, now=now)
            assert detail["entry"]["priority"] == "ROUTINE" and detail["findings"][0]["code"] == "acl_tear"
            assert list_jobs(s, tz=tz, state="processing")[0]["state"] == "processing"
            assert queries.outbox(s, tz=tz) == []
            log = queries.audit_log(s, tz=tz, action="worklist.override")
            assert [(a["actor"], a["old"], a["new"]) for a in log] == [("alice", "URGENT", "ROUTINE")]
    finally:
        pg.dispose()
