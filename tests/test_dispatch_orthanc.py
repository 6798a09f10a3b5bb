"""Integration with a real PACS: Orthanc (Debian package) over C-STORE and STOW-RS (DICOMweb plugin).

A processed phantom study's results arrive inside the original study; while Orthanc is
down the sends queue and back off; after it is back everything arrives exactly once,
also when the node itself restarted in between (a new process = a new `Database`).
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select
from test_dispatch import T0, enqueue, with_dest

from node.db.database import Database
from node.db.schema import OutboxItem
from node.dispatch.outbox import process_outbox
from node.results import TriageSummary, build_results, save
from node.settings import DimseDestination, StowDestination
from support.results_data import knee_output, phantom_knee_study, send_to_pacs

pytestmark = pytest.mark.integration


def _phantom_study(tmp_path, seed: int):
    return phantom_knee_study(tmp_path / f"phantom{seed}", seed, patient_name="Phantom^Knee", patient_id=f"PH{seed}")


def _states(db):
    with db.session() as s:
        return [(i.state, i.attempts, i.last_error) for i in s.scalars(select(OutboxItem).order_by(OutboxItem.id))]


def test_results_reach_the_original_study_exactly_once_across_pacs_and_node_restarts(settings, db, orthanc, tmp_path):
    paths, vol = _phantom_study(tmp_path, seed=11)
    send_to_pacs(orthanc, paths)
    results = build_results(
        output=knee_output(vol),
        source_files={vol.series_uid: paths},
        triage=TriageSummary("URGENT", 0.9, ["complete ACL tear"]),
        predecessors=[],
        settings=settings,
        job_fingerprint="orthanc-job-1",
    )
    saved = [(r, save(r, settings)) for r in results]
    dest = DimseDestination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    s = with_dest(settings, dest)
    enqueue(db, saved, [dest.key], study_uid=vol.study_uid)
    ours = {r.sop_instance_uid for r in results}

    orthanc.stop()
    try:
        rep = process_outbox(db, s, now=T0)
        assert rep.retrying == len(results) and rep.sent == 0
        assert all(st == "pending" and att == 1 and "connection refused" in err for st, att, err in _states(db))
        assert process_outbox(db, s, now=T0 + dt.timedelta(seconds=2)).claimed == 0  # backing off
        rep = process_outbox(db, s, now=T0 + dt.timedelta(seconds=5))
        assert rep.retrying == len(results)
        assert {att for _st, att, _e in _states(db)} == {2}
        # a sender that dies holding leases: claimed, never recorded
        from node.dispatch.outbox import claim

        with db.session() as ses:
            claim(ses, now=T0 + dt.timedelta(seconds=15), owner="killed-worker", limit=5, lease_seconds=300)
    finally:
        orthanc.start()
    assert not set(ours) & set(orthanc.received())  # none of ours reached the PACS

    # the node restarts: a new process, the same database
    db2 = Database(s.database_url)
    try:
        rep = process_outbox(db2, s, now=T0 + dt.timedelta(seconds=60))
        assert rep.sent == len(results) - 5  # the killed worker's leases have not expired yet
        rep = process_outbox(db2, s, now=T0 + dt.timedelta(minutes=10))
        assert rep.sent == 5
        assert process_outbox(db2, s, now=T0 + dt.timedelta(days=1)).claimed == 0
        assert all(st == "sent" for st, _a, _e in _states(db2))
    finally:
        db2.dispose()

    # everything in the ORIGINAL study, each kind in its own new series, each object exactly once
    series = orthanc.study_series(vol.study_uid)
    assert sorted(series[vol.series_uid]) == sorted(vol.sop_instance_uids)
    by_kind: dict[str, set[str]] = {}
    for r in results:
        by_kind.setdefault(r.kind, set()).add(r.series_uid)
    assert {k: len(v) for k, v in by_kind.items()} == {"seg": 1, "sc": 1, "superres": 1, "sr": 1}
    for r in results:
        assert r.sop_instance_uid in series[r.series_uid]
    assert sum(len(v) for k, v in series.items() if k != vol.series_uid) == len(results)
    received = orthanc.received()
    assert {uid: received[uid] for uid in ours} == dict.fromkeys(ours, 1)


def test_stow_rs_to_orthanc_dicomweb(settings, db, orthanc, tmp_path):
    paths, vol = _phantom_study(tmp_path, seed=12)
    out = knee_output(vol, superres=False)
    results = build_results(
        output=out,
        source_files={vol.series_uid: paths},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="orthanc-stow-1",
    )
    saved = [(r, save(r, settings)) for r in results]
    good = StowDestination(
        type="stow", name="stow", url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password
    )
    wrong = StowDestination(
        type="stow", name="stow-badauth", url=orthanc.dicomweb_url, username=orthanc.username, password="wrong-password"
    )
    s = with_dest(settings, good, wrong)
    enqueue(db, saved, ["stow", "stow-badauth"], study_uid=vol.study_uid)

    orthanc.stop()
    try:
        rep = process_outbox(db, s, now=T0)
        assert rep.retrying == 2 * len(results)
        assert all("ConnectionError" in err for _st, _a, err in _states(db))
    finally:
        orthanc.start()
    rep = process_outbox(db, s, now=T0 + dt.timedelta(minutes=1))
    assert rep.sent == len(results) and rep.dead == len(results)
    with db.session() as ses:
        for item in ses.scalars(select(OutboxItem)):
            if item.destination == "stow":
                assert item.state == "sent" and item.attempts == 2
            else:
                assert item.state == "dead" and "HTTP 401" in item.last_error
    series = orthanc.study_series(vol.study_uid)  # the source series was never sent: STOW created the study
    for r in results:
        assert r.sop_instance_uid in series[r.series_uid]
    received = orthanc.received()
    assert all(received[r.sop_instance_uid] == 1 for r in results)


def test_orthanc_refuses_an_unknown_calling_ae_permanently(settings, db, orthanc, tmp_path):
    paths, vol = _phantom_study(tmp_path, seed=13)
    out = knee_output(vol, superres=False, positive=False)
    results = build_results(
        output=out,
        source_files={vol.series_uid: paths},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="orthanc-unknown-ae",
    )
    saved = [(r, save(r, settings)) for r in results]
    dest = DimseDestination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    s = with_dest(settings, dest).model_copy(update={"ae_title": "UNKNOWNAE"})
    enqueue(db, saved, [dest.key], study_uid=vol.study_uid)
    rep = process_outbox(db, s, now=T0)
    assert rep.dead == 1
    [(state, _att, err)] = _states(db)
    assert state == "dead" and "rejected (permanent)" in err and "Calling AE title not recognised" in err
