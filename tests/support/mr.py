"""The one factory for MR data sets in the tests: `mr_dataset` and `save`.

`mr_dataset` makes a classic MR Image Storage data set with its File Meta Information, the SOP,
study and series UIDs (new ones unless given) and ``Modality = "MR"``; ``pixels`` (a 2-D array)
fills the image pixel module; every other attribute is a keyword argument named as in pydicom
(``SeriesDescription="SAG PD FS"``), so each test states the header it depends on and nothing
else. A keyword whose value is None is left out.

    ds = mr_dataset(study_uid=study, series_uid=series, pixels=img, SeriesDescription="SAG PD FS",
                    ImageOrientationPatient=[0, 1, 0, 0, 0, -1], ImagePositionPatient=[x, y, z])
    save(ds, folder / "001.dcm")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows anterior -> posterior, columns head -> foot
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def mr_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    uid_prefix: str | None = None,
    pixels: np.ndarray | None = None,
    bits_stored: int = 16,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_meta: dict[str, Any] | None = None,
    **attributes: Any,
) -> Dataset:
    """An MR Image Storage data set (see the module docstring).

    ``uid_prefix``: root of the UIDs made here (pydicom's when None). ``pixels``: unsigned 16-bit
    samples (Rows, Columns, MONOCHROME2, ``bits_stored`` of 16 allocated). ``file_meta``: further
    File Meta Information elements (``ImplementationClassUID``, ...).
    """
    sop_uid = sop_uid or generate_uid(prefix=uid_prefix)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    for keyword, value in (file_meta or {}).items():
        setattr(meta, keyword, value)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid(prefix=uid_prefix)
    ds.SeriesInstanceUID = series_uid or generate_uid(prefix=uid_prefix)
    ds.Modality = "MR"
    if pixels is not None:
        set_pixels(ds, pixels, bits_stored=bits_stored)
    for keyword, value in attributes.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def set_pixels(ds: Dataset, pixels: np.ndarray, *, bits_stored: int = 16) -> Dataset:
    """The image pixel module of one grey-scale frame: unsigned 16-bit samples."""
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"one 2-D frame expected, got shape {arr.shape}")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Writes ``ds`` as a DICOM file (preamble, File Meta Information); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
