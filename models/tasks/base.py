"""Task heads: what a model looks at and what it predicts (the inference contract).

A `TaskSpec` describes one classifier/grader of the node (``knee.acl``,
``knee.meniscus``, ``shoulder.rotator_cuff``, ``lumbar_spine.stenosis``):

- ``input``: the roles it takes (preference order, contract C3), the plane, the
  region of interest in mm and the network grid, plus the QC limits for its input;
- ``heads``: one or more classification heads (``acl``: intact/partial/complete; a
  grading model has one head per level), each with the classes that mean "no finding";
- ``kind``: "binary" (P(finding) = 1 - P(negative classes); AUC/sens/spec/ECE),
  "multiclass" (balanced accuracy) or "grading" (quadratic-weighted kappa per head);
- ``net``, ``build_net``, ``network_input``: the network and what it is fed;
- ``findings``: head probabilities -> `Finding` objects for results and triage.

How training and evaluation data (phantoms, MRNet, ``labels.csv``) are labelled for the heads is
the data layer's: `models.labels`. A new model is one file under ``models/tasks/`` defining a
TaskSpec subclass instance named ``TASK`` (add its module to ``models.tasks.TASK_MODULES``) and its
label mapping in `models.labels.LABELS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.types import Finding, Volume


@dataclass(frozen=True)
class Head:
    name: str  # "acl", "L4-L5"
    classes: tuple[str, ...]  # ("intact", "partial", "complete")
    negative: tuple[str, ...] = ()  # classes that mean "no finding"

    @property
    def positive(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c not in self.negative)


@dataclass(frozen=True)
class InputSpec:
    roles: tuple[str, ...]  # preference order (contract C3)
    plane: str  # "sagittal", "coronal", "axial"
    shape: tuple[int, int, int]  # network grid (D, H, W)
    roi_mm: tuple[float | None, float | None, float | None] | None  # central ROI (through, rows, cols) in mm
    # instead of a ROI in mm: sample native voxels, an integer step per axis nearest these mm
    # (transforms.make_native_frame); the grid then covers shape x step x spacing
    native_mm: tuple[float, float, float] | None = None
    min_slices: int = 12
    slice_spacing_mm: tuple[float, float] = (1.0, 7.0)
    pixel_spacing_mm: tuple[float, float] = (0.15, 1.6)
    fov_mm: tuple[float, float] = (80.0, 260.0)  # in-plane field of view accepted
    max_obliquity_deg: float = 35.0  # slice normal vs the plane's axis
    flip_slices_ok: bool = True  # mirroring along the slice axis keeps the labels (augmentation)
    extra_roles: tuple[str, ...] = ()  # optional further inputs (e.g. cor_fluid for the meniscus)
    channels: int = 1  # network input channels (e.g. 2 when an extra role is resampled in as a channel)


@dataclass(frozen=True)
class NetConfig:
    channels: tuple[int, ...] = (16, 24, 48)
    dropout: float = 0.25
    aux_weight: float = 1.0  # weight of the lesion-evidence loss where lesion masks exist


@dataclass
class HeadResult:
    head: Head
    probabilities: np.ndarray  # (n_classes,) calibrated mean over MC samples
    std: np.ndarray  # (n_classes,) std over MC samples
    p_finding: float | None  # 1 - P(negative) for heads with negatives
    p_finding_std: float | None
    heatmap: np.ndarray | None = None  # source geometry, [0, 1]
    peak_vox: tuple[int, int, int] | None = None
    peak_mm: tuple[float, float, float] | None = None


class TaskSpec:
    """Base of every task head. Subclasses set the class attributes and may override the network, its
    input and the findings."""

    name: str = ""
    anatomy: str = ""
    kind: str = "binary"  # "binary" | "multiclass" | "grading"
    version: str = "0"
    description: str = ""
    finding_code: str = ""
    site: str | None = None
    input: InputSpec
    heads: tuple[Head, ...] = ()
    net: NetConfig = NetConfig()

    # --- shapes ---------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return max(len(h.classes) for h in self.heads)

    @property
    def head_sizes(self) -> list[int]:
        return [len(h.classes) for h in self.heads]

    # --- network and its input ---------------------------------------------------------
    channels_last: bool = False  # the network's memory layout (see in_layout)
    # inference averages the network over the series and its mirror along the slice axis (logits, evidence,
    # Grad-CAM and MC-dropout logits; needs input.flip_slices_ok): steadier on lesions a few voxels wide
    flip_tta: bool = False
    patch_pretrain_steps: int = 0  # `msknode train` default for lesion-patch pretraining (training.pretrain_patches)

    def build_net(self):
        """The task's network (default LesionNet); must offer ``features`` / ``forward_head`` like LesionNet."""
        from models.nets import LesionNet

        return self.in_layout(
            LesionNet(self.input.channels, self.head_sizes, channels=self.net.channels, dropout=self.net.dropout)
        )

    def in_layout(self, net):
        """``net`` in the task's memory layout: channels-last-3D when ``channels_last`` (3-D convolutions with few
        channels are many times faster that way on CPU, in training and inference)."""
        import torch

        return net.to(memory_format=torch.channels_last_3d) if self.channels_last else net

    def network_input(self, volume: Volume, extras: Mapping[str, Volume] | None = None):
        """(C, D, H, W) float32 network input and the Frame of the main volume (default: one channel)."""
        from models.transforms import preprocess

        return preprocess(volume, self.input.shape, self.input.roi_mm, self.input.plane)

    # --- outputs ----------------------------------------------------------------------
    def positive_class(self, result: HeadResult, volume: Volume | None = None) -> str:
        """Which positive class a positive finding of a head with negatives reports: the most probable one.
        A task may decide it otherwise (e.g. from where the finding lies)."""
        probs = dict(zip(result.head.classes, result.probabilities))
        return max(result.head.positive, key=lambda c: float(probs[c]))

    def findings(
        self, results: Sequence[HeadResult], *, threshold: float, volume: Volume | None = None
    ) -> list[Finding]:
        """One Finding per head (negative ones too: the SR reports 'evaluated, absent')."""
        out = []
        for r in results:
            probs = {c: float(p) for c, p in zip(r.head.classes, r.probabilities)}
            if r.p_finding is not None:
                p = float(r.p_finding)
                positive = p >= threshold
                grade = self.positive_class(r, volume) if positive else None
            else:
                top = max(probs, key=probs.__getitem__)
                p = None
                positive = top not in r.head.negative
                grade = top
            out.append(
                Finding(
                    code=self.finding_code,
                    label=self.finding_label(r.head, grade, positive),
                    probability=p,
                    uncertainty=None if r.p_finding_std is None else float(r.p_finding_std),
                    positive=bool(positive),
                    threshold=threshold if r.p_finding is not None else None,
                    grade=grade,
                    grade_probabilities=probs,
                    level=r.head.name if len(self.heads) > 1 else None,
                    site=self.site,
                    location=r.peak_vox,
                    location_mm=r.peak_mm,
                    heatmap=r.heatmap,
                )
            )
        return out

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        return f"{self.description}: {'positive' if positive else 'negative'}" + (f" ({grade})" if grade else "")

    def score_of(self, head_index: int) -> str:
        """What the saliency explains: "finding" (log-odds of the positive classes) or "top" (top class)."""
        return "finding" if self.heads[head_index].negative else "top"

    def head_saliency(self, head_index: int, cam: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """Feature-grid saliency of one head from its Grad-CAM (d, h, w) and the logits of its own evidence
        map (same grid). Default: the Grad-CAM; a task may confine it to where the head looks."""
        return cam

    def card_facts(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.kind,
            "anatomy": self.anatomy,
            "description": self.description,
            "input": {
                "roles": list(self.input.roles),
                "extra_roles": list(self.input.extra_roles),
                "plane": self.input.plane,
                "grid": list(self.input.shape),
                "roi_mm": None if self.input.roi_mm is None else list(self.input.roi_mm),
                "native_mm": None if self.input.native_mm is None else list(self.input.native_mm),
                "min_slices": self.input.min_slices,
            },
            "outputs": {h.name: list(h.classes) for h in self.heads},
        }


def attention_confined(cam: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """Grad-CAM confined to where a head looks: ``attention * (0.05 + cam / max cam)``, with
    ``attention = exp(evidence - max evidence)`` the head's own attention-pooling weight (LesionNet
    pools its features with softmax(evidence), trained on the lesion mask); the attention alone
    where Grad-CAM is empty."""
    e = np.asarray(evidence, np.float64)
    attention = np.exp(e - e.max()).astype(np.float32)
    top = float(np.max(cam)) if cam.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return attention
    return (attention * (0.05 + np.asarray(cam, np.float32) / top)).astype(np.float32)


def volume_peak(
    volume: Volume, heat: np.ndarray
) -> tuple[tuple[int, int, int], tuple[float, float, float]] | tuple[None, None]:
    if heat is None or not np.isfinite(heat).all() or float(heat.max()) <= 0:
        return None, None
    kji = np.unravel_index(int(np.argmax(heat)), heat.shape)
    mm = volume.affine() @ np.array([kji[0], kji[1], kji[2], 1.0])
    x, y, z = (round(float(v), 2) for v in mm[:3])
    return (int(kji[0]), int(kji[1]), int(kji[2])), (x, y, z)
