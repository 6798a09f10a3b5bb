"""Inputs for the results tests: synthetic MR series written as real DICOM files, real vendor
files from pydicom-data, and model outputs built by hand (heatmaps as arrays).

``tests/test_results.py`` checks that the synthetic series are themselves valid MR objects (dciodvfy).
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from models.types import (
    Finding,
    ModelInfo,
    ModelOutput,
    PipelineOutput,
    QCResult,
    SuperResOutput,
    Volume,
)
from support.mr import mr_dataset, save

TEST_ROOT = "1.2.826.0.1.3680043.10.1447.99."
SHA = "ab" * 32


def write_mr_series(
    directory: Path,
    *,
    n_slices: int = 10,
    rows: int = 40,
    cols: int = 36,
    study_uid: str | None = None,
    series_uid: str | None = None,
    laterality: str | None = "R",
    description: str = "SAG PD FS",
    body_part: str = "KNEE",
    patient_name: str = "Test^Knee",
    patient_id: str = "PID-0001",
    patient_sex: str = "F",
    study_date: str = "20240131",
    charset: str | list[str] | None = None,
    spacing: tuple[float, float, float] = (3.0, 0.5, 0.5),
    seed: int = 1,
) -> list[Path]:
    """A sagittal MR series (classic MR Image Storage), one file per slice, valid per dciodvfy."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=TEST_ROOT)
    series_uid = series_uid or generate_uid(prefix=TEST_ROOT)
    for_uid = generate_uid(prefix=TEST_ROOT)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    row_cos, col_cos = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)  # sagittal: rows go A->P, columns H->F
    normal = np.cross(row_cos, col_cos)
    paths = []
    # written in reverse slice order so the writers must sort by position
    for k in reversed(range(n_slices)):
        ellipse = ((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 3)) ** 2 < 1
        img = 300 + 900 * ellipse + 40 * k + rng.normal(0, 20, (rows, cols))
        pos = np.array([-20.0, -10.0, 30.0]) + normal * spacing[0] * k
        ds = mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            uid_prefix=TEST_ROOT,
            pixels=np.clip(img, 0, 4095).astype(np.uint16),
            bits_stored=12,
            SpecificCharacterSet=charset,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            StudyDate=study_date,
            SeriesDate=study_date,
            ContentDate=study_date,
            StudyTime="101500",
            SeriesTime="101600",
            ContentTime="101700",
            AccessionNumber="ACC1",
            Manufacturer="Phantom Inc",
            ReferringPhysicianName="Doc^Ref",
            StudyDescription="MRI KNEE",
            SeriesDescription=description,
            ProtocolName=description,
            PatientName=patient_name,
            PatientID=patient_id,
            PatientBirthDate="19800101",
            PatientSex=patient_sex,
            BodyPartExamined=body_part,
            PatientPosition="FFS",
            ScanningSequence="SE",
            SequenceVariant="SK",
            ScanOptions="FS",
            MRAcquisitionType="2D",
            RepetitionTime="3000",
            EchoTime="30",
            EchoTrainLength="8",
            MagneticFieldStrength="1.5",
            SliceThickness=str(spacing[0]),
            SpacingBetweenSlices=str(spacing[0]),
            StudyID="1",
            SeriesNumber=3,
            InstanceNumber=k + 1,
            FrameOfReferenceUID=for_uid,
            PositionReferenceIndicator="",
            Laterality=laterality or None,
            ImagePositionPatient=[f"{v:.4f}" for v in pos],
            ImageOrientationPatient=[str(v) for v in (*row_cos, *col_cos)],
            SliceLocation=f"{float(np.dot(normal, pos)):.4f}",
            PixelSpacing=[str(spacing[1]), str(spacing[2])],
            WindowCenter="800",
            WindowWidth="1600",
        )
        path = save(ds, directory / f"slice{k:03d}.dcm")
        paths.append(path)
    return paths


def volume_from_files(paths: list[Path]) -> Volume:
    """A `Volume` of single-frame files, slices ascending along the normal (the models convention)."""
    dss = [pydicom.dcmread(p) for p in paths]
    row = tuple(float(v) for v in dss[0].ImageOrientationPatient[:3])
    col = tuple(float(v) for v in dss[0].ImageOrientationPatient[3:])
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    arr = np.stack([d.pixel_array.astype(np.float32) for d in dss])
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    if len(dss) > 1:
        step = float(np.linalg.norm(positions[1] - positions[0]))
    else:
        step = float(dss[0].get("SliceThickness", 1.0) or 1.0)
    ps = [float(v) for v in dss[0].PixelSpacing]
    return Volume(
        array=arr,
        spacing=(step, ps[0], ps[1]),
        positions=positions,
        row_cosine=row,  # type: ignore[arg-type]
        col_cosine=col,  # type: ignore[arg-type]
        study_uid=str(dss[0].StudyInstanceUID),
        series_uid=str(dss[0].SeriesInstanceUID),
        frame_of_reference_uid=str(dss[0].get("FrameOfReferenceUID", "")) or None,
        sop_class_uid=str(dss[0].SOPClassUID),
        sop_instance_uids=tuple(str(d.SOPInstanceUID) for d in dss),
        frame_numbers=tuple(None for _ in dss),
        modality="MR",
        laterality=str(dss[0].get("Laterality", "")) or None,
    )


