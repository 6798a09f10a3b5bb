"""``knee.acl``: sagittal knee -> P(ACL tear), with intact / partial / complete."""

from __future__ import annotations

from typing import Any, Mapping

from models.tasks.base import Head, InputSpec, NetConfig, TaskSpec


class KneeACL(TaskSpec):
    name = "knee.acl"
    anatomy = "knee"
    kind = "binary"
    version = "1.0.0"
    description = "ACL tear"
    finding_code = "acl_tear"
    site = "anterior cruciate ligament"
    # the intercondylar notch lies near the centre of a sagittal knee field of view: a central
    # 48 x 80 x 80 mm region (through-plane, rows, columns) on a 12 x 64 x 64 grid (4 x 1.25 x 1.25 mm)
    input = InputSpec(
        roles=("sag_fluid", "sag_pd"), plane="sagittal", shape=(12, 64, 64), roi_mm=(48.0, 80.0, 80.0),
        min_slices=12, slice_spacing_mm=(1.0, 7.0), pixel_spacing_mm=(0.15, 1.6), fov_mm=(90.0, 260.0),
        flip_slices_ok=True, mrnet_plane="sagittal",
    )
    heads = (Head("acl", ("intact", "partial", "complete"), negative=("intact",)),)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)
    phantom_lesion_masks = ("acl_lesion",)
    phantom_lesion_keys = ("acl",)
    mrnet_columns = ("acl",)
    # both input roles of contract C3: sag_fluid (PD/T2 fat-sat or STIR) and sag_pd (PD/T1 without fat-sat)
    phantom_sequences = (("PD_FS", 0.5), ("PD", 0.2), ("T1", 0.1), ("T2_FS", 0.1), ("STIR", 0.1))

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        return [labels["acl"]]

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        if not positive:
            return "No ACL tear"
        return {"partial": "Partial ACL tear", "complete": "Complete ACL tear"}.get(grade or "", "ACL tear")


TASK = KneeACL()
