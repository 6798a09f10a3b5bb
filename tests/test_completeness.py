"""Completeness and job creation against index rows written as the listener writes them (C1)."""

from __future__ import annotations

import hashlib
import threading

import pytest
from sqlalchemy import func, select

from node.db.database import Database
from node.db.schema import Association, Instance, Job, JobInput, Series, Study
from node.intake.completeness import check_positions, count_reached, input_fingerprint, tick
from node.intake.routing import load_rules
from support.index_rows import add_instances, at, make_series, make_study, open_association, release, send_series

pytestmark = pytest.mark.unit

Q = 0.5  # quiet seconds
SQ = 0.5  # study quiet seconds


@pytest.fixture
def cfg(settings):
    return settings.model_copy(update={"quiet_seconds": Q, "study_quiet_seconds": SQ, "network_timeout": 5.0})


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def anydb(request, db):
    """The same test on the embedded SQLite and on PostgreSQL (the session's server)."""
    if request.param == "sqlite":
        yield db
        return
    pg = Database(request.getfixturevalue("postgres_url"))
    try:
        yield pg
    finally:
        pg.dispose()


@pytest.fixture
def rules(cfg):
    return load_rules(cfg.routing_rules)


def run(db, cfg, rules, seconds):
    with db.session() as s:
        return tick(s, cfg, at(seconds), rules)


def state_of(db, series_uid):
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == series_uid))
        return se.state, se.pipeline, se.role, se.completed_reason


def jobs_of(db):
    with db.session() as s:
        return [
            (j.id, j.state, j.pipeline, j.supersedes_job_id, sorted((i.series.series_uid, i.role) for i in j.inputs))
            for j in s.scalars(select(Job).order_by(Job.id))
        ]


# ---- series completeness -----------------------------------------------------------
def test_series_completes_after_quiet_period_following_release(anydb, cfg, rules):
    db = anydb
    with db.session() as s:
        st = make_study(s)
        se = make_series(s, st, description="pd_tse_fs_sag")
        a = open_association(s)
        add_instances(s, se, 40, association=a, now=at(0))
        uid_ = se.series_uid
    # association open: however long nothing arrives (below the network timeout), not complete
    run(db, cfg, rules, 3.0)
    assert state_of(db, uid_)[0] == "receiving"
    with db.session() as s:
        release(s, s.get(Association, a.id), now=at(3.0), quiet_seconds=Q)
    run(db, cfg, rules, 3.0 + Q - 0.01)
    assert state_of(db, uid_)[0] == "receiving"
    run(db, cfg, rules, 3.0 + Q)
    assert state_of(db, uid_) == ("complete", "knee", "sag_fluid", "quiet")
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == uid_))
        assert se.completed_instances == 40 and se.completed_at == at(3.0 + Q)
        assert se.routing_rule == "knee sagittal fat-suppressed PD/T2 or STIR"


def test_announced_count_without_gap_completes_while_association_open(anydb, cfg, rules):
    db = anydb
    with db.session() as s:
        st = make_study(s)
        se = make_series(s, st, description="Sag PD FSE FS", expected=40)
        a = open_association(s)
        add_instances(s, se, 39, association=a, now=at(0))
        uid_ = se.series_uid
    run(db, cfg, rules, 0.1)
    assert state_of(db, uid_)[0] == "receiving"
    with db.session() as s:
        add_instances(s, s.get(Series, se.id), 1, association=s.get(Association, a.id), now=at(0.2), start=39)
    run(db, cfg, rules, 0.2)
    assert state_of(db, uid_) == ("complete", "knee", "sag_fluid", "count")


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"no_position": (17,)}, "a slice without ImagePositionPatient"),
        ({"skip_positions": (20,)}, "a gap in the slice positions"),
    ],
)
def test_missing_slice_position_waits_for_quiet_period(db, cfg, rules, kwargs, why):
    with db.session() as s:
        st = make_study(s)
        se = make_series(s, st, description="Sag PD FSE FS", expected=40)
        a = open_association(s)
        add_instances(s, se, 40, association=a, now=at(0), **kwargs)
        uid_ = se.series_uid
    run(db, cfg, rules, 1.0)
    assert state_of(db, uid_)[0] == "receiving", why
    with db.session() as s:
        release(s, s.get(Association, a.id), now=at(1.0), quiet_seconds=Q)
    run(db, cfg, rules, 1.0 + Q)
    assert state_of(db, uid_)[:2] == ("complete", "knee")
    assert state_of(db, uid_)[3] == "quiet"


