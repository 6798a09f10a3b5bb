"""Series recognition (node.intake.recognition) and its use by routing, ingest, completeness and ``routing explain``.

Real headers: pydicom-data's MR files (a Philips T1 spin echo of a shoulder study, an enhanced
MR head, a Siemens abdomen MPR) and the real Siemens Prisma knee in ../shared/realdata (skipped
with a reason when that folder is absent).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select

from node.db.schema import Instance, Series
from node.errors import RoutingError
from node.intake.recognition import (
    PLANE_TOLERANCE_DEG,
    Acquisition,
    TextPatterns,
    acquisition_from_dataset,
    decide_contrast,
    decide_plane,
    header_flags,
    plane_of_orientation,
    recognize,
)
from node.intake.routing import SeriesFacts, explain, load_rules, parse_rules
from node.receive.header import read_header, read_series_headers
from node.receive.index import index_instances
from node.receive.storage import InstanceStore
from node.settings import DEFAULT_ROUTING_RULES, DEFAULT_UID_ROOT
from support.cli import msknode
from support.listener import PYDICOM_DATA
from support.mr import mr_dataset

pytestmark = pytest.mark.unit

REALDATA = Path(os.environ.get("MSKNODE_REALDATA") or Path(__file__).resolve().parents[2] / "shared" / "realdata")
SIEMENS_KNEE = REALDATA / "knee" / "siemens_sagittal_dicom"

SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
COR = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
AX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@pytest.fixture(scope="module")
def shipped():
    return load_rules(DEFAULT_ROUTING_RULES)


def siemens_knee_files() -> list[Path]:
    if not SIEMENS_KNEE.is_dir():
        pytest.skip(f"real DICOM not available: {SIEMENS_KNEE} is absent (set MSKNODE_REALDATA to ../shared/realdata)")
    files = sorted(p for p in SIEMENS_KNEE.iterdir() if p.is_file())
    assert len(files) == 25, f"expected the 25 files of {SIEMENS_KNEE}, found {len(files)}"
    return files


def iop(v) -> str:
    return "\\".join(f"{x:g}" for x in v)


def rotated(base: tuple[float, ...], degrees: float, axis: str = "z") -> tuple[float, ...]:
    """``base`` (row, col) rotated about a patient axis."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "z":
        m = ((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0))
    else:  # about x
        m = ((1.0, 0.0, 0.0), (0.0, c, -s), (0.0, s, c))

    def apply(v):
        return tuple(sum(m[i][j] * v[j] for j in range(3)) for i in range(3))

    return apply(base[:3]) + apply(base[3:])


# ---- plane ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cosines, plane",
    [
        (SAG, "sagittal"),
        (COR, "coronal"),
        (AX, "axial"),
        ((0, -1, 0, 0, 0, 1), "sagittal"),
        ((-1, 0, 0, 0, -1, 0), "axial"),
    ],
)
def test_orthogonal_planes(cosines, plane):
    p = plane_of_orientation(cosines)
    assert (p.plane, p.angle) == (plane, 0.0)


@pytest.mark.parametrize("degrees", [5, 15, 20, 30, 40, 44])
def test_a_shoulder_coronal_oblique_up_to_45_degrees_is_coronal(degrees):
    p = plane_of_orientation(rotated(COR, degrees))
    assert p.plane == "coronal" and abs(p.angle - degrees) < 0.2
    decision, _signals = decide_plane([(iop(rotated(COR, degrees)), 24)])
    assert decision.value == "coronal" and decision.source == "ImageOrientationPatient"
    assert f"{PLANE_TOLERANCE_DEG:g} deg" in decision.detail


@pytest.mark.parametrize("degrees, plane", [(10, "sagittal"), (35, "sagittal"), (-30, "sagittal")])
def test_oblique_sagittal_and_tilted_axial(degrees, plane):
    assert plane_of_orientation(rotated(SAG, degrees)).plane == plane
    assert plane_of_orientation(rotated(AX, degrees, "x")).plane == "axial"


def test_double_oblique_beyond_the_tolerance_is_oblique_and_the_text_may_only_pick_a_neighbour():
    cos = (0.7071, 0.7071, 0.0, 0.4082, -0.4082, -0.8165)  # normal 54.7 deg from every axis
    assert plane_of_orientation(cos).plane == "oblique"
    decision, _ = decide_plane([(iop(cos), 20)])
    assert decision.value == "oblique" and "beyond the 45 deg tolerance" in decision.detail
    near = plane_of_orientation(cos).nearest
    chosen, _signals = decide_plane([(iop(cos), 20)], text_planes=[near[0]], text_source="SeriesDescription")
    assert chosen.value == near[0] and chosen.source == "ImageOrientationPatient + text"


def test_between_two_planes_the_text_breaks_the_tie_but_never_overrides():
    tie = rotated(COR, 44)  # coronal by 2 degrees over sagittal
    assert plane_of_orientation(tie).tie
    d, _ = decide_plane([(iop(tie), 20)], text_planes=["sagittal"], text_source="SeriesDescription")
    assert d.value == "sagittal" and d.source == "ImageOrientationPatient + text"
    d, _ = decide_plane([(iop(tie), 20)], text_planes=["axial"], text_source="SeriesDescription")
    assert d.value == "coronal"  # axial is not one of the two candidates
    clear = rotated(COR, 25)
    d, signals = decide_plane([(iop(clear), 20)], text_planes=["sagittal"], text_source="SeriesDescription")
    assert d.value == "coronal" and d.source == "ImageOrientationPatient"
    text = next(s for s in signals if s.name == "plane")
    assert not text.used and "the geometry decides" in text.value


