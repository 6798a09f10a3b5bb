"""The shipped knee.meniscus weights: P(tear) well above chance on fresh phantoms, medial vs lateral,
saliency on the tear, uncertainty, the optional coronal series on the sagittal grid, QC from the pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.classifier import sha256_of
from models.evaluation import evaluate
from models.phantoms import generate
from models.pipelines import run_pipeline
from models.registry import REPO_WEIGHTS, Registry
from models.tasks.knee_meniscus import CORONAL_ROLE, TASK, located_side, resample_onto_grid
from models.transforms import make_native_frame
from support.volumes import mni_volume

pytestmark = pytest.mark.slow

NAME = "knee.meniscus"
FRESH_SEED = 6_100_300  # never used in training (training seeds 7_000_000+, see the model card)


@pytest.fixture(scope="module")
def registry():
    torch.set_num_threads(2)
    return Registry()


def test_shipped_meniscus_well_above_chance_on_fresh_phantoms(registry):
    # every third seed also carries a coronal series (phantom_extras), so both inputs are scored
    res = evaluate(NAME, f"synthetic:40:{FRESH_SEED}", registry=registry, bootstrap=100)
    assert res["n"] == 40
    assert res["weights_sha256"] == sha256_of(REPO_WEIGHTS / NAME / "model.pt")
    assert res["auc"] >= 0.8, res
    assert res["auc_ci"][0] > 0.55, res
    assert res["saliency_hit_rate"] >= 0.6, res
    assert res["ece"] <= 0.25, res
    assert res["qc_refused"] <= 4, res
    assert res["shortcut_auc"] <= 0.8, res
    # medial vs lateral among the tears: where the finding lies in a knee of known laterality
    assert res["positive_class_cases"] >= 10 and res["positive_class_accuracy"] >= 0.7, res


def test_meniscus_side_probability_uncertainty_and_heatmap(registry):
    model = registry.get(NAME)
    ph = generate("knee", FRESH_SEED + 500, meniscus_tear=True, meniscus_side="medial")
    out = model.predict(ph.volume)
    assert out.qc.accepted, out.qc
    (f,) = out.findings
    assert f.code == "meniscal_tear"
    assert 0.0 <= f.probability <= 1.0 and f.uncertainty is not None and 0.0 <= f.uncertainty < 0.5
    assert f.heatmap.shape == ph.volume.shape and f.heatmap.dtype == np.float32
    assert float(f.heatmap.min()) >= 0.0 and float(f.heatmap.max()) == pytest.approx(1.0)
    assert f.positive, f
    # the side is where the tear lies (a right or left knee), not a class the network scored
    assert ph.volume.laterality in ("R", "L")
    assert f.grade == "medial" and f.site == "medial meniscus" and f.label == "Medial meniscal tear"
    assert f.grade_probabilities is None
    # without a laterality the network's own side classes answer, with their probabilities
    unknown = model.predict(dataclasses.replace(ph.volume, laterality=None)).findings[0]
    assert set(unknown.grade_probabilities) == {"none", "medial", "lateral"}
    assert unknown.probability == pytest.approx(1.0 - unknown.grade_probabilities["none"], abs=1e-4)
    assert unknown.grade == max(("medial", "lateral"), key=unknown.grade_probabilities.get)
    intact = model.predict(generate("knee", FRESH_SEED + 501, meniscus_tear=False).volume).findings[0]
    assert intact.probability < f.probability
    assert out.model.name == NAME and out.model.weights_sha256 and out.model.version


@pytest.mark.parametrize("laterality,side_of_plus_x", [("R", "medial"), ("L", "lateral")])
def test_side_is_the_half_of_the_knee_that_holds_the_finding(laterality, side_of_plus_x):
    """DICOM +x is the patient's left: the medial meniscus of a right knee lies towards +x."""
    vol = dataclasses.replace(generate("knee", FRESH_SEED + 506).volume, laterality=laterality)
    centre = vol.affine() @ np.array([(n - 1) / 2.0 for n in vol.shape] + [1.0])
    other = "lateral" if side_of_plus_x == "medial" else "medial"
    assert located_side((centre[0] + 12.0, centre[1], centre[2]), vol) == side_of_plus_x
    assert located_side((centre[0] - 12.0, centre[1], centre[2]), vol) == other
    assert located_side(None, vol) is None
    assert located_side((centre[0] + 12.0, centre[1], centre[2]), dataclasses.replace(vol, laterality=None)) is None
    # the phantoms agree: their planted tear centres fall on the side of their label
    for seed in range(FRESH_SEED + 510, FRESH_SEED + 516):
        ph = generate("knee", seed, meniscus_tear=True, laterality=laterality, matrix=128)
        assert located_side(ph.labels["lesion_centers_mm"]["meniscus"], ph.volume) == ph.labels["meniscus_side"]


