"""Phantom DICOM writer: valid MR Image Storage series (dciodvfy), pydicom round trip,
geometry, localizer, multi-series study, routing descriptions (contract C3)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.phantoms import PhantomError, generate, write_dicom_series, write_localizer, write_study

pytestmark = pytest.mark.integration

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    return [ln for ln in text.splitlines() if ln.startswith("Error")]


@pytest.mark.parametrize(
    "anatomy,desc,body",
    [
        ("knee", "SAG PD FS", "KNEE"),
        ("shoulder", "COR OBL T2 FS", "SHOULDER"),
        ("lumbar_spine", "SAG T2 TSE", "LSPINE"),
    ],
)
def test_series_round_trips_and_validates(tmp_path, anatomy, desc, body):
    p = generate(anatomy, 7, matrix=128)
    paths = write_dicom_series(p, tmp_path / anatomy)
    vol = p.volume
    assert len(paths) == vol.shape[0]
    dss = [pydicom.dcmread(f) for f in paths]
    first = dss[0]
    assert first.SOPClassUID == MR_IMAGE_STORAGE
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.Modality == "MR" and first.SeriesDescription == desc and first.BodyPartExamined == body
    assert first.Manufacturer == "msknode-phantom"
    assert first.SeriesInstanceUID == vol.series_uid and first.StudyInstanceUID == vol.study_uid
    assert first.FrameOfReferenceUID == vol.frame_of_reference_uid
    assert first.StudyDate and first.StudyTime
    assert first.BitsAllocated == 16 and first.PixelRepresentation == 0
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    # our UIDs must not carry the node's own root (own objects are never routed)
    from node.settings import DEFAULT_UID_ROOT

    assert not first.SOPInstanceUID.startswith(DEFAULT_UID_ROOT)
    assert not first.SeriesInstanceUID.startswith(DEFAULT_UID_ROOT)
    for k, d in enumerate(dss):
        assert int(d.ImagesInAcquisition) == len(dss)
        assert int(d.InstanceNumber) == k + 1
        assert np.allclose([float(x) for x in d.ImagePositionPatient], vol.positions[k], atol=1e-3)
        assert np.allclose([float(x) for x in d.ImageOrientationPatient], [*vol.row_cosine, *vol.col_cosine], atol=1e-5)
        assert np.allclose([float(x) for x in d.PixelSpacing], vol.spacing[1:], rtol=1e-5)
        assert float(d.SpacingBetweenSlices) == pytest.approx(vol.spacing[0], rel=1e-5)
        assert float(d.SliceThickness) == pytest.approx(vol.attributes["slice_thickness"], rel=1e-5)
        pix = d.pixel_array
        assert pix.dtype == np.uint16 and pix.shape == vol.shape[1:]
        assert np.array_equal(pix, np.clip(np.rint(vol.array[k]), 0, 65535).astype(np.uint16))
    # slice spacing from positions agrees with the header
    pos = np.array([[float(x) for x in d.ImagePositionPatient] for d in dss])
    normal = np.cross(vol.row_cosine, vol.col_cosine)
    assert np.allclose(np.diff(pos @ normal), vol.spacing[0], atol=1e-3)
    for f in (paths[0], paths[-1]):
        assert dciodvfy_errors(f) == [], f


def test_writer_options(tmp_path):
    p = generate("knee", 8, matrix=64, n_slices=6, laterality="L")
    paths = write_dicom_series(
        p,
        tmp_path / "s",
        series_description="SAG PD",
        body_part="KNEE",
        study_uid="1.2.3.4",
        series_uid="1.2.3.4.5",
        patient_name="DOE^JANE",
        patient_id="X1",
        uid_root="1.2.826.0.1.3680043.8.498.77.",
        sequence="*tse2d1_5",
    )
    d = pydicom.dcmread(paths[2])
    assert (d.SeriesDescription, d.StudyInstanceUID, d.SeriesInstanceUID) == ("SAG PD", "1.2.3.4", "1.2.3.4.5")
    assert (str(d.PatientName), d.PatientID, d.SequenceName, d.Laterality) == ("DOE^JANE", "X1", "*tse2d1_5", "L")
    assert d.SOPInstanceUID.startswith("1.2.826.0.1.3680043.8.498.77.")
    with pytest.raises(PhantomError):
        write_dicom_series(p, tmp_path / "bad", uid_root="1.2.3")


def test_localizer_has_three_planes(tmp_path):
    paths = write_localizer("knee", tmp_path / "loc", 3)
    dss = [pydicom.dcmread(f) for f in paths]
    assert len(dss) == 9
    assert {d.SeriesDescription for d in dss} == {"3-PLANE LOC"}
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    normals = {
        tuple(
            np.round(
                np.abs(
                    np.cross(
                        [float(x) for x in d.ImageOrientationPatient[:3]],
                        [float(x) for x in d.ImageOrientationPatient[3:]],
                    )
                ),
                0,
            )
        )
        for d in dss
    }
    assert len(normals) == 3
    assert all("LOCALIZER" in d.ImageType for d in dss)
    assert dciodvfy_errors(paths[0]) == []


@pytest.mark.parametrize(
    "anatomy,roles",
    [
        ("knee", {"localizer", "sag_fluid", "sag_pd", "cor_fluid"}),
        ("shoulder", {"localizer", "cor_fluid", "cor_t1"}),
        ("lumbar_spine", {"localizer", "sag_t2", "sag_t1"}),
    ],
)
def test_study_series_share_the_study_and_route_to_their_roles(tmp_path, anatomy, roles):
    from node.intake.routing import SeriesFacts, load_rules

    labels = {
        "knee": {"acl": "complete"},
        "shoulder": {"cuff": "partial"},
        "lumbar_spine": {"stenosis": {"L4-L5": "severe"}},
    }[anatomy]
    out = write_study(anatomy, tmp_path / "study", 4, matrix=96, **labels)
    assert set(out) == roles
    rules = load_rules(Path(__file__).resolve().parents[1] / "node" / "intake" / "routing_rules.toml")
    studies, series, frames = set(), set(), set()
    for role, paths in out.items():
        d = pydicom.dcmread(paths[0])
        studies.add(d.StudyInstanceUID)
        series.add(d.SeriesInstanceUID)
        frames.add(d.FrameOfReferenceUID)
        route = rules.route(
            SeriesFacts(
                series_uid=d.SeriesInstanceUID,
                modality=d.Modality,
                body_part=d.BodyPartExamined,
                series_description=d.SeriesDescription,
                protocol_name=d.ProtocolName,
                laterality=d.get("Laterality"),
            ),
            uid_root="1.2.826.0.1.3680043.10.1447.",
        )
        assert (route.pipeline, route.role) == (anatomy, role), (role, d.SeriesDescription, route)
        assert dciodvfy_errors(paths[-1]) == []
    assert len(studies) == 1 and len(frames) == 1 and len(series) == len(out)
    numbers = {int(pydicom.dcmread(p[0]).SeriesNumber) for p in out.values()}
    assert len(numbers) == len(out)


def test_study_series_show_the_same_lesion(tmp_path):
    """The sagittal fluid and PD series of a study are the same knee (same seed): same labels."""
    from models.phantoms.dicom import STUDY_SERIES

    roles = [r for r, _d, _o in STUDY_SERIES["knee"]]
    assert roles[0] == "sag_fluid"
    a = generate("knee", 9, acl="partial", sequence="PD_FS")
    b = generate("knee", 9, acl="partial", sequence="PD")
    assert a.labels == b.labels
    assert np.array_equal(a.masks["acl_lesion"], b.masks["acl_lesion"])
    # contrast differs: fat bright without fat saturation
    fat = a.masks["soft_tissue"] & (a.volume.array < np.percentile(a.volume.array, 50))
    assert b.volume.array[fat].mean() > a.volume.array[fat].mean()


@pytest.mark.parametrize("anatomy", ["knee", "shoulder", "lumbar_spine"])
def test_models_io_loads_the_written_series_back(tmp_path, anatomy):
    """The node's own loader (models.io) rebuilds the phantom volume from the files, in any order."""
    from models.io import load_series

    p = generate(anatomy, 13, matrix=96)
    paths = write_dicom_series(p, tmp_path / anatomy)
    v = load_series(list(reversed(paths)))
    assert v.shape == p.volume.shape
    assert np.array_equal(v.array, np.clip(np.rint(p.volume.array), 0, 65535))
    assert np.allclose(v.positions, p.volume.positions, atol=1e-3)
    assert np.allclose(v.spacing, p.volume.spacing, rtol=1e-4)
    assert v.series_uid == p.volume.series_uid and v.study_uid == p.volume.study_uid
    # the lesion centre in patient mm maps to the same voxel through the loaded geometry
    labels = p.labels.get("lesion_centers_mm") or p.labels.get("structure_centers_mm")
    for key, mm in labels.items():
        kji = np.linalg.solve(v.affine(), np.array([*mm, 1.0]))[:3]
        vox = (p.labels.get("lesion_centers_vox") or p.labels["structure_centers_vox"])[key]
        assert np.allclose(kji, vox, atol=0.05), key


def test_models_io_refuses_the_three_plane_localizer_as_a_volume(tmp_path):
    from models.errors import VolumeError
    from models.io import load_series

    paths = write_localizer("knee", tmp_path / "loc", 2)
    with pytest.raises(VolumeError, match="orientation"):
        load_series(paths)


def test_command_line_writes_a_series_and_refuses_bad_labels(tmp_path, capsys):
    from models.phantoms.__main__ import main

    rc = main(
        [
            "series",
            "knee",
            str(tmp_path / "s"),
            "--seed",
            "4",
            "--set",
            "acl=complete",
            "--set",
            "matrix=64",
            "--set",
            "n_slices=5",
        ]
    )
    assert rc == 0
    files = sorted((tmp_path / "s").glob("*.dcm"))
    assert len(files) == 5 and pydicom.dcmread(files[0]).SeriesDescription == "SAG PD FS"
    assert main(["labels", "knee", "--set", "acl=torn"]) == 2
    assert "acl must be one of" in capsys.readouterr().err
