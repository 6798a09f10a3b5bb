"""Helpers for the models tests: write any Volume as an MR DICOM series; the MNI152 brain as a sagittal Volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from models.types import Volume
from support.mr import mr_dataset, save

ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, never the node's


def write_volume_series(
    vol: Volume,
    out_dir: Path,
    *,
    body_part: str = "KNEE",
    description: str = "SAG PD FS",
    image_type=("ORIGINAL", "PRIMARY", "M", "NONE"),
) -> list[Path]:
    """One MR Image Storage file per slice (uint16 with rescale), geometry from the Volume."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(vol.array, np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    slope = (hi - lo) / 65000.0 if hi > lo else 1.0
    study, series, frame = (generate_uid(prefix=ROOT) for _ in range(3))
    paths = []
    for k in range(arr.shape[0]):
        ds = mr_dataset(
            study_uid=study,
            series_uid=series,
            uid_prefix=ROOT,
            pixels=np.round((arr[k] - lo) / slope).clip(0, 65535).astype(np.uint16),
            FrameOfReferenceUID=frame,
            BodyPartExamined=body_part,
            SeriesDescription=description,
            ImageType=list(image_type),
            PatientName="Test^Volume",
            PatientID="T1",
            InstanceNumber=arr.shape[0] - k,  # deliberately opposite to the position order
            ImagePositionPatient=[f"{v:.4f}" for v in vol.positions[k]],
            ImageOrientationPatient=[f"{v:.6f}" for v in (*vol.row_cosine, *vol.col_cosine)],
            PixelSpacing=[f"{vol.spacing[1]:.5f}", f"{vol.spacing[2]:.5f}"],
            SliceThickness=f"{vol.spacing[0]:.4f}",
            RescaleSlope=f"{slope:.8g}",
            RescaleIntercept=f"{lo:.6g}",
        )
        path = save(ds, out_dir / f"{k:03d}.dcm")
        paths.append(path)
    return paths


def mni_volume(slice_spacing: float = 4.0, pixel: float = 1.0, plane: str = "sagittal") -> Volume:
    """The MNI152 T1 template that nilearn ships, resliced into ``plane`` slices (LPS geometry, the
    standard row/column directions of that plane)."""
    import glob

    import nibabel as nib
    import nilearn
    from scipy import ndimage

    from models.transforms import PLANES

    files = glob.glob(str(Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_*.nii*"))
    assert files, "nilearn's MNI152 template is missing"
    img = nib.load(files[0])
    data = np.asarray(img.get_fdata(), np.float32)
    inv = np.linalg.inv(img.affine)
    row, col = (np.asarray(v, float) for v in PLANES[plane])
    normal = np.cross(row, col)
    centre = np.array([0.0, 18.0, 8.0])  # LPS centre of the brain in MNI space
    extent = {"sagittal": (120.0, 160.0, 180.0), "coronal": (160.0, 160.0, 150.0), "axial": (140.0, 190.0, 150.0)}[
        plane
    ]
    nk = int(extent[0] // slice_spacing) + 1
    nj, ni = int(extent[1] // pixel), int(extent[2] // pixel)
    origin = centre - normal * slice_spacing * (nk - 1) / 2 - col * pixel * (nj - 1) / 2 - row * pixel * (ni - 1) / 2
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    lps = origin + kk[..., None] * slice_spacing * normal + jj[..., None] * pixel * col + ii[..., None] * pixel * row
    ras = lps * np.array([-1.0, -1.0, 1.0])
    vox = (np.c_[ras.reshape(-1, 3), np.ones(ras.size // 3)] @ inv.T)[:, :3].T
    arr = ndimage.map_coordinates(data, vox, order=1, mode="constant").reshape(kk.shape).astype(np.float32)
    positions = np.array([origin + n * slice_spacing * normal for n in range(nk)])
    return Volume(
        array=arr,
        spacing=(slice_spacing, pixel, pixel),
        positions=positions,
        row_cosine=tuple(row),
        col_cosine=tuple(col),
        series_uid=f"mni152-{plane}",
        modality="MR",
        body_part="KNEE",
        sop_instance_uids=tuple(f"mni-{n}" for n in range(nk)),
        frame_numbers=(None,) * nk,
    )
