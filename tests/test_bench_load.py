"""`msknode bench load`: a short busy day (a few small studies at a high rate) through Orthanc and msknode serve.

Not timed: the figures are checked for consistency, not against targets. The embedded default runs
always; PostgreSQL + Redis with two worker processes runs where both servers can be started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.demo.loopback import child_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MSKNODE = Path(sys.executable).parent / "msknode"


def _bench_load(tmp_path: Path, *extra: str, studies: int = 3) -> dict:
    proc = subprocess.run(
        [
            str(MSKNODE),
            "bench",
            "load",
            "--studies",
            str(studies),
            "--rate",
            "60",
            "--slices",
            "12",
            "--matrix",
            "128",
            "--workdir",
            str(tmp_path / "bench"),
            "--warmup",
            "0",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _check(result: dict, studies: int) -> None:
    assert {"studies_per_hour", "median_s", "p95_s", "max_s", "all_once", "queue", "cpu", "memory"} <= set(result)
    assert result["all_once"] is True and result["n"] == result["completed"] == studies
    # the mix: knee, shoulder, spine
    assert [s["anatomy"] for s in result["studies"]] == ["knee", "shoulder", "lumbar_spine"][:studies]
    for s in result["studies"]:
        assert s["once"] and s["results"] >= 1 and s["job_states"] == {"done": 1}, s
        assert s["series"] >= 3  # the localizer and the anatomy's series
        assert 0 < s["latency_s"] <= result["max_s"]
    assert 0 < result["median_s"] <= result["p95_s"] <= result["max_s"]
    assert result["redelivered_objects"] == sum(s["redelivered"] for s in result["studies"])
    assert result["studies_per_hour"] > 0
    # the queue was sampled while the studies went through, and the last sample saw them done
    assert len(result["queue"]) >= 2 and result["queue"][-1]["completed"] == studies
    assert result["queue_max"]["jobs_running"] >= 1 or result["queue_max"]["jobs_waiting"] >= 1
    # memory and CPU of the real processes: a worker that loaded torch and the models is far above 100 MB
    mem = result["memory"]
    assert 100 < mem["worker_peak_rss_mb"] < 3072
    assert 20 < mem["listener_peak_rss_mb"] < 3072
    assert set(mem["worker_peak_rss_mb_per_type"]) == {s["anatomy"] for s in result["studies"]}
    assert result["cpu"]["msknode_cpu_s"] > 0 and result["processes"]["worker"]["cpu_s"] > 0


def test_bench_load_embedded_default(tmp_path):
    result = _bench_load(tmp_path)
    assert result["settings"]["backend"] == "sqlite + filesystem" and result["settings"]["workers"] == 1
    _check(result, 3)


def test_bench_load_postgres_redis_two_workers(tmp_path, postgres_url, redis_url):
    result = _bench_load(tmp_path, "--database-url", postgres_url, "--broker-url", redis_url, "--workers", "2")
    assert result["settings"]["backend"].startswith("postgresql") and result["settings"]["backend"].endswith("redis")
    assert result["settings"]["workers"] == 2 and result["processes"]["worker"]["processes"] >= 3
    _check(result, 3)