def test_the_text_names_the_plane_only_without_any_orientation():
    d, _ = decide_plane([(None, 20)], text_planes=["sagittal"], text_source="SeriesDescription (0008,103E)")
    assert (d.value, d.source) == ("sagittal", "text")
    d, _ = decide_plane([], text_planes=["sagittal", "axial"], text_source="SeriesDescription")
    assert d.value is None
    d, _ = decide_plane([])
    assert (d.value, d.source) == (None, "none")


def test_majority_over_the_instances_and_the_multi_plane_localizer():
    d, _ = decide_plane([(iop(SAG), 22), (iop(AX), 1), (None, 1)])
    assert d.value == "sagittal" and "22 of 23 instances" in d.detail and "1 without orientation" in d.detail
    d, signals = decide_plane([(iop(SAG), 3), (iop(COR), 3), (iop(AX), 3)])
    assert d.value == "multi" and "multi-plane localizer" in d.detail
    orientation = [s for s in signals if s.name == "orientation"]
    assert orientation and all(s.used for s in orientation)
    d, _ = decide_plane([(iop(SAG), 9), (iop(COR), 1)])  # 10 %: still a second plane
    assert d.value == "multi"
    # slightly different orientations of one plane (a re-planned stack) are one plane
    d, _ = decide_plane([(iop(rotated(SAG, 3)), 10), (iop(rotated(SAG, 8)), 10)])
    assert d.value == "sagittal"
    # written with brackets/quotes, or degenerate
    d, _ = decide_plane([("['0', '1', '0', '0', '0', '-1']", 5)])
    assert d.value == "sagittal"
    d, _ = decide_plane([("1\\0\\0\\1\\0\\0", 5)])
    assert d.value is None


# ---- contrast -----------------------------------------------------------------------------------
CONTRAST_TABLE = [
    # (acquisition, text, expected contrast, expected source)
    (
        dict(
            scanning_sequence=("SE",),
            scan_options=("PFP", "SAT1", "FS"),
            sequence_name="*tseR2d1rr6",
            repetition_time=3060,
            echo_time=40,
        ),
        "",
        "pd_fs",
        "acquisition parameters",
    ),
    (dict(scanning_sequence=("SE",), repetition_time=3000, echo_time=30), "", "pd", "acquisition parameters"),
    (dict(scanning_sequence=("SE",), repetition_time=3500, echo_time=95), "", "t2", "acquisition parameters"),
    (
        dict(scanning_sequence=("SE",), scan_options=("FS",), repetition_time=3500, echo_time=80),
        "",
        "t2_fs",
        "acquisition parameters",
    ),
    (dict(scanning_sequence=("SE",), repetition_time=550, echo_time=12), "", "t1", "acquisition parameters"),
    (
        dict(scanning_sequence=("SE",), scan_options=("FS",), repetition_time=600, echo_time=10),
        "",
        "t1_fs",
        "acquisition parameters",
    ),
    (
        dict(scanning_sequence=("SE",), mr_acquisition_type="3D", repetition_time=1000, echo_time=30),
        "",
        "pd",
        "acquisition parameters",
    ),  # a 3D VFA FSE runs PD at short TR
    (
        dict(
            scanning_sequence=("SE", "IR"),
            sequence_name="*tir2d1_11",
            inversion_time=220,
            repetition_time=5000,
            echo_time=40,
            magnetic_field_strength=3.0,
        ),
        "",
        "stir",
        "acquisition parameters",
    ),
    (
        dict(scanning_sequence=("SE", "IR"), inversion_time=2500, repetition_time=9000, echo_time=100),
        "",
        "other",
        "acquisition parameters",
    ),  # FLAIR
    (
        dict(scanning_sequence=("SE", "IR"), inversion_time=860, repetition_time=2200, echo_time=12),
        "",
        "t1",
        "acquisition parameters",
    ),  # T1-FLAIR
    (
        dict(scanning_sequence=("GR",), sequence_name="*fl3d1", repetition_time=5.5, echo_time=2.8),
        "",
        "gre",
        "acquisition parameters",
    ),
    (
        dict(
            scanning_sequence=("GR", "IR"),
            sequence_name="*tfl3d1_16ns",
            inversion_time=900,
            repetition_time=2300,
            echo_time=2.3,
        ),
        "",
        "gre",
        "acquisition parameters",
    ),  # MPRAGE is a gradient echo
    (
        dict(scanning_sequence=("GR",), sequence_name="*de3d1", repetition_time=14, echo_time=5),
        "",
        "dess",
        "acquisition parameters",
    ),
    (
        dict(scanning_sequence=("GR",), repetition_time=14, echo_time=5),
        "3D DESS SAG",
        "dess",
        "acquisition parameters + text",
    ),  # GE DESS: a gradient echo the name refines
    (dict(scanning_sequence=("EP",), sequence_name="*ep_b0_1000"), "", "other", "acquisition parameters"),
    # GE and Philips name the sequence in private fields only
    (
        dict(ge_pulse_sequence="fse-xl", scan_options=("FAST_GEMS", "FS"), repetition_time=3000, echo_time=35),
        "",
        "pd_fs",
        "acquisition parameters",
    ),
    (dict(ge_pulse_sequence="fgre", repetition_time=500, echo_time=15), "", "gre", "acquisition parameters"),
    (dict(philips_scanning_technique="TSE", repetition_time=3200, echo_time=80), "", "t2", "acquisition parameters"),
    (dict(philips_scanning_technique="FFE", repetition_time=20, echo_time=4.6), "", "gre", "acquisition parameters"),
    # enhanced MR: what the scanner states
    (
        dict(echo_pulse_sequence="SPIN", acquisition_contrast="PROTON_DENSITY", spectrally_selected_suppression="FAT"),
        "",
        "pd_fs",
        "acquisition parameters",
    ),
    (
        dict(pulse_sequence_name="TSE", acquisition_contrast="T2", spectrally_selected_suppression="FAT"),
        "",
        "t2_fs",
        "acquisition parameters",
    ),
    (
        dict(echo_pulse_sequence="SPIN", repetition_time=3000, echo_time=30, spectrally_selected_suppression="NONE"),
        "PD FS",
        "pd",
        "acquisition parameters",
    ),  # an explicit NONE: the text cannot add fat suppression
    # the header states no fat suppression either way: the text fills it
    (
        dict(scanning_sequence=("SE",), repetition_time=2800, echo_time=30),
        "PDW_SPAIR",
        "pd_fs",
        "acquisition parameters + text",
    ),
    # the parameters decide the weighting even when the name says otherwise
    (dict(scanning_sequence=("SE",), repetition_time=3000, echo_time=90), "pd_tse", "t2", "acquisition parameters"),
    # spin echo without TR/TE: the weighting from the text
    (dict(scanning_sequence=("SE",)), "t1_tse_cor", "t1", "acquisition parameters + text"),
    # nothing measured: the text is the whole answer
    (dict(), "Sag PD FSE FS", "pd_fs", "text"),
    (dict(), "Cor STIR", "stir", "text"),
    (dict(), "Sag 3D CUBE", "pd", "text"),
    (dict(), "Survey", None, "none"),
]


