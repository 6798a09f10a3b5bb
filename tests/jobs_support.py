"""Support for the job tests: rows for a study with a job, a step function that sleeps and writes
rows, and a worker process entry point (``python tests/jobs_support.py worker --sleep 1``).

The step function is a real `node.pipeline.JobRunner`: it loads nothing heavy, sleeps in small
steps (checking its lease), writes a result file with a UID derived from the job's input
fingerprint (as `node.results` does) and appends one line per finished run to
``<data dir>/runs.log`` so tests can count executions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.pipeline import FindingRecord, JobContext, JobProducts, ResultRecord, Steps  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def make_study_job(db, *, pipeline: str = "knee", n_series: int = 1, instances: int = 3, state: str = "queued",
                   enqueue_pending: bool = True, max_attempts: int = 3, tag: str | None = None) -> int:
    """A study with ``n_series`` routed series and one job over them (what completeness commits)."""
    from node.tables import Instance, Job, JobInput, Series, Study

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
            se = Series(study_id=study.id, series_uid=f"{root}.2.{num}.{k}", modality="MR", state="queued",
                        pipeline=pipeline, role="sag_fluid" if k == 0 else f"role{k}", series_number=k + 1,
                        instances=instances)
            s.add(se)
            s.flush()
            series_rows.append(se)
            for i in range(instances):
                sop = f"{root}.3.{num}.{k}.{i}"
                sops.append(sop)
                s.add(Instance(series_id=se.id, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{sop}.dcm", size=1,
                               instance_number=i + 1))
        fp = hashlib.sha256(("\n".join(sorted(sops)) + "\n" + pipeline).encode()).hexdigest()
        job = Job(study_id=study.id, pipeline=pipeline, state=state, input_fingerprint=fp,
                  enqueue_pending=enqueue_pending, max_attempts=max_attempts, queue="cpu")
        s.add(job)
        s.flush()
        for k, se in enumerate(series_rows):
            s.add(JobInput(job_id=job.id, series_id=se.id, role=se.role))
        return job.id


def result_uid(uid_root: str, fingerprint: str, kind: str) -> str:
    digest = int(hashlib.sha256(f"{fingerprint}|fake-1.0|{kind}".encode()).hexdigest()[:24], 16)
    return f"{uid_root}{digest}"


class SleepyRunner:
    """Sleeps ``seconds`` (in 0.1 s steps, checking the lease), then produces one finding and one SR file.

    ``fail_times``: the first N attempts of each job raise RuntimeError (transient error).
    ``permanent``: raise a PermanentJobError instead.
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
                time.sleep(min(0.1, max(end - time.monotonic(), 0)))
                steps.check()
            if self.permanent:
                from node.jobs import PermanentJobError

                raise PermanentJobError(f"series {ctx.inputs[0].series_uid}: not an image series")
            if ctx.attempt <= self.fail_times:
                raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
        with steps.step("results"):
            uid = result_uid(self.settings.uid_root, ctx.input_fingerprint, "sr")
            path = self.settings.results_dir / f"{uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(f"fake SR for job {ctx.job_id}".encode())
            os.replace(tmp, path)
        self._log(f"end {ctx.job_id} {ctx.attempt} {os.getpid()}")
        return JobProducts(
            findings=[FindingRecord(model_name="fake.sleep", model_version="1.0", weights_sha256="0" * 64,
                                    code="acl_tear", label="ACL tear", series_uid=ctx.inputs[0].series_uid,
                                    probability=0.9, uncertainty=0.01, positive=True)],
            results=[ResultRecord("sr", SR_CLASS, uid, uid + ".1", path)],
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

    from node.tables import Job

    with db.session() as s:
        return dict(s.execute(select(Job.id, Job.state)).all())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["worker"])
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--fail-times", type=int, default=0)
    p.add_argument("--queues", default=None)
    args = p.parse_args(argv)
    from node.cli import setup_logging
    from node.settings import load_settings
    from node.worker import run_worker

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
