"""Every result object type on the project's synthetic phantoms (knee, shoulder, lumbar spine):
no dciodvfy error, round trip through pydicom and highdicom."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest

from models.phantoms import generate, write_dicom_series
from models.types import Finding, ModelOutput, PipelineOutput, QCResult
from node.results import TriageSummary, build_results, save
from support.results_data import assert_valid, blob, knee_output, model, spine_output, superres_of, volume_from_files

pytestmark = pytest.mark.integration


def _shoulder_output(vol) -> PipelineOutput:
    shape = vol.array.shape
    c = (shape[0] // 2, shape[1] // 3, shape[2] // 2)
    cuff = Finding(
        code="rotator_cuff_tear",
        label="Full-thickness supraspinatus tear",
        probability=0.83,
        uncertainty=0.05,
        positive=True,
        threshold=0.5,
        grade="full_thickness",
        site="supraspinatus",
        location=c,
        heatmap=blob(shape, c),
    )
    mo = ModelOutput(
        model=model("shoulder.rotator_cuff", anatomy="shoulder"),
        series_uid=vol.series_uid,
        qc=QCResult(True),
        findings=[cuff],
    )
    return PipelineOutput(
        pipeline="shoulder",
        outputs=[mo],
        superres=[superres_of(vol)],
        used_series={mo.model.name: [vol.series_uid], "superres": [vol.series_uid]},
    )


@pytest.mark.parametrize("anatomy", ["knee", "shoulder", "lumbar_spine"])
def test_objects_on_phantoms_are_valid(settings, tmp_path, anatomy):
    phantom = generate(anatomy, 5, n_slices=9, matrix=64)
    paths = write_dicom_series(phantom, tmp_path / anatomy)
    vol = volume_from_files(paths)
    if anatomy == "knee":
        output = knee_output(vol)
    elif anatomy == "shoulder":
        output = _shoulder_output(vol)
    else:
        output = spine_output(vol)
        output.superres = [superres_of(vol)]
    results = build_results(
        output=output,
        source_files={vol.series_uid: paths},
        triage=TriageSummary("ROUTINE", 20.0, ("phantom",)),
        predecessors=[],
        settings=settings,
        job_fingerprint=f"phantom-{anatomy}",
    )
    assert {r.kind for r in results} == {"sr", "seg", "sc", "superres"}
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for r in results:
        path = save(r, settings)
        assert_valid(path, f"phantom {anatomy} {r.kind}")
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.get("Laterality", None) in (source.get("Laterality"), None, "")
        if r.kind == "sr":
            assert hd.sr.srread(path).SOPInstanceUID == r.sop_instance_uid
        elif r.kind == "seg":
            assert hd.seg.segread(path).number_of_segments >= 1
        else:
            assert ds.pixel_array.ndim in (2, 3)