@pytest.mark.parametrize(
    "acq, text, expected, source", CONTRAST_TABLE, ids=[f"{i}-{e}" for i, (_, _, e, _) in enumerate(CONTRAST_TABLE)]
)
def test_contrast_classification(acq, text, expected, source):
    patterns = TextPatterns.build()
    acquisition = Acquisition.from_json(acq)
    d, signals = decide_contrast(acquisition, text_matched=patterns.matches(text), text_source="SeriesDescription")
    assert (d.value, d.source) == (expected, source), (d, signals)
    assert all(s.source for s in signals)


def test_flags_from_image_type_sequence_names_and_the_contrast_agent():
    def flags(manufacturer=None, **kw):
        return header_flags(Acquisition.from_json(kw), manufacturer)[0]

    assert flags(image_type="DERIVED\\SECONDARY\\MPR\\CSA MPR\\M\\ND") == ["derived", "mpr"]
    assert flags(image_type="DERIVED\\PRIMARY\\DIFFUSION\\ADC\\ND") == ["derived"]
    assert flags(image_type="DERIVED\\PRIMARY\\PROJECTION IMAGE\\MIP") == ["projection"]
    assert flags(image_type="ORIGINAL\\PRIMARY\\P\\ND") == ["derived"]
    assert flags(image_type="ORIGINAL\\PRIMARY\\M\\ND\\NORM") == []
    assert flags(image_type="DERIVED\\PRIMARY\\OTHER\\M\\SE") == []  # Philips DERIVED\PRIMARY: an ordinary image
    assert flags(image_type="ORIGINAL\\PRIMARY\\LOCALIZER") == ["localizer"]
    assert set(flags(image_type="DERIVED\\PRIMARY\\DIXON\\IN_PHASE")) == {"dixon", "dixon_in_phase"}
    assert set(flags(image_type="DERIVED\\PRIMARY\\DIXON\\OPP_PHASE")) == {"dixon", "dixon_opposed_phase"}
    assert set(flags(image_type="ORIGINAL\\PRIMARY\\W\\W", manufacturer="Philips")) == {"dixon", "dixon_water"}
    assert flags(image_type="ORIGINAL\\PRIMARY\\W\\W", manufacturer="SIEMENS") == []  # W is Philips' token
    assert set(flags(philips_image_type="OP")) == {"dixon", "dixon_opposed_phase"}
    assert flags(ge_pulse_sequence="3-plane") == ["localizer"]
    assert flags(ge_pulse_sequence="calibration") == ["calibration"]
    assert flags(contrast_bolus_agent="Gadovist 7.5 ml") == ["post_contrast"]
    assert flags(contrast_bolus_agent="NONE") == flags(contrast_bolus_agent="none ") == []


def test_text_flags_add_to_header_flags_and_text_never_overrides_geometry():
    r = recognize(
        orientations=[(iop(COR), 20)],
        acquisition=Acquisition(),
        text="t1 tse sag localizer",
        text_source="SeriesDescription",
        patterns=TextPatterns.build(),
    )
    assert r.plane.value == "coronal" and r.flags == ("localizer",)
    r = recognize(
        orientations=[(iop(SAG), 3), (iop(COR), 3), (iop(AX), 3)],
        acquisition=Acquisition(),
        text="",
        text_source="",
        patterns=TextPatterns.build(),
    )
    assert r.plane.value == "multi" and r.flags == ("localizer",)


