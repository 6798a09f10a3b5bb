"""Support for the job tests: rows for a study with a job, a step function that sleeps and writes
rows, and a worker process entry point (`WorkerProcess`: ``main(["worker", "--sleep", "1"])`` in a child).

The step function is a real `node.jobs.runner.JobRunner`: it loads nothing heavy, sleeps in small
steps (checking its lease), writes a result file with a UID derived from the job's input
fingerprint (as `node.results` does) and appends one line per finished run to
``<data dir>/runs.log`` so tests can count executions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from node.demo.loopback import child_env, echoscu
from node.jobs.runner import FindingRecord, JobContext, JobProducts, ResultRecord, Steps
from support.env import ROOT, TESTS
from support.servers import track, untrack

# the child runs `main` of this module with the checkout and tests/ on its path
_WORKER_MAIN = (
    f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]; from support.jobs import main; "
    "sys.exit(main(sys.argv[1:]))"
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def make_study_job(
    db,
    *,
    pipeline: str = "knee",
    n_series: int = 1,
    instances: int = 3,
    state: str = "queued",
    enqueue_pending: bool = True,
    max_attempts: int = 3,
    tag: str | None = None,
    queue: str = "cpu",
) -> int:
    """A study with ``n_series`` routed series and one job over them (what completeness commits)."""
    from node.db.schema import Instance, Job, JobInput, Series, Study

    tag = tag or os.urandom(4).hex()
    root = "1.2.826.0.1.3680043.10.1447.99"
    num = int(tag, 16)
    with db.session() as s:
        study = Study(study_uid=f"{root}.1.{num}")
        s.add(study)
        s.flush()
        sops = []
        series_rows = []
        for k in range(n_series):
            se = Series(
                study_id=study.id,
                series_uid=f"{root}.2.{num}.{k}",
                modality="MR",
                state="queued",
                pipeline=pipeline,
                role="sag_fluid" if k == 0 else f"role{k}",
                series_number=k + 1,
                instances=instances,
            )
            s.add(se)
            s.flush()
            series_rows.append(se)
            for i in range(instances):
                sop = f"{root}.3.{num}.{k}.{i}"
                sops.append(sop)
                s.add(
                    Instance(
                        series_id=se.id,
                        sop_instance_uid=sop,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=f"x/{sop}.dcm",
                        size=1,
                        instance_number=i + 1,
                    )
                )
        fp = hashlib.sha256(("\n".join(sorted(sops)) + "\n" + pipeline).encode()).hexdigest()
        job = Job(
            study_id=study.id,
            pipeline=pipeline,
            state=state,
            input_fingerprint=fp,
            enqueue_pending=enqueue_pending,
            max_attempts=max_attempts,
            queue=queue,
        )
        s.add(job)
        s.flush()
        for se in series_rows:
            s.add(JobInput(job_id=job.id, series_id=se.id, role=se.role))
        return job.id


SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image


def secondary_capture(source: Path, *, sop_uid: str, series_uid: str):
    """A small Secondary Capture in the source's study (patient/study attributes copied)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    src = pydicom.dcmread(source, stop_before_pixels=True)
    ds = Dataset()
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "SpecificCharacterSet",
    ):
        if kw in src:
            setattr(ds, kw, src.data_element(kw).value)
    ds.SOPClassUID, ds.SOPInstanceUID = SC_CLASS, sop_uid
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, 9901, 1
    ds.Modality, ds.ConversionType, ds.SeriesDescription = "OT", "WSD", "msknode test result"
    ds.Manufacturer = "msknode"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC_CLASS, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def result_uid(uid_root: str, fingerprint: str, kind: str) -> str:
    digest = int(hashlib.sha256(f"{fingerprint}|fake-1.0|{kind}".encode()).hexdigest()[:24], 16)
    return f"{uid_root}{digest}"


