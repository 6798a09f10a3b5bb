"""The worker's loops settle a study as it arrives: real ``msknode listen`` + a pynetdicom sender that holds
its association open (as Orthanc does for ``DicomAssociationCloseDelay``) + the worker's own periodic loops
(`node.jobs.worker.build_loops`: the main loop with the completeness tick and enqueue, and the
completeness watch that wakes it), with the real clock.

The main loop's interval is set far longer than any wait below, so a job made within a second of
its last instance was made by a round the watch woke, not by the interval.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select
from test_completeness_listener import Listener, all_jobs, storescu, wait_for, write_series

from node.db.schema import Association, Instance, Job, Series
from node.jobs import lease
from node.jobs.worker import build_loops
from support.env import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Q = 0.5
STUDY_QUIET = 3.0
MAIN_INTERVAL = 60.0  # the main loop's own interval: only a wake makes it run again within the test
HOLD = 4.0  # the sender keeps its association this long after its last C-STORE
KNEE_PROTOCOL = {"knee": ["sag_fluid", "cor_fluid"]}
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class Worker:
    """The housekeeping worker's main loop and completeness watch (no Celery: wake-ups are collected)."""

    def __init__(self, db, settings):
        self.sent: list[int] = []
        loops = build_loops(
            db,
            settings,
            housekeeping=True,
            name=lease.worker_name(),
            queues=["ingest", "cpu"],
            send=lambda job_id, queue: self.sent.append(job_id),
            queue_depths=None,
        )
        self.loops = [lp for lp in loops if lp.name in ("msknode-periodic", "msknode-completeness-watch")]
        assert len(self.loops) == 2, [lp.name for lp in loops]
        self.main = self.loops[0]

    def __enter__(self) -> Worker:
        for lp in self.loops:
            lp.start()
        return self

    def __exit__(self, *exc) -> None:
        for lp in self.loops:
            lp.stop()
        for lp in self.loops:
            for duty in lp.duties:
                assert duty.last_error is None, (lp.name, duty.name, duty.last_error)


class HeldSender(threading.Thread):
    """A modality (or Orthanc) sending files on one association, then holding it open ``hold`` seconds."""

    def __init__(self, port: int, files: list[Path], hold: float):
        super().__init__(daemon=True)
        self.port, self.files, self.hold = port, files, hold
        self.last_store_done = threading.Event()
        self.released = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="MSKNODE")
            assert assoc.is_established
            try:
                for f in self.files:
                    status = assoc.send_c_store(pydicom.dcmread(f))
                    assert status.Status == 0x0000, status
                self.last_store_done.set()
                time.sleep(self.hold)
            finally:
                assoc.release()
                self.released.set()
        except BaseException as e:  # pragma: no cover - asserted by the test
            self.error = e
            self.last_store_done.set()
            self.released.set()


@pytest.fixture
def listener(settings, tmp_path, db):
    lst = Listener(settings, free_port(), tmp_path / "listener.log")
    lst.start()
    yield lst
    lst.stop()


def knee_series(tmp_path: Path, study_uid: str, *, axial: bool = False):
    d = tmp_path / "dcm"
    loc = write_series(d, study_uid=study_uid, description="localizer", n=3, number=1, orientation=AXIAL)
    sag = write_series(d, study_uid=study_uid, description="PD_TSE_FS_SAG", n=20, number=2, images_in_acquisition=20)
    cor = write_series(
        d,
        study_uid=study_uid,
        description="PD_TSE_FS_COR",
        n=16,
        number=3,
        images_in_acquisition=16,
        orientation=CORONAL,
    )
    ax = write_series(
        d, study_uid=study_uid, description="pd_tse_fs_tra", n=12, number=4, images_in_acquisition=12, orientation=AXIAL
    )
    return loc, sag, cor, ax


def last_instance_at(db, study_series: list[str]):
    with db.session() as s:
        return s.scalar(
            select(func.max(Instance.received_at))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid.in_(study_series))
        )


