"""Feedback per finding, reading targets and model monitoring, on a real SQLite node database.

History is seeded as the rows a worker writes (support.monitor_seed); answers go through the real
`worklists.feedback.record`; the figures come from `worklists.monitoring.report`.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import select

from support import web_seed as ws
from support.cli import msknode
from support.monitor_seed import Phase, answer, seed_history

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def policy(settings):
    from worklists.triage import load_policy

    return load_policy(settings.triage_policy)


# ---- statistics -------------------------------------------------------------------------------


@pytest.mark.unit
def test_wilson_interval_matches_the_published_values():
    from worklists.monitoring import wilson

    # Newcombe (1998), example: 81/263 -> 0.2553 to 0.3662 (Wilson score, 95 %)
    w = wilson(81, 263)
    assert w["lo"] == pytest.approx(0.2553, abs=5e-4) and w["hi"] == pytest.approx(0.3662, abs=5e-4)
    # 0 of 10: the interval still reaches up (never the naive [0, 0])
    z = wilson(0, 10)
    assert z["lo"] == 0.0 and z["hi"] == pytest.approx(0.2775, abs=5e-4)
    assert wilson(0, 0)["p"] is None


@pytest.mark.unit
def test_quantile_and_band():
    from worklists.monitoring import band, quantile

    assert quantile([1, 2, 3, 4], 0.5) == 2.5 and quantile([10.0], 0.9) == 10.0 and quantile([], 0.5) is None
    lo, hi = band(0.2, 100)
    assert lo == pytest.approx(0.2 - 3 * 0.04) and hi == pytest.approx(0.2 + 3 * 0.04)


# ---- feedback ---------------------------------------------------------------------------------


def _acl_study(db, settings, policy, **kw):
    return ws.seed_study(
        db,
        settings,
        policy,
        findings=ws.acl_misgraded(),
        with_seg=False,
        with_superres=False,
        **kw,
    )


def test_feedback_is_on_the_models_scale_one_per_user_locked_after_read_and_audited(db, settings, policy):
    from node.db.schema import FindingFeedback
    from worklists.entries import mark_read
    from worklists.errors import InvalidChange
    from worklists.feedback import Answer, FeedbackLocked, record, study_feedback
    from worklists.tables import AuditEvent

    st = _acl_study(db, settings, policy)
    with db.session() as s:
        view = study_feedback(s, st.study_id, user="rob")
        acl, men = view["items"]
        assert acl["scale"] == ["intact", "partial", "complete"] and acl["ai_answer"] == "partial"
        assert men["scale"] == ["none", "medial", "lateral"] and men["ai_answer"] == "none"
        for bad, why in (
            (Answer(agree=False), "needs your answer"),
            (Answer(agree=False, answer="torn"), "not on the model's scale"),
            (Answer(agree=False, answer="partial"), "that is an agreement"),
            (Answer(agree=True, answer="complete"), "an agreement takes"),
            (Answer(agree=True, comment="x" * 1001), "at most 1000"),
        ):
            with pytest.raises(InvalidChange, match=why):
                record(s, study_id=st.study_id, actor="rob", answer=bad, now=NOW, finding_id=acl["finding_id"])
        fb = record(
            s,
            study_id=st.study_id,
            actor="rob",
            answer=Answer(agree=False, answer="complete", comment="fibres all torn"),
            now=NOW,
            finding_id=acl["finding_id"],
        )
        assert (fb.ai_answer, fb.answer, fb.ai_positive, fb.answer_positive) == ("partial", "complete", True, True)
        assert (fb.model_name, fb.model_version, fb.weights_sha256) == ("knee.acl", "0.1.0", "ab" * 32)
        # the same user changes their answer: still one row; another user has their own
        record(s, study_id=st.study_id, actor="rob", answer=Answer(agree=True), now=NOW, key="acl_tear")
        record(s, study_id=st.study_id, actor="eve", answer=Answer(agree=True), now=NOW, key="acl_tear")
        rows = s.scalars(select(FindingFeedback).where(FindingFeedback.finding_key == "acl_tear")).all()
        assert sorted((r.created_by, r.agree, r.answer) for r in rows) == [
            ("eve", True, "partial"),
            ("rob", True, "partial"),
        ]
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "feedback.record")).all()
        assert [(e.actor, e.old_value, e.new_value) for e in events] == [
            ("rob", None, "disagree: complete"),
            ("rob", "disagree: complete", "agree: partial"),
            ("eve", None, "agree: partial"),
        ]
        mark_read(s, entry_id=st.entry_id, actor="rob", now=NOW)
        with pytest.raises(FeedbackLocked, match="marked read"):
            record(s, study_id=st.study_id, actor="rob", answer=Answer(agree=True), now=NOW, key="meniscal_tear")
        assert study_feedback(s, st.study_id, user="rob")["locked"] is True


# ---- reading targets ----------------------------------------------------------------------------


def test_reading_targets_come_from_the_policy_and_a_site_change_wins_and_is_audited(db, policy):
    from worklists.errors import InvalidChange
    from worklists.tables import AuditEvent
    from worklists.targets import due_state, effective_targets, set_target

    assert dict(policy.targets) == {"STAT": 30.0, "URGENT": 120.0, "ROUTINE": 1440.0}
    with db.session() as s:
        with pytest.raises(InvalidChange, match="reason"):
            set_target(s, priority="URGENT", minutes=60, actor="alice", reason=" ", now=NOW)
        with pytest.raises(InvalidChange, match="1 to"):
            set_target(s, priority="URGENT", minutes=0, actor="alice", reason="x", now=NOW)
        set_target(s, priority="URGENT", minutes=60, actor="alice", reason="new SLA", now=NOW)
    with db.session() as s:
        t = effective_targets(s, policy)
        assert t["URGENT"] == 60.0 and t["ROUTINE"] == 1440.0
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "targets.change")).one()
        assert (ev.actor, ev.old_value, ev.new_value, ev.reason) == ("alice", "policy", "60 min", "new SLA")
        since = NOW - dt.timedelta(minutes=61)
        assert due_state("URGENT", since, NOW, t, read=False)["overdue"] is True
        assert due_state("URGENT", since, NOW, t, read=True)["overdue"] is False
        assert due_state("ROUTINE", since, NOW, t, read=False)["overdue"] is False


def test_policy_targets_are_validated():
    from worklists.errors import PolicyError
    from worklists.triage import parse_policy

    with pytest.raises(PolicyError, match="priority must be one of"):
        parse_policy({"targets": {"SOON": 10}})
    with pytest.raises(PolicyError, match=r"targets\.URGENT"):
        parse_policy({"targets": {"URGENT": 0}})


# ---- monitoring -------------------------------------------------------------------------------


def _history(db, policy, *, current_positive: float):
    return seed_history(
        db,
        policy,
        now=NOW,
        phases=[
            Phase(120, 56, 7.5, positive_rate=0.2, refused_rate=0.05, read_after_minutes=90),
            Phase(
                40,
                6.5,
                0.5,
                positive_rate=current_positive,
                manufacturer="GE",
                field_strength=1.5,
                pixel_spacing_mm=0.8,
                qc_distance=3.0,
            ),
        ],
    )


def test_positive_rate_inside_its_band_raises_no_alert(db, policy):
    from worklists.monitoring import report

    _history(db, policy, current_positive=0.25)
    with db.session() as s:
        rep = report(s, policy=policy, now=NOW)
    (m,) = rep["models"]
    check = next(c for c in m["checks"] if c["metric"] == "positive_rate")
    assert check["status"] == "ok" and check["band"][0] <= 0.25 <= check["band"][1]
    assert not [a for a in rep["alerts"] if a["kind"] == "positive_rate"]


def test_positive_rate_out_of_band_agreement_ppv_turnaround_and_drift(db, policy):
    from worklists.monitoring import report, wilson

    ids = _history(db, policy, current_positive=0.6)
    answer(db, ids[:120], user="rob", agree_rate=0.75, now=NOW - dt.timedelta(days=8))
    with db.session() as s:
        rep = report(s, policy=policy, now=NOW)
    (m,) = rep["models"]
    assert (m["model"], m["version"]) == ("knee.acl", "1.0.0")
    assert m["current"]["studies"] == 40 and m["reference"]["studies"] == 120
    assert m["current"]["positive"]["k"] == 24 and m["reference"]["qc_refusal"]["k"] == 6
    assert m["reference"]["qc_reasons"] == {"motion": 6}
    check = next(c for c in m["checks"] if c["metric"] == "positive_rate")
    assert check["status"] == "alert" and check["centre"] == pytest.approx(
        24 / 114
    )  # 24 positives of 114 evaluated (6 refused)
    assert check["band"][1] < 0.6
    assert any(a["kind"] == "positive_rate" and a["model"] == "knee.acl" for a in rep["alerts"])
    assert rep["status"] == "alert"

    fb = m["feedback"]
    c = fb["counts"]
    assert fb["answers"] == 114 == c["tp"] + c["fp"] + c["tn"] + c["fn"]
    assert fb["ppv"] == wilson(c["tp"], c["tp"] + c["fp"]) and fb["ppv"]["lo"] < fb["ppv"]["p"] < fb["ppv"]["hi"]
    assert fb["agreement"]["k"] == c["tp"] + c["tn"]  # a disagreement here always flips the call
    conf = m["confusion"]["acl_tear"]
    assert conf["scale"] == ["intact", "partial", "complete"]
    assert conf["rows"][2][0] == c["fp"] and conf["rows"][0][2] == c["fn"]

    ta = rep["turnaround"]["rows"]
    assert ta and all(r["priority"] in ("ROUTINE", "URGENT") for r in ta)
    assert all(r["median_minutes"] == 90.0 and r["p90_minutes"] == 90.0 for r in ta)
    routine = [r for r in ta if r["priority"] == "ROUTINE"]
    urgent = [r for r in ta if r["priority"] == "URGENT"]
    assert all(r["within_target"]["p"] == 1.0 for r in routine)  # 90 min <= 24 h
    assert all(r["within_target"]["p"] == 1.0 for r in urgent)  # 90 min <= 2 h

    (d,) = rep["drift"]
    feats = {f["feature"]: f for f in d["features"]}
    assert feats["manufacturer"]["current"]["shares"] == {"GE": 1.0}
    assert feats["manufacturer"]["distance"] == pytest.approx(1.0)
    assert (
        feats["field_strength_t"]["current"]["median"] == 1.5 and feats["field_strength_t"]["reference"]["median"] == 3
    )
    # what the QC gate measured: voxel size and embedding distance moved, the SNR did not
    px = feats["pixel_spacing_mm"]
    assert (px["current"]["median"], px["reference"]["median"], px["current"]["n"]) == (0.8, 0.4, 40)
    assert feats["qc_embedding_distance"]["current"]["median"] == 3.0 and feats["snr"]["distance"] == 0.0
    assert px["distance"] > 0.3


def test_overdue_urgent_study_raises_an_alert(db, settings, policy):
    from worklists.monitoring import report

    st = _acl_study(db, settings, policy, received_at=NOW - dt.timedelta(hours=3))
    with db.session() as s:
        rep = report(s, policy=policy, now=NOW)
    assert rep["overdue"]["counts"]["URGENT"] == 1 and rep["overdue"]["entries"][0]["study_id"] == st.study_id
    (a,) = [a for a in rep["alerts"] if a["kind"] == "overdue"]
    assert a["message"] == "1 unread URGENT study is past the reading target (120 min)"
    with db.session() as s:
        assert report(s, policy=policy, now=NOW - dt.timedelta(hours=2))["overdue"]["counts"]["URGENT"] == 0


def test_silence_and_stalled_results_are_flagged(db, policy):
    from node.db.schema import Job, Series, Study
    from worklists.monitoring import report

    ids = seed_history(db, policy, now=NOW, phases=[Phase(60, 20, 2, positive_rate=0.2)])
    assert len(ids) == 60
    with db.session() as s:
        (q,) = report(s, policy=policy, now=NOW)["silence"]
        # one study every 0.3 days; 2 days of quiet is far more than twice the usual gap
        assert q["silent"] and q["usual_gap_minutes"] == pytest.approx(0.3 * 24 * 60, rel=0.01)
        assert not q["stopped"]
        assert report(s, policy=policy, now=NOW - dt.timedelta(days=1.6))["silence"][0]["silent"] is False
        # two routed studies arrive and no job finishes for them
        for h in (3, 2):
            at = NOW - dt.timedelta(hours=h)
            st = Study(study_uid=f"1.2.3.{h}", first_received_at=at, last_received_at=at)
            s.add(st)
            s.flush()
            s.add(Series(study_id=st.id, series_uid=f"1.2.3.{h}.1", pipeline="knee", first_received_at=at))
            s.add(Job(study_id=st.id, pipeline="knee", state="failed", created_at=at))
        s.flush()
        rep = report(s, policy=policy, now=NOW)
    (q,) = rep["silence"]
    assert q["stopped"] and q["stalled_studies"] == 2 and not q["silent"]
    assert any(a["kind"] == "no_results" for a in rep["alerts"])


@pytest.mark.slow
def test_msknode_monitor_json_exits_3_on_an_alert_and_0_without(settings, db, policy, capsys):
    def run(*args: str):
        return msknode(capsys, "monitor", *args, MSKNODE_DATA_DIR=settings.data_dir)

    r = run("--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "ok"
    now = dt.datetime.now(dt.UTC)
    seed_history(
        db,
        policy,
        now=now,
        phases=[Phase(100, 50, 7.5, positive_rate=0.1, read_after_minutes=60), Phase(30, 6, 0.5, positive_rate=0.7)],
    )
    r = run("--json")
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "alert"
    assert any(a["kind"] == "positive_rate" and a["model"] == "knee.acl" for a in out["alerts"])
    r = run()
    assert r.returncode == 3 and "ALERT positive_rate: knee.acl 1.0.0: positive rate 70.0 %" in r.stdout


def test_each_model_version_shows_its_deployment_state(db, policy):
    from node.db.schema import ModelDeployment
    from worklists.monitoring import report

    seed_history(db, policy, now=NOW, phases=[Phase(12, 3, 1, positive_rate=0.5)], version="1.1.0")
    seed_history(db, policy, now=NOW, phases=[Phase(12, 3, 1, positive_rate=0.5)], version="1.0.0", seed=2)
    with db.session() as s:
        s.add(
            ModelDeployment(
                pipeline="knee",
                model_name="knee.acl",
                version="1.1.0",
                weights_sha256="cd" * 32,
                state="shadow",
                changed_by="alice",
            )
        )
        s.flush()
        models = {m["version"]: m for m in report(s, policy=policy, now=NOW)["models"]}
    assert models["1.1.0"]["deployment"] == ["shadow (knee)"] and models["1.0.0"]["deployment"] == []
    assert models["1.1.0"]["current"]["studies"] == 12 == models["1.0.0"]["current"]["studies"]


@pytest.mark.unit
def test_the_worker_keeps_what_the_qc_gate_measured_on_an_accepted_input():
    from models.types import Finding, ModelOutput, PipelineOutput, QCResult
    from node.jobs.runner import findings_from_output
    from support.results_data import model

    qc = QCResult(True, metrics={"pixel_spacing_mm": 0.5, "snr": 21.5, "anatomy_distance": float("inf")})
    f = Finding(code="acl_tear", label="ACL tear", probability=0.2, uncertainty=0.05, positive=False)
    out = PipelineOutput(
        pipeline="knee", outputs=[ModelOutput(model("knee.acl"), "1.2.3", qc, [f])], superres=[], used_series={}
    )
    (row,) = findings_from_output(out)
    assert row.details["qc_metrics"] == {"pixel_spacing_mm": 0.5, "snr": 21.5}  # JSON has no infinity


def test_metrics_serve_the_last_report_and_refresh_it_in_the_background(settings, db, policy):
    """A scrape does not recompute the monitoring report: it is served from the last one (its age in
    msknode_monitor_report_age_seconds) and recomputed in a background thread once older than
    MSKNODE_MONITOR_REFRESH_SECONDS; the next scrape after that shows the new state."""
    import threading
    import time

    from node.ops import monitor_metrics
    from node.ops.metrics import render

    def age(text: str) -> float:
        (line,) = [x for x in text.splitlines() if x.startswith("msknode_monitor_report_age_seconds ")]
        return float(line.split()[1])

    s = settings.model_copy(update={"monitor_refresh_seconds": 3600.0})
    monitor_metrics._CACHE.clear()
    first = render(s, db)[0].decode()
    assert "msknode_monitor_status 0.0" in first and age(first) == 0.0
    now = dt.datetime.now(dt.UTC)
    seed_history(
        db,
        policy,
        now=now,
        phases=[Phase(100, 50, 7.5, positive_rate=0.1, read_after_minutes=60), Phase(30, 6, 0.5, positive_rate=0.7)],
    )
    assert "msknode_monitor_status 0.0" in render(s, db)[0].decode()  # younger than the refresh age: as it was
    s = settings.model_copy(update={"monitor_refresh_seconds": 0.0})
    stale = render(s, db)[0].decode()  # answered from the previous report while a thread computes the new one
    assert "msknode_monitor_status 0.0" in stale
    assert age(stale) > 0
    deadline = time.monotonic() + 60
    while any(t.name == "monitor-report" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    fresh = render(s, db)[0].decode()
    assert "msknode_monitor_status 1.0" in fresh
    assert 'msknode_model_check_alert{check="positive_rate",model="knee.acl",version="1.0.0"} 1.0' in fresh
    monitor_metrics._CACHE.clear()
