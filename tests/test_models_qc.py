"""QC / out-of-distribution gate: refusals with reason codes, and the anatomy check from the PIXELS.

Real MR of other body parts (the MNI152 brain template shipped inside nilearn, the abdomen and
shoulder MR files of pydicom-data) and phantoms of the other anatomies are written as multi-slice
DICOM series whose header says "sagittal knee" (BodyPartExamined KNEE, SAG PD FS, sagittal
orientation), loaded back with models.io and put through the gate of knee.acl: none may pass.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from models.io import load_series
from models.phantoms import generate, write_dicom_series, write_localizer
from models.registry import Registry
from models.tasks import TASKS
from support.mr import mr_dataset, save

SAG_ROW, SAG_COL = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
ACL = TASKS["knee.acl"]


@pytest.fixture(scope="module")
def gate():
    reg = Registry()
    g = reg.gate()
    assert g.anatomy is not None, "qc.anatomy weights must ship in models/weights/qc.anatomy"
    return g


def write_mr_series(
    array: np.ndarray,
    spacing,
    out: Path,
    *,
    row=SAG_ROW,
    col=SAG_COL,
    body_part="KNEE",
    description="SAG PD FS",
    image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
) -> list[Path]:
    """(slices, rows, cols) array -> one MR Image Storage file per slice, slices along cross(row, col)."""
    a = np.asarray(array, np.float64)
    a = a - min(0.0, float(a.min()))
    scale = 4000.0 / max(float(a.max()), 1e-6)
    pix = np.round(a * scale).astype(np.uint16)
    normal = np.cross(row, col)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(pix.shape[0]):
        ds = mr_dataset(
            study_uid=study,
            series_uid=series,
            pixels=pix[k],
            BodyPartExamined=body_part,
            SeriesDescription=description,
            ImageType=list(image_type),
            FrameOfReferenceUID=frame,
            StudyDate="20260101",
            StudyTime="120000",
            PatientName="QC^TEST",
            PatientID="QC1",
            SeriesNumber=3,
            InstanceNumber=pix.shape[0] - k,  # instance numbers reversed on purpose
            ImageOrientationPatient=[f"{v:.6f}" for v in (*row, *col)],
            ImagePositionPatient=[f"{v:.4f}" for v in np.asarray(normal) * spacing[0] * (k - pix.shape[0] / 2)],
            PixelSpacing=[f"{spacing[1]:.4f}", f"{spacing[2]:.4f}"],
            SliceThickness=f"{spacing[0]:.3f}",
        )
        paths.append(save(ds, out / f"im{k:03d}.dcm"))
    return paths


def mni_brain_as_sagittal() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The MNI152 T1 template (nilearn's package data): 28 sagittal slices, 4 mm apart, 1 mm pixels."""
    import nibabel as nib
    import nilearn

    path = next((Path(nilearn.__file__).parent / "datasets" / "data").glob("mni_icbm152_t1_*.nii*"))
    img = cast(nib.Nifti1Image, nib.load(str(path)))  # a .nii.gz file
    data = np.asarray(img.dataobj, np.float32)  # RAS voxel axes (x, y, z), 1 mm
    centre = data.shape[0] // 2
    xs = centre + 4 * (np.arange(28) - 14)
    sl = data[xs]  # (28, y, z): slices along x
    # rows head -> feet (z descending), columns anterior -> posterior (y descending)
    return sl.transpose(0, 2, 1)[:, ::-1, ::-1].copy(), (4.0, 1.0, 1.0)


