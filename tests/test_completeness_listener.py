"""Completeness through the real listener: dcmtk storescu / pynetdicom → msknode listen → tick → jobs.

The listener runs as a subprocess (``msknode listen``) on a free localhost port; the
completeness tick runs in a thread of the test (or in separate processes for the
restart test), with the real clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select

from node.db.database import Database, utcnow
from node.db.schema import Association, Job, Series, Study
from node.demo.loopback import child_env
from node.intake.completeness import rules_provider, tick
from support.cli import msknode
from support.env import ROOT, free_port
from support.listener import ListenerProcess
from support.mr import mr_dataset, save

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Q = 0.5
SQ = 0.5
TICK = 0.1


# ---- DICOM --------------------------------------------------------------------------
def write_series(
    folder: Path,
    *,
    study_uid: str,
    description: str,
    n: int,
    number: int,
    body_part: str = "KNEE",
    images_in_acquisition: int | None = None,
    no_position: tuple[int, ...] = (),
    orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    study_description: str = "MR KNEE LEFT",
) -> tuple[str, list[Path]]:
    """A small MR series as a scanner writes it (sagittal unless told otherwise)."""
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(number)
    for i in range(n):
        ds = mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            pixels=rng.integers(0, 1000, (32, 32), dtype=np.uint16),
            Manufacturer="SIEMENS",
            PatientName="Test^Completeness",
            PatientID="C0001",
            StudyDate="20260302",
            StudyDescription=study_description,
            SeriesDescription=description,
            ProtocolName=description,
            BodyPartExamined=body_part,
            SeriesNumber=number,
            InstanceNumber=i + 1,
            ImageOrientationPatient=list(orientation),
            ImagePositionPatient=None if i in no_position else [i * 3.0 - 60.0, -80.0, 80.0],
            SliceThickness=3.0,
            PixelSpacing=[0.5, 0.5],
            ImagesInAcquisition=images_in_acquisition or None,
        )
        p = save(ds, folder / f"{series_uid}_{i:03d}.dcm")
        paths.append(p)
    return series_uid, paths


# ---- processes ----------------------------------------------------------------------
def node_env(settings, **extra) -> dict:
    return child_env(
        **{
            "MSKNODE_DATA_DIR": settings.data_dir,
            "MSKNODE_QUIET_SECONDS": Q,
            "MSKNODE_STUDY_QUIET_SECONDS": SQ,
            "MSKNODE_LOG_LEVEL": "INFO",
            **extra,
        }
    )


class Listener(ListenerProcess):
    """``msknode listen`` on ``port`` (a restart reuses it) with this module's quiet periods."""

    def __init__(self, settings, port: int, log: Path, **extra):
        env = {"MSKNODE_QUIET_SECONDS": str(Q), "MSKNODE_STUDY_QUIET_SECONDS": str(SQ)}
        env.update({k: str(v) for k, v in extra.items()})
        super().__init__(settings.data_dir, env=env, port=port, log_path=log)


