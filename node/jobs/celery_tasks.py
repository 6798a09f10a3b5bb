"""Celery tasks: thin wrappers, like web views, around plain functions.

``msknode.run_job(job_id)`` loads nothing but the id from the message and calls
`node.jobs.runner.execute_job`, which claims the job by lease and does the work. Retries,
backoff and the dead state live in the database (`node.jobs.lease`), not in Celery: a Celery
retry with a countdown would sit in one worker's memory and die with it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from celery import Celery

from node.settings import Settings

if TYPE_CHECKING:
    from node.db.database import Database

log = logging.getLogger(__name__)

#: the task's name on the wire: queued messages carry it, so it never changes (not even with the module path)
RUN_JOB_TASK = "msknode.run_job"

RunnerFactory = Callable[[Settings], "object"]


class WorkerContext:
    """What a task needs, created lazily once per worker process (a fork gets its own engine)."""

    def __init__(self, settings: Settings, runner_factory: RunnerFactory | None = None):
        self.settings = settings
        self.runner_factory = runner_factory
        self._pid: int | None = None
        self._db: Database | None = None
        self._runner = None
        self._finalizers = None

    def _fresh(self) -> None:
        if self._pid != os.getpid():
            from node.db.database import Database

            self._pid = os.getpid()
            self._db = Database(self.settings.database_url, migrate=False)
            self._runner = None
            self._finalizers = None

    @property
    def db(self):
        self._fresh()
        return self._db

    @property
    def runner(self):
        self._fresh()
        if self._runner is None:
            if self.runner_factory is not None:
                self._runner = self.runner_factory(self.settings)
            else:
                from node.jobs.runner import ModelPipelineRunner

                self._runner = ModelPipelineRunner(self.settings)
        return self._runner

    def warm_up(self) -> None:
        """Builds the runner and lets it import what it needs, so the first job does not pay for it."""
        try:
            runner = self.runner
            warm = getattr(runner, "warm_up", None)
            if warm is not None:
                warm()
            _ = self.finalizers  # built now, not by the first job
        except Exception as e:  # the job itself will report a real problem
            log.warning("worker warm-up failed: %s", e)

    @property
    def finalizers(self):
        self._fresh()
        if self._finalizers is None:
            from node.jobs.runner import default_finalizers

            self._finalizers = default_finalizers(self.settings)
        return self._finalizers


def register_tasks(app: Celery, settings: Settings, *, runner_factory: RunnerFactory | None = None) -> WorkerContext:
    """Registers the msknode tasks on ``app``; they use ``settings`` captured here."""
    ctx = WorkerContext(settings, runner_factory)

    def _warm_pool_process(**_kw) -> None:
        # in a thread: the pool process reports itself up at once (billiard waits only seconds for that)
        import threading

        threading.Thread(target=ctx.warm_up, name="msknode-warm-up", daemon=True).start()

    from celery.signals import worker_process_init

    worker_process_init.connect(_warm_pool_process, weak=False)

    @app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(job_id: int) -> str:
        from node.jobs.runner import execute_job

        outcome = execute_job(ctx.db, ctx.settings, int(job_id), runner=ctx.runner, finalizers=ctx.finalizers)
        return outcome.state

    return ctx