# ---- reading the header ----------------------------------------------------------------------------
def test_acquisition_from_real_pydicom_data_headers():
    mr2 = acquisition_from_dataset(dcmread(PYDICOM_DATA / "MR2_UNCI.dcm", stop_before_pixels=True))
    assert (mr2.scanning_sequence, mr2.repetition_time, mr2.echo_time, mr2.magnetic_field_strength) == (
        ("SE",),
        350.0,
        27.0,
        1.5,
    )
    emri = acquisition_from_dataset(dcmread(PYDICOM_DATA / "emri_small.dcm", stop_before_pixels=True))
    assert (emri.pulse_sequence_name, emri.echo_pulse_sequence, emri.acquisition_contrast) == (
        "T1TFE",
        "GRADIENT",
        "T1",
    )
    assert emri.spectrally_selected_excitation == "WATER"
    mpr = acquisition_from_dataset(dcmread(PYDICOM_DATA / "MR-SIEMENS-DICOM-WithOverlays.dcm", stop_before_pixels=True))
    assert mpr.sequence_name == "*fl3d1" and "MPR" in mpr.image_type and mpr.contrast_bolus_agent
    assert Acquisition.from_json(json.loads(json.dumps(mpr.to_json()))) == mpr  # the index round trip


def _private_dataset() -> Dataset:
    ds = mr_dataset(
        pixels=np.zeros((32, 32), np.uint16),
        bits_stored=12,
        SpecificCharacterSet="ISO_IR 100",
        PatientName="Doe^Jane",
        PatientID="PID0001",
        StudyDescription="MR KNEE",
        BodyPartExamined="KNEE",
        SeriesDescription="SAG PD FS",
        ProtocolName="SAG PD FS",
        SeriesNumber=3,
        InstanceNumber=1,
        ImagePositionPatient=[-50.0, -40.0, 0.0],
        ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
    )
    ds.Manufacturer = "Philips Medical Systems"
    ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x20, "LO", "TSE")
    ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(0x11, "CS", "W")
    item = Dataset()
    item.SpectrallySelectedSuppression = "FAT"
    item.AcquisitionContrast = "T2"
    ds.private_block(0x2005, "Philips MR Imaging DD 005", create=True).add_new(0x0F, "SQ", Sequence([item]))
    # a GE block at a block number other than 0x10: found through its creator
    ds.add_new(0x00190010, "LO", "SOMETHING ELSE")
    ds.add_new(0x00190011, "LO", "GEMS_ACQU_01")
    ds.add_new(0x0019119C, "LO", "fse-xl")
    return ds


