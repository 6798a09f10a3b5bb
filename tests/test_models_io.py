"""models.io: real vendor files (pydicom-data), several transfer syntaxes, sorting by position,
spacing from positions, multi-frame Enhanced MR with functional groups, clear refusals."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless, generate_uid

from models.errors import VolumeError
from models.io import group_folder, load_folder, load_series

SYNTAXES = [
    "MR_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
]
DICOMDIR_TESTS = Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _path(name: str) -> Path:
    p = get_testdata_file(name)
    assert p is not None, f"pydicom-data file {name} missing"
    return Path(p)


def test_every_lossless_transfer_syntax_gives_the_same_pixels():
    ref = load_series([_path("MR_small.dcm")])
    assert ref.shape == (1, 64, 64)
    assert ref.spacing[1:] == pytest.approx((0.3125, 0.3125))
    for name in SYNTAXES[1:]:
        vol = load_series([_path(name)])
        assert np.array_equal(vol.array, ref.array), name
        assert vol.series_uid == ref.series_uid
        assert vol.sop_instance_uids == ref.sop_instance_uids


def _series_from(base: Path, out: Path, positions_along_normal, instance_numbers) -> list[Path]:
    """Copies of one real vendor file as a multi-slice series at the given normal offsets (mm)."""
    src = pydicom.dcmread(base)
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.array([float(v) for v in src.ImagePositionPatient])
    series_uid = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (d, inst) in enumerate(zip(positions_along_normal, instance_numbers)):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp0 + d * normal]
        arr = src.pixel_array.astype(np.int32)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            pass  # keep the vendor's compressed pixel data untouched
        else:
            ds.PixelData = np.clip(arr + 100 * i, 0, 32767).astype(src.pixel_array.dtype).tobytes()
        p = out / f"f{i:02d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def test_slices_sorted_by_position_not_instance_number(tmp_path):
    # written in scrambled order with misleading instance numbers
    offsets = [8.0, -4.0, 0.0, 4.0, -8.0]
    instance_numbers = [1, 2, 3, 4, 5]
    paths = _series_from(_path("MR_small.dcm"), tmp_path / "s", offsets, instance_numbers)
    vol = load_series(paths)
    assert vol.shape == (5, 64, 64)
    assert vol.spacing[0] == pytest.approx(4.0, abs=1e-3)
    d = vol.positions @ vol.normal
    assert np.all(np.diff(d) > 0)
    # slice k came from the file whose offset is the k-th smallest (pixel offset 100 * file index)
    order = np.argsort(offsets)
    base = pydicom.dcmread(_path("MR_small.dcm")).pixel_array.astype(np.float32)
    for k, i in enumerate(order):
        assert np.allclose(vol.array[k], np.clip(base + 100 * i, 0, 32767))
    src_uids = [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    assert list(vol.sop_instance_uids) == [src_uids[i] for i in order]
    assert vol.frame_numbers == (None,) * 5


def test_compressed_series_from_vendor_file_is_sorted_with_right_spacing(tmp_path):
    paths = _series_from(_path("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "jls", [0.0, 6.6, 3.3, 9.9], [4, 3, 2, 1])
    vol = load_series(paths)
    assert vol.shape == (4, 64, 64)
    assert vol.spacing[0] == pytest.approx(3.3, abs=1e-3)
    assert "1.2.840.10008.1.2.4.80" in vol.attributes["transfer_syntaxes"]


def test_real_vendor_ct_series_sorted_along_the_normal():
    vols = load_folder(DICOMDIR_TESTS / "77654033" / "CT2")
    assert len(vols) == 1
    vol = next(iter(vols.values()))
    d = vol.positions @ vol.normal
    assert vol.shape[0] == 4 and np.all(np.diff(d) > 0)
    assert vol.spacing[0] == pytest.approx(float(np.median(np.diff(d))))
    assert vol.attributes["irregular_spacing"] is True


def test_real_vendor_radial_localizer_is_refused_for_mixed_orientations():
    files = sorted((DICOMDIR_TESTS / "98892003" / "MR700").iterdir())
    with pytest.raises(VolumeError, match="mixed orientations"):
        load_series(files)


def test_mixed_sizes_refused(tmp_path):
    a = pydicom.dcmread(_path("MR_small.dcm"))
    b = pydicom.dcmread(_path("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    b.SeriesInstanceUID = a.SeriesInstanceUID
    b.ImageOrientationPatient = a.ImageOrientationPatient
    pa, pb = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.save_as(pa)
    b.save_as(pb)
    with pytest.raises(VolumeError, match="mixed image sizes"):
        load_series([pa, pb])


def test_duplicate_positions_and_mixed_series_refused(tmp_path):
    paths = _series_from(_path("MR_small.dcm"), tmp_path / "dup", [0.0, 0.0, 4.0], [1, 2, 3])
    with pytest.raises(VolumeError, match="share a position"):
        load_series(paths)
    other = _series_from(_path("MR_small.dcm"), tmp_path / "other", [0.0], [1])
    with pytest.raises(VolumeError, match="different series"):
        load_series(paths[2:] + other)


def test_not_dicom_and_truncated_files_refused(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not dicom" * 20)
    with pytest.raises(VolumeError, match="not a DICOM file"):
        load_series([junk])
    with pytest.raises(VolumeError, match="cannot decode"):
        load_series([_path("MR_truncated.dcm")])
    with pytest.raises(VolumeError, match="missing"):
        load_series([tmp_path / "nope.dcm"])


def test_multiframe_without_functional_groups_loads_with_assumed_geometry():
    for name in (
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_big_endian.dcm",
    ):
        vol = load_series([_path(name)])
        assert vol.shape == (10, 64, 64), name
        assert vol.spacing[0] == pytest.approx(1.2)
        assert vol.attributes["geometry_assumed"] is True
        assert vol.frame_numbers == tuple(range(1, 11))


def _enhanced_with_groups(out: Path) -> tuple[Path, list[float]]:
    """emri_small as a proper Enhanced MR: shared pixel measures/orientation, per-frame positions (scrambled
    order along the normal) and per-frame rescale, RLE compressed."""
    ds = pydicom.dcmread(_path("emri_small.dcm"))
    n = int(ds.NumberOfFrames)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [0.9, 0.8]
    pm.SliceThickness = 2.5
    po = Dataset()
    po.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    offsets = [float(v) for v in np.random.default_rng(3).permutation(n) * 2.5]
    per = []
    for f in range(n):
        fg = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [-offsets[f], -100.0, 80.0]  # normal = cross(row, col) = (-1, 0, 0)
        fg.PlanePositionSequence = Sequence([pp])
        pv = Dataset()
        pv.RescaleSlope = 2
        pv.RescaleIntercept = -5
        pv.RescaleType = "US"
        fg.PixelValueTransformationSequence = Sequence([pv])
        per.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.compress(RLELossless)
    path = out / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, offsets


def test_enhanced_multiframe_with_functional_groups(tmp_path):
    path, offsets = _enhanced_with_groups(tmp_path)
    raw = pydicom.dcmread(_path("emri_small.dcm")).pixel_array.astype(np.float32)
    vol = load_series([path])
    assert vol.shape == (10, 64, 64)
    assert vol.spacing == pytest.approx((2.5, 0.9, 0.8))
    assert "geometry_assumed" not in vol.attributes
    d = vol.positions @ vol.normal
    assert np.all(np.diff(d) == pytest.approx(2.5))
    order = np.argsort(offsets)  # frame f sits at offset offsets[f] along the normal
    assert list(vol.frame_numbers) == [int(i) + 1 for i in order]
    for k, f in enumerate(order):
        assert np.allclose(vol.array[k], raw[f] * 2 - 5)
    assert vol.attributes["multiframe"] is True


def test_load_folder_groups_by_series_and_skips_other_files(tmp_path):
    _series_from(_path("MR_small.dcm"), tmp_path / "x" / "one", [0.0, 5.0, 10.0], [1, 2, 3])
    _series_from(_path("MR_small.dcm"), tmp_path / "x" / "two", [0.0, 5.0], [1, 2])
    (tmp_path / "x" / "README.txt").write_text("not dicom")
    groups = group_folder(tmp_path / "x")
    assert sorted(len(v) for v in groups.values()) == [2, 3]
    vols = load_folder(tmp_path / "x")
    assert sorted(v.shape[0] for v in vols.values()) == [2, 3]
    with pytest.raises(VolumeError, match="is not a folder"):
        load_folder(tmp_path / "x" / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(VolumeError, match="no DICOM image series"):
        load_folder(tmp_path / "empty")


def test_phantom_series_round_trip(tmp_path):
    from models.phantoms import generate, write_dicom_series

    ph = generate("knee", 5, matrix=64, n_slices=14)
    files = write_dicom_series(ph, tmp_path / "knee")
    vol = load_series(list(reversed(files)))
    assert vol.shape == ph.volume.shape
    assert vol.spacing == pytest.approx(ph.volume.spacing, rel=1e-3)
    assert np.allclose(vol.positions, ph.volume.positions, atol=1e-2)
    scale = float(np.abs(ph.volume.array).max())
    assert np.abs(vol.array - ph.volume.array).max() <= 0.01 * scale
    assert vol.body_part == "KNEE"
