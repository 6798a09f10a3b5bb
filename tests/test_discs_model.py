"""``lumbar_spine.discs`` through the registry on a real mid-sagittal image: two findings per located
level (Pfirrmann grade, herniation) with the interface the results layer builds on, the discs named and
placed where the dataset's crops put them, the same answer whichever way the series runs; a level the
model did not locate is left out; tampered weights are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.discs.spider import crop_centres, load_spider
from models.errors import WeightsIntegrityError
from models.registry import Registry
from models.tasks import TASKS
from models.tasks.spine_discs import LEVELS, DiscResult, median_grade
from models.types import Volume
from support.spine_corpus import spider_root

pytestmark = [pytest.mark.unit]

NAME = "lumbar_spine.discs"
PATIENT = "4"  # a held-out test patient (CRC32 split) whose crops name all five lumbar discs


def registry() -> Registry:
    reg = Registry()
    if not reg.has_weights(NAME):
        pytest.skip("no lumbar_spine.discs weights installed")
    return reg


def sagittal_volume(png: Path, spacing: tuple[float, float], *, feet_first: bool, slices: int = 5) -> Volume:
    """A sagittal series of ``slices`` copies of a SPIDER image (stored sacrum-up), rows running head to feet
    (or feet to head), columns anterior to posterior, centred on the isocentre, 4 mm apart."""
    img = np.asarray(Image.open(png).convert("L"), dtype=np.float32)[::-1]  # head up
    sr, sc = spacing
    h, w = img.shape
    if feet_first:
        img = img[::-1]
    col = (0.0, 0.0, 1.0) if feet_first else (0.0, 0.0, -1.0)  # direction of increasing row index
    row = (0.0, 1.0, 0.0)  # columns run anterior -> posterior (+y)
    normal = np.cross(row, col)
    z0 = -(h - 1) * sr / 2 if feet_first else (h - 1) * sr / 2
    first = np.array([0.0, -(w - 1) * sc / 2, z0])
    positions = np.array([first + normal * 4.0 * (k - slices // 2) for k in range(slices)])
    return Volume(
        array=np.ascontiguousarray(np.stack([img] * slices)),
        spacing=(4.0, sr, sc),
        positions=positions,
        row_cosine=row,
        col_cosine=col,
        series_uid=f"2.25.{'2' if feet_first else '1'}",
        modality="MR",
        body_part="LSPINE",
    )


@pytest.mark.slow
def test_findings_on_a_real_image_both_slice_orders():
    reg = registry()
    root = spider_root()
    patient = next(p for p in load_spider(root) if p.id == PATIENT)
    assert patient.split == "test"
    series = next(s for s in patient.series if s.sequence == "t2")
    series.centres = crop_centres(root, series, patient.n_graded)
    assert set(series.centres) == set(LEVELS)
    model = reg.get(NAME)
    outs = {}
    for feet_first in (False, True):
        vol = sagittal_volume(series.path, series.spacing, feet_first=feet_first)
        out = model.predict(vol)
        assert out.qc.accepted, out.qc
        outs[feet_first] = (vol, out.findings)
    vol, findings = outs[False]
    assert [(f.code, f.level) for f in findings] == [
        (code, lv) for lv in LEVELS for code in ("disc_degeneration", "disc_herniation")
    ]
    for deg, hern in zip(findings[::2], findings[1::2]):
        lv = deg.level
        assert deg.grade in ("1", "2", "3", "4", "5")
        probs = deg.grade_probabilities
        assert list(probs) == ["1", "2", "3", "4", "5"] and abs(sum(probs.values()) - 1) < 1e-6
        top = max(probs, key=probs.__getitem__)
        assert deg.grade == (median_grade(np.array(list(probs.values()))) if model.decode == "median" else top)
        assert deg.probability == pytest.approx(probs["3"] + probs["4"] + probs["5"])
        assert deg.positive == (int(deg.grade) >= 3) and deg.threshold is None
        assert deg.label == f"{lv}: Pfirrmann grade {deg.grade}" and deg.site == f"intervertebral disc {lv}"
        assert hern.grade is None and hern.threshold == model.threshold and 0 <= hern.probability <= 1
        assert hern.positive == (hern.probability >= model.threshold)
        assert hern.label == (f"{lv}: disc herniation" if hern.positive else f"{lv}: no disc herniation")
        assert hern.site == deg.site and hern.location == deg.location
        # the disc centre: voxel of the central slice, its patient mm, near the crop-derived centre
        k, r, c = deg.location
        assert k == 2
        assert np.allclose(vol.affine() @ np.array([k, r, c, 1.0]), [*deg.location_mm, 1.0], atol=0.01)
        tr, tc = series.centres[lv]
        assert np.hypot((r - tr) * series.spacing[0], (c - tc) * series.spacing[1]) <= 15.0, lv
    # head to feet: L1-L2 highest (patient +z superior), L5-S1 lowest
    z = [f.location_mm[2] for f in findings[::2]]
    assert z == sorted(z, reverse=True)
    # the same series stored feet first: the same discs, grades and places in patient space
    _, flipped = outs[True]
    assert [(f.code, f.level, f.grade) for f in flipped] == [(f.code, f.level, f.grade) for f in findings]
    for a, b in zip(findings, flipped):
        assert np.allclose(a.location_mm, b.location_mm, atol=2.0)
        assert a.probability == pytest.approx(b.probability, abs=0.02)


def test_a_level_not_located_gets_no_finding():
    task = TASKS[NAME]
    probs = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    results = [DiscResult(level=lv, grade_probabilities=probs, p_herniation=0.3) for lv in LEVELS if lv != "L2-L3"]
    findings = task.findings(list(reversed(results)), threshold=0.25)
    assert [f.level for f in findings] == ["L1-L2", "L1-L2", "L3-L4", "L3-L4", "L4-L5", "L4-L5", "L5-S1", "L5-S1"]
    deg, hern = findings[0], findings[1]
    assert deg.grade == "3" and deg.positive and deg.probability == pytest.approx(0.7)
    assert hern.positive and hern.probability == pytest.approx(0.3) and hern.threshold == 0.25
    assert not task.findings(results, threshold=0.5)[1].positive
    # the grade the model reports (e.g. the median of the distribution) wins over the most probable one
    median = DiscResult(level="L4-L5", grade_probabilities=np.array([0.3, 0.05, 0.3, 0.05, 0.3]), p_herniation=0.1)
    assert median_grade(median.grade_probabilities) == "3"
    median.grade = "3"
    (deg, _) = task.findings([median], threshold=0.5)
    assert deg.grade == "3" and deg.label == "L4-L5: Pfirrmann grade 3" and deg.positive


def test_pipeline_runs_it_and_tampered_weights_are_refused(tmp_path):
    from models.pipelines import PIPELINES

    reg = registry()
    assert NAME in PIPELINES["lumbar_spine"].models
    assert PIPELINES["lumbar_spine"].model_roles[NAME] == ("sag_t2", "sag_t1")
    site = tmp_path / "site"
    shutil.copytree(Path(reg.weights_path(NAME)).parent, site / NAME)
    weights = site / NAME / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError):
        Registry(site).get(NAME)
