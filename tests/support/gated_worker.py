"""A real worker whose super-resolution waits at a gate: the findings-first tests.

`GatedRunner` is the production `node.jobs.runner.ModelPipelineRunner` (models, triage, result writers,
publication, final commit); only its second stage, super-resolution, first writes ``<gate>.waiting``
(job id, attempt, pid) and then waits until the file ``<gate>`` exists (``FINDINGS_FIRST_GATE`` in the
environment); a gate that says ``fail`` makes it fail with a permanent error. `GatedWorker` runs it in ``run_worker`` (the Celery worker with its periodic duties: sweeper,
outbox dispatch ...) in its own process group, so a test can hold a job between the publication of its
findings and its final commit, or SIGKILL the worker there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from node.jobs.runner import JobContext, ModelPipelineRunner
from support.env import ROOT, TESTS
from support.jobs import WorkerProcess

GATE_ENV = "FINDINGS_FIRST_GATE"
_MAIN = (
    f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]; from support.gated_worker import main; "
    "sys.exit(main())"
)


def waiting_marker(gate: Path) -> Path:
    return gate.with_name(gate.name + ".waiting")


class GatedRunner(ModelPipelineRunner):
    def super_resolve(self, ctx: JobContext, output: Any, volumes: Any, registry: Any) -> Any:
        gate = Path(os.environ[GATE_ENV])
        waiting_marker(gate).write_text(f"{ctx.job_id} {ctx.attempt} {os.getpid()}\n")
        while not gate.exists():
            time.sleep(0.05)
        if gate.read_text().strip() == "fail":  # the derived volume cannot be made (an error no retry fixes)
            from models.errors import VolumeError

            raise VolumeError("the source series cannot be super-resolved")
        return super().super_resolve(ctx, output, volumes, registry)


class GatedWorker(WorkerProcess):
    """``run_worker`` with `GatedRunner` jobs, in its own process group (``kill9`` takes its pool too)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__(env, log_path)
        self.args = [sys.executable, "-c", _MAIN]


def main() -> int:
    from node.cli import setup_logging
    from node.jobs.worker import run_worker
    from node.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level)
    return run_worker(settings, runner_factory=lambda st: GatedRunner(st))