def _vendor_2d_as_stack(name: str, n: int = 24) -> np.ndarray:
    """A single real vendor MR slice made into n slices (small shifts, slight intensity change)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
        assert isinstance(path, str), name
        img = pydicom.dcmread(path).pixel_array.astype(np.float32)
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        s = np.roll(img, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        out.append(s * (1.0 - 0.01 * abs(k - n / 2)))
    return np.stack(out)


def _assert_pixel_refusal(qc, what: str) -> None:
    assert not qc.accepted, f"{what} passed the knee gate: {qc.metrics}"
    assert qc.reason in {"wrong_anatomy", "out_of_distribution", "wrong_orientation"}, (what, qc.reason, qc.message)
    # the header checks passed: the refusal came from the pixels (anatomy classifier ran)
    assert "anatomy_probability" in qc.metrics, (what, qc.reason, qc.message)


def test_mni_brain_mislabelled_knee_is_refused(tmp_path, gate):
    arr, spacing = mni_brain_as_sagittal()
    vol = load_series(write_mr_series(arr, spacing, tmp_path / "brain"))
    assert vol.body_part == "KNEE" and vol.shape == arr.shape
    qc = gate.check(vol, ACL)
    _assert_pixel_refusal(qc, "MNI152 brain")
    assert qc.reason in {"wrong_anatomy", "out_of_distribution"}
    assert "KNEE" in qc.message or qc.reason == "out_of_distribution"


@pytest.mark.parametrize(
    "name, spacing",
    [
        ("MR-SIEMENS-DICOM-WithOverlays.dcm", (4.0, 0.45, 0.45)),  # abdomen, axial slice (header FOV of a knee)
        ("examples_overlay.dcm", (4.0, 0.7231, 0.7231)),  # abdomen (cropped)
        ("MR2_UNCR.dcm", (4.0, 0.1953, 0.1953)),  # a real shoulder (oblique coronal)
    ],
)
def test_pydicom_mr_of_other_body_parts_mislabelled_knee_is_refused(tmp_path, gate, name, spacing):
    arr = _vendor_2d_as_stack(name)
    if name == "MR2_UNCR.dcm":  # 1024 x 1024 at 0.195 mm = 200 mm FOV; keep the FOV, halve the matrix twice
        arr = arr[:, ::4, ::4]
        spacing = (4.0, 0.78125, 0.78125)
    vol = load_series(write_mr_series(arr, spacing, tmp_path / "mr"))
    _assert_pixel_refusal(gate.check(vol, ACL), name)


def _relabel_as_sagittal_knee(ph):
    """A phantom of another anatomy with a header that says sagittal knee — geometry included: the pixel
    spacing is scaled to a knee's field of view (<= 180 mm), so only the pixels can tell."""
    v = ph.volume
    n = np.cross(SAG_ROW, SAG_COL)
    positions = np.array([n * v.spacing[0] * k for k in range(v.shape[0])])
    inplane = min(1.0, 180.0 / (max(v.shape[1:]) * max(v.spacing[1:])))
    spacing = (v.spacing[0], v.spacing[1] * inplane, v.spacing[2] * inplane)
    vol = dataclasses.replace(v, row_cosine=SAG_ROW, col_cosine=SAG_COL, positions=positions, spacing=spacing)
    return dataclasses.replace(ph, volume=vol)


@pytest.mark.parametrize(
    "anatomy, seed",
    [("shoulder", 9_500_001), ("lumbar_spine", 9_500_002), ("shoulder", 9_500_003), ("lumbar_spine", 9_500_004)],
)
def test_phantoms_of_other_anatomies_labelled_knee_are_refused(tmp_path, gate, anatomy, seed):
    ph = _relabel_as_sagittal_knee(generate(anatomy, seed, matrix=160))
    files = write_dicom_series(ph, tmp_path / anatomy, series_description="SAG PD FS", body_part="KNEE")
    vol = load_series(files)
    assert vol.body_part == "KNEE"
    qc = gate.check(vol, ACL)
    _assert_pixel_refusal(qc, anatomy)
    assert qc.reason in {"wrong_anatomy", "out_of_distribution"}


def test_fresh_knee_phantoms_pass(gate):
    accepted = 0
    for seed in range(9_600_000, 9_600_010):
        qc = gate.check(generate("knee", seed).volume, ACL)
        accepted += qc.accepted
    assert accepted >= 9  # the gate must not refuse the anatomy it is made for


def test_knee_in_another_plane_with_a_sagittal_header_is_refused_from_pixels(gate):
    ph = _relabel_as_sagittal_knee(generate("knee", 9_600_100, orientation="axial"))
    qc = gate.check(ph.volume, ACL)
    _assert_pixel_refusal(qc, "axial knee labelled sagittal")
    if qc.reason == "wrong_orientation":  # the message names what the pixels show and what the header says
        assert "knee axial series" in qc.message and "header geometry says sagittal" in qc.message, qc.message
        assert qc.metrics["anatomy_plane_probability"] < gate.anatomy.plane_threshold


