"""The lumbar pipeline on a real sagittal series: ``lumbar_spine.levels`` labels the series in its own
geometry, places the stenosis level findings at its disc centres, and `build_results` writes one level
SEG (one coded segment per vertebral body and disc) that passes dciodvfy and reads back with highdicom.

The series is built at test time from a held-out patient of the real corpus (never stored in the
repository; skipped with the reason when the corpus is absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from models.levels.core import STRUCTURES
from models.registry import REPO_WEIGHTS, Registry
from support.results_data import assert_valid
from support.spine_series import write_sagittal_series

pytestmark = [pytest.mark.slow]

CARD = REPO_WEIGHTS / "lumbar_spine.levels" / "card.json"


def _held_out_volume() -> Path:
    from models.realdata import realdata_root

    base = realdata_root()
    root = base / "lumbar_spine" / "segmented_volumes" if base is not None else None
    if root is None or not (root / "volumes.csv").is_file():
        pytest.skip(
            "the real MRI corpus (../shared/realdata or MSKNODE_REALDATA) has no lumbar_spine/segmented_volumes"
        )
    held = json.loads(CARD.read_text())["metrics"]["held_out_real"]["patients"]
    key = next(k for k in held if k.startswith("VB2/"))
    return root / f"{key}.npz"


def test_pipeline_labels_a_real_series_places_stenosis_levels_and_writes_a_valid_level_seg(tmp_path, settings):
    import torch

    from models.io import load_folder
    from models.pipelines import PIPELINES, run_pipeline
    from node.results import codes
    from node.results.build import build_results
    from node.results.build import save as save_result

    torch.set_num_threads(1)
    npz = _held_out_volume()
    _, paths = write_sagittal_series(
        npz,
        tmp_path / "series",
        patient_name="LEVELS^REAL",
        patient_id="LEVELS-1",
        accession="ACC-LV-1",
        scanner_detail=False,
    )
    ((uid, vol),) = load_folder(tmp_path / "series").items()
    assert PIPELINES["lumbar_spine"].levels == "lumbar_spine.levels"
    out = run_pipeline("lumbar_spine", {"sag_t2": vol}, registry=Registry(), superres=False, saliency=False)

    # the level label volume: in the series' geometry, every lumbar body and the discs between them
    (lv,) = out.levels
    assert lv.qc.accepted, lv.qc
    assert lv.series_uid == uid and lv.labels is not None and lv.labels.shape == vol.shape
    assert set(lv.found) >= {"L1", "L2", "L3", "L4", "L5", "L1-L2", "L2-L3", "L3-L4", "L4-L5"}
    assert out.used_series["lumbar_spine.levels"] == [uid]
    # the job records the level model's version and weights hash like every model's
    from node.jobs.runner import model_versions_of

    rec = model_versions_of(out)["lumbar_spine.levels"]
    assert (rec["version"], rec["weights_sha256"]) == (lv.model.version, lv.model.weights_sha256)
    assert len(rec["weights_sha256"]) == 64 and rec["levels"]["series_uid"] == uid
    assert rec["levels"]["found"] == list(lv.found)
    # centres in patient mm follow the series geometry: head -> feet is -z, L1 above L5 by 4 bodies and discs
    z = {k: v[2] for k, v in lv.centres_mm.items()}
    assert z["L1"] > z["L1-L2"] > z["L2"] > z["L3"] > z["L4"] > z["L4-L5"] > z["L5"]
    assert 100.0 < z["L1"] - z["L5"] < 200.0
    for name in lv.found:  # each centre lies inside the bounding box of its structure's voxels
        idx = np.argwhere(lv.labels == STRUCTURES.index(name) + 1)
        assert np.all(idx.min(axis=0) <= lv.centres_vox[name]) and np.all(lv.centres_vox[name] <= idx.max(axis=0))

    # the stenosis findings keep their grades and take the segmented disc centres as their location
    (sten,) = [m for m in out.outputs if m.model.name == "lumbar_spine.stenosis"]
    assert sten.qc.accepted
    placed = [f for f in sten.findings if f.level in lv.centres_vox]
    assert len(placed) >= 4
    for f in placed:
        assert f.location == lv.centres_vox[f.level] and f.location_mm == lv.centres_mm[f.level]
        assert f.grade in ("normal", "mild", "moderate", "severe")

    # one level SEG in the study, valid, one segment per structure found, with its codes
    results = build_results(
        output=out,
        source_files={uid: paths},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="levels-test",
    )
    level_segs = [r for r in results if r.kind == "seg" and r.dataset.ContentLabel == "AI_LEVELS"]
    assert len(level_segs) == 1
    res = level_segs[0]
    assert res.study_uid == vol.study_uid
    path = save_result(res, settings)
    assert_valid(path, "level SEG")
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    labels = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert len(labels) == len(lv.found)
    for name in lv.found:
        if "-" in name:
            d = labels[f"{name} intervertebral disc"]
            assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.INTERVERTEBRAL_DISC.value
            assert d.AnatomicRegionSequence[0].CodeValue == codes.SPINE_LEVELS[name].value
        else:
            d = labels[f"{name} vertebral body"]
            assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.VERTEBRA[name].value
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    # the segment of L3 covers exactly the voxels the model labelled L3 (frames follow the source slices)
    n3 = labels["L3 vertebral body"].SegmentNumber
    vol_l3 = seg.get_volume(segment_numbers=[n3]) if hasattr(seg, "get_volume") else None
    expected = int((lv.labels == STRUCTURES.index("L3") + 1).sum())
    if vol_l3 is not None:
        assert int(np.asarray(vol_l3.array).sum()) == expected
    # the SR names the level SEG as evidence
    (sr,) = [r for r in results if r.kind == "sr"]
    evidence = {
        str(s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for e in getattr(sr.dataset, "CurrentRequestedProcedureEvidenceSequence", [])
        for ser in e.ReferencedSeriesSequence
        for s in [ser]
        if "ReferencedSOPSequence" in s
    }
    assert res.sop_instance_uid in evidence
