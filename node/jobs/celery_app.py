"""The Celery app, built from `Settings` (no module-level app, no global configuration).

Two deployments, one code path:

- embedded default: ``MSKNODE_BROKER_URL`` unset → kombu's ``filesystem://`` transport with its
  folders under ``<data dir>/broker`` (no server to install);
- scale-out: ``MSKNODE_BROKER_URL=redis://host:6379/0`` (or ``amqp://``).

Messages carry only a job id. The broker is a wake-up path: jobs are taken by a lease in
the database and a sweeper re-sends lost wake-ups (`node.jobs.lease`), so neither the
filesystem transport (which loses unacknowledged messages on ``kill -9``) nor Redis'
visibility timeout decides whether a job runs.

Queues by work type: ``ingest`` (the node's housekeeping: completeness, dispatch,
retention — run by workers on the listener host), ``cpu`` and ``gpu`` (inference).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from node.jobs import fs_broker
from node.jobs.celery_tasks import RUN_JOB_TASK, register_tasks
from node.settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("ingest", "cpu", "gpu")


@dataclass(frozen=True)
class FilesystemBroker:
    """The folders of the filesystem transport under ``settings.broker_dir``."""

    queue_dir: Path  # messages waiting (data_folder_in == data_folder_out: one node)
    processed_dir: Path  # messages taken by a consumer (renamed there atomically, then removed)
    control_dir: Path  # exchange bindings

    @classmethod
    def of(cls, settings: Settings) -> FilesystemBroker:
        base = settings.broker_dir
        return cls(base / "queue", base / "processed", base / "control")

    def ensure(self) -> None:
        for d in (self.queue_dir, self.processed_dir, self.control_dir):
            d.mkdir(parents=True, exist_ok=True)


def is_filesystem(settings: Settings) -> bool:
    return str(settings.broker_url).startswith("filesystem://")


#: how often a worker looks into the embedded broker's queue folder when it found nothing (a listdir per queue;
#: half of it is the mean wait of a job between its wake-up message and its worker)
FS_POLL_SECONDS = 0.05


def transport_options(settings: Settings) -> dict[str, Any]:
    if is_filesystem(settings):
        fs = FilesystemBroker.of(settings)
        fs.ensure()
        return {
            "data_folder_in": str(fs.queue_dir),
            "data_folder_out": str(fs.queue_dir),
            # renamed into a folder on the same file system: a message goes to one consumer only
            "store_processed": True,
            "processed_folder": str(fs.processed_dir),
            "control_folder": str(fs.control_dir),
            "polling_interval": FS_POLL_SECONDS,
        }
    opts: dict[str, Any] = {
        # redelivery of an unacknowledged message; the lease + sweeper act much sooner
        "visibility_timeout": int(settings.job_time_limit * 2 + settings.job_lease_seconds),
    }
    if str(settings.broker_url).startswith(("redis://", "rediss://")):
        opts.update(socket_connect_timeout=3, socket_timeout=10, retry_on_timeout=True)
    return opts


def make_celery(settings: Settings, *, runner_factory=None) -> Celery:
    """A configured Celery app with the msknode tasks registered (they capture ``settings``).

    ``runner_factory(settings) -> JobRunner`` replaces the model pipeline runner (tests).
    """
    app = Celery("msknode", set_as_current=False)
    filesystem = is_filesystem(settings)
    app.conf.update(
        # the filesystem transport ignores the host; naming one keeps kombu from warning about it
        broker_url=fs_broker.URL if filesystem else settings.broker_url,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits out a broker outage
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_time_limit,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        task_default_exchange="cpu",
        task_default_routing_key="cpu",
        task_create_missing_queues=False,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        # broadcast (remote control) needs fanout; with the filesystem transport it would leave
        # files behind for every worker that ever ran. Health comes from the database instead.
        worker_enable_remote_control=not filesystem,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
        enable_utc=True,
    )
    register_tasks(app, settings, runner_factory=runner_factory)
    return app


def send_job(app: Celery, job_id: int, queue: str) -> None:
    """Publishes the wake-up for one job (raises if the broker cannot take it)."""
    if queue not in QUEUES:
        queue = "cpu"
    app.send_task(RUN_JOB_TASK, args=[int(job_id)], queue=queue, routing_key=queue, exchange=queue)


def _depths(conn, queues: tuple[str, ...]) -> dict[str, int]:
    conn.ensure_connection(max_retries=0, timeout=3)
    depths: dict[str, int] = {}
    for q in queues:
        channel = conn.channel()
        try:
            depths[q] = int(channel.queue_declare(queue=q, passive=True).message_count)
        except conn.connection_errors:
            raise
        except Exception:
            depths[q] = 0  # a queue never declared holds nothing
        finally:
            try:
                channel.close()
            except Exception:
                pass
    return depths


def queue_depths(app: Celery, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """Messages waiting in each broker queue (raises if the broker is unreachable)."""
    with app.connection_for_read() as conn:
        return _depths(conn, queues)


def broker_queue_depths(settings: Settings, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """The same without a Celery app (for metrics): a plain kombu connection from the settings."""
    from kombu import Connection

    url = fs_broker.URL if is_filesystem(settings) else settings.broker_url
    assert url is not None  # resolved by Settings' validator
    with Connection(url, transport_options=transport_options(settings), connect_timeout=3) as conn:
        return _depths(conn, queues)


def cleanup_processed(settings: Settings, *, older_than: float = 3600.0) -> int:
    """Removes consumed message files of the filesystem transport older than ``older_than`` seconds."""
    if not is_filesystem(settings):
        return 0
    import time

    fs = FilesystemBroker.of(settings)
    removed = 0
    cutoff = time.time() - older_than
    try:
        entries = list(fs.processed_dir.iterdir())
    except FileNotFoundError:
        return 0
    for p in entries:
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed
