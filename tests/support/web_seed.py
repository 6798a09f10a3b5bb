"""Seeds a node database with real rows and real DICOM files for the worklist and web tests.

Writes an MR series with pydicom (a simple sagittal "joint" phantom: two bone ellipses
with a bright fluid band between them), a fractional SEG with highdicom whose frames
reference the source images, a super-resolved derived series (twice the slices), and
the matching studies/series/instances/jobs/job_inputs/findings/result_objects/outbox
rows. The worklist entry is then written by the real `worklists.entries.upsert_for_job`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from support.env import isolate_env
from support.mr import mr_dataset

ROOT = "1.2.826.0.1.3680043.10.1447.99."  # test objects
SOURCE_ROOT = "1.2.826.0.1.3680043.8.498."  # "modality" objects (not ours)

ANATOMY = {
    "knee": ("KNEE", "SAG PD FS", "sag_fluid", "knee.acl"),
    "shoulder": ("SHOULDER", "COR OBL T2 FS", "cor_fluid", "shoulder.rotator_cuff"),
    "lumbar_spine": ("LSPINE", "SAG T2 TSE", "sag_t2", "lumbar_spine.stenosis"),
}


@dataclass
class F:
    """A finding to seed (a `findings` row)."""

    code: str
    label: str
    probability: float | None
    uncertainty: float | None = 0.05
    positive: bool | None = None
    grade: str | None = None
    level: str | None = None
    grade_probabilities: dict | None = None
    evaluated: bool = True
    qc_reason: str | None = None
    model_name: str | None = None
    site: str | None = None


@dataclass
class Seeded:
    study_id: int
    job_id: int
    entry_id: int
    study_uid: str
    series_id: int
    series_uid: str
    source_paths: list[Path]
    seg_path: Path | None
    superres_uid: str | None
    seg_slices: list[int] = field(default_factory=list)


@contextmanager
def isolated_node(data_dir: Path, **overrides) -> Iterator[tuple]:
    """A node of its own to seed: ``MSKNODE_DATA_DIR=data_dir`` (the caller's ``MSKNODE_*`` variables set
    aside), its settings (with ``overrides``) and folders, its database and triage policy, as
    ``(settings, db, policy)``; at the end the database is closed and the environment restored."""
    mp = pytest.MonkeyPatch()
    isolate_env(mp, MSKNODE_DATA_DIR=data_dir)
    try:
        from node.db.database import Database
        from node.settings import load_settings
        from worklists.triage import load_policy

        settings = load_settings(**overrides)
        settings.ensure_dirs()
        db = Database(settings.database_url)
        try:
            yield settings, db, load_policy(settings.triage_policy)
        finally:
            db.dispose()
    finally:
        mp.undo()


def add_users(db, *, admin: tuple[str, str], radiologist: tuple[str, str]) -> None:
    """An admin and a radiologist, each ``(username, password)``, as the web tests log in."""
    from node.web.users import add_user

    with db.session() as s:
        add_user(s, username=admin[0], password=admin[1], role="admin")
        add_user(s, username=radiologist[0], password=radiologist[1], role="radiologist")


def phantom_volume(n_slices: int = 12, size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    vol = []
    for k in range(n_slices):
        t = 1.0 - abs(k - n_slices / 2) / n_slices
        img = 300 + 40 * rng.standard_normal((size, size))
        femur = ((xx - 0.5) / 0.30) ** 2 + ((yy - 0.25) / (0.18 * t + 0.05)) ** 2 < 1
        tibia = ((xx - 0.5) / 0.28) ** 2 + ((yy - 0.78) / (0.16 * t + 0.05)) ** 2 < 1
        fluid = (np.abs(yy - 0.5) < 0.05) & (np.abs(xx - 0.5) < 0.3)
        img[femur | tibia] = 900 + 60 * rng.standard_normal(int((femur | tibia).sum()))
        img[fluid] = 1800
        vol.append(np.clip(img, 0, 4000))
    return np.stack(vol).astype(np.uint16)


def _mr_dataset(
    *,
    arr2d: np.ndarray,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    for_uid: str,
    k: int,
    spacing: float,
    pixel: float,
    body_part: str,
    description: str,
    patient_name: str,
    patient_id: str,
    study_date: str,
    study_time: str,
    accession: str,
    series_number: int,
    derived: bool = False,
    source: Dataset | None = None,
) -> Dataset:
    ds = mr_dataset(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        pixels=arr2d.astype(np.uint16),
        file_meta={"ImplementationClassUID": ROOT + "1"},
        SpecificCharacterSet="ISO_IR 100",
        FrameOfReferenceUID=for_uid,
        PatientName=patient_name,
        PatientID=patient_id,
        PatientBirthDate="19800101",
        PatientSex="F",
        StudyDate=study_date,
        StudyTime=study_time,
        SeriesDate=study_date,
        ContentDate=study_date,
        ContentTime=study_time,
        AccessionNumber=accession,
        ReferringPhysicianName="",
        StudyID="1",
        Manufacturer="msknode-tests" if derived else "TESTVENDOR",
        BodyPartExamined=body_part,
        SeriesDescription=description,
        SeriesNumber=series_number,
        InstanceNumber=k + 1,
        ImageType=["DERIVED", "SECONDARY"] if derived else ["ORIGINAL", "PRIMARY", "M", "NONE"],
        ScanningSequence="SE",
        SequenceVariant="NONE",
        ScanOptions="",
        MRAcquisitionType="2D",
        EchoTime=30,
        RepetitionTime=3000,
        EchoTrainLength=8,
        MagneticFieldStrength=3,
        SliceThickness=spacing,
        SpacingBetweenSlices=spacing,
        PixelSpacing=[pixel, pixel],
        # sagittal: rows run anterior->posterior (0,1,0) and columns head->foot (0,0,-1); slices along x
        ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
        ImagePositionPatient=[-20.0 + k * spacing, -50.0, 50.0],
        SliceLocation=-20.0 + k * spacing,
        PositionReferenceIndicator="",
        Laterality="R",
    )
    if derived and source is not None:
        ds.DerivationDescription = "super-resolution (test seed)"
        src = Dataset()
        src.ReferencedSOPClassUID = source.SOPClassUID
        src.ReferencedSOPInstanceUID = source.SOPInstanceUID
        ds.SourceImageSequence = [src]
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _heatmap(shape: tuple[int, int, int], center: tuple[int, int, int]) -> np.ndarray:
    kk, yy, xx = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    sj, si = shape[1] / 10.0, shape[2] / 10.0
    d2 = ((kk - center[0]) / 1.5) ** 2 + ((yy - center[1]) / sj) ** 2 + ((xx - center[2]) / si) ** 2
    return np.exp(-d2 / 2).astype(np.float32)


def superres_series(sources: list[Dataset], series_uid: str, description: str) -> list[Dataset]:
    """A derived series with twice the slices (linear interpolation), geometry from the sources."""
    import copy

    n = len(sources)
    arrays = [ds.pixel_array.astype(np.float32) for ds in sources]
    pos = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in sources]
    out = []
    for j, z in enumerate(np.linspace(0, n - 1, 2 * n - 1)):
        k0 = int(np.floor(z))
        k1 = min(k0 + 1, n - 1)
        t = float(z - k0)
        ds = copy.deepcopy(sources[round(z)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(prefix=ROOT)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 902
        ds.SeriesDescription = description[:64]
        ds.InstanceNumber = j + 1
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.Manufacturer = "msknode-tests"
        ds.DerivationDescription = "super-resolution (test seed: linear interpolation)"
        ds.ImagePositionPatient = [float(f"{v:.4f}") for v in pos[k0] * (1 - t) + pos[k1] * t]
        ds.SliceThickness = float(getattr(sources[0], "SliceThickness", 1) or 1) / 2
        ds.SpacingBetweenSlices = ds.SliceThickness
        pix = np.clip(arrays[k0] * (1 - t) + arrays[k1] * t, 0, 65535).astype(np.uint16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pix.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        src = Dataset()
        src.ReferencedSOPClassUID = sources[round(z)].SOPClassUID
        src.ReferencedSOPInstanceUID = sources[round(z)].SOPInstanceUID
        ds.SourceImageSequence = [src]
        out.append(ds)
    return out


def write_seg(sources: list[Dataset], heat: np.ndarray, labels: list[str], out: Path, series_uid: str) -> Path:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descs = []
    for i, label in enumerate(labels, start=1):
        descs.append(
            hd.seg.SegmentDescription(
                segment_number=i,
                segment_label=label[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="test-saliency", version="1.0", family=codes.cid7162.ArtificialIntelligence
                ),
            )
        )
    pixels = np.stack([heat] * len(labels), axis=-1) if len(labels) > 1 else heat
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descs,
        series_instance_uid=series_uid,
        series_number=901,
        sop_instance_uid=generate_uid(prefix=ROOT),
        instance_number=1,
        manufacturer="msknode",
        manufacturer_model_name="msknode",
        software_versions="0.1.0",
        device_serial_number="test",
        max_fractional_value=255,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return out


def seed_study(
    db,
    settings,
    policy,
    *,
    anatomy: str = "knee",
    findings: list[F],
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID0001",
    accession: str = "ACC0001",
    study_date: str = "20240305",
    study_time: str = "142210",
    received_at: dt.datetime | None = None,
    n_slices: int = 12,
    size: int = 96,
    with_seg: bool = True,
    with_superres: bool = True,
    outbox_states: tuple[str, ...] = ("sent",),
    job_state: str = "done",
    seed: int = 0,
    phantom: dict | None = None,
) -> Seeded:
    from node.db.schema import Finding, Instance, Job, JobInput, OutboxItem, ResultObject, Series, Study
    from worklists.entries import upsert_for_job

    received_at = received_at or dt.datetime.now(dt.UTC)
    body_part, description, role, model = ANATOMY[anatomy]
    study_uid = generate_uid(prefix=SOURCE_ROOT)
    series_uid = generate_uid(prefix=SOURCE_ROOT)
    for_uid = generate_uid(prefix=SOURCE_ROOT)
    store = settings.store_dir / study_uid / series_uid
    if phantom is not None:
        # a phantom from models.phantoms, written by its own DICOM writer (slice order = along the normal)
        from models.phantoms import generate, write_dicom_series

        ph = generate(anatomy, seed, **phantom)
        paths = [
            Path(p)
            for p in write_dicom_series(
                ph,
                store,
                patient_name=patient_name,
                patient_id=patient_id,
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=3,
            )
        ]
        sources = [pydicom.dcmread(str(p)) for p in paths]
        study_date, study_time = str(sources[0].StudyDate), str(sources[0].StudyTime)
        description = str(sources[0].SeriesDescription)
        shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
        centres = ph.labels.get("lesion_centers_vox") or {}
        center = tuple(int(v) for v in next(iter(centres.values()))) if centres else tuple(n // 2 for n in shape)
    else:
        vol = phantom_volume(n_slices, size, seed)
        common = dict(
            study_uid=study_uid,
            for_uid=for_uid,
            spacing=3.0,
            pixel=160.0 / size,
            body_part=body_part,
            patient_name=patient_name,
            patient_id=patient_id,
            study_date=study_date,
            study_time=study_time,
            accession=accession,
        )
        sources, paths = [], []
        for k in range(n_slices):
            sop = generate_uid(prefix=SOURCE_ROOT)
            ds = _mr_dataset(
                arr2d=vol[k],
                series_uid=series_uid,
                sop_uid=sop,
                k=k,
                description=description,
                series_number=3,
                **common,
            )
            # files in reverse order on disk so the loader must sort by position, not by name
            paths.append(_write(ds, store / f"{n_slices - k:04d}.dcm"))
            sources.append(ds)
        shape = vol.shape
        center = (n_slices // 2, int(size * 0.5), int(size * 0.45))
    n_slices = shape[0]

    seg_path = None
    superres_uid = None
    result_rows: list[tuple[str, str, str, str, Path]] = []  # kind, sop class, sop uid, series uid, path
    positive_labels = [f.label for f in findings if f.evaluated and f.positive]
    seg_slices: list[int] = []
    if with_seg and positive_labels:
        heat = _heatmap(shape, center)
        seg_uid = generate_uid(prefix=ROOT)
        seg_path = write_seg(sources, heat, positive_labels, settings.results_dir / study_uid / "seg.dcm", seg_uid)
        seg_ds = pydicom.dcmread(str(seg_path), stop_before_pixels=True)
        result_rows.append(("seg", str(seg_ds.SOPClassUID), str(seg_ds.SOPInstanceUID), seg_uid, seg_path))
        seg_slices = [k for k in range(n_slices) if heat[k].max() >= 0.05]
    if with_superres:
        superres_uid = generate_uid(prefix=ROOT)
        for j, ds in enumerate(superres_series(sources, superres_uid, f"{description} SR x2")):
            p = _write(ds, settings.results_dir / study_uid / "superres" / f"{j:04d}.dcm")
            result_rows.append(("superres", MRImageStorage, str(ds.SOPInstanceUID), superres_uid, p))

    with db.session() as s:
        study = Study(
            study_uid=study_uid,
            patient_name=patient_name,
            patient_id=patient_id,
            patient_birth_date="19800101",
            patient_sex="F",
            accession_number=accession,
            study_date=study_date,
            study_time=study_time,
            study_description=f"MR {body_part}",
            specific_character_set="ISO_IR 100",
            first_received_at=received_at,
            last_received_at=received_at,
        )
        s.add(study)
        s.flush()
        series = Series(
            study_id=study.id,
            series_uid=series_uid,
            modality="MR",
            body_part=body_part,
            series_description=description,
            series_number=3,
            manufacturer="TESTVENDOR",
            instances=n_slices,
            state="done" if job_state == "done" else "processing",
            pipeline=anatomy,
            role=role,
            first_received_at=received_at,
            last_received_at=received_at,
        )
        s.add(series)
        s.flush()
        for ds, p in zip(sources, paths):
            s.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=MRImageStorage,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    path=str(p),
                    size=p.stat().st_size,
                    instance_number=int(ds.InstanceNumber),
                    image_position="\\".join(str(v) for v in ds.ImagePositionPatient),
                    image_orientation="\\".join(str(v) for v in ds.ImageOrientationPatient),
                    received_at=received_at,
                )
            )
        versions = {model: {"version": "0.1.0", "weights_sha256": "ab" * 32}}
        job = Job(
            study_id=study.id,
            pipeline=anatomy,
            state=job_state,
            input_fingerprint="f" * 64,
            attempts=1,
            created_at=received_at,
            started_at=received_at,
            finished_at=received_at + dt.timedelta(seconds=8) if job_state == "done" else None,
            enqueue_pending=False,
            model_versions=versions,
            timings={"load": 0.4, "inference": 2.1},
            error="model crashed: test" if job_state in ("failed", "dead") else None,
        )
        s.add(job)
        s.flush()
        s.add(JobInput(job_id=job.id, series_id=series.id, role=role, used_by=[model]))
        for f in findings:
            s.add(
                Finding(
                    job_id=job.id,
                    model_name=f.model_name or model,
                    model_version="0.1.0",
                    weights_sha256="ab" * 32,
                    series_uid=series_uid,
                    code=f.code,
                    label=f.label,
                    evaluated=f.evaluated,
                    qc_reason=f.qc_reason,
                    qc_message=f"QC refused: {f.qc_reason}" if f.qc_reason else None,
                    probability=f.probability,
                    uncertainty=f.uncertainty,
                    positive=f.positive,
                    grade=f.grade,
                    level=f.level,
                    site=f.site,
                    laterality="R",
                    details={
                        "grade_probabilities": f.grade_probabilities,
                        "demo_weights": True,
                        "location": list(center) if f.positive else None,
                    },
                )
            )
        for kind, sop_class, sop, ser_uid, p in result_rows:
            ro = ResultObject(
                job_id=job.id,
                kind=kind,
                sop_class_uid=sop_class,
                sop_instance_uid=sop,
                series_uid=ser_uid,
                path=str(p),
                created_at=received_at,
            )
            s.add(ro)
            s.flush()
            for i, state in enumerate(outbox_states):
                s.add(
                    OutboxItem(
                        result_object_id=ro.id,
                        destination=f"dest{i}",
                        state=state,
                        attempts=1 if state != "dead" else 5,
                        last_error="0x0122 SOP class not supported" if state == "dead" else None,
                        sent_at=received_at + dt.timedelta(seconds=10) if state == "sent" else None,
                    )
                )
        s.flush()
        entry_id = None
        if job_state == "done":
            entry = upsert_for_job(s, job_id=job.id, policy=policy, now=received_at + dt.timedelta(seconds=9))
            s.flush()
            entry_id = entry.id
        return Seeded(
            study_id=study.id,
            job_id=job.id,
            entry_id=entry_id,
            study_uid=study_uid,
            series_id=series.id,
            series_uid=series_uid,
            source_paths=paths,
            seg_path=seg_path,
            superres_uid=superres_uid,
            seg_slices=seg_slices,
        )


def acl_misgraded(*, site: str | None = None) -> list[F]:
    """A knee whose ACL tear the model is sure of but grades "partial" (P(tear) 98 %: partial 71 %,
    complete 27 %), with a negative meniscus result on the meniscus model's scale (none/medial/lateral).
    ``site`` is the ACL finding's site."""
    return [
        F(
            "acl_tear",
            "Partial ACL tear",
            0.98,
            0.01,
            True,
            grade="partial",
            site=site,
            grade_probabilities={"intact": 0.02, "partial": 0.71, "complete": 0.27},
        ),
        F(
            "meniscal_tear",
            "No meniscal tear",
            0.12,
            0.05,
            False,
            model_name="knee.meniscus",
            grade_probabilities={"none": 0.88, "medial": 0.08, "lateral": 0.04},
        ),
    ]