@pytest.mark.parametrize("implicit", [False, True])
def test_vendor_private_fields_are_read_through_their_creator(implicit):
    from test_ingest import encode

    data = encode(_private_dataset(), implicit=implicit)
    header = read_header(data, "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
    acq = Acquisition.from_json(header.acquisition)
    assert (acq.ge_pulse_sequence, acq.philips_scanning_technique, acq.philips_image_type) == ("fse-xl", "TSE", "W")
    assert (acq.spectrally_selected_suppression, acq.acquisition_contrast) == ("FAT", "T2")
    assert "Philips private item" in acq.origin("spectrally_selected_suppression", "")


def test_enhanced_mr_functional_groups():
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    shared = Dataset()
    plane = Dataset()
    plane.ImageOrientationPatient = list(COR)
    shared.PlaneOrientationSequence = Sequence([plane])
    timing = Dataset()
    timing.RepetitionTime = 3000
    timing.FlipAngle = 90
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = 35.0
    shared.MREchoSequence = Sequence([echo])
    anatomy = Dataset()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "72696002", "SCT", "Knee"
    anatomy.AnatomicRegionSequence = Sequence([code])
    shared.FrameAnatomySequence = Sequence([anatomy])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.EchoPulseSequence = "SPIN"
    ds.SpectrallySelectedSuppression = "FAT"
    acq = acquisition_from_dataset(ds)
    assert (acq.repetition_time, acq.echo_time, acq.orientation) == (3000.0, 35.0, iop(COR))
    assert acq.anatomic_region == (("SCT", "72696002", "Knee"),)
    assert "MREchoSequence" in acq.origin("echo_time", "")
    r = recognize(orientations=[(None, 1)], acquisition=acq, text="", text_source="", patterns=TextPatterns.build())
    assert (r.plane.value, r.contrast.value) == ("coronal", "pd_fs")


def test_odd_values_never_fail_and_are_bounded():
    from pydicom.dataelem import RawDataElement

    ds = Dataset()
    for tag, vr, value in (
        (0x00180024, "SH", b"x" * 500),
        (0x00180022, "CS", b"\\".join([b"FS"] * 40)),
        (0x00180080, "DS", b"not a number "),
        (0x00180081, "DS", b"\xff\xfe"),
    ):
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    acq = acquisition_from_dataset(ds)
    assert len(acq.sequence_name) == 64 and len(acq.scan_options) == 16 and acq.repetition_time is None
    assert Acquisition.from_json(
        {"repetition_time": "nan", "scan_options": 3, "bogus": 1, "anatomic_region": "x"}
    ) == Acquisition(scan_options=("3",))


# ---- real headers routed ----------------------------------------------------------------------------
def facts_of(files: list[Path], **override) -> SeriesFacts:
    headers, _skipped = read_series_headers(files[0].parent if len(files) > 1 else files[0])
    headers = [h for h in headers if h.series_uid == headers[0].series_uid]
    first = headers[0]
    values = dict(
        series_uid=first.series_uid,
        modality=first.modality,
        body_part=first.body_part,
        series_description=first.series_description,
        protocol_name=first.protocol_name,
        laterality=first.laterality,
        manufacturer=first.manufacturer,
        study_description=first.demographics.get("study_description"),
        orientations=tuple(Counter(h.image_orientation for h in headers).items()),
        acquisition=Acquisition.from_json(first.acquisition),
    )
    values.update(override)
    return SeriesFacts(**values)


def test_real_siemens_knee_routes_from_its_parameters(shipped):
    """Descriptions are anonymiser placeholders: orientation and acquisition parameters decide."""
    files = siemens_knee_files()
    facts = facts_of(files)
    assert "ANONYMIZED" in facts.series_description and facts.body_part == "KNEE"
    ex = explain(facts, shipped, uid_root=DEFAULT_UID_ROOT)
    assert (ex.route.pipeline, ex.route.role) == ("knee", "sag_fluid")
    assert (ex.plane.value, ex.plane.source) == ("sagittal", "ImageOrientationPatient")
    assert "13.3 deg" in ex.plane.detail and "25 instance(s)" in ex.plane.detail
    assert (ex.contrast.value, ex.contrast.source) == ("pd_fs", "acquisition parameters")
    assert "3060" in ex.contrast.detail and "FS" in ex.contrast.detail
    assert (ex.anatomy.value, ex.anatomy.source) == ("knee", "BodyPartExamined")
    by_name = {s.name: s for s in ex.signals}
    assert by_name["fat suppression"].source.startswith("ScanOptions (0018,0022)") and by_name["fat suppression"].used
    assert not by_name["contrast (text)"].used
    assert by_name["rule"].used
    # without BodyPartExamined and descriptions the parameters still say what it is, the anatomy is then silent
    bare = facts_of(files, body_part=None, series_description=None, protocol_name=None, study_description=None)
    ex = explain(bare, shipped, uid_root=DEFAULT_UID_ROOT)
    assert (ex.plane.value, ex.contrast.value, ex.route.rule) == ("sagittal", "pd_fs", "unrouted:no_anatomy")
    # ... which the other series of its study, or the pixels, then supply
    sibling = SeriesFacts(series_uid="1.2.3.9", modality="MR", body_part="KNEE")
    assert explain(bare, shipped, uid_root=DEFAULT_UID_ROOT, siblings=[sibling]).route.role == "sag_fluid"
    pixels = explain(bare, shipped, uid_root=DEFAULT_UID_ROOT, pixel_anatomy=lambda f: ("knee", 0.97))
    assert pixels.route.role == "sag_fluid" and pixels.anatomy.source == "pixels"


def test_real_pydicom_data_headers_route_as_what_they_are(shipped):
    # Philips T1 spin echo of a shoulder study (no description, no body part): sagittal 35 deg oblique, T1
    ex = explain(facts_of([PYDICOM_DATA / "MR2_UNCI.dcm"]), shipped, uid_root=DEFAULT_UID_ROOT)
    assert (ex.plane.value, ex.contrast.value, ex.anatomy.value, ex.anatomy.source) == (
        "sagittal",
        "t1",
        "shoulder",
        "StudyDescription",
    )
    assert "34.7 deg" in ex.plane.detail and ex.route.rule == "unrouted:no_rule"  # the shoulder has no sagittal T1 role
    # enhanced MR of a head: never routed
    ex = explain(facts_of([PYDICOM_DATA / "emri_small.dcm"]), shipped, uid_root=DEFAULT_UID_ROOT)
    assert (ex.anatomy.value, ex.route.rule, ex.contrast.value) == ("head", "unrouted:other_anatomy", "gre")
    # a Siemens abdomen MPR after contrast: flags from ImageType and ContrastBolusAgent
    ex = explain(facts_of([PYDICOM_DATA / "MR-SIEMENS-DICOM-WithOverlays.dcm"]), shipped, uid_root=DEFAULT_UID_ROOT)
    assert {"derived", "mpr", "post_contrast"} <= set(ex.flags) and not ex.route.routed
    # the same MPR headers with BodyPartExamined KNEE are still never model input
    ex = explain(
        facts_of([PYDICOM_DATA / "MR-SIEMENS-DICOM-WithOverlays.dcm"], body_part="KNEE"),
        shipped,
        uid_root=DEFAULT_UID_ROOT,
    )
    assert not ex.route.routed and ex.route.rule.startswith("unrouted:")


# ---- anatomy --------------------------------------------------------------------------------------
def knee_sag(**kw) -> SeriesFacts:
    base = dict(
        series_uid="1.2.3.1",
        modality="MR",
        body_part="KNEE",
        orientations=((iop(SAG), 20),),
        acquisition=Acquisition(
            scanning_sequence=("SE",), scan_options=("FS",), repetition_time=3000.0, echo_time=35.0
        ),
    )
    base.update(kw)
    return SeriesFacts(**base)


def test_coded_anatomy_and_conflicts(shipped):
    coded = Acquisition(
        scanning_sequence=("SE",),
        repetition_time=3000.0,
        echo_time=100.0,
        anatomic_region=(("SCT", "122496007", "Lumbar spine"),),
    )
    ex = explain(knee_sag(body_part="SPINE", acquisition=coded), shipped, uid_root="9.")
    assert (ex.route.pipeline, ex.anatomy.source) == ("lumbar_spine", "AnatomicRegionSequence")
    cervical = Acquisition(
        scanning_sequence=("SE",),
        repetition_time=3000.0,
        echo_time=100.0,
        anatomic_region=(("SCT", "122494005", "Cervical spine"),),
    )
    for body in ("", "SPINE", "LSPINE"):
        ex = explain(
            knee_sag(body_part=body, acquisition=cervical, study_description="MR LUMBAR SPINE"), shipped, uid_root="9."
        )
        assert not ex.route.routed, body
    assert (
        explain(knee_sag(body_part="LSPINE", acquisition=cervical), shipped, uid_root="9.").route.rule
        == "unrouted:anatomy_conflict"
    )
    # a code naming the knee with a BodyPartExamined nobody knows: the code
    knee = Acquisition(
        scanning_sequence=("SE",),
        scan_options=("FS",),
        repetition_time=3000.0,
        echo_time=35.0,
        anatomic_region=(("SCT", "72696002", "Knee"),),
    )
    assert explain(knee_sag(body_part="LKNEE", acquisition=knee), shipped, uid_root="9.").route.role == "sag_fluid"


@pytest.mark.parametrize(
    "description, study",
    [
        ("Sag T2 C-spine", None),
        ("t2_tse_sag cervical", None),
        ("T2_TSE_SAG", "MRT HWS"),
        ("Sag T2 C3-C4", None),
        ("Sag T2", "MR T-SPINE"),
        ("Sag T2", "MR CERVICAL AND LUMBAR SPINE"),
    ],
)
def test_a_cervical_or_thoracic_spine_is_never_routed_to_the_lumbar_spine(shipped, description, study):
    t2 = Acquisition(scanning_sequence=("SE",), repetition_time=3000.0, echo_time=100.0)
    f = knee_sag(body_part="SPINE", series_description=description, study_description=study, acquisition=t2)
    lumbar_sibling = SeriesFacts(series_uid="1.2.3.7", modality="MR", body_part="LSPINE")
    for siblings in ((), (lumbar_sibling,)):
        ex = explain(f, shipped, uid_root="9.", siblings=siblings)
        if study and "LUMBAR" in study and siblings:
            continue  # a combined study: the sibling is lumbar, this series is named by nothing but the study
        assert ex.route.pipeline != "lumbar_spine", (description, study, ex.anatomy)


def test_other_series_naming_another_region_stop_the_guess(shipped):
    silent = knee_sag(body_part="", series_uid="1.2.3.5")
    knee = SeriesFacts(series_uid="1.2.3.6", modality="MR", body_part="KNEE")
    cervical = SeriesFacts(series_uid="1.2.3.8", modality="MR", body_part="CSPINE")
    assert explain(silent, shipped, uid_root="9.", siblings=[knee]).route.role == "sag_fluid"
    assert not explain(silent, shipped, uid_root="9.", siblings=[knee, cervical]).route.routed


def test_the_pixel_hook_is_asked_only_when_everything_else_is_silent(shipped):
    calls = []

    def hook(answer):
        def classify(facts):
            calls.append(facts.series_uid)
            if isinstance(answer, Exception):
                raise answer
            return answer

        return classify

    silent = knee_sag(body_part="")
    named = knee_sag()
    assert explain(named, shipped, uid_root="9.", pixel_anatomy=hook(("shoulder", 0.99))).route.pipeline == "knee"
    assert calls == []  # a header named it
    ex = explain(silent, shipped, uid_root="9.", pixel_anatomy=hook(("knee", 0.95)))
    assert ex.route.role == "sag_fluid" and ex.anatomy.source == "pixels" and calls
    assert not explain(silent, shipped, uid_root="9.", pixel_anatomy=hook(("knee", 0.6))).route.routed  # not sure
    ex = explain(silent, shipped, uid_root="9.", pixel_anatomy=hook(("lumbar_spine", 0.999)))
    assert not ex.route.routed and "never decide" in ex.anatomy.detail  # could be a cervical spine
    ex = explain(silent, shipped, uid_root="9.", pixel_anatomy=hook(RuntimeError("weights missing")))
    assert ex.route.rule == "unrouted:no_anatomy" and any("unavailable" in s.value for s in ex.signals)
    calls.clear()
    loc = knee_sag(body_part="", orientations=((iop(SAG), 3), (iop(COR), 3), (iop(AX), 3)))
    explain(loc, shipped, uid_root="9.", pixel_anatomy=hook(("knee", 0.99)))
    assert calls == []  # a localizer is no anatomy image


# ---- rule conditions -------------------------------------------------------------------------------
def test_rule_conditions_plane_contrast_flags_image_type_sequence():
    rules = parse_rules(
        r"""
        [anatomy.knee]
        body_part = 'knee'
        [[rule]]
        name = "no Dixon except water"
        route = false
        flags = ["dixon"]
        not_flags = ["dixon_water"]
        [[rule]]
        name = "research TSE"
        pipeline = "knee"
        role = "sag_pd"
        sequence = 'tse'
        image_type = '\bNORM\b'
        plane = ["sagittal", "coronal"]
        contrast = "pd"
        [[rule]]
        name = "sagittal fluid"
        pipeline = "knee"
        role = "sag_fluid"
        plane = "sagittal"
        contrast = ["pd_fs", "t2_fs"]
        """
    )
    f = knee_sag()
    assert rules.route(f, uid_root="9.").rule == "sagittal fluid"
    assert not rules.route(knee_sag(orientations=((iop(AX), 20),)), uid_root="9.").routed
    pd = Acquisition(
        scanning_sequence=("SE",),
        sequence_name="*tse2d1_5",
        image_type=("ORIGINAL", "PRIMARY", "M", "NORM"),
        repetition_time=3000.0,
        echo_time=30.0,
    )
    assert rules.route(knee_sag(acquisition=pd), uid_root="9.").rule == "research TSE"
    assert rules.route(knee_sag(acquisition=pd, orientations=((iop(COR), 20),)), uid_root="9.").rule == "research TSE"
    dixon_fat = Acquisition(image_type=("DERIVED", "PRIMARY", "DIXON", "FAT"))
    assert rules.route(knee_sag(acquisition=dixon_fat), uid_root="9.").rule == "unrouted:no Dixon except water"


@pytest.mark.parametrize(
    "line, message",
    [
        ('plane = "sideways"', "plane 'sideways' is not one of sagittal, coronal, axial, oblique, multi, unknown"),
        ('contrast = ["pd_fs", "flair"]', "contrast 'flair' is not one of"),
        ('flags = ["scout"]', "flags 'scout' is not one of"),
        ("plane = 3", "plane must be a string or a non-empty list of strings"),
        ("image_type = '(('", "image_type: invalid regex"),
    ],
)
def test_invalid_new_conditions_are_refused(line, message):
    with pytest.raises(RoutingError, match=re.escape(message)):
        parse_rules(
            f'[[rule]]\nname = "x"\npipeline = "knee"\nrole = "sag_pd"\nanatomy = "any"\n{line}\n', source="site.toml"
        )


def test_an_old_text_rule_file_keeps_routing_by_text():
    """Site rule files written before recognition match text exactly as before (geometry is not consulted)."""
    rules = parse_rules(
        r"""
        [patterns]
        sag = '\bsag\w*'
        [anatomy.knee]
        body_part = 'knee'
        [[rule]]
        name = "site sagittal"
        pipeline = "knee"
        role = "sag_pd"
        text = '{sag}'
        """
    )
    assert (
        rules.route(knee_sag(series_description="sag pd", orientations=((iop(COR), 20),)), uid_root="9.").rule
        == "site sagittal"
    )
    assert not rules.route(knee_sag(series_description="cor pd"), uid_root="9.").routed


# ---- ingest, completeness, routing explain ------------------------------------------------------------
def index_files(db, settings, files: list[Path]) -> str:
    """Stores files as the listener does (header parse, staged file, index rows); returns the series UID."""
    from test_ingest import _received

    store = InstanceStore.from_settings(settings)
    store.prepare()
    items = [_received(store, dcmread(f)) for f in files]
    with db.session() as s:
        out = index_instances(s, store, items, uid_root=settings.uid_root, quiet_seconds=0.0)
    assert all(o.status == 0 for o in out)
    return items[0].header.series_uid


def route_now(db, settings):
    from node.intake.completeness import tick

    with db.session() as s:
        tick(s, settings, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60), load_rules(settings.routing_rules))


