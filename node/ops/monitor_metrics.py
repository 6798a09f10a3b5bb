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
"""

from __future__ import annotations

import logging
from collections import Counter

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.db.database import Database, utcnow
from node.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("positive_rate", "qc_refusal_rate", "agreement", "silence", "no_results", "overdue")


class MonitorCollector(Collector):
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db

    def describe(self):
        return []

    def collect(self):
        from worklists.monitoring import node_report
        from worklists.triage import load_policy

        error = GaugeMetricFamily("msknode_monitor_error", "1 when the monitoring report could not be computed")
        try:
            rep = node_report(self.settings, self.db, load_policy(self.settings.triage_policy), utcnow())
        except Exception:  # the node's other metrics are still served; the error is logged
            log.exception("monitoring report failed")
            error.add_metric([], 1.0)
            yield error
            return
        error.add_metric([], 0.0)
        yield error
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
