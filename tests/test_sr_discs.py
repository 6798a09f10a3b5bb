"""Disc grading in the SR: one TID 1500 measurement group per intervertebral disc (Pfirrmann grade
and herniation of ``lumbar_spine.discs``) next to the stenosis groups of the same lumbar study; dciodvfy clean."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from models.types import Finding, ModelOutput, PipelineOutput, QCResult
from node.results import build_results, save
from node.results import codes as result_codes
from support.results_data import (
    assert_valid,
    blob,
    measurement_groups,
    model,
    spine_output,
    volume_from_files,
    write_mr_series,
)

pytestmark = [pytest.mark.unit]

DISCS = "lumbar_spine.discs"
# (level, Pfirrmann grade, P(grade >= 3), P(herniation)) of the model's findings below
GRADED = (("L3-L4", "2", 0.18, 0.07), ("L4-L5", "4", 0.93, 0.81), ("L5-S1", "3", 0.66, 0.32))


def _grade_split(grade: str) -> dict[str, float]:
    split = dict.fromkeys("12345", 0.02)
    split[grade] = 0.92
    return split


def disc_findings(shape: tuple[int, int, int], *, threshold: float = 0.5) -> list[Finding]:
    """The two findings per level the discs model returns (models.types.Finding as its interface fixes them)."""
    out = []
    for i, (level, grade, p_deg, p_hern) in enumerate(GRADED):
        c = (shape[0] // 2, 8 + 10 * i, shape[2] // 2)
        out.append(
            Finding(
                code="disc_degeneration",
                label="Disc degeneration",
                probability=p_deg,
                uncertainty=0.04,
                positive=int(grade) >= 3,
                threshold=None,
                grade=grade,
                grade_probabilities=_grade_split(grade),
                level=level,
                site=f"intervertebral disc {level}",
                location=c,
            )
        )
        out.append(
            Finding(
                code="disc_herniation",
                label="Disc herniation",
                probability=p_hern,
                uncertainty=0.05,
                positive=p_hern >= threshold,
                threshold=threshold,
                level=level,
                site=f"intervertebral disc {level}",
                location=c,
                heatmap=blob(shape, c, 3.0) if p_hern >= threshold else None,
            )
        )
    return out


@pytest.fixture
def spine(tmp_path):
    paths = write_mr_series(
        tmp_path / "spine", n_slices=7, rows=48, cols=40, laterality=None, description="SAG T2 TSE", body_part="LSPINE"
    )
    return paths, volume_from_files(paths)


def _lumbar_output(vol, discs: ModelOutput) -> PipelineOutput:
    out = spine_output(vol)
    out.outputs.append(discs)
    out.used_series[DISCS] = [vol.series_uid]
    return out


def _sr(settings, paths, vol, output):
    results = build_results(
        output=output,
        source_files={vol.series_uid: paths},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="fp-discs",
    )
    sr = next(r for r in results if r.kind == "sr")
    path = save(sr, settings)
    assert_valid(path, "lumbar sr with discs")
    return pydicom.dcmread(path), results


def _value(group, suffix):
    vals = [v for p, _t, v in group if p.endswith(suffix)]
    return vals[0] if vals else None


def test_one_group_per_disc_with_pfirrmann_and_herniation_beside_the_stenosis_levels(settings, spine):
    paths, vol = spine
    discs = ModelOutput(
        model=model(DISCS, task="grading", anatomy="lumbar_spine"),
        series_uid=vol.series_uid,
        qc=QCResult(accepted=True),
        findings=disc_findings(vol.array.shape),
    )
    ds, _results = _sr(settings, paths, vol, _lumbar_output(vol, discs))
    groups = measurement_groups(ds)
    stenosis = [g for g in groups if _value(g, "/Finding") == "Spinal stenosis"]
    disc_groups = [g for g in groups if _value(g, "/Finding") == "Intervertebral disc structure"]
    assert len(stenosis) == 3 and len(disc_groups) == 3 and len(groups) == 6

    by_level = {}
    for g in disc_groups:
        sites = [v for p, _t, v in g if p.endswith("/Finding Site")]
        assert sites[0] == "Intervertebral disc structure"
        by_level[sites[1]] = g
    assert sorted(by_level) == [
        "Level of L3/L4 intervertebral disc",
        "Level of L4/L5 intervertebral disc",
        "Level of L5/S1 intervertebral disc",
    ]
    expected = {
        "Level of L3/L4 intervertebral disc": ("Pfirrmann grade II", "Absent", "Absent", 0.18, 0.07),
        "Level of L4/L5 intervertebral disc": ("Pfirrmann grade IV", "Present", "Present", 0.93, 0.81),
        "Level of L5/S1 intervertebral disc": ("Pfirrmann grade III", "Present", "Absent", 0.66, 0.32),
    }
    for site, (grade, degenerated, herniated, p_deg, p_hern) in expected.items():
        g = by_level[site]
        assert _value(g, "/Pfirrmann grade") == grade
        assert _value(g, "/Degeneration of intervertebral disc") == degenerated
        assert _value(g, "/Herniation of intervertebral disc") == herniated
        assert _value(g, "/Probability of Pfirrmann grade III-V") == pytest.approx(p_deg)
        assert _value(g, "/Probability of disc herniation") == pytest.approx(p_hern)
        assert _value(g, "/Probability of disc herniation/Standard Deviation") == pytest.approx(0.05)
        assert _value(g, "/Input quality gate") == "Accepted"
        assert _value(g, "/Algorithm Name") == DISCS
        assert _value(g, "/Algorithm Version") == "0.1.0"
        assert "Pfirrmann grade probabilities" in str(_value(g, "/Comment"))
    # the herniation with a heatmap references its SEG segment (TID 1411); the others their source images
    assert any(
        vt == "IMAGE" and p.endswith("/Referenced Segment")
        for p, vt, _v in by_level["Level of L4/L5 intervertebral disc"]
    )

    # the codes as written: SNOMED CT where a concept exists, the declared private scheme for Pfirrmann
    coded = {}

    def walk(items):
        for it in items:
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                if seq in it:
                    c = it[seq].value[0]
                    coded[c.CodeMeaning] = (c.CodeValue, c.CodingSchemeDesignator)
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    assert coded["Herniation of intervertebral disc"] == ("73589001", "SCT")
    assert coded["Degeneration of intervertebral disc"] == ("77547008", "SCT")
    assert coded["Intervertebral disc structure"] == ("360499006", "SCT")
    assert coded["Level of L4/L5 intervertebral disc"] == ("243923001", "SCT")
    assert coded["Pfirrmann grade"] == ("MSK-C-PFIRRMANN", "99MSKNODE")
    assert coded["Pfirrmann grade IV"] == ("MSK-G-PFIRR4", "99MSKNODE")
    assert coded["Spinal stenosis"] == ("76107001", "SCT")
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MSKNODE"
    # both models are named as contributing equipment of the one SR
    models = {i.ManufacturerModelName for i in ds.ContributingEquipmentSequence if i.Manufacturer == "msknode"}
    assert {"lumbar_spine.stenosis", DISCS} <= models


def test_a_level_with_one_finding_and_a_roman_grade_still_gets_its_disc_group(settings, spine):
    paths, vol = spine
    only = [
        Finding(
            code="disc_degeneration",
            label="Disc degeneration",
            probability=0.97,
            uncertainty=None,
            positive=True,
            grade="V",
            level="L5-S1",
        )
    ]
    discs = ModelOutput(
        model=model(DISCS, task="grading", anatomy="lumbar_spine"),
        series_uid=vol.series_uid,
        qc=QCResult(accepted=True),
        findings=only,
    )
    ds, _ = _sr(settings, paths, vol, _lumbar_output(vol, discs))
    g = next(g for g in measurement_groups(ds) if _value(g, "/Finding") == "Intervertebral disc structure")
    assert _value(g, "/Pfirrmann grade") == "Pfirrmann grade V"
    assert _value(g, "/Herniation of intervertebral disc") is None  # not claimed when not evaluated
    assert _value(g, "/Probability of disc herniation") is None


def test_a_refused_disc_series_is_reported_not_evaluated(settings, spine):
    paths, vol = spine
    discs = ModelOutput(
        model=model(DISCS, task="grading", anatomy="lumbar_spine"),
        series_uid=vol.series_uid,
        qc=QCResult(accepted=False, reason="low_snr"),
        findings=[],
    )
    ds, _ = _sr(settings, paths, vol, _lumbar_output(vol, discs))
    groups = measurement_groups(ds)
    refused = [g for g in groups if _value(g, "/Algorithm Name") == DISCS]
    assert len(refused) == 1
    assert _value(refused[0], "/Degeneration of intervertebral disc") == "Not Evaluated"
    assert _value(refused[0], "/Input quality gate") == "Refused"
    assert len([g for g in groups if _value(g, "/Finding") == "Spinal stenosis"]) == 3


def test_grade_concepts_of_the_pfirrmann_scale():
    for grade, roman in zip("12345", ("I", "II", "III", "IV", "V"), strict=True):
        name, value = result_codes.grade_concept(grade, "disc_degeneration")
        assert (name.value, value.meaning) == ("MSK-C-PFIRRMANN", f"Pfirrmann grade {roman}")
        assert result_codes.grade_concept(roman, "disc_degeneration")[1] == value
    # other findings keep their severity scale; a stray number outside a grading system is not a Pfirrmann grade
    assert result_codes.grade_concept("severe", "spinal_stenosis")[0].meaning == "Severity"
    assert result_codes.grade_concept("3")[0].meaning != "Pfirrmann grade"
    assert np.all([len(v.value) <= 16 for v in result_codes.PFIRRMANN_VALUES.values()])


def test_no_disc_located_is_not_evaluated_never_absent(settings, spine):
    paths, vol = spine
    discs = ModelOutput(
        model=model(DISCS, task="grading", anatomy="lumbar_spine"),
        series_uid=vol.series_uid,
        qc=QCResult(accepted=True),
        findings=[],
    )
    ds, _ = _sr(settings, paths, vol, _lumbar_output(vol, discs))
    (g,) = [g for g in measurement_groups(ds) if _value(g, "/Algorithm Name") == DISCS]
    assert _value(g, "/Degeneration of intervertebral disc") == "Not Evaluated"
    assert _value(g, "/Input quality gate") == "Accepted"
    assert "located no intervertebral disc" in str(_value(g, "/Comment"))


def test_a_disc_group_references_its_disc_in_the_level_seg(settings, spine):
    from models.types import LevelsOutput

    paths, vol = spine
    structures = ("L4", "L5", "L4-L5", "L5-S1")
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[2:5, 8:16, 10:30] = 1  # L4 body
    labels[2:5, 22:30, 10:30] = 2  # L5 body
    labels[2:5, 17:21, 12:28] = 3  # L4-L5 disc
    labels[2:5, 31:34, 12:28] = 4  # L5-S1 disc
    levels = LevelsOutput(
        model=model("lumbar_spine.levels", task="segmentation", anatomy="lumbar_spine"),
        series_uid=vol.series_uid,
        qc=QCResult(accepted=True),
        labels=labels,
        structures=structures,
        centres_vox={"L4": (3, 12, 20), "L5": (3, 26, 20), "L4-L5": (3, 19, 20), "L5-S1": (3, 32, 20)},
    )
    discs = ModelOutput(
        model=model(DISCS, task="grading", anatomy="lumbar_spine"),
        series_uid=vol.series_uid,
        qc=QCResult(accepted=True),
        findings=disc_findings(vol.array.shape, threshold=0.95),  # no herniation called: no evidence segment
    )
    output = _lumbar_output(vol, discs)
    output.levels = [levels]
    output.used_series["lumbar_spine.levels"] = [vol.series_uid]
    ds, results = _sr(settings, paths, vol, output)
    level_seg = next(r.dataset for r in results if r.kind == "seg" and r.dataset.get("ContentLabel") == "AI_LEVELS")
    segment_of = {str(s.SegmentLabel): int(s.SegmentNumber) for s in level_seg.SegmentSequence}

    disc_groups = {
        next(str(v) for p, _t, v in g if p.endswith("/Finding Site") and str(v).startswith("Level")): g
        for g in measurement_groups(ds)
        if _value(g, "/Finding") == "Intervertebral disc structure"
    }
    for level, site in (
        ("L4-L5", "Level of L4/L5 intervertebral disc"),
        ("L5-S1", "Level of L5/S1 intervertebral disc"),
    ):
        refs = [v for p, vt, v in disc_groups[site] if vt == "IMAGE" and p.endswith("/Referenced Segment")]
        assert refs == [
            (str(level_seg.SOPClassUID), str(level_seg.SOPInstanceUID), [segment_of[f"{level} intervertebral disc"]])
        ], (level, refs)
    # a disc the levels model did not segment has no region, only its source images
    l34 = disc_groups["Level of L3/L4 intervertebral disc"]
    assert not [v for p, vt, v in l34 if vt == "IMAGE" and p.endswith("/Referenced Segment")]