def test_a_protocol_complete_study_gets_its_job_while_the_sender_holds_its_association(
    listener, settings, db, tmp_path
):
    """Sagittal and coronal of the knee protocol, then a localizer, on one association held open: one job,
    made (and sent to the queue) within a second of the last protocol instance, before the release; the
    localizer changes nothing; a later axial (outside the protocol) supersedes the job after the quiet period."""
    cfg = settings.model_copy(
        update={
            "quiet_seconds": Q,
            "study_quiet_seconds": STUDY_QUIET,
            "study_protocols": KNEE_PROTOCOL,
            "sweep_interval_seconds": MAIN_INTERVAL,
        }
    )
    study_uid = generate_uid()
    (loc, loc_files), (sag, sag_files), (cor, cor_files), (ax, ax_files) = knee_series(tmp_path, study_uid)
    with Worker(db, cfg) as worker:
        time.sleep(0.5)  # the main loop's first round (at start) is over: from now on only a wake runs it
        rounds = worker.main.rounds
        sender = HeldSender(listener.port, sag_files + cor_files + loc_files, HOLD)
        sender.start()
        jobs = wait_for(lambda: all_jobs(db), HOLD + 10)
        made = time.monotonic()
        assert jobs, "no job while the association was held"
        assert not sender.released.is_set(), "the job waited for the release"
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Association).where(Association.ended_at.is_(None))) == 1
            created = s.get(Job, jobs[0].id).created_at
        waited = (created - last_instance_at(db, [sag, cor])).total_seconds()
        assert waited < 1.0, waited  # the watch woke the main loop: far sooner than its 60 s interval
        assert worker.main.rounds > rounds and worker.main.wakes >= 1
        assert wait_for(lambda: worker.sent == [jobs[0].id], 2.0), worker.sent  # enqueued in the same round
        assert sorted((i.series.series_uid, i.role) for i in jobs[0].inputs) == sorted(
            [(sag, "sag_fluid"), (cor, "cor_fluid")]
        )
        sender.join(HOLD + 30)
        assert sender.error is None, sender.error
        assert time.monotonic() - made > 0.5  # the release came well after the job
        # from here on the quiet periods decide, which the main loop checks at its interval: a short one now
        worker.main.interval = 0.2
        worker.main.wake()
        # the localizer completes once the association is released (no announced count): still one job
        assert wait_for(lambda: (r := _row(db, loc)) is not None and r.state == "complete", Q + 5), _row(db, loc)
        time.sleep(STUDY_QUIET + 0.5)
        assert [(j.id, j.state) for j in all_jobs(db)] == [(jobs[0].id, "queued")]
        assert _row(db, loc).role == "localizer"

        # the job is done; an axial arrives later, in its own association: a job that supersedes it
        with db.session() as s:
            s.get(Job, jobs[0].id).state = "done"
            for se in s.scalars(select(Series).where(Series.state == "queued")):
                se.state = "done"
        storescu(listener.port, ax_files)
        later = wait_for(lambda: len(j := all_jobs(db)) == 2 and j, STUDY_QUIET + 10)
        assert later, [(j.id, j.state) for j in all_jobs(db)]
        with db.session() as s:
            second = s.get(Job, later[1].id)
        waited = (second.created_at - last_instance_at(db, [ax])).total_seconds()
        assert waited >= STUDY_QUIET, waited  # outside the protocol: the study quiet period, as before
        assert (second.supersedes_job_id, second.state) == (jobs[0].id, "queued")
        assert sorted(i.role for i in later[1].inputs) == ["ax_fluid", "cor_fluid", "sag_fluid"]


def test_without_a_protocol_the_quiet_period_still_applies(listener, settings, db, tmp_path):
    """The same series without a site protocol: each completes on its count at once (the watch wakes the
    loop), but the study waits for the study quiet period after its last instance, as before."""
    cfg = settings.model_copy(
        update={"quiet_seconds": Q, "study_quiet_seconds": STUDY_QUIET, "sweep_interval_seconds": 0.2}
    )
    study_uid = generate_uid()
    (_, _), (sag, sag_files), (cor, cor_files), _ = knee_series(tmp_path, study_uid)
    with Worker(db, cfg):
        sender = HeldSender(listener.port, sag_files + cor_files, HOLD)
        sender.start()
        assert sender.last_store_done.wait(30)
        assert wait_for(lambda: all((r := _row(db, u)) is not None and r.state == "complete" for u in (sag, cor)), 3)
        assert [_row(db, u).completed_reason for u in (sag, cor)] == ["count", "count"]
        time.sleep(STUDY_QUIET - 1.0)
        assert all_jobs(db) == []  # complete series, but within the study quiet period: no job
        jobs = wait_for(lambda: all_jobs(db), STUDY_QUIET + 5)
        assert len(jobs) == 1
        with db.session() as s:
            created = s.get(Job, jobs[0].id).created_at
        waited = (created - last_instance_at(db, [sag, cor])).total_seconds()
        assert waited >= STUDY_QUIET, waited
        sender.join(HOLD + 30)
        assert sender.error is None, sender.error
        assert len(all_jobs(db)) == 1


def _row(db, series_uid: str) -> Series | None:
    with db.session() as s:
        return s.scalar(select(Series).where(Series.series_uid == series_uid))
