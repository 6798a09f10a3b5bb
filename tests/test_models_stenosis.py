"""The shipped lumbar_spine.stenosis weights: graded well above chance at every level on fresh phantoms,
every level located (normal ones too), saliency on the narrowed level, uncertainty, QC from the pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.classifier import sha256_of
from models.evaluation import evaluate
from models.labels import labels_for
from models.phantoms import generate
from models.registry import REPO_WEIGHTS, Registry
from models.tasks.spine_stenosis import GRADES, LEVELS, TASK
from support.volumes import mni_volume

pytestmark = pytest.mark.slow

NAME = "lumbar_spine.stenosis"
FRESH_SEED = 6_300_000  # never used in training (training seeds 100_000+, see the model card)


@pytest.fixture(scope="module")
def registry():
    torch.set_num_threads(2)
    return Registry()


def test_shipped_stenosis_grades_every_level_on_fresh_phantoms(registry):
    res = evaluate(NAME, f"synthetic:32:{FRESH_SEED}", registry=registry, bootstrap=100)
    assert res["n"] == 32
    assert res["weights_sha256"] == sha256_of(REPO_WEIGHTS / NAME / "model.pt")
    assert set(res["kappa_per_level"]) == set(LEVELS)
    # chance is kappa 0; the shortcut baseline (global statistics) is near AUC 0.5
    assert res["kappa"] >= 0.6, res
    assert res["kappa"] == min(res["kappa_per_level"].values())
    assert res["saliency_hit_rate"] >= 0.7, res
    assert res["ece"] <= 0.2, res
    assert res["qc_refused"] <= 3, res
    assert res["shortcut_auc"] <= 0.8, res


def test_every_level_graded_and_located(registry):
    model = registry.get(NAME)
    grades = {"L1-L2": "normal", "L2-L3": "severe", "L3-L4": "normal", "L4-L5": "moderate", "L5-S1": "normal"}
    ph = generate("lumbar_spine", FRESH_SEED + 500, stenosis=grades)
    out = model.predict(ph.volume)
    assert out.qc.accepted, out.qc
    assert [f.level for f in out.findings] == list(LEVELS)
    centres = ph.labels["level_centers_mm"]
    for f in out.findings:
        assert f.code == "spinal_stenosis" and f.grade in GRADES
        assert set(f.grade_probabilities) == set(GRADES)
        assert sum(f.grade_probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert f.positive == (f.grade != "normal")
        assert f.uncertainty is not None and 0.0 <= f.uncertainty < 0.5
        # the level is located (slice, row, column) whatever its grade: the SR and the viewer point at it
        assert f.location is not None and f.location_mm is not None
        assert 0 <= f.location[0] < ph.volume.shape[0]
        dist = np.linalg.norm(np.subtract(f.location_mm, centres[f.level]))
        assert dist <= 12.0, (f.level, f.location_mm, centres[f.level])
        assert f.heatmap is not None and f.heatmap.shape == ph.volume.shape and f.heatmap.dtype == np.float32
    by_level = {f.level: f for f in out.findings}
    assert GRADES.index(by_level["L2-L3"].grade) >= GRADES.index("moderate")
    assert by_level["L2-L3"].probability > by_level["L1-L2"].probability
    assert by_level["L1-L2"].grade in ("normal", "mild")
    assert out.model.name == NAME and out.model.weights_sha256 and out.model.version


def test_qc_refuses_other_anatomy_from_pixels_even_when_tagged_lspine(registry):
    model = registry.get(NAME)
    knee = generate("knee", FRESH_SEED + 501).volume
    # a knee's field of view (~150 mm) alone is outside the spine's geometry range: widen its pixels to a
    # spine-sized 260 mm field so that only the pixels can tell it is not a lumbar spine
    scale = 260.0 / (max(knee.shape[1:]) * max(knee.spacing[1:]))
    knee = dataclasses.replace(
        knee,
        spacing=(knee.spacing[0], knee.spacing[1] * scale, knee.spacing[2] * scale),
        body_part="LSPINE",
        series_description="SAG T2 TSE",
    )
    out = model.predict(knee)
    assert not out.qc.accepted and out.qc.reason in ("wrong_anatomy", "out_of_distribution"), out.qc
    assert out.findings == []
    brain = mni_volume(slice_spacing=4.0, pixel=1.2)
    brain = dataclasses.replace(brain, body_part="LSPINE", series_description="SAG T2 TSE")
    out = model.predict(brain)
    assert not out.qc.accepted and out.qc.reason in ("wrong_anatomy", "out_of_distribution", "extreme_spacing"), out.qc
    spine = generate("lumbar_spine", FRESH_SEED + 502).volume
    assert model.predict(spine, saliency=False).qc.accepted


def test_level_balls_mark_each_disc_level():
    ph = generate("lumbar_spine", FRESH_SEED + 503, matrix=128)
    target = labels_for(TASK).target_from_phantom(ph)
    assert target.lesion.shape == (len(LEVELS),) + ph.volume.shape
    aff = ph.volume.affine()
    for h, level in enumerate(LEVELS):
        idx = np.argwhere(target.lesion[h] > 0)
        assert len(idx) > 0
        mm = (np.c_[idx, np.ones(len(idx))] @ aff.T)[:, :3]
        # the ball is centred on the level's canal centre and does not reach the next level (~30 mm away)
        assert np.linalg.norm(mm.mean(axis=0) - np.asarray(ph.labels["level_centers_mm"][level])) < 2.5
        assert np.linalg.norm(mm - np.asarray(ph.labels["level_centers_mm"][level]), axis=1).max() <= 7.5