def test_check_positions():
    ori = "1\\0\\0\\0\\1\\0"  # axial: normal along z
    rows = [(f"0\\0\\{z * 2.5}", ori, None) for z in range(10)]
    assert check_positions(rows, 10).complete
    assert not check_positions(rows[:9], 10).complete
    assert not check_positions(rows[:4] + rows[5:] + [rows[0]], 10).complete  # duplicate + missing
    gap = [(f"0\\0\\{z * 2.5}", ori, None) for z in list(range(5)) + list(range(6, 11))]
    assert check_positions(gap, 10).reason == "a gap in the slice positions"
    two_echoes = rows + [(f"0\\0\\{z * 2.5}", ori, None) for z in range(10)]
    assert check_positions(two_echoes, 20).complete
    mixed = rows[:9] + [("0\\0\\22.5", "0\\1\\0\\0\\0\\-1", None)]
    assert check_positions(mixed, 10).reason == "mixed orientations"
    # a 3-plane localizer announcing 9 images: complete by count when every plane has its 3 slices, no gap
    planes = ("0\\1\\0\\0\\0\\-1", "1\\0\\0\\0\\0\\-1", "1\\0\\0\\0\\1\\0")  # sagittal, coronal, axial
    localizer = [
        (f"{8 * k * (i == 0)}\\{8 * k * (i == 1)}\\{8 * k * (i == 2)}", o, None)
        for i, o in enumerate(planes)
        for k in range(3)
    ]
    assert check_positions(localizer, 9).complete
    assert not check_positions(localizer[:8], 9).complete
    unequal = localizer[:3] + localizer[3:5] + localizer[6:] + [(f"0\\0\\{8 * 3}", planes[2], None)]
    assert check_positions(unequal, 9).reason == "mixed orientations"  # 3 + 2 + 4: a plane may be incomplete
    holed = localizer[:6] + [(f"0\\0\\{z}", planes[2], None) for z in (0, 8, 40)]
    assert check_positions(holed, 9).reason == "a gap in the slice positions"
    assert check_positions([("", "", 40)], 40).complete  # one enhanced multi-frame object
    assert not check_positions([(None, ori, None)] + rows[1:], 10).complete
    quoted = [(f"'0.0'\\'0.0'\\'{z * 2.5}'", "'1.0'\\'0.0'\\'0.0'\\'0.0'\\'1.0'\\'0.0'", None) for z in range(10)]
    assert check_positions(quoted, 10).complete  # decimal strings written with their quotes
    assert check_positions([("0\\0\\x", ori, None)] + rows[1:], 10).reason == "an instance has no slice position"


def test_lost_association_is_closed_and_its_series_completes(anydb, cfg, rules):
    db = anydb
    with db.session() as s:
        st = make_study(s)
        se = make_series(s, st, description="t2_tse_fs_sag")
        a = open_association(s, now=at(0))
        add_instances(s, se, 12, association=a, now=at(1.0))
        uid_, aid = se.series_uid, a.id
    run(db, cfg, rules, 1.0 + cfg.network_timeout - 0.1)
    with db.session() as s:
        assert s.get(Association, aid).ended_at is None
    run(db, cfg, rules, 1.0 + cfg.network_timeout)
    with db.session() as s:
        assoc = s.get(Association, aid)
        assert assoc.end_reason == "lost"
        assert s.scalar(select(Series.state).where(Series.series_uid == uid_)) == "receiving"
    run(db, cfg, rules, 1.0 + cfg.network_timeout + Q)
    assert state_of(db, uid_)[0] == "complete"


