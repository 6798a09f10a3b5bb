"""Viewer pixels: decoding real vendor files, refusing bad series, the SEG overlay by reference and by position."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from node.web import imaging
from support import web_seed as ws

pytestmark = pytest.mark.unit


def test_pydicom_loader_on_vendor_files_and_transfer_syntaxes():
    plain = imaging._load_with_pydicom([get_testdata_file("MR_small.dcm")])
    assert plain.array.shape == (1, 64, 64) and plain.positions is not None
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        other = imaging._load_with_pydicom([get_testdata_file(name)])
        assert np.array_equal(other.array[0], ref), name
    enhanced = imaging._load_with_pydicom([get_testdata_file("emri_small.dcm")])
    assert enhanced.array.shape == (10, 64, 64)
    assert enhanced.frame_numbers == tuple(range(1, 11))  # a multi-frame object keeps its frame numbers
    png = imaging.gray_png(enhanced, 3)
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_series_that_cannot_be_shown_are_refused_with_a_reason(tmp_path):
    a = shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "a.dcm")
    big = shutil.copy(get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm"), tmp_path / "b.dcm")
    with pytest.raises(imaging.ImagingError, match=r"mixes image sizes \[\(64, 64\), \(484, 484\)\]"):
        imaging._load_with_pydicom([a, big])
    with pytest.raises(imaging.ImagingError):  # models.io.load_series, when installed, words it its own way
        imaging.load_stack([a, big])
    with pytest.raises(imaging.ImagingError, match="1 stored file\\(s\\) of the series are missing"):
        imaging.load_stack([a, tmp_path / "gone.dcm"])
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(Path(a).read_bytes()[:1200])
    with pytest.raises(imaging.ImagingError, match=r"broken\.dcm: cannot decode pixel data"):
        imaging._load_with_pydicom([broken])


def test_seg_without_per_frame_references_is_placed_by_position(settings, tmp_path):
    vol = ws.phantom_volume(10, 64, seed=3)
    study = pydicom.uid.generate_uid()
    sources = []
    paths = []
    for k in range(10):
        ds = ws._mr_dataset(
            arr2d=vol[k],
            study_uid=study,
            series_uid="1.2.826.0.1.3680043.8.498.77",
            for_uid="1.2.826.0.1.3680043.8.498.78",
            sop_uid=pydicom.uid.generate_uid(),
            k=k,
            spacing=3.0,
            pixel=2.0,
            body_part="KNEE",
            description="SAG PD FS",
            patient_name="X^Y",
            patient_id="P",
            study_date="20240101",
            study_time="101010",
            accession="A",
            series_number=3,
        )
        paths.append(ws._write(ds, tmp_path / f"{k}.dcm"))
        sources.append(ds)
    heat = ws._heatmap(vol.shape, (7, 20, 40))
    seg_path = ws.write_seg(sources, heat, ["ACL tear"], tmp_path / "seg.dcm", pydicom.uid.generate_uid())
    stack = imaging.load_stack(paths)
    by_ref = imaging.load_overlay(seg_path, stack)
    assert by_ref.method == "source_instance"

    seg = pydicom.dcmread(seg_path)
    for fg in seg.PerFrameFunctionalGroupsSequence:
        del fg.DerivationImageSequence
    stripped = tmp_path / "seg-no-refs.dcm"
    seg.save_as(stripped)
    by_pos = imaging.load_overlay(stripped, stack)
    assert by_pos.method == "plane_position"
    assert np.allclose(by_pos.array, by_ref.array, atol=1 / 255)
    peak = np.unravel_index(np.argmax(by_ref.array), by_ref.array.shape)
    assert peak == (9 - 7, 20, 40)  # the stack runs along the normal (-x): seed slice 7 is stack slice 2


def test_heat_png_and_slice_map():
    h = np.zeros((8, 8), np.float32)
    h[2, 3] = 0.04
    h[5, 5] = 1.0
    rgba = np.asarray(Image.open(io.BytesIO(imaging.heat_png(h))))
    assert rgba[2, 3, 3] == 0 and rgba[5, 5, 3] > 200 and rgba[0, 0, 3] == 0
    a = imaging.SliceStack(np.zeros((3, 2, 2), np.float32), ("a", "b", "c"), (None,) * 3, None, None)
    b = imaging.SliceStack(np.zeros((5, 2, 2), np.float32), tuple("vwxyz"), (None,) * 5, None, None)
    assert imaging.slice_map(a, b) == [0, 2, 4]  # no geometry: proportional