def test_ingest_fills_the_acquisition_and_routing_records_the_explanation(db, settings, caplog):
    _ingest_and_route_mr2(db, settings, caplog)


def test_ingest_and_routing_columns_on_postgresql(postgres_url, tmp_path, caplog):
    from node.db.database import Database
    from node.settings import load_settings

    settings = load_settings(data_dir=tmp_path / "data", database_url=postgres_url)
    database = Database(postgres_url)
    try:
        _ingest_and_route_mr2(database, settings, caplog)
    finally:
        database.dispose()


def _ingest_and_route_mr2(db, settings, caplog):
    uid = index_files(db, settings, [PYDICOM_DATA / "MR2_UNCI.dcm"])
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == uid))
        assert se.acquisition["scanning_sequence"] == ["SE"] and se.acquisition["repetition_time"] == 350.0
        assert se.plane is None and se.routing_explanation is None
    caplog.set_level("DEBUG", logger="node.intake.completeness")  # the routing line is DEBUG
    route_now(db, settings)
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == uid))
        assert (se.state, se.plane, se.contrast, se.anatomy) == ("unrouted", "sagittal", "t1", "shoulder")
        ex = se.routing_explanation
        assert set(ex) == {"decision", "plane", "contrast", "anatomy", "flags", "signals"}
        assert ex["decision"] == {"pipeline": None, "role": None, "rule": "unrouted:no_rule", "routed": False}
        assert all(set(sig) == {"name", "value", "source", "used"} for sig in ex["signals"])
    line = next(r.getMessage() for r in caplog.records if "routing:" in r.getMessage())
    assert uid in line and "plane sagittal (ImageOrientationPatient)" in line
    assert "SHOULDER" not in line  # decisions and sources only, no header text


