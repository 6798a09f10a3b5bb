"""``lumbar_spine.stenosis``: sagittal T2 lumbar spine -> central canal stenosis grade
(normal / mild / moderate / severe) at each disc level L1-L2 ... L5-S1, each level located.

One head per level ("grading": quadratic-weighted kappa per level). Each head has its own
evidence map; on phantoms it is supervised with a ball around the canal centre of its disc
level (``level_centers_vox``: present at every level, normal ones too; `models.labels`), so each head pools
the canal at its own level and the peak of its map gives the level's position (slice, row,
column and patient mm) for the SR and the viewer, whatever its grade. The saliency map of a level is its
Grad-CAM confined to the head's attention (``head_saliency``). The reported grade
is the most probable class; P(stenosis) = 1 - P(normal).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from models.nets import LesionNet
from models.tasks.base import Head, HeadResult, InputSpec, NetConfig, TaskSpec, attention_confined
from models.types import Finding, Volume

LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
GRADES = ("normal", "mild", "moderate", "severe")


class LevelContextNet(LesionNet):
    """LesionNet with the context to tell the disc levels apart.

    A level is recognised by counting from the sacrum and the conus, 30 - 150 mm away,
    which is beyond LesionNet's receptive field. Two dilated convolutions (in-plane
    dilation 2 and 4) on the coarsest map (1/8 in-plane) see the whole region of interest,
    and the fused feature map F also gets the normalised (row, column) position of each
    voxel. ``features`` / ``forward_head`` / evidence maps are LesionNet's, so saliency and
    MC-dropout uncertainty work unchanged.
    """

    def __init__(self, in_channels, head_sizes, channels=(16, 24, 48), dropout=0.25):
        super().__init__(in_channels, head_sizes, channels=channels, dropout=dropout)
        _c1, c2, c3 = (int(c) for c in channels)

        def conv(cin, cout, k=3, dil=1):
            pad = tuple((kk // 2) * d for kk, d in zip((k, k, k) if isinstance(k, int) else k, (1, dil, dil)))
            return Convolution(
                3, cin, cout, kernel_size=k, dilation=(1, dil, dil), padding=pad, act="relu", norm="batch"
            )

        self.context = nn.Sequential(conv(c3, c3, dil=2), conv(c3, c3, dil=4))
        self.fuse = Convolution(3, c2 + c3 + 2, c2, kernel_size=1, act="relu", norm="batch")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.down2(self.stem(self.s2d(x)))
        s3 = self.down3(s2)
        s3 = s3 + self.context(s3)
        up = F.interpolate(s3, size=s2.shape[2:], mode="nearest")
        b, _, d, h, w = s2.shape
        rows = torch.linspace(-1.0, 1.0, h, dtype=s2.dtype).view(1, 1, 1, h, 1).expand(b, 1, d, h, w)
        cols = torch.linspace(-1.0, 1.0, w, dtype=s2.dtype).view(1, 1, 1, 1, w).expand(b, 1, d, h, w)
        return self.fuse(torch.cat([s2, up, rows, cols], dim=1))


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
        roles=("sag_t2",),
        plane="sagittal",
        shape=(8, 96, 96),
        roi_mm=(32.0, 224.0, 96.0),
        min_slices=9,
        slice_spacing_mm=(1.0, 7.0),
        pixel_spacing_mm=(0.3, 2.0),
        fov_mm=(200.0, 420.0),
        flip_slices_ok=True,
    )
    heads = tuple(Head(level, GRADES, negative=("normal",)) for level in LEVELS)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)
    channels_last = True

    def build_net(self) -> LevelContextNet:
        """LevelContextNet (wider context, to tell the levels apart) in the task's layout."""
        return self.in_layout(
            LevelContextNet(self.input.channels, self.head_sizes, channels=self.net.channels, dropout=self.net.dropout)
        )

    def head_saliency(self, head_index: int, cam: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """Grad-CAM confined to where the head looks (`attention_confined`). Grad-CAM weighs the shared
        feature map with one weight per channel, so on its own it peaks at the most narrowed canal
        whichever level asks; the attention of each level head is trained to sit on its level ball.
        Where Grad-CAM is empty (a normal level has no positive evidence for stenosis) the map is the
        attention, so every level's map peaks at its level."""
        return attention_confined(cam, evidence)

    def findings(
        self, results: Sequence[HeadResult], *, threshold: float, volume: Volume | None = None
    ) -> list[Finding]:
        """One finding per level; the grade is the most probable class (normal included)."""
        out = super().findings(results, threshold=threshold, volume=volume)
        for f, r in zip(out, results):
            probs = {c: float(p) for c, p in zip(r.head.classes, r.probabilities)}
            top = max(probs, key=probs.__getitem__)
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
