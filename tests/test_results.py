"""Result objects on synthetic MR series: validity (dciodvfy), round trips, content, UIDs."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from models.types import Finding, ModelOutput, PipelineOutput, QCResult
from node.errors import ResultsError
from node.jobs.runner import save_all
from node.results import ResultRef, TriageSummary, build_results, save
from support.results_data import (
    assert_valid,
    dciodvfy,
    knee_output,
    measurement_groups,
    model,
    spine_output,
    sr_items,
    volume_from_files,
    write_mr_series,
)

pytestmark = pytest.mark.integration


def test_synthetic_series_is_a_valid_mr_series(tmp_path):
    paths = write_mr_series(tmp_path / "s", n_slices=3)
    errors, _warnings = dciodvfy(paths[0])
    assert errors == []
    vol = volume_from_files(paths)
    assert vol.array.shape == (3, 40, 36)
    # slices are ordered ascending along the normal although written in reverse
    proj = vol.positions @ vol.normal
    assert np.all(np.diff(proj) > 0)


@pytest.fixture
def knee(tmp_path):
    paths = write_mr_series(tmp_path / "knee", n_slices=8, laterality="R")
    return paths, volume_from_files(paths)


def _build(settings, paths, vol, output, *, fingerprint="fp-1", triage=None, predecessors=()):
    return build_results(
        output=output,
        source_files={vol.series_uid: paths},
        triage=triage,
        predecessors=list(predecessors),
        settings=settings,
        job_fingerprint=fingerprint,
    )


def _by_kind(results):
    out = {}
    for r in results:
        out.setdefault(r.kind, []).append(r)
    return out


def test_every_object_type_is_valid_and_round_trips(settings, knee):
    paths, vol = knee
    triage = TriageSummary(priority="URGENT", score=91.0, reasons=("ACL tear p=0.91 >= 0.80",))
    results = _build(settings, paths, vol, knee_output(vol), triage=triage)
    kinds = _by_kind(results)
    assert sorted(kinds) == ["sc", "seg", "sr", "superres"]
    assert len(kinds["sr"]) == 1 and len(kinds["seg"]) == 1 and len(kinds["sc"]) == 1
    assert len(kinds["superres"]) == 15  # 8 slices, x2 through-plane
    source_series = {vol.series_uid}
    source_sops = set(vol.sop_instance_uids)
    for r in results:
        path = save(r, settings)
        assert path.is_file() and path.is_relative_to(settings.results_dir)
        assert_valid(path, f"synthetic {r.kind}")
        ds = pydicom.dcmread(path)
        # all in the original study, new series, our UID root
        assert ds.StudyInstanceUID == vol.study_uid
        assert ds.SeriesInstanceUID not in source_series and ds.SOPInstanceUID not in source_sops
        assert ds.SOPInstanceUID.startswith(settings.uid_root) and ds.SeriesInstanceUID.startswith(settings.uid_root)
        assert ds.SOPInstanceUID == r.sop_instance_uid and ds.SOPClassUID == r.sop_class_uid
        assert ds.PatientName == "Test^Knee" and ds.PatientID == "PID-0001"
        # IHE AI Results: the algorithm that contributed (model name, version, weights hash)
        ce = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == "msknode"]
        assert ce and all(len(i.SoftwareVersions) == 2 and i.SoftwareVersions[1] == "ab" * 32 for i in ce)
        if r.kind == "sr":
            sr = hd.sr.srread(path)
            assert isinstance(sr, hd.sr.Comprehensive3DSR)
            assert sr.SOPInstanceUID == r.sop_instance_uid
        elif r.kind == "seg":
            seg = hd.seg.segread(path)
            assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
            assert seg.segmentation_fractional_type == hd.seg.SegmentationFractionalTypeValues.PROBABILITY
        else:
            assert ds.pixel_array.shape[:2] == (ds.Rows, ds.Columns)
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    # the series of each kind are distinct
    assert len({r.series_uid for r in results}) == 4


def test_sr_reports_findings_qc_refusal_triage_and_notice(settings, knee):
    paths, vol = knee
    triage = TriageSummary(priority="URGENT", score=91.0, reasons=("complete ACL tear",), needs_review=True)
    results = _build(settings, paths, vol, knee_output(vol), triage=triage)
    kinds = _by_kind(results)
    sr = pydicom.dcmread(save(kinds["sr"][0], settings))
    seg = kinds["seg"][0].dataset
    sc = kinds["sc"][0].dataset
    items = sr_items(sr)
    texts = [v for _p, t, v in items if t == "TEXT"]
    assert any("Not for diagnostic use" in t for t in texts)
    assert sr.SeriesDescription.endswith("not for diagnostic use")
    groups = measurement_groups(sr)
    # ACL finding, meniscus not evaluated, triage: the SR is written before super-resolution runs, so it says
    # nothing about the super-resolved series (which describes itself)
    assert len(groups) == 3

    acl = groups[0]
    assert group_has(acl, "/Finding", "Rupture of anterior cruciate ligament")
    assert group_has(acl, "/Rupture of anterior cruciate ligament", "Present")
    assert group_has(acl, "/Tear extent", "Complete")
    assert group_has(acl, "/Input quality gate", "Accepted")
    assert group_has(acl, "/Finding Site", "Knee joint")
    assert group_has(acl, "/Finding Site/Laterality", "Right")  # from the series' Laterality (R)
    assert group_has(acl, "/Algorithm Name", "knee.acl")
    assert group_has(acl, "/Algorithm Version", "0.1.0")
    assert group_has(acl, "/Algorithm Parameters", f"weights_sha256={'ab' * 32}")
    assert group_has(acl, "/Algorithm Parameters", "threshold=0.5")
    assert pytest.approx(value_of(acl, "/Probability")) == 0.91
    assert pytest.approx(value_of(acl, "/Probability/Standard Deviation")) == 0.04
    assert group_has(acl, "/Series Instance UID", vol.series_uid)
    # the SEG segment of its heatmap and the SC overlay are referenced
    refs = [v for p, t, v in acl if t == "IMAGE"]
    assert any(v[1] == seg.SOPInstanceUID and v[2] == [1] for v in refs)
    assert any(v[1] == sc.SOPInstanceUID for v in refs)
    assert {v[1] for v in refs} >= set(vol.sop_instance_uids)  # source images of the segment

    meniscus = groups[1]
    assert group_has(meniscus, "/Tear of meniscus of knee", "Not Evaluated")
    assert group_has(meniscus, "/Input quality gate", "Refused")
    assert group_has(meniscus, "/Reason input not evaluated", "Signal-to-noise ratio too low")
    texts = [str(v) for _p, t, v in meniscus if t == "TEXT"]
    # the reader gets the sentence of the coded reason; the gate's own message (which may name a plane or anatomy
    # that contradicts the headers) never reaches the PACS
    assert "Not evaluated: the images are too noisy for the model" in texts
    assert not any("signal-to-noise ratio 2.1" in t for t in texts)
    assert group_has(meniscus, "/Algorithm Name", "knee.meniscus")

    new_series = kinds["superres"][0].series_uid
    assert not any(p.endswith("/Data consistency check") for g in groups for p, _t, _v in g)
    assert not any(v == new_series for _p, _t, v in items)

    tri = groups[2]
    assert group_has(tri, "/Priority", "Urgent")
    assert pytest.approx(value_of(tri, "/Triage score")) == 91.0
    assert group_has(tri, "/Comment", "complete ACL tear")
    assert any("human review" in str(v) for _p, t, v in tri if t == "TEXT")

    # evidence: every source image, the SEG and the SC, in the current study
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for ser in s.ReferencedSeriesSequence
        for i in ser.ReferencedSOPSequence
    }
    assert evidence >= set(vol.sop_instance_uids) | {seg.SOPInstanceUID, sc.SOPInstanceUID}
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MSKNODE"
    ce_models = {i.ManufacturerModelName for i in sr.ContributingEquipmentSequence if i.Manufacturer == "msknode"}
    assert ce_models == {"knee.acl", "knee.meniscus"}


def group_has(group, suffix, value) -> bool:
    return any(p.endswith(suffix) and v == value for p, _t, v in group)


def value_of(group, suffix):
    vals = [v for p, _t, v in group if p.endswith(suffix)]
    assert vals, f"no {suffix} in group"
    return vals[0]


def test_negative_study_gets_an_sr_with_explicit_negative_findings(settings, knee):
    paths, vol = knee
    out = knee_output(vol, positive=False, superres=False, refused_meniscus=False)
    results = _build(settings, paths, vol, out)
    assert [r.kind for r in results] == ["sr"]  # no SEG, no overlay for negatives
    path = save(results[0], settings)
    assert_valid(path, "negative sr")
    groups = measurement_groups(pydicom.dcmread(path))
    assert group_has(groups[0], "/Rupture of anterior cruciate ligament", "Absent")
    assert pytest.approx(value_of(groups[0], "/Probability")) == 0.08
    assert group_has(groups[1], "/Tear of meniscus of knee", "Absent")
    assert group_has(groups[1], "/Finding Site/Topographical modifier", "Medial")


def test_all_refused_study_says_not_evaluated(settings, knee):
    paths, vol = knee
    outs = [
        ModelOutput(
            model=model("knee.acl"),
            series_uid="",
            qc=QCResult(False, "missing_series", "no sagittal fluid-sensitive series"),
            findings=[],
        ),
        ModelOutput(
            model=model("knee.meniscus"), series_uid=vol.series_uid, qc=QCResult(False, "wrong_anatomy"), findings=[]
        ),
    ]
    out = PipelineOutput(pipeline="knee", outputs=outs, superres=[], used_series={"knee.meniscus": [vol.series_uid]})
    results = _build(settings, paths, vol, out)
    assert [r.kind for r in results] == ["sr"]
    path = save(results[0], settings)
    assert_valid(path, "not-evaluated sr")
    groups = measurement_groups(pydicom.dcmread(path))
    assert group_has(groups[0], "/Rupture of anterior cruciate ligament", "Not Evaluated")
    assert group_has(groups[0], "/Reason input not evaluated", "Required series missing")
    assert group_has(groups[1], "/Reason input not evaluated", "Wrong anatomy")


def test_uids_are_deterministic_per_job_and_model_versions(settings, knee):
    paths, vol = knee
    a = _build(settings, paths, vol, knee_output(vol), fingerprint="job-A")
    b = _build(settings, paths, vol, knee_output(vol), fingerprint="job-A")  # a redelivered job
    c = _build(settings, paths, vol, knee_output(vol), fingerprint="job-B")  # new inputs (re-opened study)
    out_v2 = knee_output(vol)
    out_v2.outputs[0].model = model("knee.acl", version="0.2.0")
    d = _build(settings, paths, vol, out_v2, fingerprint="job-A")  # a new model version
    uids = lambda rs: [(r.kind, r.series_uid, r.sop_instance_uid) for r in rs]  # noqa: E731
    assert uids(a) == uids(b)
    all_a = {r.sop_instance_uid for r in a}
    assert all_a.isdisjoint({r.sop_instance_uid for r in c})
    assert all_a.isdisjoint({r.sop_instance_uid for r in d})
    assert len(all_a) == len(a)


def test_reopened_study_sr_lists_its_predecessor(settings, knee):
    paths, vol = knee
    first = _build(settings, paths, vol, knee_output(vol), fingerprint="job-1")
    old_sr = next(r for r in first if r.kind == "sr")
    pred = ResultRef(sop_instance_uid=old_sr.sop_instance_uid, series_uid=old_sr.series_uid, study_uid=vol.study_uid)
    second = _build(settings, paths, vol, knee_output(vol), fingerprint="job-2", predecessors=[pred])
    new_sr = next(r for r in second if r.kind == "sr")
    path = save(new_sr, settings)
    assert_valid(path, "sr with predecessor")
    ds = pydicom.dcmread(path)
    seq = ds.PredecessorDocumentsSequence[0]
    assert seq.StudyInstanceUID == vol.study_uid
    ref = seq.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == old_sr.series_uid
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr.sop_instance_uid
    assert new_sr.sop_instance_uid != old_sr.sop_instance_uid


def test_seg_holds_the_heatmap_on_the_source_geometry(settings, knee):
    paths, vol = knee
    out = knee_output(vol, superres=False)
    heat = out.outputs[0].findings[0].heatmap
    results = _build(settings, paths, vol, out)
    seg_rf = next(r for r in results if r.kind == "seg")
    path = save(seg_rf, settings)
    seg = hd.seg.segread(path)
    desc = seg.get_segment_description(1)
    assert desc.segment_label == "Complete ACL tear (knee.acl)"
    assert desc.segmented_property_type.value == "444798002"
    assert desc.algorithm_identification[0].AlgorithmName == "knee.acl"
    assert desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeMeaning == "Right"
    # frames in volume order: the pixels of segment 1 for each source instance equal the heatmap
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(vol.sop_instance_uids),
        segment_numbers=[1],
        combine_segments=False,
        rescale_fractional=True,
    )
    assert arr.shape == heat.shape + (1,)
    assert np.max(np.abs(arr[..., 0] - heat)) <= 1.0 / 255 + 1e-6
    # the SEG references every source image of the series
    refs = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == set(vol.sop_instance_uids)
    assert seg.FrameOfReferenceUID == vol.frame_of_reference_uid


def test_superres_series_geometry_and_derivation(settings, knee):
    paths, vol = knee
    out = knee_output(vol)
    srv = out.superres[0].volume
    results = [r for r in _build(settings, paths, vol, out) if r.kind == "superres"]
    first_uid = results[0].dataset.SOPInstanceUID
    dss = [pydicom.dcmread(p) for p in save_all(results, settings)]  # as a job writes them
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    # the slices share the first one's elements but not their own: each has its UID, number and meta
    assert results[0].dataset.SOPInstanceUID == first_uid and results[0].dataset.InstanceNumber == 1
    assert len({d.SOPInstanceUID for d in dss}) == len(dss) == srv.array.shape[0]
    assert sorted(int(d.InstanceNumber) for d in dss) == list(range(1, len(dss) + 1))
    assert all(d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID for d in dss)
    assert [r.sop_instance_uid for r in results] == [d.SOPInstanceUID for d in dss]
    assert all(d.SOPClassUID == MRImageStorage for d in dss)
    for k, d in enumerate(sorted(dss, key=lambda d: d.InstanceNumber)):
        assert np.allclose([float(v) for v in d.ImagePositionPatient], srv.positions[k], atol=1e-3)
        assert np.allclose([float(v) for v in d.PixelSpacing], srv.spacing[1:], atol=1e-6)
        assert float(d.SpacingBetweenSlices) == pytest.approx(srv.spacing[0])
        assert float(d.SliceThickness) == pytest.approx(1.5)
        assert d.FrameOfReferenceUID == vol.frame_of_reference_uid
        assert list(d.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        assert "data consistency relative error 0.012" in d.DerivationDescription
        assert d.DerivationCodeSequence[0].CodeValue == "113085"
        src = {i.ReferencedSOPInstanceUID for i in d.SourceImageSequence}
        assert src and src <= set(vol.sop_instance_uids)
        # even output slices coincide with a source slice: exactly that one is named
        if k % 2 == 0:
            assert src == {vol.sop_instance_uids[k // 2]}
            assert np.array_equal(d.pixel_array, np.rint(vol.array[k // 2]).astype(np.uint16))
        else:
            assert src == {vol.sop_instance_uids[k // 2], vol.sop_instance_uids[k // 2 + 1]}
        assert d.SeriesDescription == "AI superres SAG PD FS"
        assert d.Laterality == "R"


def test_failed_consistency_check_writes_no_superres_series_and_the_findings_do_not_change(settings, knee):
    from support.results_data import superres_of

    paths, vol = knee
    out = knee_output(vol)
    out.superres = [superres_of(vol, passed=False)]
    results = _build(settings, paths, vol, out)
    assert "superres" not in {r.kind for r in results}
    sr = next(r for r in results if r.kind == "sr").dataset
    # the findings objects do not depend on super-resolution: the same SR (UID and content) with a passed check,
    # with none at all, and with a failed one (the check is in the job's findings rows and model versions)
    for other in (knee_output(vol), knee_output(vol, superres=False)):
        same = next(r for r in _build(settings, paths, vol, other) if r.kind == "sr").dataset
        assert same.SOPInstanceUID == sr.SOPInstanceUID
        assert sr_items(same) == sr_items(sr)


def test_overlay_never_depends_on_patient_identity(settings, tmp_path):
    common = dict(n_slices=6, laterality="L", seed=7)
    p1 = write_mr_series(tmp_path / "a", patient_name="Alpha^Ann", patient_id="ID-A", study_date="20230101", **common)
    p2 = write_mr_series(
        tmp_path / "b", patient_name="Beta^Bob", patient_id="ID-B-LONGER", study_date="20240606", **common
    )
    pixels = []
    for paths in (p1, p2):
        vol = volume_from_files(paths)
        results = _build(settings, paths, vol, knee_output(vol, superres=False))
        sc = next(r for r in results if r.kind == "sc")
        path = save(sc, settings)
        assert_valid(path, "sc overlay")
        ds = pydicom.dcmread(path)
        assert ds.BurnedInAnnotation == "NO" and ds.RecognizableVisualFeatures == "NO"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in vol.sop_instance_uids
        assert ds.Laterality == "L"
        pixels.append(ds.pixel_array)
    assert np.array_equal(pixels[0], pixels[1])
    img = pixels[0]
    assert img.shape[0] >= 256 and img.shape[2] == 3
    # the notice is burned in (yellow text on black), the heatmap is coloured
    yellow = np.all(img == [255, 255, 0], axis=-1).sum()
    assert yellow > 100
    assert np.any(img[..., 0].astype(int) - img[..., 2].astype(int) > 60)


def test_spine_grades_every_level(settings, tmp_path):
    paths = write_mr_series(
        tmp_path / "spine", n_slices=7, rows=48, cols=40, laterality=None, description="SAG T2 TSE", body_part="LSPINE"
    )
    vol = volume_from_files(paths)
    results = _build(settings, paths, vol, spine_output(vol))
    kinds = _by_kind(results)
    assert len(kinds["sc"]) == 2
    seg_path = save(kinds["seg"][0], settings)
    assert_valid(seg_path, "spine seg")
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_segments == 2
    labels = {seg.get_segment_description(i).segment_label for i in (1, 2)}
    assert labels == {
        "Spinal canal stenosis L4-L5 (lumbar_spine.stenosis)",
        "Spinal canal stenosis L5-S1 (lumbar_spine.stenosis)",
    }
    sr_path = save(kinds["sr"][0], settings)
    assert_valid(sr_path, "spine sr")
    groups = measurement_groups(pydicom.dcmread(sr_path))
    assert len(groups) == 3
    assert all(value_of(g, "/Finding Site") == "Vertebral canal" for g in groups)
    levels = [next(v for p, _t, v in g if p.endswith("/Finding Site") and v.startswith("Level")) for g in groups]
    assert levels == [
        "Level of L3/L4 intervertebral disc",
        "Level of L4/L5 intervertebral disc",
        "Level of L5/S1 intervertebral disc",
    ]
    assert [value_of(g, "/Severity") for g in groups] == ["Mild", "Severe", "Moderate"]
    assert [value_of(g, "/Spinal stenosis") for g in groups] == ["Absent", "Present", "Present"]
    for g in groups:
        assert not any(p.endswith("/Laterality") for p, _t, _v in g)  # unpaired: no laterality


def test_bad_inputs_give_clear_errors(settings, knee, tmp_path):
    paths, vol = knee
    out = knee_output(vol, superres=False)
    out.outputs[0].findings[0].heatmap = np.zeros((3, 3, 3), dtype=np.float32) + 0.5
    with pytest.raises(ResultsError, match="heatmap shape"):
        _build(settings, paths, vol, out)
    with pytest.raises(ResultsError, match="belongs to series"):
        build_results(
            output=out,
            source_files={"1.2.3": paths},
            triage=None,
            predecessors=[],
            settings=settings,
            job_fingerprint="x",
        )
    out = knee_output(vol, superres=False)
    out.outputs[0].series_uid = "1.2.3"
    with pytest.raises(ResultsError, match="not among the source files"):
        _build(settings, paths, vol, out)
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(ResultsError, match="cannot read source file"):
        build_results(
            output=out,
            source_files={vol.series_uid: [bad]},
            triage=None,
            predecessors=[],
            settings=settings,
            job_fingerprint="x",
        )
    with pytest.raises(ResultsError, match="fingerprint"):
        _build(settings, paths, vol, out, fingerprint="")


def test_finding_without_heatmap_or_with_empty_heatmap_is_still_reported(settings, knee):
    paths, vol = knee
    out = knee_output(vol, superres=False, refused_meniscus=False)
    out.outputs[0].findings[0].heatmap = np.zeros(vol.array.shape, dtype=np.float32)
    out.outputs[1].findings.append(
        Finding(
            code="meniscal_tear",
            label="Lateral meniscal tear",
            probability=0.7,
            uncertainty=None,
            positive=True,
            threshold=0.5,
            site="lateral meniscus",
            heatmap=None,
        )
    )
    results = _build(settings, paths, vol, out)
    assert [r.kind for r in results] == ["sr"]
    groups = measurement_groups(results[0].dataset)
    assert group_has(groups[0], "/Rupture of anterior cruciate ligament", "Present")
    assert group_has(groups[2], "/Tear of meniscus of knee", "Present")
    assert group_has(groups[2], "/Finding Site/Topographical modifier", "Lateral")
    assert not any(p.endswith("/Standard Deviation") for p, _t, _v in groups[2])


def test_series_no_model_used_is_neither_read_nor_evidence(settings, knee, tmp_path):
    paths, vol = knee
    junk = tmp_path / "localizer.dcm"
    junk.write_bytes(b"\x00" * 200)  # unreadable, and no model took it as input
    results = build_results(
        output=knee_output(vol, superres=False),
        source_files={vol.series_uid: paths, "1.2.3.4": [junk]},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="fp-loc",
    )
    sr = next(r for r in results if r.kind == "sr").dataset
    series = {
        s.SeriesInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence for s in e.ReferencedSeriesSequence
    }
    assert "1.2.3.4" not in series and vol.series_uid in series


def test_multiframe_source_frames_are_mapped_by_position(settings, tmp_path):
    """An enhanced (multi-frame) MR source whose frames are stored in reverse slice order."""
    import dataclasses

    from pydicom.uid import generate_uid

    paths = write_mr_series(tmp_path / "single", n_slices=6)
    vol = volume_from_files(paths)
    dss = [pydicom.dcmread(p) for p in paths]  # written in reverse slice order
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        dss,
        series_instance_uid=generate_uid(prefix="1.2.826.0.1.3680043.10.1447.99."),
        series_number=5,
        sop_instance_uid=generate_uid(prefix="1.2.826.0.1.3680043.10.1447.99."),
        instance_number=1,
    )
    mf_path = tmp_path / "enhanced.dcm"
    mf.save_as(mf_path)
    n = len(dss)
    # frame f (1-based) holds file f-1, i.e. volume slice n-f
    frames = tuple(n - k for k in range(n))
    mvol = dataclasses.replace(
        vol,
        series_uid=str(mf.SeriesInstanceUID),
        sop_class_uid=str(mf.SOPClassUID),
        sop_instance_uids=(str(mf.SOPInstanceUID),) * n,
        frame_numbers=frames,
    )
    out = knee_output(mvol)
    heat = out.outputs[0].findings[0].heatmap
    results = build_results(
        output=out,
        source_files={mvol.series_uid: [mf_path]},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="fp-mf",
    )
    kinds = _by_kind(results)
    for r in results:
        assert_valid(save(r, settings), f"multi-frame source {r.kind}")
    seg = hd.seg.segread(save(kinds["seg"][0], settings))
    arr = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(mf.SOPInstanceUID),
        source_frame_numbers=list(range(1, n + 1)),
        segment_numbers=[1],
        combine_segments=False,
        rescale_fractional=True,
    )
    for f in range(1, n + 1):
        assert np.max(np.abs(arr[f - 1, ..., 0] - heat[n - f])) <= 1.0 / 255 + 1e-6
    sc = kinds["sc"][0].dataset
    k = out.outputs[0].findings[0].location[0]
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == n - k
    first = next(r.dataset for r in kinds["superres"] if r.dataset.InstanceNumber == 1)
    assert first.SourceImageSequence[0].ReferencedFrameNumber == n  # volume slice 0 is the last frame


def test_slice_order_matches_the_models_loader(tmp_path):
    """Contract C4: heatmap slice k of a `models.io` volume is source slice k for the writers."""
    from pydicom.uid import generate_uid

    from models.io import load_series
    from node.results.sources import load_series as load_sources_series

    paths = write_mr_series(tmp_path / "s", n_slices=5)
    v = load_series(paths)
    s = load_sources_series(v.series_uid, paths)
    assert v.sop_instance_uids == tuple(sl.sop_instance_uid for sl in s.slices)
    dss = [pydicom.dcmread(p) for p in paths]
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        dss, series_instance_uid=generate_uid(), series_number=5, sop_instance_uid=generate_uid(), instance_number=1
    )
    mf_path = tmp_path / "mf.dcm"
    mf.save_as(mf_path)
    vm = load_series([mf_path])
    sm = load_sources_series(str(mf.SeriesInstanceUID), [mf_path])
    assert tuple(vm.frame_numbers) == tuple(sl.frame_number for sl in sm.slices)
    assert np.allclose(vm.array, v.array)


def test_source_without_geometry_gives_a_clear_error(settings, knee, tmp_path):
    paths, vol = knee
    broken = []
    for p in paths:  # a series whose Frame of Reference UID is invalid (sanitising removes it)
        ds = pydicom.dcmread(p)
        with pydicom.config.disable_value_validation():
            ds.FrameOfReferenceUID = "not-a-uid"
            out_path = tmp_path / f"b-{p.name}"
            ds.save_as(out_path)
        broken.append(out_path)
    out = knee_output(vol, superres=False)
    with pytest.raises(ResultsError, match=f"cannot build the SEG of series {vol.series_uid}"):
        build_results(
            output=out,
            source_files={vol.series_uid: broken},
            triage=None,
            predecessors=[],
            settings=settings,
            job_fingerprint="fp-broken",
        )
