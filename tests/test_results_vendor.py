"""Result objects built on real vendor MR files (pydicom-data), including the invalid values
real sources carry: every object passes dciodvfy with no error and round-trips."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset

from models.types import Finding, ModelOutput, PipelineOutput, QCResult
from node.results import TriageSummary, build_results, save
from support.results_data import (
    assert_valid,
    blob,
    copy_real,
    measurement_groups,
    model,
    superres_inplane,
    volume_from_files,
)

pytestmark = pytest.mark.integration

VENDOR_FILES = [
    # (file, build a super-resolved series too)
    ("MR_small.dcm", True),  # Toshiba, no Specific Character Set, retired PN forms
    ("MR_small_bigendian.dcm", False),  # Explicit VR Big Endian source
    ("MR_small_jpeg_ls_lossless.dcm", True),  # JPEG-LS compressed source pixels
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", True),  # Siemens, ISO_IR 100, overlays, zero weight
    ("MR2_UNCR.dcm", False),  # Philips 1024x1024, oblique, rescale slope/intercept
]


def _output(vol, *, superres: bool) -> PipelineOutput:
    shape = vol.array.shape
    center = (0, shape[1] // 2, shape[2] // 2)
    acl = Finding(
        code="acl_tear",
        label="ACL tear",
        probability=0.77,
        uncertainty=0.1,
        positive=True,
        threshold=0.5,
        grade="partial",
        location=center,
        heatmap=blob(shape, center, radius=max(3.0, shape[1] / 10)),
    )
    men = Finding(
        code="meniscal_tear",
        label="Meniscal tear",
        probability=0.2,
        uncertainty=0.07,
        positive=False,
        threshold=0.5,
        site="medial meniscus",
    )
    outs = [
        ModelOutput(model=model("knee.acl"), series_uid=vol.series_uid, qc=QCResult(True), findings=[acl]),
        ModelOutput(model=model("knee.meniscus"), series_uid=vol.series_uid, qc=QCResult(True), findings=[men]),
    ]
    return PipelineOutput(
        pipeline="knee",
        outputs=outs,
        superres=[superres_inplane(vol)] if superres else [],
        used_series={o.model.name: [vol.series_uid] for o in outs},
    )


def _check_all(results, settings, label, *, source: Dataset) -> dict[str, list[Path]]:
    paths: dict[str, list[Path]] = {}
    for r in results:
        path = save(r, settings)
        assert_valid(path, f"{label} {r.kind}")
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        if r.kind == "sr":
            assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)
        elif r.kind == "seg":
            assert hd.seg.segread(path).number_of_segments == 1
        else:
            assert ds.pixel_array.size > 0
        paths.setdefault(r.kind, []).append(path)
    return paths


@pytest.mark.parametrize("name,superres", VENDOR_FILES, ids=[v[0] for v in VENDOR_FILES])
def test_objects_from_real_vendor_input_are_valid(settings, tmp_path, name, superres):
    src = copy_real(name, tmp_path / "src")
    vol = volume_from_files([src])
    results = build_results(
        output=_output(vol, superres=superres),
        source_files={vol.series_uid: [src]},
        triage=TriageSummary("ROUTINE", 0.4, ["partial ACL tear"]),
        predecessors=[],
        settings=settings,
        job_fingerprint=f"vendor-{name}",
    )
    kinds = {r.kind for r in results}
    assert kinds == ({"sr", "seg", "sc", "superres"} if superres else {"sr", "seg", "sc"})
    source = pydicom.dcmread(src, stop_before_pixels=True)
    paths = _check_all(results, settings, name, source=source)
    sr = pydicom.dcmread(paths["sr"][0])
    assert str(sr.PatientName) == str(source.PatientName)
    assert sr.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
    if superres:
        d = pydicom.dcmread(paths["superres"][0])
        assert d.Rows == 2 * source.Rows and d.Columns == 2 * source.Columns
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert float(d.PixelSpacing[0]) == pytest.approx(float(source.PixelSpacing[0]) / 2, rel=1e-5)
        # the centre of the first source pixel is still inside the first 2x2 block of the new grid
        src_ipp = np.array([float(v) for v in source.ImagePositionPatient])
        new_ipp = np.array([float(v) for v in d.ImagePositionPatient])
        assert np.linalg.norm(src_ipp - new_ipp) < float(source.PixelSpacing[0])


def _quirky_copy(tmp_path: Path, charset_file: str | None, *, bad_charset: str | None = None) -> Path:
    """MR_small.dcm with the invalid values real PACS traffic carries, written without validation."""
    src = copy_real("MR_small.dcm", tmp_path / "quirky")
    ds = pydicom.dcmread(src)
    with config.disable_value_validation():
        if charset_file:
            ref = pydicom.dcmread(next(iter(get_charset_files(charset_file))))
            ds.SpecificCharacterSet = ref.SpecificCharacterSet
            ds.PatientName = ref.PatientName
            ds.SeriesDescription = str(ref.PatientName).split("=")[-1][:20] + " SAG PD"
        if bad_charset:
            ds.SpecificCharacterSet = bad_charset
            ds.PatientName = "Muller^Jurgen"
        ds.PatientSex = "MALE"  # non-standard Patient's Sex
        ds.PatientID = "P" * 80  # over-long LO
        ds.AccessionNumber = "A1234567890123456789"  # over-long SH
        ds.StudyDescription = "KNEE " * 20  # over-long LO
        ds.ReferringPhysicianName = "Ref\x00^Doc\x00\x00"  # NUL padding
        ds.StudyDate = "2004-08-26"  # wrong date format
        ds.PatientBirthDate = "unknown"
        ds.InstitutionName = "General\x00Hospital" + " of Somewhere" * 6
        ds.Laterality = "r"
        code = Dataset()
        code.CodeValue = "KNEE01\x00\x00"
        code.CodingSchemeDesignator = "LOCAL\x00"
        code.CodeMeaning = "MR knee without contrast\x00 " + "x" * 70
        ds.ProcedureCodeSequence = [code]
        ds.save_as(src)
    return src


@pytest.mark.parametrize(
    "charset_file,bad_charset",
    [("chrH31.dcm", None), ("chrX2.dcm", None), ("chrRuss.dcm", None), ("chrH32.dcm", None), (None, "ISO_IR 999")],
    ids=["ISO2022-IR87", "GB18030", "ISO_IR144", "ISO2022-IR13-IR87", "unknown-charset"],
)
def test_invalid_source_values_are_sanitised(settings, tmp_path, charset_file, bad_charset):
    src = _quirky_copy(tmp_path, charset_file, bad_charset=bad_charset)
    raw = pydicom.dcmread(src, stop_before_pixels=True)
    vol = volume_from_files([src])
    results = build_results(
        output=_output(vol, superres=True),
        source_files={vol.series_uid: [src]},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint=f"quirky-{charset_file}-{bad_charset}",
    )
    paths = _check_all(results, settings, f"sanitised {charset_file or bad_charset}", source=raw)
    for kind, files in paths.items():
        ds = pydicom.dcmread(files[0])
        assert ds.PatientSex == "M", kind
        assert len(ds.PatientID) == 64 and ds.PatientID == "P" * 64
        assert ds.AccessionNumber == "A123456789012345"
        assert len(ds.StudyDescription) <= 64
        assert str(ds.ReferringPhysicianName) == "Ref^Doc"
        assert ds.StudyDate == "20040826"
        assert ds.PatientBirthDate == ""
        code = ds.ProcedureCodeSequence[0]
        assert code.CodeValue == "KNEE01" and code.CodingSchemeDesignator == "LOCAL"
        assert "\x00" not in code.CodeMeaning and len(code.CodeMeaning) <= 64
        if bad_charset:
            # an unknown character set is replaced by UTF-8; the values survive
            assert ds.SpecificCharacterSet == "ISO_IR 192"
            assert str(ds.PatientName) == "Muller^Jurgen"
        else:
            # names and descriptions copied from the source keep its character set
            assert ds.get("SpecificCharacterSet") == raw.SpecificCharacterSet
            assert str(ds.PatientName) == str(raw.PatientName)
    sr = pydicom.dcmread(paths["sr"][0])
    assert measurement_groups(sr)[0][0][2] == "knee.acl acl_tear"
    lat = [v for p, _t, v in measurement_groups(sr)[0] if p.endswith("/Laterality")]
    assert lat == ["Right"]  # "r" in the source
    if not bad_charset:
        sup = pydicom.dcmread(paths["superres"][0])
        assert sup.SeriesDescription.startswith("AI superres ")
        assert sup.SeriesDescription.endswith(" SAG PD")
        assert str(raw.SeriesDescription).split(" SAG")[0] in sup.SeriesDescription