def model(name: str, version: str = "0.1.0", task: str = "binary", anatomy: str = "knee") -> ModelInfo:
    return ModelInfo(name=name, version=version, weights_sha256=SHA, task=task, anatomy=anatomy)


def blob(shape: tuple[int, int, int], center: tuple[int, int, int], radius: float = 4.0) -> np.ndarray:
    zz, yy, xx = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    d2 = ((zz - center[0]) * 2.0) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2
    return np.exp(-d2 / (2 * radius**2)).astype(np.float32)


def superres_of(vol: Volume, factor: int = 2, *, passed: bool = True) -> SuperResOutput:
    """A through-plane x`factor` super-resolved volume (linear interpolation), same frame of reference."""
    n = vol.array.shape[0]
    new_n = (n - 1) * factor + 1
    z = np.linspace(0, n - 1, new_n)
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (z - lo)[:, None, None].astype(np.float32)
    arr = vol.array[lo] * (1 - w) + vol.array[hi] * w
    p0, p1 = vol.positions[0], vol.positions[-1]
    positions = np.array([p0 + (p1 - p0) * t / (new_n - 1) for t in range(new_n)]) if new_n > 1 else vol.positions
    out = Volume(
        array=arr.astype(np.float32),
        spacing=(vol.spacing[0] / factor, vol.spacing[1], vol.spacing[2]),
        positions=positions,
        row_cosine=vol.row_cosine,
        col_cosine=vol.col_cosine,
        study_uid=vol.study_uid,
        series_uid=vol.series_uid,
        frame_of_reference_uid=vol.frame_of_reference_uid,
    )
    return SuperResOutput(
        model=model("superres", task="superres"),
        source=vol,
        volume=out,
        qc=QCResult(accepted=True),
        consistency_error=0.012 if passed else 0.4,
        consistency_tolerance=0.05,
        consistency_passed=passed,
    )


