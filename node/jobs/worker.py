"""``msknode worker``: a Celery worker plus the node's periodic loops.

`run_worker` starts a Celery worker programmatically (prefork pool, so the soft and hard
time limits apply) on the given queues, and — as a worker bootstep, once the pool is up —
`PeriodicLoop` threads in the main process that run every ``sweep_interval_seconds``:

- the main loop: worker heartbeat (for health) → completeness tick (`node.intake.completeness.tick`,
  creates jobs; housekeeping workers only) → enqueue (wake-ups for committed jobs with
  ``enqueue_pending``) → sweeper (expired leases, lost wake-ups) → retention and broker file
  cleanup, hourly (housekeeping workers only);
- the dispatch loop (housekeeping workers only, every ``DISPATCH_POLL_SECONDS`` at most, so a
  finished job's findings leave at once): `node.dispatch.outbox.process_outbox`, in its own
  thread so that a slow or unreachable PACS never delays the sweeper.
- the UPS loop (housekeeping workers only): `node.ups.events.run_round` — workitems follow the
  jobs, their events go to subscribers — in its own thread for the same reason.
- the completeness watch (housekeeping workers only, every ``COMPLETENESS_WATCH_SECONDS``): asks
  the database whether a receiving series has reached its announced count
  (`node.intake.completeness.count_reached`, no write lock) and, when one newly has, wakes the
  main loop, which runs its round at once instead of at its next interval: the series is found
  complete and its study settled (protocol complete) within tens of milliseconds of the
  instance that completed it being indexed, by whichever listener process or host stored it.

"Housekeeping" workers are those that consume the ``ingest`` queue (the listener host);
inference-only workers (``--queues gpu``) heartbeat, enqueue and sweep only. Every step is
safe with several workers at once (conditional updates in the database).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node.db.database import Database, utcnow
from node.jobs import lease
from node.settings import Settings

log = logging.getLogger(__name__)

#: the longest the dispatch loop waits between two looks at the outbox (a read that takes no lock,
#: `node.dispatch.outbox.anything_due`; the claim's write transaction only when something is due)
DISPATCH_POLL_SECONDS = 0.05
#: how often the completeness watch asks whether a receiving series reached its announced count (a read, no lock)
COMPLETENESS_WATCH_SECONDS = 0.05


@dataclass
class Duty:
    """One step of the periodic loop: ``fn(now)``, at most every ``every`` seconds (0 = every round)."""

    name: str
    fn: Callable[[dt.datetime], object]
    every: float = 0.0
    last_run: float = field(default=float("-inf"))
    last_error: str | None = None

    def due(self, t: float) -> bool:
        return t - self.last_run >= self.every


class BrokerUnavailable(Exception):
    """The broker did not take a wake-up (the job stays pending in the database)."""


class PeriodicLoop:
    """Runs the duties in order, every ``interval`` seconds, in a daemon thread; a failing duty is logged, not fatal.

    `wake` starts the next round at once (or right after the current one, if a round is running).
    """

    def __init__(
        self,
        duties: list[Duty],
        *,
        interval: float,
        name: str = "msknode-periodic",
        logger: logging.Logger | None = None,
    ):
        self.duties = duties
        self.interval = interval
        self.name = name
        self.log = logger or log
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.wakes = 0

    def run_once(self) -> None:
        for duty in self.duties:
            t = time.monotonic()
            if not duty.due(t):
                continue
            duty.last_run = t
            try:
                duty.fn(utcnow())
                if duty.last_error is not None:
                    self.log.info("periodic %s: recovered", duty.name)
                duty.last_error = None
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                if msg != duty.last_error:  # log a repeated failure once
                    if isinstance(e, BrokerUnavailable):
                        self.log.warning("periodic %s: %s", duty.name, e)
                    else:
                        self.log.exception("periodic %s failed: %s", duty.name, msg)
                duty.last_error = msg
        self.rounds += 1

    def wake(self) -> None:
        """The next round now, not at the interval (thread-safe; a wake during a round runs one more)."""
        self.wakes += 1
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self._wake.clear()  # before the round: a wake while it runs starts the next one right after
            self.run_once()
            self._wake.wait(max(self.interval - (time.monotonic() - t0), 0.01))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)


def completeness_duty(db: Database, settings: Settings) -> Duty:
    """The completeness tick: routes complete series, creates jobs."""
    from node.intake import completeness

    provider = completeness.rules_provider(settings)

    def tick(now: dt.datetime) -> None:
        with db.session() as s:
            created = completeness.tick(s, settings, now, provider())
        if created:
            log.debug("jobs created: %s", list(created))

    return Duty("completeness", tick)


def completeness_watch_duty(db: Database, main: PeriodicLoop) -> Duty:
    """Wakes ``main`` (the loop with the completeness tick) when a receiving series newly reached its announced count.

    Newly: a series whose count was reached but that the tick left receiving (a slice without
    a position, a gap: it waits for the quiet period) wakes the loop once, not on every look;
    another instance of it wakes it again.
    """
    from node.intake.completeness import count_reached

    seen: frozenset[tuple[int, int]] = frozenset()

    def look(now: dt.datetime) -> None:
        nonlocal seen
        reached = count_reached(db.engine)
        if reached - seen:
            main.wake()
        seen = reached

    return Duty("completeness-watch", look)


def dispatch_duty(db: Database, settings: Settings) -> Duty:
    """Sends due result objects to their destinations (the outbox)."""
    from node.dispatch.outbox import anything_due, process_outbox

    def run(now: dt.datetime) -> None:
        if anything_due(db.engine, now):  # a read without the write lock: the loop looks often
            process_outbox(db, settings, now=now)

    return Duty("dispatch", run)


def retention_duty(db: Database, settings: Settings) -> Duty:
    """Purges stored instances whose results were delivered long enough ago (hourly)."""
    from node.ops.retention import purge

    def run(now: dt.datetime) -> None:
        purge(db, settings, now=now)

    return Duty("retention", run, every=3600.0)


def ups_duty(db: Database, settings: Settings) -> Duty:
    """Unified Procedure Steps follow the jobs; their events go to subscribers (node.ups)."""
    from node.ups.events import run_round

    def run(now: dt.datetime) -> None:
        run_round(db, settings, now)

    return Duty("ups", run)


def ups_cleanup_duty(db: Database) -> Duty:
    """Forgets UPS events delivered (or dead) a week ago (hourly)."""
    from node.ups.events import forget_old_events

    return Duty("ups-cleanup", lambda now: forget_old_events(db, now), every=3600.0)


def answers_duty(db: Database, settings: Settings) -> Duty:
    """Radiologists' answers of read studies to the PACS as SRs (node.jobs.answers; MSKNODE_FEEDBACK_SR)."""
    from node.jobs.answers import send_answers

    return Duty("answers", lambda now: send_answers(db, settings, now=now), every=30.0)