# ---- study → job -------------------------------------------------------------------
def study_with(db, *series: dict, description: str | None = None, t: float = 0.0) -> tuple[int, str, list[str]]:
    """A study and its series as the listener stores them (one dict of `send_series` keywords per
    series, in order); returns (study id, study uid, series uids)."""
    with db.session() as s:
        st = make_study(s, description=description, now=at(t))
        uids = [send_series(s, st, **kw).series_uid for kw in series]
        return st.id, st.study_uid, uids


def add_series(db, study: int | str, **kw) -> str:
    """One more series for a study (its id or uid) arriving later; returns its uid."""
    with db.session() as s:
        st = s.get(Study, study) if isinstance(study, int) else s.scalar(select(Study).where(Study.study_uid == study))
        return send_series(s, st, **kw).series_uid


def finish(db, job_id: int) -> None:
    """What the worker does when it has finished a job: the job and its queued series are done."""
    with db.session() as s:
        s.get(Job, job_id).state = "done"
        for se in s.scalars(select(Series).where(Series.state == "queued")):
            se.state = "done"


def knee_study(db, *, t=0.0):
    _, study_uid, (loc, sag, cor) = study_with(
        db,
        dict(description="localizer", count=3, now=at(t), number=1),
        dict(description="PD_TSE_FS_SAG", count=30, now=at(t + 0.1), number=2),
        dict(description="t1_tse_cor", count=24, now=at(t + 0.2), number=3),
        description="MR KNEE LEFT",
        t=t,
    )
    return study_uid, loc, sag, cor


def test_three_series_knee_study_yields_exactly_one_job(anydb, cfg, rules):
    db = anydb
    _study_uid, loc, sag, cor = knee_study(db)
    assert run(db, cfg, rules, 0.2 + Q) == []  # series complete, study not settled yet
    assert [state_of(db, u)[:3] for u in (loc, sag, cor)] == [
        ("complete", "knee", "localizer"),
        ("complete", "knee", "sag_fluid"),
        ("complete", "knee", "cor_t1"),
    ]
    assert run(db, cfg, rules, 0.2 + Q + SQ - 0.01) == []
    created = run(db, cfg, rules, 0.2 + Q + SQ)
    assert len(created) == 1
    for t in (2.0, 3.0, 10.0):
        assert run(db, cfg, rules, t) == []
    [(job_id, state, pipeline, supersedes, inputs)] = jobs_of(db)
    assert (job_id, state, pipeline, supersedes) == (created[0], "queued", "knee", None)
    assert inputs == sorted([(sag, "sag_fluid"), (cor, "cor_t1")])  # the localizer is never an input
    assert [state_of(db, u)[0] for u in (loc, sag, cor)] == ["complete", "queued", "queued"]
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.enqueue_pending is True and job.max_attempts == cfg.job_max_attempts
        uids = s.scalars(select(Instance.sop_instance_uid).join(Series).where(Series.series_uid.in_([sag, cor]))).all()
        assert len(uids) == 54
        assert job.input_fingerprint == input_fingerprint("knee", uids)
        assert (
            job.input_fingerprint
            == hashlib.sha256(("knee" + "".join("\n" + u for u in sorted(uids))).encode()).hexdigest()
        )


def test_study_waits_for_a_series_still_receiving(db, cfg, rules):
    with db.session() as s:
        st = make_study(s)
        sag = send_series(s, st, description="sag pd fs", count=20, now=at(0))
        cor = make_series(s, st, description="Cor PD FS")
        a = open_association(s, now=at(0.5))
        add_instances(s, cor, 10, association=a, now=at(0.5))
        aid, cor_id = a.id, cor.id
    assert run(db, cfg, rules, 5.0) == []
    assert state_of(db, sag.series_uid)[0] == "complete"
    with db.session() as s:
        add_instances(s, s.get(Series, cor_id), 10, association=s.get(Association, aid), now=at(5.0), start=10)
        release(s, s.get(Association, aid), now=at(5.0), quiet_seconds=Q)
    assert run(db, cfg, rules, 5.0 + Q) == []  # cor complete now; study quiet period starts
    created = run(db, cfg, rules, 5.0 + Q + SQ)
    assert len(created) == 1
    [(_, _, _, _, inputs)] = jobs_of(db)
    assert sorted(r for _, r in inputs) == ["cor_fluid", "sag_fluid"]


def test_late_series_supersedes_processed_job(anydb, cfg, rules):
    db = anydb
    study_uid, _loc, sag, cor = knee_study(db)
    [first] = run(db, cfg, rules, 2.0)
    finish(db, first)
    ax_uid = add_series(db, study_uid, description="pd_tse_fs_tra", count=25, now=at(60.0), number=4)
    assert run(db, cfg, rules, 60.0 + Q) == []
    [second] = run(db, cfg, rules, 60.0 + Q + SQ)
    jobs = jobs_of(db)
    assert [(j[0], j[1], j[3]) for j in jobs] == [(first, "done", None), (second, "queued", first)]
    assert jobs[1][4] == sorted([(sag, "sag_fluid"), (cor, "cor_t1"), (ax_uid, "ax_fluid")])
    assert [state_of(db, u)[0] for u in (sag, cor, ax_uid)] == ["queued"] * 3
    assert run(db, cfg, rules, 100.0) == []


def test_late_series_replaces_a_job_still_queued(anydb, cfg, rules):
    db = anydb
    study_uid, _loc, _sag, _cor = knee_study(db)
    [first] = run(db, cfg, rules, 2.0)
    add_series(db, study_uid, description="Ax T2 FS", count=25, now=at(3.0), number=4)
    [second] = run(db, cfg, rules, 3.0 + Q + SQ)
    jobs = jobs_of(db)
    assert [(j[0], j[1]) for j in jobs] == [(first, "superseded"), (second, "queued")]
    assert jobs[1][3] == first
    with db.session() as s:
        assert s.get(Job, first).enqueue_pending is False
    assert len(jobs[1][4]) == 3


def test_late_instances_reopen_a_series_and_the_study(anydb, cfg, rules):
    db = anydb
    _study_uid, _loc, sag, _cor = knee_study(db)
    [first] = run(db, cfg, rules, 2.0)
    with db.session() as s:
        s.get(Job, first).state = "done"
        se = s.scalar(select(Series).where(Series.series_uid == sag))
        se.state = "done"
        a = open_association(s, now=at(30.0))
        add_instances(s, se, 2, association=a, now=at(30.0), start=30)
        aid = a.id
    run(db, cfg, rules, 30.1)
    assert state_of(db, sag)[0] == "receiving"
    with db.session() as s:
        release(s, s.get(Association, aid), now=at(31.0), quiet_seconds=Q)
    run(db, cfg, rules, 31.0 + Q)
    assert state_of(db, sag)[:3] == ("complete", "knee", "sag_fluid")
    [second] = run(db, cfg, rules, 31.0 + Q + SQ)
    assert jobs_of(db)[1][:4] == (second, "queued", "knee", first)


def test_identical_resend_makes_no_second_job(db, cfg, rules):
    _study_uid, _loc, sag, _cor = knee_study(db)
    [first] = run(db, cfg, rules, 2.0)
    with db.session() as s:
        s.get(Job, first).state = "done"
        se = s.scalar(select(Series).where(Series.series_uid == sag))
        se.state = "done"
        # a PACS resends the same objects: the listener stores nothing new, but the series is
        # seen as receiving again (counted twice by a naive listener would also re-open it)
        se.state = "receiving"
        se.completed_instances = None
        se.quiet_deadline = at(20.0)
    assert run(db, cfg, rules, 20.0 + SQ) == []
    assert len(jobs_of(db)) == 1
    assert state_of(db, sag)[0] == "done"


def test_non_mr_and_own_objects_are_never_routed(anydb, cfg, rules):
    db = anydb
    _, _, uids = study_with(
        db,
        dict(description="Knee 1.0 Bone", modality="CT", count=5),
        dict(description="SAG PD FS", count=5, own_object=True),
        dict(description="SAG PD FS", count=5, series_uid=cfg.uid_root + "5.6.7"),
        dict(description="SAG PD FS", count=5, manufacturer="msknode"),
        dict(description="msknode findings", modality="SR", count=1),
    )
    assert run(db, cfg, rules, 5.0) == []
    assert run(db, cfg, rules, 10.0) == []
    states = [state_of(db, u) for u in uids]
    assert all(st[:3] == ("unrouted", None, None) for st in states), states
    with db.session() as s:
        reasons = s.scalars(select(Series.routing_rule).order_by(Series.id)).all()
    assert reasons == [
        "unrouted:no_rule",
        "unrouted:own_object",
        "unrouted:own_object",
        "unrouted:own_object",
        "unrouted:no_rule",
    ]
    assert jobs_of(db) == []


