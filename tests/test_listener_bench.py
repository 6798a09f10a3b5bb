"""``msknode bench ingest`` runs end to end (a tiny set: this checks the command, not the figures)."""

from __future__ import annotations

import json
import subprocess
import sys

from node.demo.loopback import child_env
from support.env import ROOT

KEYS = {
    "msknode_ips",
    "orthanc_ips",
    "storescp_ips",
    "ratio_orthanc",
    "ratio_storescp",
    "ratio_orthanc_parallel",
    "all_arrived",
    "msknode_stock_ips",
    "msknode_stock_parallel_ips",
    "ratio_orthanc_stock",
    "ratio_orthanc_stock_parallel",
    "ratio_fast_stock",
    "ratio_fast_stock_parallel",
}


def test_bench_ingest_json(tmp_path):
    env = child_env()
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "bench", "ingest", "--instances", "8", "--workdir", str(tmp_path), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert set(result) >= KEYS and result["all_arrived"] is True and result["instances"] == 8
    # each receiver got an untimed warm-up first (4 instances per association), checked as arrived too:
    # Orthanc holds the timed set and the warm-up, no more, no less
    assert result["warmup_per_association"] == 4
    for run in result["runs"]:
        if run["receiver"] == "orthanc":
            assert run["note"] == f"{8 + 4 * run['associations']} instances in Orthanc", run
    for key in KEYS - {"all_arrived"}:
        assert result[key] > 0, key
    runs = {(run["receiver"], run["associations"]) for run in result["runs"]}
    assert runs == {(name, n) for name in ("msknode", "msknode-stock", "orthanc", "storescp") for n in (1, 4)}
    assert all(run["arrived"] for run in result["runs"]), result["runs"]
    # the listener's peak RSS (VmHWM of its real processes, read before they stop): a Python process with
    # pydicom and pynetdicom loaded is tens of MB
    for key in ("msknode_listener_peak_rss_mb", "msknode_listener_parallel_peak_rss_mb"):
        assert 20 < result[key] < 2048, (key, result[key])
    # CPU time of each receiver's processes over the send, per instance (msknode: a few ms)
    for name in ("msknode", "msknode_stock", "orthanc", "storescp"):
        for suffix in ("", "_parallel"):
            assert result[f"{name}{suffix}_cpu_ms"] is not None and result[f"{name}{suffix}_cpu_ms"] >= 0, (
                name,
                suffix,
            )
    assert all(run["cpu_ms"] is not None for run in result["runs"]), result["runs"]
    assert result["msknode_cpu_ms"] > 0
    assert not list(tmp_path.iterdir())  # the receivers' data is removed


def test_bench_ingest_refuses_a_bad_warmup():
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "bench", "ingest", "--warmup", "-1"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--warmup must be between 0 and 1000" in r.stderr, r.stderr
