"""``lumbar_spine.discs``: mid-sagittal lumbar spine MRI -> per disc L1-L2 ... L5-S1 the Pfirrmann
grade (1-5) and disc herniation (yes/no), each disc located and named from the image alone.

Unlike the 3-D LesionNet tasks this model is 2-D and two-stage (`models.discs`): a heatmap
localiser finds the five lumbar discs on the mid-sagittal slice of the series (one map per level,
named from the sacrum up), then a grader reads a patch cut around each located disc (Pfirrmann
grade head + herniation head). Its checkpoint format is ``msknode.discs/1``; the registry loads it
through `models.protocol` like every model, and the lumbar pipeline runs it on the sagittal T2
(or T1) series.

Findings per located level (a level whose disc was not found is left out, never invented):

- ``disc_degeneration``: grade "1".."5" (the Pfirrmann grade: the most probable one, or the median of
  the distribution when the model was calibrated so, ``decode``), ``grade_probabilities``
  {"1": p1, ..., "5": p5}, probability = P(grade >= 3), positive = grade >= 3, threshold None;
- ``disc_herniation``: probability = calibrated P(herniation), positive = probability >= the
  model's threshold (chosen on the validation split), grade None.

Both carry ``level``, ``site`` "intervertebral disc <level>" and the disc centre (voxel and mm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.tasks.base import Head, InputSpec, NetConfig, TaskSpec
from models.types import Finding, Volume

LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
GRADES = ("1", "2", "3", "4", "5")
HERNIATION = ("absent", "present")
DEGENERATED_FROM = 3  # Pfirrmann grade at and above which a disc counts as degenerated (triage)


@dataclass
class DiscResult:
    """What the model says about one located disc."""

    level: str  # "L4-L5"
    grade_probabilities: np.ndarray  # (5,) calibrated P(Pfirrmann grade 1..5)
    p_herniation: float  # calibrated P(herniation)
    location: tuple[int, int, int] | None = None  # (slice, row, col) voxel of the disc centre
    location_mm: tuple[float, float, float] | None = None  # patient coordinates of that voxel
    localisation_score: float | None = None  # peak of the level's heatmap, [0, 1]
    grade_std: float | None = None  # std of P(grade >= 3) over test-time views
    herniation_std: float | None = None
    grade: str | None = None  # the grade reported; None = the most probable one


def median_grade(p: np.ndarray) -> str:
    """The median of a grade distribution: the lowest grade whose cumulative probability reaches 1/2."""
    c = np.cumsum(np.asarray(p, dtype=np.float64) / max(float(np.sum(p)), 1e-12))
    idx = int(np.searchsorted(c, 0.5 - 1e-9))
    return GRADES[min(idx, len(GRADES) - 1)]


class LumbarDiscs(TaskSpec):
    name = "lumbar_spine.discs"
    anatomy = "lumbar_spine"
    kind = "grading"
    version = "1.0.0"
    description = "Disc degeneration (Pfirrmann) and disc herniation"
    finding_code = "disc_degeneration"
    herniation_code = "disc_herniation"
    site = "intervertebral disc"
    # the model reads the mid-sagittal slice (the series' central slice); the grid is the localiser's
    input = InputSpec(
        roles=("sag_t2", "sag_t1"),
        plane="sagittal",
        shape=(1, 256, 256),
        roi_mm=None,
        min_slices=3,
        slice_spacing_mm=(0.5, 8.0),
        pixel_spacing_mm=(0.2, 2.0),
        fov_mm=(140.0, 500.0),
        max_obliquity_deg=35.0,
        flip_slices_ok=True,
    )
    # one head per level for the grade; herniation is a second output per level (see findings)
    heads = tuple(Head(level, GRADES, negative=("1", "2")) for level in LEVELS)
    net = NetConfig(channels=(16, 32, 64), dropout=0.2, aux_weight=0.0)

    def build_net(self):
        from models.discs.nets import DiscGrader

        return DiscGrader()

    def network_input(self, volume: Volume, extras: Mapping[str, Volume] | None = None):
        from models.discs.images import volume_midslice

        return volume_midslice(volume)

    def findings(self, results: Sequence[Any], *, threshold: float, volume: Volume | None = None) -> list[Finding]:
        """Two findings per located disc (degeneration, herniation), in level order L1-L2 ... L5-S1.
        ``results``: `DiscResult` per located level; ``threshold``: the herniation threshold."""
        by_level = {r.level: r for r in results}
        out: list[Finding] = []
        for level in LEVELS:
            r = by_level.get(level)
            if r is None:
                continue
            p = np.asarray(r.grade_probabilities, dtype=np.float64)
            p = p / max(float(p.sum()), 1e-12)
            probs = {g: float(v) for g, v in zip(GRADES, p)}
            grade = r.grade if r.grade in GRADES else GRADES[int(np.argmax(p))]
            p_degen = float(p[DEGENERATED_FROM - 1 :].sum())
            site = f"{self.site} {level}"
            loc = None if r.location is None else tuple(int(v) for v in r.location)
            loc_mm = None if r.location_mm is None else tuple(float(v) for v in r.location_mm)
            out.append(
                Finding(
                    code=self.finding_code,
                    label=f"{level}: Pfirrmann grade {grade}",
                    probability=p_degen,
                    uncertainty=None if r.grade_std is None else float(r.grade_std),
                    positive=int(grade) >= DEGENERATED_FROM,
                    threshold=None,
                    grade=grade,
                    grade_probabilities=probs,
                    level=level,
                    site=site,
                    location=loc,  # type: ignore[arg-type]
                    location_mm=loc_mm,  # type: ignore[arg-type]
                )
            )
            ph = float(r.p_herniation)
            positive = ph >= threshold
            out.append(
                Finding(
                    code=self.herniation_code,
                    label=f"{level}: disc herniation" if positive else f"{level}: no disc herniation",
                    probability=ph,
                    uncertainty=None if r.herniation_std is None else float(r.herniation_std),
                    positive=bool(positive),
                    threshold=float(threshold),
                    grade=None,
                    grade_probabilities=None,
                    level=level,
                    site=site,
                    location=loc,  # type: ignore[arg-type]
                    location_mm=loc_mm,  # type: ignore[arg-type]
                )
            )
        return out

    def card_facts(self) -> dict[str, Any]:
        facts = super().card_facts()
        facts["input"]["slice"] = "the series' central (mid-sagittal) slice"
        facts["outputs"] = {
            "levels": list(LEVELS),
            "disc_degeneration": {"grade": list(GRADES), "probability": "P(Pfirrmann grade >= 3)"},
            "disc_herniation": {"probability": "calibrated P(herniation)", "threshold": "chosen on validation"},
        }
        return facts


TASK = LumbarDiscs()