def build_duties(
    db: Database,
    settings: Settings,
    *,
    name: str,
    queues: list[str],
    send: Callable[[int, str], None],
    queue_depths: Callable[[], dict[str, int]] | None,
    housekeeping: bool,
) -> list[Duty]:
    """The main loop's duties in their order: heartbeat → completeness → enqueue → sweeper → retention."""
    from node.jobs.celery_app import cleanup_processed

    def enqueue(now: dt.datetime) -> None:
        report = lease.enqueue_pending_jobs(db, send, now=now)
        if report.sent:
            log.debug("enqueued jobs %s", report.sent)
        if report.error:  # logged once by the loop until the broker is back
            raise BrokerUnavailable(f"jobs stay pending in the database: {report.error}")

    duties: list[Duty] = [Duty("heartbeat", lambda now: lease.heartbeat(db, name=name, queues=queues, now=now))]
    if housekeeping:
        duties.append(completeness_duty(db, settings))
    duties.append(Duty("enqueue", enqueue))
    duties.append(
        Duty(
            "sweeper",
            lambda now: lease.sweep(db, now=now, lease_seconds=settings.job_lease_seconds, queue_depths=queue_depths),
        )
    )
    # a lost wake-up found by the sweeper is sent in the same round
    duties.append(Duty("enqueue-resent", enqueue))
    if housekeeping:
        duties.append(retention_duty(db, settings))
        if settings.feedback_sr:
            duties.append(answers_duty(db, settings))
        duties.append(Duty("broker-cleanup", lambda now: cleanup_processed(settings), every=3600.0))
    return duties


