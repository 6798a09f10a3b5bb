"""A real lumbar volume of the corpus (``lumbar_spine/segmented_volumes``) as a sagittal T2 TSE DICOM series.

``write_sagittal_series(npz, folder, ...)`` writes one MR image per left-right slice of ``I[row, col, k]``:
rows run superior -> inferior (DICOM column direction (0, 0, -1)), columns anterior -> posterior (row
direction (0, 1, 0)), k is the left-right slice index (1 mm apart, along +x, patient left); the volume is
centred on the isocentre. The 8-bit corpus intensities are scaled to 12 bits as an MR scanner stores them.
The series is made at test time and never stored in the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from support.mr import SAGITTAL, mr_dataset, save


def write_sagittal_series(
    npz: Path,
    folder: Path,
    *,
    patient_name: str,
    patient_id: str,
    accession: str,
    scanner_detail: bool = True,
) -> tuple[str, list[Path]]:
    """The volume as a sagittal T2 TSE series; (study UID, files). ``scanner_detail``: also what a scanner
    writes beyond the geometry and timing (protocol and sequence names, averages, acquisition matrix, phase
    encoding direction, window)."""
    arr = np.load(npz)["I"]
    rows, cols, n = arr.shape
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    x0, y0, z0 = -(n - 1) / 2.0, -(cols - 1) / 2.0, (rows - 1) / 2.0
    detail: dict[str, object] = {}
    if scanner_detail:
        detail = {
            "ProtocolName": "T2_TSE_SAG",
            "SequenceName": "*tse2d1_17",
            "NumberOfAverages": 1.0,
            "AcquisitionMatrix": [0, cols, rows, 0],
            "InPlanePhaseEncodingDirection": "ROW",
            "WindowCenter": int(np.percentile(arr, 99) * 16 / 2),
            "WindowWidth": int(np.percentile(arr, 99) * 16),
        }
    paths = []
    for k in range(n):
        x = x0 + k
        ds = mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            pixels=arr[:, :, k].astype(np.uint16) * 16,
            bits_stored=12,
            PatientName=patient_name,
            PatientID=patient_id,
            PatientBirthDate="",
            PatientSex="",
            StudyDate="20240611",
            StudyTime="101500",
            StudyID="1",
            AccessionNumber=accession,
            ReferringPhysicianName="",
            StudyDescription="MRI LUMBAR SPINE",
            SeriesDescription="T2_TSE_SAG",
            SeriesNumber=3,
            InstanceNumber=k + 1,
            BodyPartExamined="LSPINE",
            PatientPosition="HFS",
            Manufacturer="",
            FrameOfReferenceUID=frame_uid,
            PositionReferenceIndicator="",
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            ImageOrientationPatient=list(SAGITTAL),
            ImagePositionPatient=[x, y0, z0],
            SliceLocation=x,
            PixelSpacing=[1.0, 1.0],
            SliceThickness=1.0,
            SpacingBetweenSlices=1.0,
            ScanningSequence=["SE"],
            SequenceVariant=["SK", "SP"],
            ScanOptions="",
            MRAcquisitionType="2D",
            RepetitionTime=3500.0,
            EchoTime=100.0,
            EchoTrainLength=17,
            ImagingFrequency=63.6,
            ImagedNucleus="1H",
            MagneticFieldStrength=1.5,
            FlipAngle=150.0,
            **detail,
        )
        paths.append(save(ds, folder / f"{k + 1:03d}.dcm"))
    return study_uid, paths
