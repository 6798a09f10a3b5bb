"""The production node as separate processes for the end-to-end tests.

`NodeWorker` is the real ``msknode worker`` (where `support.jobs.WorkerProcess` runs the test's step
function); `node_env` the environment ``msknode listen`` and ``msknode worker`` share (the test's
data directory and port, short quiet times and sweeps, one torch thread); `study_job` a study's job
once it reached a state; `knee_study_files` a knee
study to send: a phantom, or the real Siemens sagittal PD-FS series (skipped when the corpus is absent).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support.jobs import WorkerProcess, worker_env

MSKNODE = str(Path(sys.executable).parent / "msknode")


class NodeWorker(WorkerProcess):
    """The production ``msknode worker`` (not the test step function)."""

    def __init__(self, env, log_path):
        super().__init__(env, log_path)
        self.args = [MSKNODE, "worker"]


def node_env(settings, port: int, **overrides: str) -> dict[str, str]:
    """The child environment of the node's processes: ``settings.data_dir``, DICOM ``port``, quiet times
    of 0.5 s, a sweep every 0.5 s, one torch thread and INFO logs; ``overrides`` (``MSKNODE_*`` names)
    replace or add settings."""
    return worker_env(
        {
            "MSKNODE_DATA_DIR": str(settings.data_dir),
            "MSKNODE_PORT": str(port),
            "MSKNODE_QUIET_SECONDS": "0.5",
            "MSKNODE_STUDY_QUIET_SECONDS": "0.5",
            "MSKNODE_SWEEP_INTERVAL_SECONDS": "0.5",
            "MSKNODE_TORCH_THREADS": "1",
            "MSKNODE_LOG_LEVEL": "INFO",
            **overrides,
        }
    )


def study_job(db, study_uid: str, states: tuple[str, ...] = ("done",)):
    """A job of the study ``study_uid`` in one of ``states`` (None: none yet), for `support.jobs.wait_for`."""
    from sqlalchemy import select

    from node.db.schema import Job, Study

    with db.session() as s:
        return s.scalars(
            select(Job).join(Study, Study.id == Job.study_id).where(Study.study_uid == study_uid, Job.state.in_(states))
        ).first()


def knee_study_files(source: str, folder: Path, seed: int) -> list[Path]:
    """``source`` "phantom": a knee phantom study (three series and a localizer, ACL torn) written below
    ``folder`` from ``seed``; "realdata": the real Siemens sagittal PD-FS knee series."""
    if source == "phantom":
        from models.phantoms import write_study

        files = write_study("knee", folder / "study", seed, acl="complete")
        return [p for paths in files.values() for p in paths]
    from models.realdata import realdata_root

    root = realdata_root()
    series = root / "knee" / "siemens_sagittal_dicom" if root is not None else None
    if series is None or not series.is_dir():
        pytest.skip("the real MRI corpus (../shared/realdata or MSKNODE_REALDATA) is absent")
    return sorted(p for p in series.iterdir() if p.is_file() and not p.name.endswith((".md", ".json", ".csv")))