def build_loops(db: Database, settings: Settings, *, housekeeping: bool, **kw) -> list[PeriodicLoop]:
    """The main loop and, on housekeeping workers, a dispatch loop of its own (a slow PACS never delays the sweeper),
    the UPS loop and the completeness watch that wakes the main loop."""
    main = PeriodicLoop(
        build_duties(db, settings, housekeeping=housekeeping, **kw),
        interval=settings.sweep_interval_seconds,
        name="msknode-periodic",
    )
    loops = [main]
    if housekeeping:
        # a series that reached its announced count is found complete (and its study settled) at once
        loops.append(
            PeriodicLoop(
                [completeness_watch_duty(db, main)],
                interval=min(settings.sweep_interval_seconds, COMPLETENESS_WATCH_SECONDS),
                name="msknode-completeness-watch",
            )
        )
        # the outbox is looked at more often than the rest: a finished job's SR leaves within DISPATCH_POLL_SECONDS
        loops.append(
            PeriodicLoop(
                [dispatch_duty(db, settings)],
                interval=min(settings.sweep_interval_seconds, DISPATCH_POLL_SECONDS),
                name="msknode-dispatch",
            )
        )
        # workitems and their events in a loop of their own: a subscriber that is down never delays results
        loops.append(
            PeriodicLoop(
                [ups_duty(db, settings), ups_cleanup_duty(db)],
                interval=settings.sweep_interval_seconds,
                name="msknode-ups",
            )
        )
    return loops


def validate_queues(queues: list[str] | None, settings: Settings) -> list[str]:
    from node.errors import SettingsError
    from node.jobs.celery_app import QUEUES

    queues = list(queues or settings.worker_queues)
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise SettingsError(f"unknown worker queue(s) {unknown}; choose from {', '.join(QUEUES)}")
    return queues


def run_worker(
    settings: Settings,
    queues: list[str] | None = None,
    *,
    runner_factory=None,
    housekeeping: bool | None = None,
    pool: str = "prefork",
) -> int:
    """Runs a Celery worker with the periodic loop until SIGTERM/SIGINT; returns the exit code.

    ``runner_factory(settings) -> JobRunner`` replaces the model pipeline (tests);
    ``housekeeping`` defaults to whether the worker consumes the ``ingest`` queue.
    """
    from celery import bootsteps

    from node.jobs.celery_app import make_celery, queue_depths, send_job

    queues = validate_queues(queues, settings)
    if housekeeping is None:
        housekeeping = "ingest" in queues
    # inherited by the pool's processes before torch is imported there
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(settings.torch_threads)
    settings.ensure_dirs()
    db = Database(settings.database_url)  # applies migrations
    app = make_celery(settings, runner_factory=runner_factory)
    name = lease.worker_name()
    loops = build_loops(
        db,
        settings,
        name=name,
        queues=queues,
        send=lambda job_id, queue: send_job(app, job_id, queue),
        queue_depths=lambda: queue_depths(app),
        housekeeping=housekeeping,
    )

    def stop_loops() -> None:
        for loop in loops:
            loop.stop()

    class PeriodicLoopStep(bootsteps.StartStopStep):
        requires = ("celery.worker.components:Pool",)

        def start(self, worker):
            for loop in loops:
                log.info("worker %s: %s started (%s)", name, loop.name, ", ".join(d.name for d in loop.duties))
                loop.start()

        def stop(self, worker):
            stop_loops()

        def shutdown(self, worker):
            stop_loops()

    app.steps["worker"].add(PeriodicLoopStep)

    def _forget_parent_connections(**_kw) -> None:
        # a pool process forked after the loops connected must never use (or close) those connections
        db.engine.dispose(close=False)

    from celery.signals import worker_process_init

    worker_process_init.connect(_forget_parent_connections, weak=False)
    log.info(
        "worker %s: queues %s, broker %s, concurrency %s",
        name,
        ",".join(queues),
        str(settings.broker_url).split("://", 1)[0],
        settings.worker_concurrency,
    )
    worker = app.Worker(
        hostname=f"msknode-{os.getpid()}@{socket.gethostname()}",
        queues=queues,
        concurrency=settings.worker_concurrency,
        pool=pool,
        loglevel=settings.log_level,
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
        optimization="fair",
    )
    try:
        worker.start()
    finally:
        stop_loops()
        try:
            lease.worker_stopped(db, name=name)
        except Exception as e:  # the database may be what stopped us
            log.warning("could not record worker stop: %s", e)
        db.dispose()
    return int(worker.exitcode or 0)