def test_pixel_plane_contradicts_the_header_only_when_very_confident(gate):
    """The plane comes from the header: a knee whose pixels lean to another plane, but not with the
    classifier's calibrated confidence, is accepted; a confident wrong anatomy is refused, an unsure one not."""
    probs = dict.fromkeys(gate.anatomy.classes, 0.0)
    probs.update({"knee/sagittal": 0.2, "knee/axial": 0.75, "shoulder/coronal": 0.05})
    pred = {
        "probabilities": probs,
        "anatomy_probabilities": {"knee": 0.95, "shoulder": 0.05, "lumbar_spine": 0.0, "other": 0.0},
        "anatomy_distances": {"knee": 0.0, "shoulder": 9.0, "lumbar_spine": 9.0, "other": 9.0},
    }
    assert gate.judge(pred, "knee", "sagittal").accepted
    probs.update({"knee/sagittal": 0.01, "knee/axial": 0.94})
    v = gate.judge(pred, "knee", "sagittal", model="knee.acl")
    if gate.anatomy.plane_threshold <= 0.94:
        assert v.reason == "wrong_orientation" and "knee axial series" in v.message
        assert "header geometry says sagittal" in v.message and "knee sagittal series" not in v.message
    unsure = dict(pred, anatomy_probabilities={"knee": 0.55, "shoulder": 0.45, "lumbar_spine": 0.0, "other": 0.0})
    assert gate.judge(unsure, "knee", "sagittal").reason != "wrong_anatomy"
    sure = dict(pred, anatomy_probabilities={"knee": 0.04, "shoulder": 0.96, "lumbar_spine": 0.0, "other": 0.0})
    v = gate.judge(sure, "knee", "sagittal", model="knee.acl", body_part="KNEE")
    assert v.reason == "wrong_anatomy" and "shoulder" in v.message and "header says KNEE" in v.message
    far = dict(
        pred,
        anatomy_distances={
            "knee": gate.anatomy.ood_threshold + 1.0,
            "shoulder": 0.0,
            "lumbar_spine": 0.0,
            "other": 0.0,
        },
    )
    far["probabilities"] = dict(probs, **{"knee/sagittal": 0.95, "knee/axial": 0.0})
    assert gate.judge(far, "knee", "sagittal").reason == "out_of_distribution"


def test_predict_reports_anatomy_marginals_for_routing(gate):
    """What routing asks of a series without header anatomy: the label and the marginal per anatomy."""
    pred = gate.anatomy.predict(generate("knee", 9_600_400).volume)
    assert {
        "label",
        "probability",
        "probabilities",
        "distance",
        "min_distance",
        "motion_probability",
        "anatomy_probabilities",
    } <= set(pred)
    marg = pred["anatomy_probabilities"]
    assert set(marg) == {"knee", "shoulder", "lumbar_spine", "other"}
    assert abs(sum(marg.values()) - 1.0) < 1e-5 and abs(sum(pred["probabilities"].values()) - 1.0) < 1e-5
    assert pred["label"].startswith("knee/") and marg["knee"] > 0.5
    assert 0.0 <= pred["motion_probability"] <= 1.0


def test_header_checks(gate, tmp_path):
    # true coronal knee: refused by the header geometry before the pixels are looked at
    qc = gate.check(generate("knee", 9_600_200, orientation="coronal").volume, ACL)
    assert (qc.accepted, qc.reason) == (False, "wrong_orientation")
    # decided from the header geometry, before any pixel is classified; the message names both planes
    assert "header geometry" in qc.message and "nearest plane: coronal" in qc.message, qc.message
    assert "reads sagittal" in qc.message and "anatomy_probability" not in qc.metrics
    # too few slices
    qc = gate.check(generate("knee", 9_600_201, n_slices=8).volume, ACL)
    assert qc.reason == "too_few_slices" and "12" in qc.message
    # extreme spacing (10 mm slices)
    v = generate("knee", 9_600_202, matrix=96).volume
    thick = dataclasses.replace(v, spacing=(10.0, *v.spacing[1:]), positions=v.positions * (10.0 / v.spacing[0]))
    assert gate.check(thick, ACL).reason == "extreme_spacing"
    # a localizer (written by the phantom DICOM writer, loaded back)
    files = write_localizer("knee", tmp_path / "loc", 9_600_203)
    from models.io import group_folder

    groups = group_folder(tmp_path / "loc")
    loc_files = max(groups.values(), key=len)
    try:
        loc = load_series(loc_files)
    except Exception as e:  # a 3-plane localizer mixes orientations: models.io refuses it outright
        from models.errors import VolumeError

        assert isinstance(e, VolumeError) and "orientation" in str(e)
    else:
        assert gate.check(loc, ACL).reason in {"localizer", "too_few_slices"}
    assert files