def storescu(port: int, files: list[Path]) -> None:
    r = subprocess.run(
        ["storescu", "-aec", "MSKNODE", "-aet", "MODALITY", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


class Ticker(threading.Thread):
    """The periodic completeness tick, as the worker's loop runs it (real clock)."""

    def __init__(self, settings):
        super().__init__(daemon=True)
        self.settings = settings
        self.db = Database(settings.database_url, migrate=False)
        self.rules = rules_provider(settings)
        self.stop_event = threading.Event()
        self.created: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                with self.db.session() as s:
                    self.created += tick(s, self.settings, utcnow(), self.rules())
                self.stop_event.wait(TICK)
        except BaseException as e:  # pragma: no cover - surfaced by stop()
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        self.db.dispose()
        assert self.error is None, self.error


TICKER_SCRIPT = f"""
import sys, time
from node.db.database import Database, utcnow
from node.intake.completeness import tick, rules_provider
from node.settings import load_settings
settings = load_settings()
db = Database(settings.database_url, migrate=False)
rules = rules_provider(settings)
while True:
    with db.session() as s:
        created = tick(s, settings, utcnow(), rules())
    if created:
        print("created", created, flush=True)
    time.sleep({TICK})
"""


def wait_for(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def series_row(db, series_uid) -> Series | None:
    with db.session() as s:
        return s.scalar(select(Series).where(Series.series_uid == series_uid))


def all_jobs(db) -> list[Job]:
    with db.session() as s:
        jobs = s.scalars(select(Job).order_by(Job.id)).all()
        for j in jobs:
            _ = [(i.role, i.series.series_uid) for i in j.inputs]
        return jobs


def msknode_json(capsys, settings, *args) -> list[dict]:
    """``msknode ARGS --json`` in the test's process (`support.cli.msknode`) with the listener's settings."""
    env = {k: v for k, v in node_env(settings).items() if k.startswith("MSKNODE_")}
    r = msknode(capsys, *args, "--json", **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def cfg(settings):
    return settings.model_copy(update={"quiet_seconds": Q, "study_quiet_seconds": SQ})


@pytest.fixture
def listener(settings, tmp_path, db):
    lst = Listener(settings, free_port(), tmp_path / "listener.log").start()
    yield lst
    lst.stop()


@pytest.fixture
def ticker(cfg, db):
    t = Ticker(cfg)
    t.start()
    yield t
    t.stop()


# ---- tests --------------------------------------------------------------------------
def test_forty_slices_complete_within_quiet_period_plus_one_second(listener, ticker, db, tmp_path):
    study_uid = generate_uid()
    series_uid, files = write_series(tmp_path / "dcm", study_uid=study_uid, description="PD_TSE_FS_SAG", n=40, number=3)
    storescu(listener.port, files)
    released = time.monotonic()
    row = wait_for(lambda: (r := series_row(db, series_uid)) is not None and r.state != "receiving" and r, Q + 3)
    seen = time.monotonic() - released
    assert row and row.state == "complete", row and row.state
    assert (row.instances, row.pipeline, row.role, row.completed_reason) == (40, "knee", "sag_fluid", "quiet")
    with db.session() as s:
        ended = s.scalar(
            select(Association.ended_at).where(Association.instances == 40).order_by(Association.id.desc())
        )
    waited = (row.completed_at - ended).total_seconds()
    assert Q <= waited <= Q + 1.0, waited  # not before the quiet period, and at most 1 s after it
    assert seen <= Q + 1.0, seen


def test_three_series_knee_study_through_the_listener_yields_one_job(listener, ticker, db, settings, tmp_path, capsys):
    study_uid = generate_uid()
    d = tmp_path / "dcm"
    loc, f1 = write_series(
        d, study_uid=study_uid, description="localizer", n=3, number=1, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    )
    sag, f2 = write_series(d, study_uid=study_uid, description="PD_TSE_FS_SAG", n=20, number=2)
    cor, f3 = write_series(
        d, study_uid=study_uid, description="t1_tse_cor", n=16, number=3, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    )
    storescu(listener.port, f1 + f2)  # two associations, as a modality sends series as they finish
    storescu(listener.port, f3)
    jobs = wait_for(lambda: all_jobs(db), Q + SQ + 5)
    time.sleep(Q + SQ + 1.0)  # and nothing more comes of it
    jobs = all_jobs(db)
    assert len(jobs) == 1
    job = jobs[0]
    assert (job.pipeline, job.state, job.supersedes_job_id) == ("knee", "queued", None)
    assert sorted((i.series.series_uid, i.role) for i in job.inputs) == sorted([(sag, "sag_fluid"), (cor, "cor_t1")])

    listed = msknode_json(capsys, settings, "jobs")
    assert [(j["id"], j["study_uid"], j["pipeline"], j["state"]) for j in listed] == [
        (job.id, study_uid, "knee", "queued")
    ]
    assert sorted((i["series_uid"], i["role"]) for i in listed[0]["input_series"]) == sorted(
        [(sag, "sag_fluid"), (cor, "cor_t1")]
    )
    for key in ("attempts", "max_attempts", "timings", "error", "created_at", "finished_at", "started_at"):
        assert key in listed[0]
    series = {r["series_uid"]: r for r in msknode_json(capsys, settings, "series")}
    assert (series[loc]["state"], series[loc]["pipeline"], series[loc]["role"]) == ("complete", "knee", "localizer")
    assert (series[sag]["state"], series[sag]["role"]) == ("queued", "sag_fluid")
    assert (series[cor]["state"], series[cor]["role"]) == ("queued", "cor_t1")


def _send_holding_association(port: int, files: list[Path], hold: float) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
    assert assoc.is_established
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            assert status.Status == 0x0000
        time.sleep(hold)
    finally:
        assoc.release()


def test_announced_count_completes_at_once_but_a_missing_position_waits(listener, ticker, db, tmp_path):
    study_uid = generate_uid()
    d = tmp_path / "dcm"
    good, fg = write_series(
        d, study_uid=study_uid, description="Sag PD FSE FS", n=40, number=2, images_in_acquisition=40
    )
    holey, fh = write_series(
        d,
        study_uid=study_uid,
        description="Cor PD FS",
        n=40,
        number=3,
        images_in_acquisition=40,
        no_position=(23,),
        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    )
    hold = Q + 2.0
    errors: list[BaseException] = []

    def send():
        try:
            _send_holding_association(listener.port, fg + fh, hold)
        except BaseException as e:  # pragma: no cover - asserted below
            errors.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    # the complete, gap-free series is complete while the association is still open
    row = wait_for(lambda: (r := series_row(db, good)) is not None and r.state == "complete" and r, 20)
    assert row and row.completed_reason == "count", dump(db, tmp_path)
    with db.session() as s:
        assoc = s.scalar(select(Association).order_by(Association.id.desc()))
        assert assoc.ended_at is None
    # the one with a slice lacking its position waits, though its count was reached
    assert wait_for(lambda: (r := series_row(db, holey)) is not None and r.instances == 40, 30)
    time.sleep(1.0)
    assert series_row(db, holey).state == "receiving"
    assert sender.is_alive()  # still inside the held association
    sender.join(60)
    assert not errors, errors
    released = time.monotonic()
    row = wait_for(lambda: (r := series_row(db, holey)) is not None and r.state == "complete" and r, Q + 3)
    assert row and row.completed_reason == "quiet" and time.monotonic() - released >= Q - 0.2
    jobs = wait_for(lambda: all_jobs(db), SQ + 3)
    assert len(jobs) == 1 and len(jobs[0].inputs) == 2


def test_late_series_supersedes_the_processed_job(listener, ticker, db, tmp_path):
    study_uid = generate_uid()
    d = tmp_path / "dcm"
    sag, f1 = write_series(d, study_uid=study_uid, description="pd_tse_fs_sag", n=12, number=2)
    storescu(listener.port, f1)
    [first] = wait_for(lambda: all_jobs(db), Q + SQ + 5)
    with db.session() as s:  # the worker processed it
        s.get(Job, first.id).state = "done"
        s.scalar(select(Series).where(Series.series_uid == sag)).state = "done"
    cor, f2 = write_series(
        d, study_uid=study_uid, description="pd_tse_fs_cor", n=12, number=3, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    )
    storescu(listener.port, f2)
    jobs = wait_for(lambda: len(j := all_jobs(db)) == 2 and j, Q + SQ + 5)
    assert jobs, all_jobs(db)
    time.sleep(Q + SQ)
    jobs = all_jobs(db)
    assert [(j.state, j.supersedes_job_id) for j in jobs] == [("done", None), ("queued", first.id)]
    assert sorted((i.series.series_uid, i.role) for i in jobs[1].inputs) == sorted(
        [(sag, "sag_fluid"), (cor, "cor_fluid")]
    )
    with db.session() as s:
        assert s.scalar(select(Study.study_quiet_deadline).where(Study.study_uid == study_uid)) is not None


def test_restart_in_the_middle_of_the_quiet_period_completes_once(settings, db, tmp_path):
    """Listener and ticker are killed (-9) during the quiet period; after the restart the study
    completes once, from the timers in the database."""
    quiet = 3.0
    port = free_port()
    extra = {"MSKNODE_QUIET_SECONDS": quiet}
    log = tmp_path / "node.log"
    first = Listener(settings, port, log, **extra).start()
    env = node_env(settings, MSKNODE_PORT=port, **extra)
    tickers = [
        subprocess.Popen(
            [sys.executable, "-c", TICKER_SCRIPT],
            env=env,
            cwd=ROOT,
            stdout=open(tmp_path / "t0.log", "wb"),  # noqa: SIM115 -- the ticker's log for the rest of the test
            stderr=subprocess.STDOUT,
        )
    ]
    second = None
    try:
        study_uid = generate_uid()
        d = tmp_path / "dcm"
        uids = []
        files = []
        coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
        for k, (desc, n, ori) in enumerate(
            (
                ("localizer", 3, coronal),
                ("PD_TSE_FS_SAG", 20, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)),
                ("t1_tse_cor", 16, coronal),
            )
        ):
            u, f = write_series(d, study_uid=study_uid, description=desc, n=n, number=k + 1, orientation=ori)
            uids.append(u)
            files += f
        storescu(port, files)
        released = time.monotonic()
        # the listener records the release (and starts the quiet timers) just after answering it
        assert wait_for(lambda: all(series_row(db, u).quiet_deadline is not None for u in uids), 2.0)
        first.kill()
        tickers[0].send_signal(signal.SIGKILL)
        tickers[0].wait(10)
        assert time.monotonic() - released < quiet - 0.5, "too slow to kill inside the quiet period"
        rows = [series_row(db, u) for u in uids]
        assert [r.state for r in rows] == ["receiving"] * 3  # killed in the middle of the quiet period
        # restart: a new listener and two tickers (as two worker hosts would run)
        second = Listener(settings, port, log, **extra).start()
        for i in (1, 2):
            tickers.append(
                subprocess.Popen(
                    [sys.executable, "-c", TICKER_SCRIPT],
                    env=env,
                    cwd=ROOT,
                    stdout=open(tmp_path / f"t{i}.log", "wb"),  # noqa: SIM115 -- as t0.log
                    stderr=subprocess.STDOUT,
                )
            )
        jobs = wait_for(lambda: all_jobs(db), quiet + SQ + 15)
        assert jobs, (tmp_path / "t1.log").read_text()[-2000:]
        time.sleep(SQ + 1.0)
        jobs = all_jobs(db)
        assert len(jobs) == 1
        assert sorted(i.role for i in jobs[0].inputs) == ["cor_t1", "sag_fluid"]
        rows = [series_row(db, u) for u in uids]
        # each completed once, by its own timer from before the restart, not earlier
        assert all(r.completed_reason == "quiet" and r.completed_at >= r.quiet_deadline for r in rows)
        assert all(r.completed_instances == r.instances for r in rows)
        assert [r.state for r in rows] == ["complete", "queued", "queued"]
        for t in tickers[1:]:
            assert t.poll() is None, "a ticker died"
    finally:
        for t in tickers:
            if t.poll() is None:
                t.send_signal(signal.SIGKILL)
                t.wait(10)
        first.kill()
        if second is not None:
            second.stop()


def test_listener_killed_mid_association_waits_for_the_network_timeout(settings, cfg, db, tmp_path):
    """kill -9 of the listener leaves its association open in the database: the series is not
    complete until that association counts as lost (no instance for network_timeout), even
    though the modality resent everything to the restarted listener and released."""
    from pynetdicom import AE
    from sqlalchemy import func

    from node.db.schema import Instance

    timeout = 8.0
    port = free_port()
    log = tmp_path / "listener.log"
    # one process, so that kill -9 takes down the process that holds the association
    first = Listener(settings, port, log, MSKNODE_LISTENER_PROCESSES=1).start()
    ticker = Ticker(cfg.model_copy(update={"network_timeout": timeout}))
    ticker.start()
    second = None
    try:
        study_uid = generate_uid()
        uid_, files = write_series(tmp_path / "dcm", study_uid=study_uid, description="sag pd fs", n=20, number=5)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
        assert assoc.is_established
        for f in files[:10]:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
        first.kill()
        killed = time.monotonic()
        assoc.abort()
        with db.session() as s:
            orphan = s.scalar(select(Association).where(Association.calling_ae == "MODALITY"))
            assert orphan.ended_at is None  # nobody was left to record its end
            orphan_id = orphan.id
            orphan_last = s.scalar(select(func.max(Instance.received_at)).where(Instance.association_id == orphan_id))
        second = Listener(settings, port, log).start()
        storescu(second.port, files)  # the modality sends the whole series again
        time.sleep(Q + 1.0)
        row = series_row(db, uid_)
        assert row.instances == 20
        if time.monotonic() - killed < timeout - 0.5:
            assert row.state == "receiving"  # the orphan still holds it, though the quiet period is over
        row = wait_for(lambda: (r := series_row(db, uid_)).state == "complete" and r, timeout + Q + 5)
        assert row, series_row(db, uid_).state
        with db.session() as s:
            orphan = s.get(Association, orphan_id)
            resend = s.scalar(
                select(Association)
                .where(Association.calling_ae == "MODALITY", Association.id != orphan_id)
                .order_by(Association.id.desc())
            )
        assert orphan.end_reason == "lost"
        assert (orphan.ended_at - orphan_last).total_seconds() >= timeout
        assert row.completed_at >= orphan.ended_at
        assert (row.completed_at - resend.ended_at).total_seconds() >= Q
        jobs = wait_for(lambda: all_jobs(db), SQ + 3)
        assert len(jobs) == 1 and [i.role for i in jobs[0].inputs] == ["sag_fluid"]
    finally:
        ticker.stop()
        first.kill()
        if second is not None:
            second.stop()


def dump(db, tmp_path):
    with db.engine.connect() as c:
        return (
            c.exec_driver_sql("select * from associations").all(),
            c.exec_driver_sql("select * from association_series").all(),
            c.exec_driver_sql(
                "select id, instances, expected_instances, quiet_deadline, completed_at, completed_reason, last_received_at from series"
            ).all(),
            (tmp_path / "listener.log").read_text()[-3000:],
        )


# ---- a real knee study, protocol-aware ---------------------------------------------------
REALDATA = Path(os.environ.get("MSKNODE_REALDATA") or Path(__file__).resolve().parents[2] / "shared" / "realdata")
SIEMENS_KNEE = REALDATA / "knee" / "siemens_sagittal_dicom"


def real_knee_study(out: Path) -> tuple[str, list[Path], str, list[Path]]:
    """The real Siemens sagittal PD-FS knee series and, made from it here, a coronal PD-FS series of the same study.

    The coronal copy keeps every acquisition parameter (sequence, scan options, TR/TE) and
    the pixels, with new Series/SOP Instance UIDs, a coronal orientation and positions
    stepping along the new slice normal — what a second series of the exam looks like in
    its headers. Nothing is written outside ``out``.
    """
    if not SIEMENS_KNEE.is_dir():
        pytest.skip(f"real DICOM not available: {SIEMENS_KNEE} is absent (set MSKNODE_REALDATA to ../shared/realdata)")
    sag = sorted(SIEMENS_KNEE.glob("*.DCM"))
    assert len(sag) == 25, f"expected the 25 files of {SIEMENS_KNEE}, found {len(sag)}"
    first = pydicom.dcmread(sag[0], stop_before_pixels=True)
    cor_uid = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    cor = []
    for k, path in enumerate(sag):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = cor_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = int(first.SeriesNumber) + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal: normal along y
        ds.ImagePositionPatient = [-80.0, -20.0 + 3.6 * k, 80.0]
        ds.SliceLocation = -20.0 + 3.6 * k
        for seq in ("ReferencedImageSequence",):  # the sagittal's localizer references do not fit a coronal
            if seq in ds:
                del ds[seq]
        p = out / f"cor_{k:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        cor.append(p)
    return str(first.SeriesInstanceUID), sag, cor_uid, cor


def test_real_two_series_knee_study_in_two_associations_gives_one_knee_job(listener, settings, db, tmp_path):
    """The real Siemens knee (sagittal PD-FS, descriptions anonymised: routed from its headers) and a
    coronal series of the same study, each sent by storescu in its own association, seconds apart.
    With the knee protocol (sag_fluid + cor_fluid) the study is settled the moment the coronal is
    complete — long before the study quiet period — and exactly one knee job holds both series."""
    sag_uid, sag_files, cor_uid, cor_files = real_knee_study(tmp_path / "cor")
    study_quiet = 30.0
    cfg = settings.model_copy(
        update={
            "quiet_seconds": Q,
            "study_quiet_seconds": study_quiet,
            "study_protocols": {"knee": ["sag_fluid", "cor_fluid"]},
        }
    )
    ticker = Ticker(cfg)
    ticker.start()
    try:
        storescu(listener.port, sag_files)
        row = wait_for(lambda: (r := series_row(db, sag_uid)) is not None and r.state != "receiving" and r, Q + 5)
        assert row, series_row(db, sag_uid)
        assert (row.instances, row.state, row.pipeline, row.role) == (25, "complete", "knee", "sag_fluid"), (
            f"the real sagittal PD-FS knee series was routed {row.state} {row.pipeline}/{row.role} "
            f"(rule {row.routing_rule!r}); expected knee/sag_fluid from its orientation and acquisition parameters"
        )
        time.sleep(2.0)  # what a short study quiet period would have been: no job yet, the coronal is missing
        assert all_jobs(db) == []
        storescu(listener.port, cor_files)
        sent = time.monotonic()
        jobs = wait_for(lambda: all_jobs(db), Q + 5)
        waited = time.monotonic() - sent
        assert jobs, (series_row(db, cor_uid).state, series_row(db, cor_uid).routing_rule)
        assert waited < study_quiet / 3, waited  # settled by the protocol, not by the quiet period
        time.sleep(Q + 2.0)  # and nothing more comes of it
        jobs = all_jobs(db)
        assert len(jobs) == 1, [(j.id, j.state, j.supersedes_job_id) for j in jobs]
        job = jobs[0]
        assert (job.pipeline, job.state, job.supersedes_job_id) == ("knee", "queued", None)
        assert sorted((i.series.series_uid, i.role) for i in job.inputs) == sorted(
            [(sag_uid, "sag_fluid"), (cor_uid, "cor_fluid")]
        )
        with db.session() as s:
            assocs = s.scalars(select(Association).where(Association.instances == 25).order_by(Association.id)).all()
            assert len(assocs) == 2 and all(a.end_reason == "released" for a in assocs)
            created = s.get(Job, job.id).created_at
        assert (created - assocs[1].ended_at).total_seconds() < study_quiet / 3
    finally:
        ticker.stop()
