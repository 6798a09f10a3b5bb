"""Write phantoms as DICOM MR Image Storage series (one file per slice), a 3-plane localizer
and whole multi-series studies.

Defaults follow contract C3 (descriptions the shipped routing rules match). The default UID
root is pydicom's, NOT the node's ``uid_root``: the node never routes objects carrying its own
root (they are its own results), and phantom series must be routed like scanner series.
Manufacturer is "msknode-phantom" for the same reason ("msknode" marks our own results).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from models.phantoms.common import ANATOMIES, PHANTOM_UID_ROOT, Phantom
from models.phantoms.errors import PhantomError
from models.phantoms.mr import SEQUENCE_FACTS

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MANUFACTURER = "msknode-phantom"

DEFAULT_DESCRIPTION = {"knee": "SAG PD FS", "shoulder": "COR OBL T2 FS", "lumbar_spine": "SAG T2 TSE"}
BODY_PART = {"knee": "KNEE", "shoulder": "SHOULDER", "lumbar_spine": "LSPINE"}
PATIENT_NAME = {"knee": "PHANTOM^KNEE", "shoulder": "PHANTOM^SHOULDER", "lumbar_spine": "PHANTOM^LSPINE"}
PATIENT_POSITION = {"knee": "FFS", "shoulder": "HFS", "lumbar_spine": "HFS"}
STUDY_DESCRIPTION = {"knee": "MR KNEE", "shoulder": "MR SHOULDER", "lumbar_spine": "MR LUMBAR SPINE"}
# Siemens-like sequence names per contrast
SEQUENCE_NAME = {
    "PD_FS": "*tse2d1_9",
    "PD": "*tse2d1_9",
    "T1": "*tse2d1_3",
    "T2_FS": "*tse2d1_12",
    "T2": "*tse2d1_17",
    "STIR": "*tir2d1_12",
}

# (role, SeriesDescription, overrides) of the series write_study writes, in series-number order
STUDY_SERIES: dict[str, tuple[tuple[str, str, dict[str, Any]], ...]] = {
    "knee": (
        ("sag_fluid", "SAG PD FS", {"sequence": "PD_FS", "orientation": "sagittal"}),
        ("sag_pd", "SAG PD", {"sequence": "PD", "orientation": "sagittal"}),
        ("cor_fluid", "COR PD FS", {"sequence": "PD_FS", "orientation": "coronal"}),
    ),
    "shoulder": (
        ("cor_fluid", "COR OBL T2 FS", {"sequence": "T2_FS", "orientation": "coronal"}),
        ("cor_t1", "COR OBL T1", {"sequence": "T1", "orientation": "coronal"}),
    ),
    "lumbar_spine": (
        ("sag_t2", "SAG T2 TSE", {"sequence": "T2", "orientation": "sagittal"}),
        ("sag_t1", "SAG T1 TSE", {"sequence": "T1", "orientation": "sagittal"}),
    ),
}


def _study_datetime(seed: int) -> dt.datetime:
    base = dt.datetime(2024, 1, 1, 7, 30, 0)  # noqa: DTZ001 -- StudyDate/StudyTime are the site's wall clock, no zone
    return base + dt.timedelta(days=int(seed) % 700, minutes=(int(seed) * 37) % 600)


def _ds(v: float) -> str:
    """A DS value within 16 characters."""
    s = f"{float(v):.6g}"
    if len(s) > 16:
        s = f"{float(v):.8e}"[:16]
    return s


def _pixels(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), 0, 65535).astype(np.uint16)


def _base_dataset(
    *,
    anatomy: str,
    patient_name: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str | None,
    when: dt.datetime,
    series_number: int,
    description: str,
    body_part: str,
    laterality: str | None,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.AcquisitionDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = when.strftime("%H%M%S")
    series_time = when + dt.timedelta(minutes=3 * series_number)
    ds.SeriesTime = series_time.strftime("%H%M%S")
    ds.AcquisitionTime = ds.SeriesTime
    ds.ContentTime = ds.SeriesTime
    ds.AccessionNumber = "PH" + hashlib.sha256(study_uid.encode()).hexdigest()[:10].upper()
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Phantom Imaging"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM1"
    ds.StudyDescription = STUDY_DESCRIPTION[anatomy]
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "synthetic"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.ProtocolName = description
    ds.SoftwareVersions = "msknode-phantom 1"
    ds.PatientPosition = PATIENT_POSITION[anatomy]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    if laterality:
        ds.Laterality = laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _mr_attributes(
    ds: Dataset,
    sequence: str,
    *,
    localizer: bool,
    rows: int,
    cols: int,
    pe_axis: int,
    acq_fraction_pe: float,
    acq_fraction_ro: float,
    sequence_name: str | None,
) -> None:
    scanning, variant, options, tr, te, ti, etl = SEQUENCE_FACTS[sequence]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"] if localizer else ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = scanning.split("\\") if "\\" in scanning else scanning
    ds.SequenceVariant = variant.split("\\")
    ds.ScanOptions = options if options else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = sequence_name or SEQUENCE_NAME[sequence]
    ds.AngioFlag = "N"
    ds.RepetitionTime = _ds(tr)
    ds.EchoTime = _ds(te)
    if ti is not None:
        ds.InversionTime = _ds(ti)
    ds.EchoTrainLength = etl
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "63.676"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "1.5"
    ds.PixelBandwidth = "200"
    ds.FlipAngle = "150" if not localizer else "20"
    n_pe = round((rows if pe_axis == 1 else cols) * acq_fraction_pe)
    n_ro = round((cols if pe_axis == 1 else rows) * acq_fraction_ro)
    ds.NumberOfPhaseEncodingSteps = n_pe
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    # AcquisitionMatrix: frequency rows, frequency columns, phase rows, phase columns
    ds.InPlanePhaseEncodingDirection = "COL" if pe_axis == 1 else "ROW"
    ds.AcquisitionMatrix = [0, n_pe, n_ro, 0] if pe_axis == 1 else [n_ro, 0, 0, n_pe]
    ds.ReceiveCoilName = "phantom coil"
    ds.TransmitCoilName = "body"


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MSKNODE_PHANTOM"
    ds.file_meta = meta
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


def _slices(
    ds_base: Dataset,
    volume,
    out_dir: Path,
    *,
    series_uid: str,
    uid_root: str,
    instance_offset: int = 0,
    n_in_acquisition: int | None = None,
    prefix: str = "IM",
) -> list[Path]:
    arr = _pixels(volume.array)
    normal = np.cross(np.asarray(volume.row_cosine), np.asarray(volume.col_cosine))
    paths = []
    nk = arr.shape[0]
    hi = float(np.percentile(arr, 99.5)) if arr.size else 1.0
    for k in range(nk):
        ds = Dataset()
        ds.update(ds_base)
        number = instance_offset + k + 1
        ds.SOPInstanceUID = generate_uid(prefix=uid_root, entropy_srcs=[series_uid, "instance", str(number)])
        ds.InstanceNumber = number
        ds.AcquisitionNumber = 1
        ds.ImagesInAcquisition = n_in_acquisition or nk
        pos = np.asarray(volume.positions[k], float)
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in (*volume.row_cosine, *volume.col_cosine)]
        ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[2])]
        ds.SliceThickness = _ds(volume.attributes.get("slice_thickness", volume.spacing[0]))
        ds.SpacingBetweenSlices = _ds(volume.spacing[0])
        ds.SliceLocation = _ds(float(np.dot(pos, normal)))
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        sl = arr[k]
        ds.SmallestImagePixelValue = int(sl.min())
        ds.LargestImagePixelValue = int(sl.max())
        ds["SmallestImagePixelValue"].VR = "US"
        ds["LargestImagePixelValue"].VR = "US"
        ds.WindowCenter = _ds(max(hi / 2, 1.0))
        ds.WindowWidth = _ds(max(hi, 2.0))
        ds.PixelData = np.ascontiguousarray(sl).tobytes()
        paths.append(_save(ds, out_dir / f"{prefix}{number:04d}.dcm"))
    return paths


def write_dicom_series(
    phantom: Phantom,
    out_dir,
    *,
    series_description: str | None = None,
    body_part: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str | None = None,
    patient_id: str | None = None,
    uid_root: str = PHANTOM_UID_ROOT,
    laterality: str | None = None,
    sequence: str | None = None,
    series_number: int = 1,
    frame_of_reference_uid: str | None = None,
) -> list[Path]:
    """Write ``phantom.volume`` as an MR Image Storage series in ``out_dir`` (created); one file
    per slice, ordered along the slice normal. ``sequence`` is the DICOM SequenceName; the
    contrast comes from the phantom. Returns the file paths in slice order."""
    anatomy = phantom.anatomy
    if anatomy not in ANATOMIES:
        raise PhantomError(f"unknown anatomy {anatomy!r}")
    if not uid_root.endswith(".") or len(uid_root) > 40:
        raise PhantomError("uid_root must end with '.' and leave room for a UID suffix (<= 40 characters)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vol = phantom.volume
    seed = phantom.seed
    own_uids = uid_root == PHANTOM_UID_ROOT and bool(vol.series_uid)
    key = [anatomy, str(seed), str(vol.series_uid), str(vol.shape), str(series_description)]
    study_uid = study_uid or (
        vol.study_uid if own_uids else generate_uid(prefix=uid_root, entropy_srcs=["study", anatomy, str(seed)])
    )
    series_uid = series_uid or (
        vol.series_uid
        if own_uids and series_description is None
        else generate_uid(prefix=uid_root, entropy_srcs=["series", *key])
    )
    frame_uid = frame_of_reference_uid or (
        vol.frame_of_reference_uid
        if own_uids
        else generate_uid(prefix=uid_root, entropy_srcs=["frame", anatomy, str(seed)])
    )
    lat = laterality if laterality is not None else (vol.laterality if anatomy in ("knee", "shoulder") else None)
    base = _base_dataset(
        anatomy=anatomy,
        patient_name=patient_name or PATIENT_NAME[anatomy],
        patient_id=patient_id or f"PH-{BODY_PART[anatomy]}-{seed}",
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        when=_study_datetime(seed),
        series_number=series_number,
        description=series_description or DEFAULT_DESCRIPTION[anatomy],
        body_part=body_part or BODY_PART[anatomy],
        laterality=lat,
    )
    p = phantom.params
    _mr_attributes(
        base,
        vol.attributes.get("sequence", "PD_FS"),
        localizer=False,
        rows=vol.shape[1],
        cols=vol.shape[2],
        pe_axis=int(p.get("pe_axis", 1)),
        acq_fraction_pe=float(p.get("acq_fraction_pe", 1.0)),
        acq_fraction_ro=float(p.get("acq_fraction_ro", 1.0)),
        sequence_name=sequence,
    )
    return _slices(base, vol, out, series_uid=series_uid, uid_root=uid_root)


def write_localizer(
    anatomy: str,
    out_dir,
    seed: int,
    *,
    series_description: str = "3-PLANE LOC",
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str | None = None,
    patient_id: str | None = None,
    uid_root: str = PHANTOM_UID_ROOT,
    series_number: int = 99,
    frame_of_reference_uid: str | None = None,
    slices_per_plane: int = 3,
    matrix: int = 128,
) -> list[Path]:
    """A 3-plane localizer: ``slices_per_plane`` thick low-resolution slices in each of the
    sagittal, coronal and axial planes, in ONE series (mixed orientations, as scanners do)."""
    from models.phantoms import generate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=uid_root, entropy_srcs=["study", anatomy, str(seed)])
    series_uid = series_uid or generate_uid(prefix=uid_root, entropy_srcs=["localizer", anatomy, str(seed)])
    frame_uid = frame_of_reference_uid or generate_uid(prefix=uid_root, entropy_srcs=["frame", anatomy, str(seed)])
    base = _base_dataset(
        anatomy=anatomy,
        patient_name=patient_name or PATIENT_NAME[anatomy],
        patient_id=patient_id or f"PH-{BODY_PART[anatomy]}-{seed}",
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        when=_study_datetime(seed),
        series_number=series_number,
        description=series_description,
        body_part=BODY_PART[anatomy],
        laterality=None,
    )
    paths: list[Path] = []
    total = 3 * slices_per_plane
    for idx, plane in enumerate(("sagittal", "coronal", "axial")):
        ph = generate(
            anatomy,
            seed,
            orientation=plane,
            n_slices=slices_per_plane,
            slice_thickness=8.0,
            slice_gap_fraction=1.0,
            matrix=matrix,
            fov=max(300.0, 0.0),
            sequence="PD",
            motion_px=0.0,
            sub_slices=1,
        )
        if anatomy in ("knee", "shoulder") and ph.volume.laterality:
            base.Laterality = ph.volume.laterality
        ds = Dataset()
        ds.update(base)
        _mr_attributes(
            ds,
            "PD",
            localizer=True,
            rows=matrix,
            cols=matrix,
            pe_axis=1,
            acq_fraction_pe=0.5,
            acq_fraction_ro=1.0,
            sequence_name="*fl2d1",
        )
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.RepetitionTime = "8.6"
        ds.EchoTime = "4"
        ds.EchoTrainLength = 1
        paths += _slices(
            ds,
            ph.volume,
            out,
            series_uid=series_uid,
            uid_root=uid_root,
            instance_offset=idx * slices_per_plane,
            n_in_acquisition=total,
            prefix="LOC",
        )
    return paths


def write_study(anatomy: str, out_dir, seed: int, **labels) -> dict[str, list[Path]]:
    """A whole study (one StudyInstanceUID and frame of reference): a 3-plane localizer plus the
    anatomy's usual series (knee: sag_fluid, sag_pd, cor_fluid; shoulder: cor_fluid, cor_t1;
    lumbar_spine: sag_t2, sag_t1), all of the same phantom (same seed and labels). Each series
    goes to ``out_dir/<role>/``. Returns role -> file paths."""
    from models.phantoms import generate

    if anatomy not in STUDY_SERIES:
        raise PhantomError(f"unknown anatomy {anatomy!r}; expected one of {', '.join(ANATOMIES)}")
    out = Path(out_dir)
    uid_root = labels.pop("uid_root", PHANTOM_UID_ROOT)
    study_uid = labels.pop("study_uid", None) or generate_uid(
        prefix=uid_root, entropy_srcs=["study", anatomy, str(seed)]
    )
    frame_uid = generate_uid(prefix=uid_root, entropy_srcs=["frame", anatomy, str(seed)])
    patient_id = labels.pop("patient_id", None)
    patient_name = labels.pop("patient_name", None)
    result: dict[str, list[Path]] = {}
    result["localizer"] = write_localizer(
        anatomy,
        out / "localizer",
        seed,
        study_uid=study_uid,
        uid_root=uid_root,
        series_number=1,
        frame_of_reference_uid=frame_uid,
        patient_id=patient_id,
        patient_name=patient_name,
    )
    for number, (role, description, over) in enumerate(STUDY_SERIES[anatomy], start=2):
        kw = dict(over)
        kw.update({k: v for k, v in labels.items() if k not in ("sequence", "orientation")})
        ph = generate(anatomy, seed, **kw)
        result[role] = write_dicom_series(
            ph,
            out / role,
            series_description=description,
            study_uid=study_uid,
            uid_root=uid_root,
            series_number=number,
            frame_of_reference_uid=frame_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            series_uid=generate_uid(
                prefix=uid_root, entropy_srcs=["study-series", anatomy, str(seed), role, study_uid]
            ),
        )
    return result
