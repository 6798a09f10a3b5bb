"""``knee.acl``: sagittal knee -> P(ACL tear), with intact / partial / complete."""

from __future__ import annotations

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
        roles=("sag_fluid", "sag_pd"),
        plane="sagittal",
        shape=(12, 64, 64),
        roi_mm=(48.0, 80.0, 80.0),
        min_slices=12,
        slice_spacing_mm=(1.0, 7.0),
        pixel_spacing_mm=(0.15, 1.6),
        fov_mm=(90.0, 260.0),
        flip_slices_ok=True,
    )
    heads = (Head("acl", ("intact", "partial", "complete"), negative=("intact",)),)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        if not positive:
            return "No ACL tear"
        return {"partial": "Partial ACL tear", "complete": "Complete ACL tear"}.get(grade or "", "ACL tear")


TASK = KneeACL()
