"""``shoulder.rotator_cuff``: coronal-oblique shoulder -> none / partial-thickness /
full-thickness supraspinatus tear, with the probability of each.

Three classes on one head ("multiclass": balanced accuracy); P(tear) = 1 - P(none) is
reported too. The supraspinatus footprint is lateral on the humeral head, which is on the
left or the right of the image depending on the side and the vendor's row direction, so the
region of interest covers both halves of the field of view.
"""

from __future__ import annotations

from collections.abc import Mapping

from models.tasks.base import Head, InputSpec, NetConfig, TaskSpec
from models.tasks.knee_meniscus import offset_frame
from models.transforms import make_frame, robust_scale
from models.types import Volume

ROI_OFFSET_MM = (0.0, -14.0, 0.0)  # region-of-interest centre from the field-of-view centre (canonical axes)


class ShoulderRotatorCuff(TaskSpec):
    name = "shoulder.rotator_cuff"
    anatomy = "shoulder"
    kind = "multiclass"
    version = "1.0.0"
    description = "Supraspinatus tear"
    finding_code = "rotator_cuff_tear"
    site = "supraspinatus tendon"
    # the tendon and its tears lie within +-15 mm of the centre slice, 0 - 35 mm above the
    # centre of the field of view (rows) and 15 - 41 mm to the side of it, left or right
    # (columns): a 48 x 56 x 88 mm region moved ROI_OFFSET_MM (14 mm up) from the centre, on a
    # 12 x 64 x 96 grid (4 x 0.88 x 0.92 mm: partial-thickness defects are 1.5 - 4 mm deep in a
    # 5 - 6 mm tendon)
    input = InputSpec(
        roles=("cor_fluid",),
        plane="coronal",
        shape=(12, 64, 96),
        roi_mm=(48.0, 56.0, 88.0),
        min_slices=12,
        slice_spacing_mm=(1.0, 7.0),
        pixel_spacing_mm=(0.15, 1.6),
        fov_mm=(100.0, 260.0),
        max_obliquity_deg=50.0,
        flip_slices_ok=True,
    )
    heads = (Head("cuff", ("none", "partial", "full_thickness"), negative=("none",)),)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)
    channels_last = True

    def network_input(self, volume: Volume, extras: Mapping[str, Volume] | None = None):
        """(1, D, H, W): the coronal-oblique series on the grid of the (moved) region of interest."""
        spec = self.input
        frame = offset_frame(make_frame(volume, spec.shape, spec.roi_mm, spec.plane), ROI_OFFSET_MM)
        return robust_scale(frame.to_grid(volume.array))[None], frame

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        if not positive:
            return "No supraspinatus tear"
        return {
            "partial": "Partial-thickness supraspinatus tear",
            "full_thickness": "Full-thickness supraspinatus tear",
        }.get(grade or "", "Supraspinatus tear")


TASK = ShoulderRotatorCuff()