def test_pixel_checks(gate):
    base = generate("knee", 9_600_300).volume
    # constant and empty images
    const = dataclasses.replace(base, array=np.full(base.shape, 7.0, np.float32))
    assert gate.check(const, ACL).reason == "constant_image"
    rng = np.random.default_rng(1)
    noise = np.abs(rng.normal(0, 5, base.shape) + 1j * rng.normal(0, 5, base.shape)).astype(np.float32)
    empty = dataclasses.replace(base, array=noise)
    assert gate.check(empty, ACL).reason in {"empty_image", "low_snr"}
    # very low SNR (the spec's floor is 10)
    low = generate("knee", 9_600_301, snr=1.5).volume
    qc = gate.check(low, ACL)
    assert qc.reason == "low_snr", (qc.reason, qc.metrics)
    # heavy motion ghosting (the spec has at most 3 px)
    moving = generate("knee", 9_600_302, motion_px=14.0).volume
    qc = gate.check(moving, ACL)
    assert qc.reason == "motion", (qc.reason, qc.metrics)


def test_pipeline_reports_refusal_without_findings(tmp_path):
    from models.pipelines import run_pipeline

    reg = Registry()
    arr, spacing = mni_brain_as_sagittal()
    brain = load_series(write_mr_series(arr, spacing, tmp_path / "brain"))
    out = run_pipeline("knee", {"sag_fluid": brain}, registry=reg, superres=False)
    acl = next(o for o in out.outputs if o.model.name == "knee.acl")
    assert not acl.qc.accepted and acl.findings == []
    assert acl.qc.reason in {"wrong_anatomy", "out_of_distribution"}
    # a missing input series is reported, never silent
    out = run_pipeline("knee", {"cor_fluid": brain}, registry=reg, superres=False)
    acl = next(o for o in out.outputs if o.model.name == "knee.acl")
    assert acl.qc.reason == "missing_series" and acl.findings == []


def test_two_models_reading_one_series_run_its_pixel_checks_once(gate, monkeypatch):
    """The knee's ACL and meniscus models both read its sagittal fluid series: the anatomy classifier and the pixel
    statistics run once for that volume, with the same answers; another volume object runs them again."""
    import gc

    from models.qc import gate as gate_module

    calls: list[str] = []
    predict, metrics = gate.anatomy.predict, gate_module.pixel_metrics
    monkeypatch.setattr(gate.anatomy, "predict", lambda v, plane: calls.append("anatomy") or predict(v, plane))
    monkeypatch.setattr(gate_module, "pixel_metrics", lambda v: calls.append("pixels") or metrics(v))
    vol = generate("knee", 9_600_100).volume
    first = gate.check(vol, ACL)
    second = gate.check(vol, TASKS["knee.meniscus"])
    assert first.accepted and second.accepted
    assert sorted(calls) == ["anatomy", "pixels"]
    assert second.metrics["snr"] == first.metrics["snr"]
    assert second.metrics["motion_probability"] == first.metrics["motion_probability"]
    again = dataclasses.replace(vol)  # the same pixels in another volume object: asked again
    assert gate.check(again, ACL).metrics == first.metrics
    assert sorted(calls) == ["anatomy", "anatomy", "pixels", "pixels"]
    n = len(gate_module._SEEN)
    del vol, again
    gc.collect()
    assert len(gate_module._SEEN) == n - 4  # forgotten with their volumes
