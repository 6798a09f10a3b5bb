"""Prometheus metrics, read from the database at scrape time (so every process of a scale-out
deployment reports the same numbers, and nothing is kept in module state).

`render(settings, db)` returns ``(body, content_type)`` for ``GET /metrics``. Metric names:

- ``msknode_instances_received_total`` — stored instances (rows in the index);
- ``msknode_instances_quarantined_total`` — refused objects kept for inspection;
- ``msknode_series{state}`` and ``msknode_series_completed_total`` (series that reached complete);
- ``msknode_jobs{state}``, ``msknode_job_attempts_total``;
- ``msknode_job_step_duration_seconds{step}`` — histogram over finished jobs' timings
  (``load``, ``inference``, ``results``, ``total`` …);
- ``msknode_queue_depth{queue}`` — jobs waiting per queue in the database;
  ``msknode_broker_queue_messages{queue}`` — messages waiting in the broker (when reachable);
- ``msknode_outbox_items{state}``, ``msknode_dispatch_failures_total`` (send attempts that did
  not succeed), ``msknode_dispatch_sent_total``;
- ``msknode_ups_workitems{state}`` (SCHEDULED, IN PROGRESS, COMPLETED, CANCELED) and
  ``msknode_ups_events{state}`` (pending, sent, dead: N-EVENT-REPORTs owed to UPS subscribers);
- ``msknode_workers_alive``; ``msknode_disk_free_bytes``;
- ``msknode_listener_refusals_total{reason}`` — connections and associations the DICOM listener
  refused (request deadline, connections per address, calling/called AE title, local limit, PDU
  too large ...): the only figure not from the database, but from the listener processes' counts
  in ``<data_dir>/run/refusals-*.json`` (`node.receive.listener.RefusalCounts`).

Labels are states, queues and step names only: no PHI.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.db.database import Database, utcnow
from node.settings import Settings

#: histogram buckets for step durations, seconds
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: the most recent finished jobs whose timings make the histogram
TIMING_WINDOW = 5000


def _histogram(values: Iterable[float]) -> tuple[list[tuple[str, int]], float]:
    counts = [0] * (len(STEP_BUCKETS) + 1)
    total = 0.0
    n = 0
    for v in values:
        n += 1
        total += v
        for i, b in enumerate(STEP_BUCKETS):
            if v <= b:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    buckets = []
    acc = 0
    for b, c in zip(STEP_BUCKETS, counts):
        acc += c
        buckets.append((repr(float(b)), acc))
    buckets.append(("+Inf", n))
    return buckets, total


class NodeCollector(Collector):
    """Collects the node's metrics from the database on every scrape."""

    def __init__(self, settings: Settings, db: Database, broker_depths: Callable[[], Mapping[str, int]] | None = None):
        self.settings = settings
        self.db = db
        self.broker_depths = broker_depths

    def describe(self):
        return []

    def collect(self):
        from node.db.schema import Instance, Job, OutboxItem, Quarantine, Series, UpsEvent, UpsWorkitem
        from node.jobs.lease import live_workers
        from node.ops.health import STALE_HEARTBEATS

        now = utcnow()
        with self.db.session() as s:
            instances = s.scalar(select(func.count()).select_from(Instance)) or 0
            quarantined = s.scalar(select(func.count()).select_from(Quarantine)) or 0
            series_states = s.execute(select(Series.state, func.count()).group_by(Series.state)).all()
            series_completed = (
                s.scalar(select(func.count()).select_from(Series).where(Series.completed_at.is_not(None))) or 0
            )
            job_states = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            attempts = s.scalar(select(func.coalesce(func.sum(Job.attempts), 0))) or 0
            depths = s.execute(select(Job.queue, func.count()).where(Job.state == "queued").group_by(Job.queue)).all()
            timings = s.scalars(
                select(Job.timings)
                .where(Job.state.in_(("done", "superseded")), Job.timings.is_not(None))
                .order_by(Job.id.desc())
                .limit(TIMING_WINDOW)
            ).all()
            outbox_states = s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all()
            ups_states = s.execute(select(UpsWorkitem.state, func.count()).group_by(UpsWorkitem.state)).all()
            ups_events = s.execute(select(UpsEvent.state, func.count()).group_by(UpsEvent.state)).all()
            out_attempts = s.scalar(select(func.coalesce(func.sum(OutboxItem.attempts), 0))) or 0
            sent = s.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.state == "sent")) or 0
            alive = len(
                live_workers(s, now=now, stale_after=max(10.0, STALE_HEARTBEATS * self.settings.sweep_interval_seconds))
            )

        yield CounterMetricFamily("msknode_instances_received", "Instances stored in the index", value=instances)
        yield CounterMetricFamily(
            "msknode_instances_quarantined", "Objects refused and kept for inspection", value=quarantined
        )

        g = GaugeMetricFamily("msknode_series", "Series by state", labels=["state"])
        for state, n in series_states:
            g.add_metric([state], n)
        yield g
        yield CounterMetricFamily("msknode_series_completed", "Series that reached complete", value=series_completed)

        g = GaugeMetricFamily("msknode_jobs", "Jobs by state", labels=["state"])
        for state, n in job_states:
            g.add_metric([state], n)
        yield g
        yield CounterMetricFamily("msknode_job_attempts", "Job attempts started", value=attempts)

        per_step: dict[str, list[float]] = {}
        for t in timings:
            for step, secs in (t or {}).items():
                if isinstance(secs, (int, float)):
                    per_step.setdefault(step, []).append(float(secs))
        h = HistogramMetricFamily(
            "msknode_job_step_duration_seconds",
            f"Duration of each job step (the last {TIMING_WINDOW} finished jobs)",
            labels=["step"],
        )
        for step in sorted(per_step):
            buckets, total = _histogram(per_step[step])
            h.add_metric([step], buckets, total)
        yield h

        g = GaugeMetricFamily("msknode_queue_depth", "Jobs waiting in the database per queue", labels=["queue"])
        from node.jobs.celery_app import QUEUES

        by_queue = dict(depths)
        for q in sorted(set(QUEUES) | set(by_queue)):
            g.add_metric([q], by_queue.get(q, 0))
        yield g
        if self.broker_depths is not None:
            try:
                broker = self.broker_depths()
            except Exception:
                broker = None
            if broker is not None:
                g = GaugeMetricFamily(
                    "msknode_broker_queue_messages", "Messages waiting in the broker", labels=["queue"]
                )
                for q, n in sorted(broker.items()):
                    g.add_metric([q], n)
                yield g

        g = GaugeMetricFamily("msknode_outbox_items", "Outbox items by state", labels=["state"])
        for state, n in outbox_states:
            g.add_metric([state], n)
        yield g
        yield CounterMetricFamily(
            "msknode_dispatch_failures",
            "Send attempts that did not succeed",
            value=max(int(out_attempts) - int(sent), 0),
        )
        yield CounterMetricFamily("msknode_dispatch_sent", "Result objects acknowledged by a destination", value=sent)

        g = GaugeMetricFamily("msknode_ups_workitems", "UPS workitems (AI tasks) by state", labels=["state"])
        for state, n in ups_states:
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(
            "msknode_ups_events", "UPS events owed to subscribers by state (pending, sent, dead)", labels=["state"]
        )
        for state, n in ups_events:
            g.add_metric([state], n)
        yield g

        yield GaugeMetricFamily("msknode_workers_alive", "Workers with a recent heartbeat", value=alive)
        try:
            free = shutil.disk_usage(self.settings.data_dir).free
            yield GaugeMetricFamily(
                "msknode_disk_free_bytes", "Free space on the data directory's file system", value=free
            )
        except OSError:
            pass
        c = CounterMetricFamily(
            "msknode_listener_refusals",
            "Connections and associations the DICOM listener refused, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(listener_refusals(self.settings).items()):
            c.add_metric([reason], n)
        yield c


def listener_refusals(settings: Settings) -> dict[str, int]:
    """The listener processes' refusal counts by reason, summed over ``<data_dir>/run/refusals-*.json``."""
    totals: dict[str, int] = {}
    run = settings.data_dir / "run"
    try:
        files = sorted(run.glob("refusals-*.json"))
    except OSError:
        return totals
    for f in files:
        try:
            counts = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(counts, dict):
            continue
        for reason, n in counts.items():
            if isinstance(n, int):
                totals[str(reason)] = totals.get(str(reason), 0) + n
    return totals


def broker_depths(settings: Settings) -> Callable[[], Mapping[str, int]]:
    """Broker queue depths: counted files for the filesystem transport, the broker's own count otherwise."""
    from node.jobs.celery_app import QUEUES, FilesystemBroker, broker_queue_depths, is_filesystem

    if not is_filesystem(settings):
        return lambda: broker_queue_depths(settings)
    fs = FilesystemBroker.of(settings)

    def depths() -> Mapping[str, int]:
        counts = dict.fromkeys(QUEUES, 0)
        for p in fs.queue_dir.iterdir():
            q = p.name.partition(".")[2].removesuffix(".msg")
            if q in counts and p.name.endswith(".msg"):
                counts[q] += 1
        return counts

    return depths


def make_registry(
    settings: Settings, db: Database, broker_depths_fn: Callable[[], Mapping[str, int]] | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        NodeCollector(settings, db, broker_depths_fn if broker_depths_fn is not None else broker_depths(settings))
    )
    from node.ops.monitor_metrics import MonitorCollector

    registry.register(MonitorCollector(settings, db))  # model monitoring and reading targets
    return registry


def render(settings: Settings, db: Database) -> tuple[bytes, str]:
    """The Prometheus text exposition of the node's metrics and its content type."""
    return generate_latest(make_registry(settings, db)), CONTENT_TYPE_LATEST