def test_own_objects_do_not_hold_or_reopen_a_study(db, cfg, rules):
    study_uid, _loc, _sag, _cor = knee_study(db)
    [first] = run(db, cfg, rules, 2.0)
    with db.session() as s:
        s.get(Job, first).state = "done"
        st = s.scalar(select(Study).where(Study.study_uid == study_uid))
        # our SR and SEG forwarded back by the PACS
        send_series(
            s, st, description="AI findings", modality="SR", count=1, series_uid=cfg.uid_root + "9.1", now=at(20)
        )
        send_series(s, st, description="SAG PD FS superres", count=30, own_object=True, now=at(20))
    assert run(db, cfg, rules, 30.0) == []
    assert len(jobs_of(db)) == 1


def test_localizer_without_anatomy_gets_it_from_the_study(db, cfg, rules):
    study_id, _, [loc_uid] = study_with(
        db, dict(description="3 Plane Loc", body_part="", count=3, now=at(0))
    )  # no study description
    run(db, cfg, rules, Q)  # only the localizer so far: anatomy unknown
    assert state_of(db, loc_uid)[:2] == ("unrouted", None)
    sag = add_series(db, study_id, description="Sag PD FSE FS", body_part="KNEE", count=20, now=at(1.0))
    [_job] = run(db, cfg, rules, 1.0 + Q + SQ)
    assert state_of(db, loc_uid)[:3] == ("complete", "knee", "localizer")
    assert jobs_of(db)[0][4] == [(sag, "sag_fluid")]


def test_two_anatomies_in_one_study_make_one_job_each(db, cfg, rules):
    study_with(
        db,
        dict(description="SAG PD FS", body_part="KNEE", count=10),
        dict(description="COR OBL T2 FS", body_part="SHOULDER", count=10),
    )
    created = run(db, cfg, rules, Q + SQ)
    assert sorted(j[2] for j in jobs_of(db)) == ["knee", "shoulder"] and len(created) == 2


def test_timers_survive_a_restart(db, settings, cfg, rules):
    """The quiet timers are columns: a fresh process (new engine) completes the series once."""
    _study_uid, _loc, sag, _cor = knee_study(db)
    run(db, cfg, rules, 0.3)  # mid quiet period: nothing complete
    assert state_of(db, sag)[0] == "receiving"
    db.dispose()
    restarted = Database(settings.database_url)
    try:
        created = run(restarted, cfg, rules, 0.2 + Q + SQ)
        assert len(created) == 1
        assert run(restarted, cfg, rules, 5.0) == []
        assert len(jobs_of(restarted)) == 1
    finally:
        restarted.dispose()


def tick_concurrently(settings, cfg, rules, times, engines: int = 4) -> list[int]:
    """``engines`` threads, each with its own engine, tick at each of ``times`` from the same instant;
    returns every job id the ticks created."""
    dbs = [Database(settings.database_url, migrate=False) for _ in range(engines)]
    barrier = threading.Barrier(len(dbs))
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def worker(d):
        try:
            barrier.wait()
            for t in times:
                with d.session() as s:
                    results.append(tick(s, cfg, at(t), rules))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(d,)) for d in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for d in dbs:
        d.dispose()
    assert not errors, errors
    return [j for r in results for j in r]


def test_concurrent_ticks_create_one_job(db, settings, cfg, rules):
    """Several threads with their own engines tick the same SQLite database at the same instant."""
    for _ in range(4):
        knee_study(db, t=0.0)
    created = tick_concurrently(settings, cfg, rules, (0.2 + Q, 0.2 + Q + SQ, 0.2 + Q + SQ + 0.1, 3.0))
    assert len(created) == 4 and len(set(created)) == 4
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 4
        per_study = s.execute(select(Job.study_id, func.count()).group_by(Job.study_id)).all()
        assert all(n == 1 for _, n in per_study)
        assert s.scalar(select(func.count()).select_from(JobInput)) == 8


