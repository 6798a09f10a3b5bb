"""``knee.meniscus``: sagittal knee -> P(meniscal tear), and which meniscus (medial / lateral).

One head with the classes none / medial / lateral: P(tear) = 1 - P(none), the side is the
more probable positive class. A mirrored knee (flip along the slice axis) is a valid knee of
the other side with the same labels (medial stays medial), so slice flips are a
label-preserving augmentation; the side is told by anatomy (the fibula is lateral, the
medial meniscus is C-shaped with a larger posterior horn), not by the laterality tag.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from models.tasks.base import Head, HeadResult, InputSpec, NetConfig, TaskSpec
from models.types import Finding

SIDES = ("medial", "lateral")


class KneeMeniscus(TaskSpec):
    name = "knee.meniscus"
    anatomy = "knee"
    kind = "binary"
    version = "1.0.0"
    description = "Meniscal tear"
    finding_code = "meniscal_tear"
    site = "meniscus"
    # both menisci lie within about +-30 mm of the centre of a sagittal knee field of view
    # (through-plane), a few mm below its centre (rows) and behind it (columns): a central
    # 80 x 48 x 96 mm region on a 20 x 48 x 96 grid (4 x 1 x 1 mm). Tear lines are about one
    # native pixel thick, so the in-plane grid stays close to the native resolution.
    input = InputSpec(
        roles=("sag_fluid", "sag_pd"), plane="sagittal", shape=(20, 48, 96), roi_mm=(80.0, 48.0, 96.0),
        min_slices=12, slice_spacing_mm=(1.0, 7.0), pixel_spacing_mm=(0.15, 1.6), fov_mm=(90.0, 260.0),
        flip_slices_ok=True, extra_roles=("cor_fluid",), mrnet_plane="sagittal",
    )
    heads = (Head("meniscus", ("none", "medial", "lateral"), negative=("none",)),)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)
    phantom_lesion_masks = ("meniscus_lesion",)
    phantom_lesion_keys = ("meniscus",)
    mrnet_columns = ("meniscus",)

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        if not labels["meniscus_tear"]:
            return ["none"]
        return [labels["meniscus_side"]]

    def findings(self, results: Sequence[HeadResult], *, threshold: float) -> list[Finding]:
        out = super().findings(results, threshold=threshold)
        for f in out:
            if f.positive and f.grade in SIDES:
                f.site = f"{f.grade} meniscus"
        return out

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        if not positive:
            return "No meniscal tear"
        return {"medial": "Medial meniscal tear", "lateral": "Lateral meniscal tear"}.get(grade or "", "Meniscal tear")


TASK = KneeMeniscus()