class SleepyRunner:
    """Sleeps ``seconds`` (in 0.1 s steps, checking the lease), then produces one finding and one SR file.

    ``fail_times``: the first N attempts of each job raise RuntimeError (transient error).
    ``permanent``: raise a PermanentJobError instead.
    A job whose pipeline is ``stubborn`` ignores the soft time limit (to reach the hard one).
    """

    def __init__(self, settings, *, seconds: float = 0.2, fail_times: int = 0, permanent: bool = False):
        self.settings = settings
        self.seconds = seconds
        self.fail_times = fail_times
        self.permanent = permanent

    def _log(self, line: str) -> None:
        with open(self.settings.data_dir / "runs.log", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __call__(self, ctx: JobContext, steps: Steps) -> JobProducts:
        self._log(f"start {ctx.job_id} {ctx.attempt} {os.getpid()}")
        with steps.step("inference"):
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                try:
                    time.sleep(min(0.1, max(end - time.monotonic(), 0)))
                except Exception as e:  # the soft time limit; a "stubborn" job ignores it
                    if ctx.pipeline != "stubborn":
                        raise
                    self._log(f"ignored {ctx.job_id} {ctx.attempt} {os.getpid()}")
                    del e
                steps.check()
            if self.permanent:
                from node.jobs.lease import PermanentJobError

                raise PermanentJobError(f"series {ctx.inputs[0].series_uid}: not an image series")
            if ctx.attempt <= self.fail_times:
                raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
        with steps.step("results"):
            uid = result_uid(self.settings.uid_root, ctx.input_fingerprint, "sr")
            path = self.settings.results_dir / f"{uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            sources = [p for i in ctx.inputs for p in i.paths if p.exists()]
            if sources:  # inputs really stored (listener): a real DICOM object a PACS accepts
                kind, sop_class = "sc", SC_CLASS
                secondary_capture(sources[0], sop_uid=uid, series_uid=uid + ".1").save_as(tmp, enforce_file_format=True)
            else:
                kind, sop_class = "sr", SR_CLASS
                tmp.write_bytes(f"fake SR for job {ctx.job_id}".encode())
            os.replace(tmp, path)
        self._log(f"end {ctx.job_id} {ctx.attempt} {os.getpid()}")
        return JobProducts(
            findings=[
                FindingRecord(
                    model_name="fake.sleep",
                    model_version="1.0",
                    weights_sha256="0" * 64,
                    code="acl_tear",
                    label="ACL tear",
                    series_uid=ctx.inputs[0].series_uid,
                    probability=0.9,
                    uncertainty=0.01,
                    positive=True,
                )
            ],
            results=[ResultRecord(kind, sop_class, uid, uid + ".1", path)],
            model_versions={"fake.sleep": {"version": "1.0", "weights_sha256": "0" * 64}},
            used_by={ctx.inputs[0].series_uid: ["fake.sleep"]},
        )


def read_runs(data_dir: Path) -> list[tuple[str, int, int, int]]:
    p = Path(data_dir) / "runs.log"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        kind, job, attempt, pid = line.split()
        out.append((kind, int(job), int(attempt), int(pid)))
    return out


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def job_states(db) -> dict[int, str]:
    from sqlalchemy import select

    from node.db.schema import Job

    with db.session() as s:
        return dict(s.execute(select(Job.id, Job.state)).all())


# ---- real processes: worker, Redis, PostgreSQL ------------------------------------------------


class WorkerProcess:
    """The worker of `main` (`SleepyRunner` jobs) in its own process group (so kill -9 takes its pool too)."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *, sleep: float = 0.2, fail_times: int = 0, queues: str | None = None
    ):
        self.env = env
        self.log_path = Path(log_path)
        self.args = [
            sys.executable,
            "-c",
            _WORKER_MAIN,
            "worker",
            "--sleep",
            str(sleep),
            "--fail-times",
            str(fail_times),
        ] + (["--queues", queues] if queues else [])
        self.proc = None
        self._token = None

    def start(self) -> WorkerProcess:
        import subprocess

        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- the worker writes to it until stop() closes it
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT)
        )
        self._token = track(f"{type(self).__name__} pid {self.proc.pid}", lambda: self.stop(graceful=False))
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """Kills the worker and its pool processes at once (a crash: no shutdown code runs)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        untrack(self._token)

    def stop(self, timeout: float = 20.0, *, graceful: bool = True) -> int | None:
        """SIGTERM and wait (``graceful``), else SIGKILL at once (test teardown: the state is already checked)."""
        import signal
        import subprocess

        if self.proc is None:
            return None
        if self.proc.poll() is None and not graceful:
            self.kill9()
            return self.proc.returncode
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:  # the group may still hold pool children
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()
        untrack(self._token)
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ListenerProcess(WorkerProcess):
    """``msknode listen`` in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = Path(log_path)
        self.args = [str(Path(sys.executable).parent / "msknode"), "listen"]
        self.proc = None
        self._token = None

    def wait_ready(self, port: int, ae_title: str = "MSKNODE", timeout: float = 30.0) -> ListenerProcess:
        deadline = time.monotonic() + timeout
        while not echoscu(port, ae_title):
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"listener did not answer C-ECHO:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        return self


def write_phantom_series(out_dir: Path, seed: int, *, slices: int = 40, matrix: int = 64) -> list[Path]:
    """A knee phantom series ("SAG PD FS", KNEE) in its own study; routed to the knee pipeline."""
    from models.phantoms import generate, write_dicom_series

    phantom = generate("knee", seed, n_slices=slices, matrix=matrix, snr=None)
    return write_dicom_series(phantom, out_dir)


def storescu(port: int, files: list[Path], *, ae_title: str = "MSKNODE", calling: str = "MODALITY"):
    """Starts dcmtk storescu sending ``files`` in one association (returns the Popen)."""
    import subprocess

    return subprocess.Popen(
        ["storescu", "-aet", calling, "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def worker_env(settings_env: dict[str, str]) -> dict[str, str]:
    return child_env(**{**settings_env, "PYTHONUNBUFFERED": "1"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["worker"])
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--fail-times", type=int, default=0)
    p.add_argument("--queues", default=None)
    args = p.parse_args(argv)
    from node.cli import setup_logging
    from node.jobs.worker import run_worker
    from node.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level)
    queues = args.queues.split(",") if args.queues else None
    return run_worker(
        settings,
        queues=queues,
        runner_factory=lambda st: SleepyRunner(st, seconds=args.sleep, fail_times=args.fail_times),
    )


if __name__ == "__main__":
    sys.exit(main())