def test_mirror_averaging_gives_a_knee_and_its_mirror_image_the_same_probabilities(registry, monkeypatch):
    """flip_tta: the network sees the series and its mirror along the slice axis, so a mirrored knee
    (same labels) scores the same; without the averaging the two differ."""
    model = registry.get(NAME)
    vol = generate("knee", FRESH_SEED + 507, meniscus_tear=True).volume
    mirrored = dataclasses.replace(vol, array=np.ascontiguousarray(vol.array[::-1]))
    a = model.analyse(vol, saliency=False, uncertainty=False)[0]
    b = model.analyse(mirrored, saliency=False, uncertainty=False)[0]
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    monkeypatch.setattr(model.task, "flip_tta", False)
    a1 = model.analyse(vol, saliency=False, uncertainty=False)[0]
    b1 = model.analyse(mirrored, saliency=False, uncertainty=False)[0]
    assert float(np.abs(a1.probabilities - b1.probabilities).max()) > 1e-4


def test_coronal_series_is_resampled_onto_the_sagittal_grid():
    sag = generate("knee", FRESH_SEED + 502, matrix=128)
    cor = generate("knee", FRESH_SEED + 502, matrix=128, orientation="coronal")
    assert cor.volume.frame_of_reference_uid == sag.volume.frame_of_reference_uid
    _, frame = TASK.network_input(sag.volume, {})
    # the sagittal volume sampled through patient coordinates gives back the direct grid resampling
    direct = frame.to_grid(sag.volume.array)
    via_world = resample_onto_grid(sag.volume, sag.volume, frame)
    inside = direct > 0.05 * direct.max()
    assert np.corrcoef(direct[inside], via_world[inside])[0, 1] > 0.97
    # the coronal series of the same knee lands on the same anatomy (bone masks of both acquisitions agree)
    bone_sag = frame.to_grid((sag.masks["femur"] | sag.masks["tibia"]).astype(np.float32)) > 0.5
    bone_cor = (
        resample_onto_grid(
            dataclasses.replace(cor.volume, array=(cor.masks["femur"] | cor.masks["tibia"]).astype(np.float32)),
            sag.volume,
            frame,
        )
        > 0.5
    )
    both = bone_sag & bone_cor
    assert both.sum() / max(1, (bone_sag | bone_cor).sum()) > 0.6
    img, _ = TASK.network_input(sag.volume, {CORONAL_ROLE: cor.volume})
    assert img.shape == (2,) + TASK.input.shape and float(np.abs(img[1]).max()) > 0.5
    alone, _ = TASK.network_input(sag.volume, {})
    assert float(np.abs(alone[1]).max()) == 0.0
    np.testing.assert_array_equal(alone[0], img[0])
    other = dataclasses.replace(cor.volume, frame_of_reference_uid="1.2.3.4")
    unrelated, _ = TASK.network_input(sag.volume, {CORONAL_ROLE: other})
    assert float(np.abs(unrelated[1]).max()) == 0.0  # another frame of reference cannot be registered


