"""`msknode bench e2e --studies 1 --json`: one small knee study through Orthanc and msknode serve, the JSON keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.demo.loopback import child_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MSKNODE = Path(sys.executable).parent / "msknode"


def test_bench_e2e_one_study_json(tmp_path):
    env = child_env()
    proc = subprocess.run(
        [
            str(MSKNODE),
            "bench",
            "e2e",
            "--studies",
            "1",
            "--warmup",
            "0",
            "--slices",
            "12",
            "--matrix",
            "128",
            "--workdir",
            str(tmp_path / "bench"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert {"median_s", "p95_s", "all_arrived", "breakdown"} <= set(result)
    assert result["all_arrived"] is True and result["n"] == 1
    study = result["studies"][0]
    assert study["arrived"] and study["results"] >= 1  # at least the SR
    # findings first: the SR (and SEG) were stored in Orthanc before any derived object (Orthanc's reception log)
    assert study["kinds"].get("sr") == 1 and set(study["kinds"]) - {"sr", "seg"}, study["kinds"]
    assert study["findings_first"] is True and result["findings_first"] is True
    assert 0 < result["first_result_s"] == study["first_result_s"] <= study["total_s"]
    assert result["first_result_p95_s"] == result["first_result_s"]
    # the total is PACS-to-PACS; the steps inside it are measured on the same clock and fit into it
    assert 0 < result["median_s"] == result["p95_s"] == study["total_s"] < 400
    b = result["breakdown"]
    for step in (
        "forward_s",
        "completeness_wait_s",
        "queue_wait_s",
        "load_s",
        "inference_s",
        "writing_s",
        "dispatch_s",
    ):
        assert step in b and b[step] >= 0, step
    assert isinstance(b["inference_per_model_s"], dict)
    # findings first: the SR is sent once the job published its findings, and is in the PACS before the job is done
    # (super-resolution and its series still to come): total - dispatch is last source image -> job done
    assert b["findings_dispatch_s"] >= 0 and study["first_result_s"] < study["total_s"] - b["dispatch_s"]
    parts = sum(
        b[k]
        for k in (
            "forward_s",
            "completeness_wait_s",
            "queue_wait_s",
            "load_s",
            "inference_s",
            "writing_s",
            "dispatch_s",
        )
    )
    assert parts <= study["total_s"] + 0.5
    # the study's series completed by their announced size or the quiet timer, not by a 60 s timeout
    assert b["completeness_wait_s"] < 30
    # the bench's node declares the phantom studies' series as its protocol: the study is settled by it, at once,
    # while Orthanc still holds its association open (DicomAssociationCloseDelay) and before the study quiet period
    from node.demo.bench_e2e import BENCH_STUDY_PROTOCOLS

    assert result["settings"]["study_protocols"] == BENCH_STUDY_PROTOCOLS
    assert b["completeness_wait_s"] < min(result["settings"]["study_quiet_seconds"], 1.0), b
