"""Prometheus gauges of model monitoring and reading targets (`worklists.monitoring`), read at scrape time.

- ``msknode_monitor_status`` — 1 when any monitoring alert is raised, else 0;
- ``msknode_monitor_alerts{kind}`` — alerts by kind (positive_rate, qc_refusal_rate, agreement,
  silence, no_results, overdue);
- ``msknode_model_positive_rate{model,version}``, ``msknode_model_qc_refusal_rate{model,version}``
  — in the current window; ``msknode_model_agreement{model,version}`` and
  ``msknode_model_ppv{model,version}`` — from radiologists' answers (all in both windows);
- ``msknode_model_check_alert{model,version,check}`` — 1 when that rate left its control band;
- ``msknode_model_band_low`` / ``msknode_model_band_high{model,version,check}`` — the band;
- ``msknode_pipeline_silent{pipeline}``, ``msknode_pipeline_stalled_studies{pipeline}``;
- ``msknode_worklist_overdue{priority}`` — unread studies past their reading target.

Labels are model names, versions, pipelines and priorities: no PHI.

The report reads every finding of the windows (about a second on a few thousand studies), so a scrape
does not recompute it: `cached_report` serves the last report and, once it is older than
``MSKNODE_MONITOR_REFRESH_SECONDS``, refreshes it in a background thread (one at a time) while the
scrape is answered from the previous one; ``msknode_monitor_report_age_seconds`` says how old it is.
Only the very first scrape of a process waits for a report.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.db.database import Database, utcnow
from node.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("positive_rate", "qc_refusal_rate", "agreement", "silence", "no_results", "overdue")


@dataclass
class _Cached:
    report: dict[str, Any] | None = None
    at: float = 0.0  # time.monotonic() when `report` was computed
    refreshing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_CACHE: dict[tuple, _Cached] = {}
_CACHE_LOCK = threading.Lock()


def _compute(settings: Settings, db: Database) -> dict[str, Any]:
    from worklists.monitoring import node_report
    from worklists.triage import load_policy

    return node_report(settings, db, load_policy(settings.triage_policy), utcnow())


def cached_report(settings: Settings, db: Database) -> tuple[dict[str, Any], float]:
    """(report, age in seconds): the last monitoring report of this database and configuration,
    refreshed in the background once older than ``settings.monitor_refresh_seconds``; computed here
    (raising on failure) only when there is none yet."""
    key = (
        db.url,
        str(settings.weights_dir),
        str(settings.triage_policy),
        settings.monitor_window_days,
        settings.monitor_reference_days,
    )
    with _CACHE_LOCK:
        entry = _CACHE.setdefault(key, _Cached())
    with entry.lock:
        if entry.report is None:
            entry.report, entry.at = _compute(settings, db), time.monotonic()
            return entry.report, 0.0
        age = time.monotonic() - entry.at
        if age > float(settings.monitor_refresh_seconds) and not entry.refreshing:
            entry.refreshing = True
            threading.Thread(target=_refresh, args=(entry, settings, db), name="monitor-report", daemon=True).start()
        return entry.report, age


def _refresh(entry: _Cached, settings: Settings, db: Database) -> None:
    try:
        report = _compute(settings, db)
    except Exception:  # the previous report is served; the next scrape tries again
        log.exception("monitoring report refresh failed")
        with entry.lock:
            entry.refreshing = False
        return
    with entry.lock:
        entry.report, entry.at, entry.refreshing = report, time.monotonic(), False


class MonitorCollector(Collector):
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db

    def describe(self):
        return []

    def collect(self):
        error = GaugeMetricFamily("msknode_monitor_error", "1 when the monitoring report could not be computed")
        try:
            rep, age = cached_report(self.settings, self.db)
        except Exception:  # the node's other metrics are still served; the error is logged
            log.exception("monitoring report failed")
            error.add_metric([], 1.0)
            yield error
            return
        error.add_metric([], 0.0)
        yield error
        age_g = GaugeMetricFamily("msknode_monitor_report_age_seconds", "age of the monitoring report served")
        age_g.add_metric([], round(age, 3))
        yield age_g
        status = GaugeMetricFamily("msknode_monitor_status", "1 when a monitoring alert is raised")
        status.add_metric([], 1.0 if rep["alerts"] else 0.0)
        yield status
        alerts = GaugeMetricFamily("msknode_monitor_alerts", "monitoring alerts by kind", labels=["kind"])
        counts = Counter(a["kind"] for a in rep["alerts"])
        for k in KINDS:
            alerts.add_metric([k], float(counts.get(k, 0)))
        yield alerts
        mv = ["model", "version"]
        pos = GaugeMetricFamily("msknode_model_positive_rate", "positive rate, current window", labels=mv)
        qc = GaugeMetricFamily("msknode_model_qc_refusal_rate", "QC refusal rate, current window", labels=mv)
        agree = GaugeMetricFamily("msknode_model_agreement", "agreement with radiologists' answers", labels=mv)
        ppv = GaugeMetricFamily("msknode_model_ppv", "estimated PPV from radiologists' answers", labels=mv)
        mvc = [*mv, "check"]
        check = GaugeMetricFamily("msknode_model_check_alert", "1 when the rate left its control band", labels=mvc)
        low = GaugeMetricFamily("msknode_model_band_low", "lower control limit", labels=mvc)
        high = GaugeMetricFamily("msknode_model_band_high", "upper control limit", labels=mvc)
        for m in rep["models"]:
            key = [m["model"], m["version"]]
            for fam, w in (
                (pos, m["current"]["positive"]),
                (qc, m["current"]["qc_refusal"]),
                (agree, m["feedback"]["agreement"]),
                (ppv, m["feedback"]["ppv"]),
            ):
                if w["p"] is not None:
                    fam.add_metric(key, float(w["p"]))
            for c in m["checks"]:
                check.add_metric([*key, c["metric"]], 1.0 if c["status"] == "alert" else 0.0)
                if c.get("band"):
                    low.add_metric([*key, c["metric"]], float(c["band"][0]))
                    high.add_metric([*key, c["metric"]], float(c["band"][1]))
        yield from (pos, qc, agree, ppv, check, low, high)
        silent = GaugeMetricFamily("msknode_pipeline_silent", "1 when a pipeline went quiet", labels=["pipeline"])
        stalled = GaugeMetricFamily(
            "msknode_pipeline_stalled_studies", "routed studies without a result", labels=["pipeline"]
        )
        for q in rep["silence"]:
            silent.add_metric([q["pipeline"]], 1.0 if q["silent"] else 0.0)
            stalled.add_metric([q["pipeline"]], float(q["stalled_studies"]))
        yield from (silent, stalled)
        late = GaugeMetricFamily(
            "msknode_worklist_overdue", "unread studies past their reading target", labels=["priority"]
        )
        for prio, n in rep["overdue"]["counts"].items():
            late.add_metric([prio], float(n))
        yield late
