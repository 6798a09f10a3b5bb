"""Health report and Prometheus metrics against real components (SQLite, the filesystem broker,
a real DICOM peer answering C-ECHO: dcmtk storescp)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.db.schema import Study
from node.demo.loopback import echoscu
from node.jobs import lease as jobs
from node.jobs.runner import execute_job
from node.ops.health import health_report
from node.ops.metrics import render
from support.env import free_port
from support.jobs import SleepyRunner, make_study_job

pytestmark = pytest.mark.integration


@pytest.fixture
def echo_peer(tmp_path):
    """dcmtk storescp on a free port: a real C-ECHO SCP standing in for the listener."""
    port = free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "--aetitle", "MSKNODE", "--output-directory", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not echoscu(port, "MSKNODE"):
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_health_reports_each_component(settings, db, echo_peer):
    settings.port = free_port()  # nothing listens there
    report = health_report(settings, db)
    c = report["components"]
    assert c["database"]["ok"] and c["database"]["backend"] == "sqlite"
    assert c["disk"]["ok"] and c["disk"]["free_gb"] > 0
    assert c["broker"]["ok"] and c["broker"]["transport"] == "filesystem"
    assert not c["listener"]["ok"] and c["listener"]["error"]
    assert not c["workers"]["ok"] and c["workers"]["alive"] == 0
    assert report["status"] == "degraded" and report["ok"] is False

    settings.port = echo_peer
    jobs.heartbeat(db, name="host-a:4242", queues=["ingest", "cpu"])
    report = health_report(settings, db)
    c = report["components"]
    assert c["listener"]["ok"] and c["listener"]["latency_ms"] >= 0
    assert c["workers"]["ok"] and c["workers"]["alive"] == 1 and c["workers"]["queues"] == ["cpu", "ingest"]
    assert report["status"] == "ok" and report["ok"] is True

    jobs.worker_stopped(db, name="host-a:4242")
    assert health_report(settings, db, check_listener_too=False)["components"]["workers"]["alive"] == 0


def test_health_is_down_when_the_disk_is_below_the_threshold(settings, db):
    settings.min_free_gb = 1e9
    report = health_report(settings, db, check_listener_too=False)
    assert report["status"] == "down"
    assert "MSKNODE_MIN_FREE_GB" in report["components"]["disk"]["error"]


def test_metrics_count_jobs_steps_and_queues_without_phi(settings, db):
    ids = [make_study_job(db, instances=4) for _ in range(3)]
    with db.session() as s:
        for st in s.query(Study):
            st.patient_name = "DOE^JANE"
            st.patient_id = "PID-SECRET-1"
    assert execute_job(db, settings, ids[0], runner=SleepyRunner(settings, seconds=0.3)).state == "done"
    from node.jobs.celery_app import make_celery, send_job

    app = make_celery(settings)
    send_job(app, ids[1], "cpu")  # one wake-up waiting in the filesystem broker

    body, ctype = render(settings, db)
    text = body.decode()
    assert ctype.startswith("text/plain")
    assert "DOE" not in text and "PID-SECRET" not in text and "1.2.826" not in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name, **labels):
        for s in fams[name].samples:
            if all(s.labels.get(k) == v for k, v in labels.items()) and (s.name == name or s.name == name + "_total"):
                return s.value
        raise KeyError((name, labels))

    assert value("msknode_instances_received") == 12
    assert value("msknode_jobs", state="done") == 1 and value("msknode_jobs", state="queued") == 2
    assert value("msknode_queue_depth", queue="cpu") == 2
    assert value("msknode_broker_queue_messages", queue="cpu") == 1
    assert value("msknode_job_attempts") == 1
    steps = {s.labels["step"] for s in fams["msknode_job_step_duration_seconds"].samples}
    assert {"inference", "total"} <= steps
    count = [
        s
        for s in fams["msknode_job_step_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["step"] == "inference"
    ]
    assert count[0].value == 1
    le_05 = [
        s
        for s in fams["msknode_job_step_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["step"] == "inference" and s.labels["le"] in ("0.25", "0.5")
    ]
    assert [s.value for s in sorted(le_05, key=lambda s: float(s.labels["le"]))] == [0, 1]  # 0.3 s
    assert value("msknode_workers_alive") == 0
    assert value("msknode_disk_free_bytes") > 0
