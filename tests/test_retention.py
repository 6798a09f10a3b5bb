"""Retention: only delivered studies older than MSKNODE_RETENTION_DAYS are purged."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.db.database import utcnow
from node.db.schema import Instance, Job, JobInput, OutboxItem, ResultObject, Series, Study
from node.ops.retention import purge
from support.cli import msknode
from support.index_rows import uid

pytestmark = pytest.mark.unit

DAY = dt.timedelta(days=1)


def make_processed_study(
    s,
    settings,
    *,
    delivered_days_ago: float | None = 40.0,
    outbox_states=("sent",),
    job_state: str = "done",
    series_state: str = "done",
    with_localizer: bool = True,
    with_results: bool = True,
) -> str:
    """A knee study with stored files, a job, result objects and outbox items in the given states."""
    now = utcnow()
    st = Study(study_uid=uid(), first_received_at=now - 50 * DAY, last_received_at=now - 50 * DAY)
    s.add(st)
    s.flush()
    series = []
    specs = [("sag_fluid", series_state, 4)] + ([("localizer", "complete", 2)] if with_localizer else [])
    for role, state, n in specs:
        se = Series(
            study_id=st.id,
            series_uid=uid(),
            modality="MR",
            state=state,
            pipeline="knee",
            role=role,
            instances=n,
            completed_instances=n,
        )
        s.add(se)
        s.flush()
        for i in range(n):
            rel = Path(st.study_uid) / se.series_uid / f"{i}.dcm"
            path = settings.store_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(64))
            s.add(
                Instance(
                    series_id=se.id,
                    sop_instance_uid=uid(),
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(rel),
                    size=196,
                )
            )
        series.append(se)
    job = Job(
        study_id=st.id,
        pipeline="knee",
        state=job_state,
        input_fingerprint="x" * 64,
        created_at=now - 45 * DAY,
        finished_at=now - 45 * DAY,
    )
    s.add(job)
    s.flush()
    s.add(JobInput(job_id=job.id, series_id=series[0].id, role="sag_fluid"))
    if with_results:
        ro = ResultObject(
            job_id=job.id,
            kind="sr",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            sop_instance_uid=uid(),
            series_uid=uid(),
            path="results/x.dcm",
        )
        s.add(ro)
        s.flush()
        for k, state in enumerate(outbox_states):
            sent = (
                now - dt.timedelta(days=delivered_days_ago)
                if state == "sent" and delivered_days_ago is not None
                else None
            )
            s.add(OutboxItem(result_object_id=ro.id, destination=f"dest{k}", state=state, sent_at=sent))
    s.flush()
    return st.study_uid


def files_of(settings, study_uid) -> list[Path]:
    return sorted((settings.store_dir / study_uid).rglob("*.dcm"))


def instance_count(db, study_uid) -> int:
    with db.session() as s:
        return s.scalar(
            select(func.count()).select_from(Instance).join(Series).join(Study).where(Study.study_uid == study_uid)
        )


@pytest.fixture
def studies(db, settings):
    settings.ensure_dirs()
    with db.session() as s:
        out = {
            "delivered_old": make_processed_study(s, settings, delivered_days_ago=40),
            "two_destinations_old": make_processed_study(
                s, settings, delivered_days_ago=35, outbox_states=("sent", "sent")
            ),
            "delivered_recently": make_processed_study(s, settings, delivered_days_ago=10),
            "one_destination_pending": make_processed_study(s, settings, outbox_states=("sent", "pending")),
            "one_destination_dead": make_processed_study(s, settings, outbox_states=("sent", "dead")),
            "job_failed": make_processed_study(s, settings, job_state="failed", series_state="failed"),
            "job_queued": make_processed_study(
                s, settings, job_state="queued", series_state="queued", outbox_states=()
            ),
            "no_results": make_processed_study(s, settings, with_results=False),
            "no_destinations": make_processed_study(s, settings, outbox_states=()),
        }
        # never processed at all: a complete series waiting for its study to settle
        st = Study(study_uid=uid(), first_received_at=utcnow() - 90 * DAY, last_received_at=utcnow() - 90 * DAY)
        s.add(st)
        s.flush()
        s.add(
            Series(study_id=st.id, series_uid=uid(), state="complete", pipeline="knee", role="sag_fluid", instances=0)
        )
        out["unprocessed"] = st.study_uid
    # processed and delivered long ago, but a later series re-opened it and is being processed now
    with db.session() as s:
        reopened = make_processed_study(s, settings, delivered_days_ago=60)
        st = s.scalar(select(Study).where(Study.study_uid == reopened))
        s.add(
            Series(study_id=st.id, series_uid=uid(), state="processing", pipeline="knee", role="cor_fluid", instances=1)
        )
        s.add(Job(study_id=st.id, pipeline="knee", state="processing", input_fingerprint="y" * 64))
        out["reopened"] = reopened
    return out


def test_purge_removes_only_delivered_studies_older_than_the_setting(db, settings, studies):
    report = purge(db, settings)  # default 30 days
    assert sorted(p.study_uid for p in report.studies) == sorted(
        [studies["delivered_old"], studies["two_destinations_old"]]
    )
    assert report.instances == 12 and report.bytes == 12 * 196
    for key, study_uid in studies.items():
        purged = key in ("delivered_old", "two_destinations_old")
        if key != "unprocessed":
            assert (files_of(settings, study_uid) == []) is purged, key
            assert (instance_count(db, study_uid) == 0) is purged, key
        with db.session() as s:
            st = s.scalar(select(Study).where(Study.study_uid == study_uid))
            assert (st.purged_at is not None) is purged, key
            assert s.scalar(select(func.count()).select_from(Series).where(Series.study_id == st.id)) > 0  # rows kept
    assert not (settings.store_dir / studies["delivered_old"]).exists()  # empty folders removed too
    assert list(settings.tmp_dir.glob("purge-*")) == []
    assert purge(db, settings).studies == []  # nothing left to do


def test_periodic_call_with_an_explicit_time(db, settings, studies):
    # 10 days after a 10-day-old delivery is not yet 30 days; 25 days later it is
    assert studies["delivered_recently"] not in [
        p.study_uid for p in purge(db, settings, now=utcnow() + 10 * DAY).studies
    ]
    later = purge(db, settings, now=utcnow() + 25 * DAY)
    assert studies["delivered_recently"] in [p.study_uid for p in later.studies]
    assert files_of(settings, studies["one_destination_pending"])  # still never


@pytest.mark.integration  # msknode's command line
def test_msknode_purge_command(db, settings, studies, capsys):
    def run(*args: str) -> subprocess.CompletedProcess:
        return msknode(capsys, "purge", *args, MSKNODE_DATA_DIR=settings.data_dir, MSKNODE_RETENTION_DAYS="20")

    dry = run("--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    expected = sorted([studies["delivered_old"], studies["two_destinations_old"]])
    assert out["dry_run"] is True and sorted(s["study_uid"] for s in out["studies"]) == expected
    assert all(files_of(settings, u) for u in expected)  # dry run changed nothing
    purged = run()
    assert purged.returncode == 0, purged.stderr
    assert "purged 12 instances" in purged.stdout
    assert all(files_of(settings, u) == [] for u in expected)
    assert files_of(settings, studies["delivered_recently"])  # 10 days < 20
    again = run()
    assert again.returncode == 0 and "nothing to purge" in again.stdout


def test_retention_zero_purges_at_delivery_but_never_undelivered(db, settings, studies):
    now_settings = settings.model_copy(update={"retention_days": 0.0})
    report = purge(db, now_settings)
    assert studies["delivered_recently"] in [p.study_uid for p in report.studies]
    for key in (
        "one_destination_pending",
        "one_destination_dead",
        "job_failed",
        "job_queued",
        "no_results",
        "no_destinations",
        "reopened",
    ):
        assert files_of(settings, studies[key]), key


def test_an_instance_received_again_during_purge_is_kept(db, settings, studies, monkeypatch):
    """A resend racing with the purge: the re-inserted instance keeps its file."""
    import node.ops.retention as retention

    study_uid = studies["delivered_old"]
    with db.session() as s:
        victim = s.execute(
            select(Instance.sop_instance_uid, Instance.path, Series.id)
            .join(Series)
            .join(Study)
            .where(Study.study_uid == study_uid)
            .order_by(Instance.id)
            .limit(1)
        ).one()
    real_check = retention._received_again

    def listener_stores_it_again(db_, sop_uids):
        # the purge has committed; the listener has meanwhile received the same object again
        if victim[0] not in sop_uids:  # the other study purged in this run
            return real_check(db_, sop_uids)
        calls.append(sop_uids)
        with db.session() as s:
            s.add(
                Instance(
                    series_id=victim[2],
                    sop_instance_uid=victim[0],
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=victim[1],
                    size=196,
                )
            )
        return real_check(db_, sop_uids)

    calls = []
    monkeypatch.setattr(retention, "_received_again", listener_stores_it_again)
    purge(db, settings)
    assert (settings.store_dir / victim[1]).exists()
    assert [p.name for p in files_of(settings, study_uid)] == [Path(victim[1]).name]
    assert len(calls) == 1 and len(calls[0]) == 6  # every other file of the study was removed