def acl_complete() -> list[F]:
    return [
        F(
            "acl_tear",
            "ACL tear",
            0.93,
            0.04,
            True,
            grade="complete",
            site="anterior cruciate ligament",
            grade_probabilities={"intact": 0.07, "partial": 0.11, "complete": 0.82},
        ),
        F("meniscal_tear", "Meniscal tear", 0.12, 0.05, False, site="medial meniscus", model_name="knee.meniscus"),
    ]


def knee_normal() -> list[F]:
    return [
        F(
            "acl_tear",
            "ACL tear",
            0.04,
            0.02,
            False,
            grade="intact",
            grade_probabilities={"intact": 0.96, "partial": 0.03, "complete": 0.01},
        ),
        F("meniscal_tear", "Meniscal tear", 0.08, 0.03, False, model_name="knee.meniscus"),
    ]


def spine_severe() -> list[F]:
    out = []
    grades = {"L1-L2": "normal", "L2-L3": "mild", "L3-L4": "moderate", "L4-L5": "severe", "L5-S1": "mild"}
    for level, g in grades.items():
        probs = {"normal": 0.05, "mild": 0.05, "moderate": 0.05, "severe": 0.05}
        probs[g] = 0.85
        out.append(
            F(
                "spinal_stenosis",
                "Spinal stenosis",
                1 - probs["normal"],
                0.06,
                g in ("moderate", "severe"),
                grade=g,
                level=level,
                grade_probabilities=probs,
            )
        )
    return out


def qc_refused() -> list[F]:
    return [F("acl_tear", "ACL tear", None, None, None, evaluated=False, qc_reason="wrong_anatomy")]