# ---- protocol-aware settling ----------------------------------------------------------
LONG_SQ = 60.0  # a study quiet period long enough that only the protocol can settle the study early


@pytest.fixture
def proto_cfg(cfg):
    return cfg.model_copy(
        update={"study_quiet_seconds": LONG_SQ, "study_protocols": {"knee": ["cor_fluid", "sag_fluid"]}}
    )


def test_protocol_complete_settles_the_study_without_the_quiet_period(anydb, proto_cfg, rules):
    db = anydb
    study_id, _, [sag] = study_with(
        db, dict(description="PD_TSE_FS_SAG", count=30, now=at(0), number=2), description="MR KNEE LEFT"
    )
    assert run(db, proto_cfg, rules, Q) == []  # sagittal complete; the coronal of the protocol is missing
    assert state_of(db, sag)[:3] == ("complete", "knee", "sag_fluid")
    assert run(db, proto_cfg, rules, 20.0) == []
    # the coronal comes in a second association
    cor = add_series(db, study_id, description="PD_TSE_FS_COR", count=24, now=at(20.0), number=3)
    assert run(db, proto_cfg, rules, 20.0 + Q - 0.01) == []  # the series itself still in its quiet period
    [job] = run(db, proto_cfg, rules, 20.0 + Q)  # complete: the protocol is whole, no study quiet period
    for t in (21.0, 20.0 + Q + LONG_SQ, 200.0):
        assert run(db, proto_cfg, rules, t) == []
    [(job_id, state, pipeline, supersedes, inputs)] = jobs_of(db)
    assert (job_id, state, pipeline, supersedes) == (job, "queued", "knee", None)
    assert inputs == sorted([(sag, "sag_fluid"), (cor, "cor_fluid")])


def test_a_missing_protocol_role_waits_for_the_quiet_period(anydb, proto_cfg, rules):
    db = anydb
    study_with(
        db,
        dict(description="PD_TSE_FS_SAG", count=30, now=at(0), number=2),
        dict(description="t1_tse_cor", count=24, now=at(0.2), number=3),
    )  # cor_t1, not cor_fluid
    assert run(db, proto_cfg, rules, 0.2 + Q) == []
    assert run(db, proto_cfg, rules, 0.2 + Q + LONG_SQ - 0.01) == []
    assert len(run(db, proto_cfg, rules, 0.2 + Q + LONG_SQ)) == 1
    assert sorted(r for *_, r in jobs_of(db)[0][4]) == ["cor_t1", "sag_fluid"]


def test_a_pipeline_without_a_protocol_waits_for_the_quiet_period(db, proto_cfg, rules):
    study_with(db, dict(description="COR OBL T2 FS", body_part="SHOULDER", count=20, now=at(0)))
    assert run(db, proto_cfg, rules, Q) == []  # the protocol is the knee's; the shoulder waits as before
    assert [j[2] for j in jobs_of(db)] == []
    assert len(run(db, proto_cfg, rules, Q + LONG_SQ)) == 1


def test_after_the_protocol_job_an_extra_series_waits_for_the_quiet_period(anydb, proto_cfg, rules):
    db = anydb
    study_id, _, _ = study_with(
        db,
        dict(description="PD_TSE_FS_SAG", count=30, now=at(0), number=2),
        dict(description="PD_TSE_FS_COR", count=24, now=at(0.1), number=3),
    )
    [first] = run(db, proto_cfg, rules, 0.1 + Q)
    finish(db, first)
    ax = add_series(db, study_id, description="pd_tse_fs_tra", count=25, now=at(30.0), number=4)
    assert run(db, proto_cfg, rules, 30.0 + Q) == []  # outside the protocol: the study quiet period again
    assert state_of(db, ax)[:3] == ("complete", "knee", "ax_fluid")
    assert run(db, proto_cfg, rules, 30.0 + Q + LONG_SQ - 0.01) == []
    [second] = run(db, proto_cfg, rules, 30.0 + Q + LONG_SQ)
    assert [(j[0], j[1], j[3]) for j in jobs_of(db)] == [(first, "done", None), (second, "queued", first)]
    # a repeated protocol series (e.g. after motion) settles at once again
    finish(db, second)
    add_series(db, study_id, description="PD_TSE_FS_SAG repeat", count=30, now=at(200.0), number=5)
    [third] = run(db, proto_cfg, rules, 200.0 + Q)
    assert jobs_of(db)[2][:4] == (third, "queued", "knee", second)
    assert len(jobs_of(db)[2][4]) == 4


