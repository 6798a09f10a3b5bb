"""``lumbar_spine.stenosis``: sagittal T2 lumbar spine -> central canal stenosis grade
(normal / mild / moderate / severe) at each disc level L1-L2 ... L5-S1, each level located.

One head per level ("grading": quadratic-weighted kappa per level). Each head has its own
evidence map; on phantoms it is supervised with the canal-narrowing region of its level
(present at every level, normal ones too), so the peak of a level's evidence gives the
level's position (slice, row, column and patient mm) for the SR and the viewer, whatever
its grade. The reported grade is the most probable class; P(stenosis) = 1 - P(normal).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from models.tasks.base import Head, HeadResult, InputSpec, NetConfig, TaskSpec
from models.types import Finding

LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
GRADES = ("normal", "mild", "moderate", "severe")


class LumbarStenosis(TaskSpec):
    name = "lumbar_spine.stenosis"
    anatomy = "lumbar_spine"
    kind = "grading"
    version = "1.0.0"
    description = "Central canal stenosis"
    finding_code = "spinal_stenosis"
    site = "lumbar central canal"
    # the canal runs near the midline slice; L1-L2 ... L5-S1 span about 150 mm head-feet and
    # move by +-15 mm between patients: a central 32 x 224 x 96 mm region (through-plane,
    # head-feet, antero-posterior) on an 8 x 96 x 96 grid (4 x 2.33 x 1 mm: the canal's
    # antero-posterior diameter is what is graded, so that axis stays fine)
    input = InputSpec(
        roles=("sag_t2",), plane="sagittal", shape=(8, 96, 96), roi_mm=(32.0, 224.0, 96.0),
        min_slices=9, slice_spacing_mm=(1.0, 7.0), pixel_spacing_mm=(0.3, 2.0), fov_mm=(200.0, 420.0),
        flip_slices_ok=True, mrnet_plane="sagittal",
    )
    heads = tuple(Head(level, GRADES, negative=("normal",)) for level in LEVELS)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)
    phantom_lesion_masks = tuple(f"narrowing_{level}" for level in LEVELS)
    phantom_lesion_keys = LEVELS
    mrnet_columns = ()

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        grades = labels["stenosis"]
        return [grades[level] for level in LEVELS]

    def findings(self, results: Sequence[HeadResult], *, threshold: float) -> list[Finding]:
        """One finding per level; the grade is the most probable class (normal included)."""
        out = super().findings(results, threshold=threshold)
        for f, r in zip(out, results):
            probs = {c: float(p) for c, p in zip(r.head.classes, r.probabilities)}
            top = max(probs, key=probs.get)
            f.grade = top
            f.positive = top not in r.head.negative
            f.label = self.finding_label(r.head, top, f.positive)
            f.site = f"central canal at {r.head.name}"
        return out

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        if not positive:
            return f"{head.name}: no central canal stenosis"
        return f"{head.name}: {grade} central canal stenosis"


TASK = LumbarStenosis()
