"""``msknode bench models`` runs end to end on the shipped knee models (this checks the command and its
JSON, not the figures: speed is reported by the benchmark, never asserted by a timed test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.pipelines import PIPELINES
from support.cli import msknode
from support.env import ROOT

pytestmark = pytest.mark.slow


def _run(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSKNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "bench", "models", *args, "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bench_models_knee_json(tmp_path):
    r = _run("--anatomy", "knee", "--repeat", "1", "--threads", "2", "--json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert {"knee_study_s", "knee_peak_rss_mb", "per_anatomy", "within_targets"} <= set(res)
    knee = res["per_anatomy"]["knee"]
    assert knee["series"] == {"sag_fluid": [40, 384, 384], "cor_fluid": [40, 384, 384]}
    expected = list(PIPELINES["knee"].models) + (["superres"] if PIPELINES["knee"].superres else [])
    assert knee["models"] == expected and set(knee["per_model"]) == set(expected)
    for name in PIPELINES["knee"].models:
        timing = knee["per_model"][name]
        assert timing["qc"] == "accepted", timing
        # saliency and uncertainty are part of the timed study
        assert {"inference_s", "saliency_s", "uncertainty_s"} <= set(timing), timing
        assert set(knee["forward_modes"][name]) == {
            f"{layout}_{mode}_s" for layout in ("ncdhw", "channels_last") for mode in ("grad", "inference_mode")
        }
    if PIPELINES["knee"].superres:
        assert knee["per_model"]["superres"]["consistency_passed"] is True
    assert res["knee_study_s"] > 0 and res["knee_peak_rss_mb"] > knee["baseline_rss_mb"] > 0
    assert "knee.acl:acl_tear:True" in knee["findings"]  # the typical input is a complete ACL tear
    assert not list(tmp_path.iterdir())  # the generated inputs are removed


def test_bench_models_refuses_bad_arguments(tmp_path, capsys):
    """The refusals come before any benchmark runs: through msknode's entry point in the test's process
    (`support.cli.msknode`; a process of its own would only add the model registry's import time)."""

    def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
        return msknode(capsys, "bench", "models", *args, "--workdir", str(tmp_path))

    r = _run("--threads", "0", tmp_path=tmp_path)
    assert r.returncode == 2 and "--threads" in r.stderr
    r = _run("--anatomy", "elbow", tmp_path=tmp_path)
    assert r.returncode == 2 and "elbow" in r.stderr