@pytest.fixture
def run_cli(settings, capsys):
    """``msknode routing explain ARGS`` on the test's data directory (`support.cli.msknode`)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return msknode(capsys, "routing", "explain", *args, MSKNODE_DATA_DIR=settings.data_dir)

    return run


@pytest.mark.integration  # msknode's command line
def test_routing_explain_on_a_real_series_folder_and_on_the_indexed_series(db, settings, run_cli):
    files = siemens_knee_files()
    r = run_cli(str(SIEMENS_KNEE))
    assert r.returncode == 0, r.stderr
    assert "decision knee/sag_fluid" in r.stdout and "ImageOrientationPatient (0020,0037)" in r.stdout
    assert "ScanOptions (0018,0022)" in r.stdout and "25 instance(s) read" in r.stdout
    r = run_cli(str(files[0]), "--json")
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)
    assert one["decision"]["role"] == "sag_fluid" and one["plane"]["value"] == "sagittal"

    uid = index_files(db, settings, files)
    route_now(db, settings)
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == uid))
        assert se.state in ("complete", "queued")  # routed (and its study settled into a job)
        assert (se.pipeline, se.role, se.plane, se.contrast, se.anatomy) == (
            "knee",
            "sag_fluid",
            "sagittal",
            "pd_fs",
            "knee",
        )
        assert se.acquisition["sequence_name"] == "*tseR2d1rr6"
        assert s.scalar(select(Instance.image_orientation).where(Instance.series_id == se.id)).startswith("-0.23")
        recorded = se.routing_explanation
    r = run_cli(uid, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["series_uid"] == uid and out["decision"] == recorded["decision"]
    assert out["plane"] == recorded["plane"] and out["contrast"] == recorded["contrast"]
    r = run_cli(uid)
    assert r.returncode == 0 and "recorded decision: knee/sag_fluid" in r.stdout


@pytest.mark.integration  # msknode's command line
def test_routing_explain_refuses_bad_input_with_a_clear_message(tmp_path, run_cli):
    r = run_cli(str(tmp_path / "missing"))
    assert r.returncode == 1 and "neither an existing file or folder nor a Series Instance UID" in r.stderr
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "a.txt").write_text("hello")
    r = run_cli(str(tmp_path / "notdicom"))
    assert r.returncode == 1 and "holds no DICOM instance (1 file(s)" in r.stderr
    r = run_cli("1.2.3.4.5")
    assert r.returncode == 1 and "no series 1.2.3.4.5" in r.stderr
    r = run_cli(str(PYDICOM_DATA))
    assert r.returncode == 1 and "series" in r.stderr and "give a file or the folder of one series" in r.stderr


def test_the_pixel_hook_in_completeness_is_lazy_and_never_fails_the_tick(db, settings, monkeypatch):
    """Wired to qc.anatomy through the registry; a failing classifier is logged and silent."""
    import node.intake.completeness as completeness

    files = siemens_knee_files()
    datasets = []
    for f in files:
        ds = dcmread(f)
        ds.BodyPartExamined = ""
        datasets.append(ds)
    from test_ingest import _received

    store = InstanceStore.from_settings(settings)
    store.prepare()
    items = [_received(store, ds) for ds in datasets]
    with db.session() as s:
        index_instances(s, store, items, uid_root=settings.uid_root, quiet_seconds=0.0)
    uid = items[0].header.series_uid

    seen = []

    class Classifier:
        def predict(self, volume, plane=None):
            seen.append((volume.array.shape, plane))
            return {"label": "knee/sagittal", "probability": 0.96, "probabilities": {}}

    monkeypatch.setattr(completeness, "_anatomy_classifier", lambda weights_dir: Classifier())
    route_now(db, settings)
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == uid))
        assert (se.pipeline, se.role, se.anatomy) == ("knee", "sag_fluid", "knee")
        assert se.routing_explanation["anatomy"]["source"] == "pixels"
    assert seen and seen[0][1] == "sagittal" and 25 in seen[0][0]

    # a broken classifier: the series stays unrouted for want of an anatomy, the tick goes on
    def broken(weights_dir):
        raise RuntimeError("no weights")

    monkeypatch.setattr(completeness, "_anatomy_classifier", broken)
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == uid))
        ex = completeness.explain_series(s, settings, load_rules(settings.routing_rules), se)
    assert ex.route.rule == "unrouted:no_anatomy"
    # the setting turns it off
    off = settings.model_copy(update={"routing_pixel_anatomy": False})
    with db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == uid))
        assert completeness.pixel_anatomy_hook(s, off, se) is None


@pytest.mark.parametrize("anatomy", ["knee", "shoulder", "lumbar_spine"])
def test_phantom_studies_route_from_their_headers(shipped, tmp_path, anatomy):
    """The demo's phantom series, read from their files as the node reads them, reach the roles they were made for."""
    from models.phantoms.dicom import write_study

    out = write_study(anatomy, tmp_path / anatomy, 4, matrix=64)
    for role, paths in out.items():
        facts = facts_of(sorted(paths))
        ex = explain(facts, shipped, uid_root=DEFAULT_UID_ROOT)
        assert (ex.route.pipeline, ex.route.role) == (anatomy, role), ex.summary()
        assert ex.plane.source == "ImageOrientationPatient" and ex.contrast.source == "acquisition parameters"