def knee_output(
    vol: Volume, *, positive: bool = True, superres: bool = True, refused_meniscus: bool = True
) -> PipelineOutput:
    """knee: ACL positive (complete) with a heatmap, meniscus refused by QC (or negative)."""
    shape = vol.array.shape
    acl = Finding(
        code="acl_tear",
        label="Complete ACL tear" if positive else "ACL tear",
        probability=0.91 if positive else 0.08,
        uncertainty=0.04,
        positive=positive,
        threshold=0.5,
        grade="complete" if positive else None,
        site="anterior cruciate ligament",
        location=(shape[0] // 2, shape[1] // 2, shape[2] // 2),
        heatmap=blob(shape, (shape[0] // 2, shape[1] // 2, shape[2] // 2)),
    )
    outputs = [
        ModelOutput(model=model("knee.acl"), series_uid=vol.series_uid, qc=QCResult(accepted=True), findings=[acl])
    ]
    if refused_meniscus:
        outputs.append(
            ModelOutput(
                model=model("knee.meniscus"),
                series_uid=vol.series_uid,
                qc=QCResult(accepted=False, reason="low_snr", message="signal-to-noise ratio 2.1 below 5.0"),
                findings=[],
            )
        )
    else:
        outputs.append(
            ModelOutput(
                model=model("knee.meniscus"),
                series_uid=vol.series_uid,
                qc=QCResult(accepted=True),
                findings=[
                    Finding(
                        code="meniscal_tear",
                        label="Meniscal tear",
                        probability=0.12,
                        uncertainty=0.05,
                        positive=False,
                        threshold=0.5,
                        site="medial meniscus",
                    )
                ],
            )
        )
    used = {o.model.name: [vol.series_uid] for o in outputs}
    srs = [superres_of(vol)] if superres else []
    if srs:
        used["superres"] = [vol.series_uid]
    return PipelineOutput(pipeline="knee", outputs=outputs, superres=srs, used_series=used)


def spine_output(vol: Volume) -> PipelineOutput:
    """lumbar spine: stenosis graded per level, two levels positive with heatmaps, one negative."""
    shape = vol.array.shape
    findings = []
    for i, (level, grade, p) in enumerate(
        (("L3-L4", "mild", 0.3), ("L4-L5", "severe", 0.88), ("L5-S1", "moderate", 0.64))
    ):
        c = (min(shape[0] - 1, shape[0] // 2), 8 + 10 * i, shape[2] // 2)
        findings.append(
            Finding(
                code="spinal_stenosis",
                label="Spinal canal stenosis",
                probability=p,
                uncertainty=0.06,
                positive=p >= 0.5,
                threshold=0.5,
                grade=grade,
                level=level,
                location=c,
                heatmap=blob(shape, c, 3.0) if p >= 0.5 else None,
            )
        )
    out = ModelOutput(
        model=model("lumbar_spine.stenosis", task="grading", anatomy="lumbar_spine"),
        series_uid=vol.series_uid,
        qc=QCResult(accepted=True),
        findings=findings,
    )
    return PipelineOutput(
        pipeline="lumbar_spine", outputs=[out], superres=[], used_series={out.model.name: [vol.series_uid]}
    )


def real_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    assert p is not None, f"pydicom-data file {name} missing"
    return Path(p)


def copy_real(name: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dst = directory / Path(name).name
    shutil.copy(real_file(name), dst)
    return dst


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dicom3tools' dciodvfy for one file."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=120)
    # dciodvfy echoes values in the object's own character set
    lines = (proc.stdout + proc.stderr).decode("utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DciodvfyWarning(UserWarning):
    """A warning dciodvfy reported for one of our objects (listed in pytest's warnings summary)."""


def assert_valid(path: Path, label: str) -> list[str]:
    """No dciodvfy error; its warnings are reported as `DciodvfyWarning`s."""
    import warnings

    errors, warns = dciodvfy(path)
    assert errors == [], f"{label}: dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    for w in sorted(set(warns)):
        warnings.warn(f"dciodvfy {label}: {w}", DciodvfyWarning, stacklevel=2)
    return warns


def superres_inplane(vol: Volume, factor: int = 2) -> SuperResOutput:
    """An in-plane x`factor` super-resolved volume (for single-slice real inputs)."""
    arr = np.kron(vol.array, np.ones((1, factor, factor), dtype=np.float32))
    rs, cs = vol.spacing[1] / factor, vol.spacing[2] / factor
    shift = (
        -np.asarray(vol.row_cosine) * (vol.spacing[2] - cs) / 2 - np.asarray(vol.col_cosine) * (vol.spacing[1] - rs) / 2
    )
    out = Volume(
        array=arr,
        spacing=(vol.spacing[0], rs, cs),
        positions=vol.positions + shift,
        row_cosine=vol.row_cosine,
        col_cosine=vol.col_cosine,
        study_uid=vol.study_uid,
        series_uid=vol.series_uid,
        frame_of_reference_uid=vol.frame_of_reference_uid,
    )
    return SuperResOutput(
        model=model("superres", task="superres"),
        source=vol,
        volume=out,
        qc=QCResult(accepted=True),
        consistency_error=0.01,
        consistency_tolerance=0.05,
        consistency_passed=True,
    )


def sr_items(ds) -> list[tuple[str, str, object]]:
    """The SR content tree flattened: (path of concept meanings, value type, value)."""
    out: list[tuple[str, str, object]] = []

    def walk(items, prefix):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else "?"
            path = f"{prefix}/{name}"
            vt = it.ValueType
            if vt == "CODE":
                val = it.ConceptCodeSequence[0].CodeMeaning
            elif vt == "TEXT":
                val = it.TextValue
            elif vt == "NUM":
                val = float(it.MeasuredValueSequence[0].NumericValue) if it.get("MeasuredValueSequence") else None
            elif vt == "UIDREF":
                val = it.UID
            elif vt in ("IMAGE", "COMPOSITE"):
                ref = it.ReferencedSOPSequence[0]
                seg = ref.get("ReferencedSegmentNumber")
                segs = [] if seg is None else ([int(seg)] if isinstance(seg, int) else [int(x) for x in seg])
                val = (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID, segs)
            else:
                val = None
            out.append((path, vt, val))
            if "ContentSequence" in it:
                walk(it.ContentSequence, path)

    walk(ds.ContentSequence, "")
    return out


def measurement_groups(ds) -> list[list[tuple[str, str, object]]]:
    """One flattened item list per Measurement Group, in document order."""
    groups = []
    for container in ds.ContentSequence:
        if (
            container.ValueType == "CONTAINER"
            and container.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
        ):
            for g in container.ContentSequence:
                fake = Dataset()
                fake.ContentSequence = g.ContentSequence
                groups.append(sr_items(fake))
    return groups


def group_value(group, path_suffix: str):
    vals = [v for p, _t, v in group if p.endswith(path_suffix)]
    return vals[0] if vals else None


def phantom_knee_study(directory: Path, seed: int, *, patient_name: str, patient_id: str) -> tuple[list[Path], Volume]:
    """A small knee phantom series written as DICOM (12 slices of 96 x 96) and its `Volume`."""
    from models.phantoms import generate, write_dicom_series

    phantom = generate("knee", seed, n_slices=12, matrix=96)
    paths = write_dicom_series(phantom, directory, patient_name=patient_name, patient_id=patient_id)
    return paths, volume_from_files(paths)


def send_to_pacs(orthanc, paths: list[Path]) -> None:
    """The modality/PACS side: dcmtk storescu sends the series into Orthanc (and it answered Success)."""
    import os

    proc = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, paths)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TCP_NODELAY="1"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
