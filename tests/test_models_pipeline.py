"""run_pipeline (contract C4) on a knee phantom study written as DICOM; missing roles; predict CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from models.errors import PipelineError
from models.io import load_series
from models.phantoms import write_study
from models.pipelines import PIPELINES, run_pipeline
from models.registry import Registry
from support.cli import msknode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def knee_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("knee_study")
    roles = write_study("knee", out, 6_200_001, acl="complete")
    return out, roles


@pytest.fixture(scope="module")
def registry():
    torch.set_num_threads(2)
    return Registry()


def test_knee_pipeline_lists_shipped_models():
    knee = PIPELINES["knee"]
    assert "knee.acl" in knee.models and knee.main_model == "knee.acl"
    assert knee.model_roles["knee.acl"] == ("sag_fluid", "sag_pd")
    assert knee.superres_roles[:2] == ("sag_fluid", "sag_pd")


def test_run_pipeline_on_a_knee_phantom_study(knee_study, registry):
    _, roles = knee_study
    volumes = {role: load_series(paths) for role, paths in roles.items() if role != "localizer"}
    assert "sag_fluid" in volumes
    out = run_pipeline("knee", volumes, registry=registry)
    assert out.pipeline == "knee"
    acl = next(o for o in out.outputs if o.model.name == "knee.acl")
    assert acl.qc.accepted, acl.qc
    assert acl.series_uid == volumes["sag_fluid"].series_uid
    assert out.used_series["knee.acl"] == [volumes["sag_fluid"].series_uid]
    (f,) = acl.findings
    assert f.code == "acl_tear" and f.probability is not None and f.uncertainty is not None
    assert f.heatmap.shape == volumes["sag_fluid"].shape and f.heatmap.dtype == np.float32
    assert f.heatmap.min() >= 0.0 and f.heatmap.max() <= 1.0
    if PIPELINES["knee"].superres:
        (sr,) = out.superres
        assert sr.source.series_uid == volumes["sag_fluid"].series_uid
        assert sr.qc.accepted and sr.consistency_passed
        assert sr.volume.shape[0] == 2 * volumes["sag_fluid"].shape[0]
        assert out.used_series["superres"] == [volumes["sag_fluid"].series_uid]
    assert out.timings["total"] > 0


def test_missing_role_gives_missing_series_not_silence(knee_study, registry):
    _, roles = knee_study
    out = run_pipeline("knee", {"cor_fluid": load_series(roles["cor_fluid"])}, registry=registry)
    for o in out.outputs:
        assert not o.qc.accepted and o.qc.reason == "missing_series" and o.findings == []
        assert "sag_fluid" in o.qc.message
    assert out.superres == [] and out.used_series == {}


def test_sag_pd_is_the_fallback_role(knee_study, registry):
    _, roles = knee_study
    vol = load_series(roles["sag_pd"])
    out = run_pipeline("knee", {"sag_pd": vol}, registry=registry, superres=False, saliency=False)
    acl = next(o for o in out.outputs if o.model.name == "knee.acl")
    assert acl.series_uid == vol.series_uid and out.superres == []
    assert acl.findings and acl.findings[0].heatmap is None


def test_unknown_pipeline_or_role_is_an_error(registry):
    with pytest.raises(PipelineError, match="unknown pipeline"):
        run_pipeline("elbow", {}, registry=registry)
    with pytest.raises(PipelineError, match="no role"):
        run_pipeline("knee", {"sag_t2": None}, registry=registry)


def test_predict_cli_on_a_series_folder(knee_study, capsys):
    out, _ = knee_study
    env = {k: v for k, v in os.environ.items() if k.startswith("MSKNODE_")}
    env["MSKNODE_DATA_DIR"] = str(out / "data")
    res = msknode(capsys, "predict", str(out / "sag_fluid"), "--json", **env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    (series,) = report["series"]
    assert series["anatomy"] == "knee" and series["anatomy_source"] == "header"
    acl = next(m for m in series["models"] if m["model"] == "knee.acl")
    assert acl["qc"]["accepted"] and acl["findings"][0]["code"] == "acl_tear"
    assert acl["weights_sha256"] and "Not for diagnostic use" in report["notice"]
    bad = msknode(capsys, "predict", str(out / "nope"), **env)
    assert bad.returncode == 2 and "not a folder" in bad.stderr