def test_pipeline_uses_the_coronal_series_when_present(registry):
    sag = generate("knee", FRESH_SEED + 503)
    cor = generate("knee", FRESH_SEED + 503, orientation="coronal")
    out = run_pipeline(
        "knee", {"sag_fluid": sag.volume, CORONAL_ROLE: cor.volume}, registry=registry, superres=False, saliency=False
    )
    men = next(o for o in out.outputs if o.model.name == NAME)
    assert men.qc.accepted, men.qc
    assert out.used_series[NAME] == [sag.volume.series_uid, cor.volume.series_uid]


def test_qc_refuses_other_anatomy_from_pixels_even_when_tagged_knee(registry):
    model = registry.get(NAME)
    spine = generate("lumbar_spine", FRESH_SEED + 504).volume
    # a knee-sized field of view, so only the pixels can tell
    k = min(1.0, 180.0 / (max(spine.shape[1:]) * max(spine.spacing[1:])))
    spine = dataclasses.replace(
        spine,
        body_part="KNEE",
        series_description="SAG PD FS",
        spacing=(spine.spacing[0], spine.spacing[1] * k, spine.spacing[2] * k),
    )
    out = model.predict(spine)
    assert not out.qc.accepted and out.qc.reason in ("wrong_anatomy", "out_of_distribution"), out.qc
    assert out.findings == []
    brain = mni_volume(slice_spacing=4.0, pixel=1.0)  # tagged KNEE by the helper
    out = model.predict(brain)
    assert not out.qc.accepted and out.qc.reason in ("wrong_anatomy", "out_of_distribution", "extreme_spacing"), out.qc


@pytest.mark.parametrize("matrix", [192, 384])
def test_native_grid_keeps_a_one_pixel_tear_line_at_full_contrast(matrix):
    """The grid samples native voxels (384 matrices: pairs of pixels, averaged), so a line one pixel
    thick is not smeared by interpolation between pixels or slices."""
    ph = generate("knee", FRESH_SEED + 505, matrix=matrix)
    vol = ph.volume
    img, frame = TASK.network_input(vol, {})
    assert img.shape == (2,) + TASK.input.shape
    assert all(float(s).is_integer() and float(o).is_integer() for s, o in zip(frame.step, frame.origin))
    assert frame.step[1] == frame.step[2] == (1.0 if matrix == 192 else 2.0)
    assert 0.6 <= frame.grid_spacing[1] <= 1.0 and 2.5 <= frame.grid_spacing[0] <= 5.0
    # the menisci lie inside the grid
    men = (ph.masks["meniscus_medial"] | ph.masks["meniscus_lateral"]).astype(np.float32)
    inside = frame.to_grid(men).sum() * np.prod(frame.grid_spacing) / (men.sum() * np.prod(vol.spacing))
    assert inside > 0.9, inside
    # a one-pixel bright line (one slice, one row) anywhere on the grid keeps its contrast: sampled
    # exactly on 192 matrices, a 2-pixel average at worst on 384 matrices
    peaks = []
    for a in range(3):
        for b in range(4):
            canon = np.zeros(frame.canonical_shape, np.float32)
            canon[int(frame.origin[0]) + 12 + a, int(frame.origin[1]) + 28 + b, :] = 1.0
            peaks.append(float(frame.to_grid(frame.from_canonical(canon)).max()))
    if matrix == 192:
        assert min(peaks) == pytest.approx(1.0), peaks
    else:
        assert min(peaks) >= 0.25 - 1e-6 and max(peaks) == pytest.approx(0.5), peaks
    # the same function on an arbitrary volume: integer steps, voxel-aligned origin
    fr = make_native_frame(vol, (10, 20, 30), (7.0, 2.0, 0.1), TASK.input.plane, (0.0, 0.0, 0.0))
    assert fr.step[1] >= 2 and fr.step[2] == 1.0