def test_a_protocol_complete_study_is_settled_while_its_sender_is_still_connected(anydb, proto_cfg, rules):
    """Series complete by their announced count while the sender still holds its association open (as
    Orthanc does for DicomAssociationCloseDelay) and a localizer is still arriving on it: the protocol
    is whole, so the job is made at once; the localizer, once complete, changes nothing."""
    db = anydb
    with db.session() as s:
        st = make_study(s, description="MR KNEE LEFT")
        loc = make_series(s, st, description="localizer", number=1)
        sag = make_series(s, st, description="Sag PD FSE FS", expected=20, number=2)
        cor = make_series(s, st, description="Cor PD FSE FS", expected=20, number=3)
        a = open_association(s, now=at(0))
        add_instances(s, loc, 2, association=a, now=at(0))
        add_instances(s, sag, 20, association=a, now=at(0))
        add_instances(s, cor, 20, association=a, now=at(0.1))
        aid, ids, uids = a.id, (loc.id, sag.id, cor.id), (loc.series_uid, sag.series_uid, cor.series_uid)
    [job] = run(db, proto_cfg, rules, 0.2)  # still connected, the localizer still receiving: settled all the same
    assert [state_of(db, u)[0] for u in uids] == ["receiving", "queued", "queued"]
    assert jobs_of(db) == [(job, "queued", "knee", None, sorted([(uids[1], "sag_fluid"), (uids[2], "cor_fluid")]))]
    with db.session() as s:
        assert s.get(Association, aid).ended_at is None
        add_instances(s, s.get(Series, ids[0]), 1, association=s.get(Association, aid), now=at(0.5), start=2)
        release(s, s.get(Association, aid), now=at(1.5), quiet_seconds=Q)
    for t in (1.0, 1.5 + Q, 1.5 + Q + LONG_SQ, 200.0):
        assert run(db, proto_cfg, rules, t) == []
    assert state_of(db, uids[0])[:3] == ("complete", "knee", "localizer")
    assert jobs_of(db) == [(job, "queued", "knee", None, sorted([(uids[1], "sag_fluid"), (uids[2], "cor_fluid")]))]


def test_a_series_outside_the_protocol_still_arriving_supersedes_the_protocol_job(db, proto_cfg, rules):
    """The protocol job does not wait for an axial (not in the site's protocol) arriving on the same
    association; the axial, once complete, settles by the quiet period and its job supersedes."""
    with db.session() as s:
        st = make_study(s, description="MR KNEE LEFT")
        sag = make_series(s, st, description="Sag PD FSE FS", expected=20, number=2)
        cor = make_series(s, st, description="Cor PD FSE FS", expected=20, number=3)
        ax = make_series(s, st, description="Ax PD FSE FS", expected=20, number=4)
        a = open_association(s, now=at(0))
        add_instances(s, sag, 20, association=a, now=at(0))
        add_instances(s, cor, 20, association=a, now=at(0.1))
        add_instances(s, ax, 5, association=a, now=at(0.1))
        aid, ax_id = a.id, ax.id
    [first] = run(db, proto_cfg, rules, 0.2)
    with db.session() as s:
        add_instances(s, s.get(Series, ax_id), 15, association=s.get(Association, aid), now=at(0.4), start=5)
    assert run(db, proto_cfg, rules, 0.4) == []  # the axial complete (count): outside the protocol, quiet period
    assert run(db, proto_cfg, rules, 0.4 + LONG_SQ - 0.01) == []
    [second] = run(db, proto_cfg, rules, 0.4 + LONG_SQ)
    jobs = jobs_of(db)
    assert [(j[0], j[1], j[3]) for j in jobs] == [(first, "superseded", None), (second, "queued", first)]
    assert sorted(r for _, r in jobs[1][4]) == ["ax_fluid", "cor_fluid", "sag_fluid"]


