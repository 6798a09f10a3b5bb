"""``shoulder.rotator_cuff``: coronal-oblique shoulder -> none / partial-thickness /
full-thickness supraspinatus tear, with the probability of each.

Three classes on one head ("multiclass": balanced accuracy); P(tear) = 1 - P(none) is
reported too. The supraspinatus footprint is lateral on the humeral head, which is on the
left or the right of the image depending on the side and the vendor's row direction, so the
region of interest covers both halves of the field of view.
"""

from __future__ import annotations

from typing import Any, Mapping

from models.tasks.base import Head, InputSpec, NetConfig, TaskSpec


class ShoulderRotatorCuff(TaskSpec):
    name = "shoulder.rotator_cuff"
    anatomy = "shoulder"
    kind = "multiclass"
    version = "1.0.0"
    description = "Supraspinatus tear"
    finding_code = "rotator_cuff_tear"
    site = "supraspinatus tendon"
    # the tendon's critical zone lies within about 40 mm of the centre of a coronal-oblique
    # field of view, above it (rows) and to the side of the humeral head (columns): the whole
    # slice stack, a central 80 x 96 mm in-plane region, on a 24 x 80 x 96 grid (about 1 mm
    # in-plane: partial-thickness defects are 1.5 - 4 mm deep in a 5 - 6 mm tendon)
    input = InputSpec(
        roles=("cor_fluid",), plane="coronal", shape=(24, 80, 96), roi_mm=(None, 80.0, 96.0),
        min_slices=12, slice_spacing_mm=(1.0, 7.0), pixel_spacing_mm=(0.15, 1.6), fov_mm=(100.0, 260.0),
        max_obliquity_deg=50.0, flip_slices_ok=True, mrnet_plane="coronal",
    )
    heads = (Head("cuff", ("none", "partial", "full_thickness"), negative=("none",)),)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)
    phantom_lesion_masks = ("cuff_lesion",)
    phantom_lesion_keys = ("cuff",)
    mrnet_columns = ()

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        return [labels["cuff"]]

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        if not positive:
            return "No supraspinatus tear"
        return {
            "partial": "Partial-thickness supraspinatus tear",
            "full_thickness": "Full-thickness supraspinatus tear",
        }.get(grade or "", "Supraspinatus tear")


TASK = ShoulderRotatorCuff()