def test_count_reached_names_the_series_the_tick_will_find_complete(anydb, cfg, rules):
    """The completeness watch's question: receiving series at their announced count (and nothing else)."""
    db = anydb
    with db.session() as s:
        st = make_study(s)
        whole = make_series(s, st, description="Sag PD FSE FS", expected=20)
        short = make_series(s, st, description="Cor PD FSE FS", expected=20)
        unannounced = make_series(s, st, description="Ax PD FSE FS")
        holey = make_series(s, st, description="Sag T1", expected=20)
        a = open_association(s)
        add_instances(s, whole, 20, association=a)
        add_instances(s, short, 19, association=a)
        add_instances(s, unannounced, 20, association=a)
        add_instances(s, holey, 20, association=a, no_position=(7,))
        ids = {n: se.id for n, se in (("whole", whole), ("short", short), ("holey", holey))}
    assert count_reached(db.engine) == {(ids["whole"], 20), (ids["holey"], 20)}
    run(db, cfg, rules, 0.1)  # the whole one completes; the one with a slice lacking its position waits
    assert count_reached(db.engine) == {(ids["holey"], 20)}
    with db.session() as s:
        add_instances(s, s.get(Series, ids["short"]), 1, association=s.get(Association, a.id), start=19)
    assert count_reached(db.engine) == {(ids["holey"], 20), (ids["short"], 20)}


def test_concurrent_ticks_create_one_job_when_the_protocol_settles(db, settings, cfg, rules):
    """Several engines tick at the same instant the protocol becomes whole: one job per study."""
    pcfg = cfg.model_copy(update={"study_quiet_seconds": LONG_SQ, "study_protocols": {"knee": ["sag_fluid", "cor_t1"]}})
    for _ in range(4):
        knee_study(db, t=0.0)
    created = tick_concurrently(settings, pcfg, rules, (0.2 + Q, 0.2 + Q + 0.1, 3.0, 0.2 + Q + LONG_SQ))
    assert len(created) == 4 and len(set(created)) == 4
    with db.session() as s:
        per_study = s.execute(select(Job.study_id, func.count()).group_by(Job.study_id)).all()
        assert len(per_study) == 4 and all(n == 1 for _, n in per_study)
        assert s.scalar(select(func.count()).select_from(JobInput)) == 8


@pytest.mark.parametrize(
    "value, expected",
    [
        ('{"knee": ["sag_fluid", "cor_fluid"]}', {"knee": ["cor_fluid", "sag_fluid"]}),
        (
            "knee=sag_fluid,cor_fluid; shoulder=cor_fluid",
            {"knee": ["cor_fluid", "sag_fluid"], "shoulder": ["cor_fluid"]},
        ),
        ("", {}),
    ],
)
def test_study_protocols_setting(monkeypatch, tmp_path, value, expected):
    from node.settings import load_settings

    monkeypatch.setenv("MSKNODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MSKNODE_STUDY_PROTOCOLS", value)
    assert load_settings().study_protocols == expected


@pytest.mark.parametrize(
    "value, why",
    [
        ("hip=sag_fluid", "'hip' is not a pipeline"),
        ("knee=sag_t2", "'sag_t2' is not an input role of knee"),
        ("knee=localizer", "'localizer' is not an input role of knee"),
        ("knee=", "list at least one role"),
        ("knee sag_fluid", "is not PIPELINE=ROLE,ROLE"),
        ('{"knee": ', "not valid JSON"),
    ],
)
def test_an_invalid_study_protocol_is_refused_with_a_reason(monkeypatch, tmp_path, value, why):
    from node.errors import SettingsError
    from node.settings import load_settings

    monkeypatch.setenv("MSKNODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MSKNODE_STUDY_PROTOCOLS", value)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert "MSKNODE_STUDY_PROTOCOLS" in str(e.value) and why in str(e.value), str(e.value)
