"""`LevelsModel`: a sagittal spine series -> named vertebral bodies and discs (`LevelsOutput`).

Checkpoint format ``msknode.levels/1``: ``{"format", "name", "version", "channels", "grid_mm",
"state_dict", "metadata"}``, loaded through `models.protocol.load` like every model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.errors import RegistryError
from models.levels.core import (
    GRID_MM,
    STRUCTURES,
    build_unet,
    name_structures,
    predict_probabilities,
    upsample_labels,
)
from models.tasks.base import InputSpec, TaskSpec
from models.transforms import canonical_layout
from models.types import LevelsOutput, ModelInfo, QCResult, Volume

FORMAT = "msknode.levels/1"
NOTICE = (
    "Research weights trained on real MRI of 17 patients from two public research datasets; not clinically "
    "validated. Not for diagnostic use."
)
MODEL_NAME = "lumbar_spine.levels"
VERSION = "1.0.0"


class LevelsTask(TaskSpec):
    """The input contract of ``lumbar_spine.levels`` (for the QC gate and the card); not a classifier, so it is
    not listed in `models.tasks.TASKS`."""

    name = MODEL_NAME
    anatomy = "lumbar_spine"
    kind = "segmentation"
    version = VERSION
    description = "Vertebral bodies L1-L5 and discs L1-L2 - L5-S1, segmented and named"
    input = InputSpec(
        roles=("sag_t2", "sag_t1", "sag_stir"),
        plane="sagittal",
        shape=(0, 0, 0),  # every slice, in-plane at GRID_MM
        roi_mm=None,
        min_slices=5,
        slice_spacing_mm=(0.8, 7.0),
        pixel_spacing_mm=(0.3, 2.0),
        fov_mm=(160.0, 500.0),
    )

    def card_facts(self) -> dict[str, Any]:
        facts = super().card_facts()
        facts["input"] = {
            "roles": list(self.input.roles),
            "plane": self.input.plane,
            "grid": f"every sagittal slice, in-plane resampled to {GRID_MM:g} mm",
            "min_slices": self.input.min_slices,
        }
        facts["outputs"] = {"labels": list(STRUCTURES)}
        return facts


TASK = LevelsTask()


def canonical_of(volume: Volume) -> tuple[np.ndarray, tuple[int, int, int], tuple[bool, bool, bool]]:
    perm, flips, _ = canonical_layout(volume, "sagittal")
    a = np.transpose(np.asarray(volume.array, np.float32), perm)
    for ax, f in enumerate(flips):
        if f:
            a = np.flip(a, axis=ax)
    return np.ascontiguousarray(a), perm, flips


def from_canonical(array: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    a = array
    for ax, f in enumerate(flips):
        if f:
            a = np.flip(a, axis=ax)
    return np.ascontiguousarray(np.transpose(a, np.argsort(perm)))


def source_index(
    kji: tuple[float, float, float], canonical_shape: tuple[int, ...], perm: tuple[int, int, int], flips
) -> tuple[float, float, float]:
    c = [canonical_shape[t] - 1 - kji[t] if flips[t] else kji[t] for t in range(3)]
    out = [0.0, 0.0, 0.0]
    for t in range(3):
        out[perm[t]] = float(c[t])
    return out[0], out[1], out[2]


@dataclass
class LevelsModel:
    net: torch.nn.Module
    info: ModelInfo
    channels: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: Any = None  # models.qc.QCGate or None (no QC)

    @classmethod
    def new(cls, channels=(16, 32, 64, 128, 128)) -> LevelsModel:
        net = build_unet(channels)
        return cls(net=net, info=_info("", VERSION), channels=tuple(channels))

    @classmethod
    def from_checkpoint(cls, ckpt, *, gate=None, version: str | None = None) -> LevelsModel:
        data = ckpt.data
        if str(data.get("format", "")).split("/")[0] != FORMAT.split("/")[0]:
            raise RegistryError(f"{ckpt.path} is not a {MODEL_NAME} checkpoint")
        channels = tuple(int(c) for c in data["channels"])
        net = build_unet(channels)
        net.load_state_dict(data["state_dict"])
        net.eval()
        meta = dict(data.get("metadata", {}))
        return cls(
            net=net,
            info=_info(ckpt.sha256, version or str(data.get("version", VERSION))),
            channels=channels,
            metadata=meta,
            gate=gate,
        )

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": MODEL_NAME,
            "version": self.info.version,
            "channels": list(self.channels),
            "grid_mm": GRID_MM,
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "metadata": self.metadata,
        }

    def save(self, path) -> str:
        from models.protocol import save_checkpoint

        return save_checkpoint(self.checkpoint(), path)

    # --- inference ------------------------------------------------------------------------------
    def segment_canonical(self, canonical: np.ndarray, spacing: tuple[float, float, float], *, classes: bool = False):
        """(class map or None, Named) of a canonical sagittal stack with (slice, row, col) spacing in mm, both at
        the stack's own pixel grid: classes and names are found on the network grid, then brought back (the
        class map only when ``classes``)."""
        from scipy import ndimage

        _k, h, w = canonical.shape
        probs = predict_probabilities(self.net, canonical, (spacing[1], spacing[2]), out_grid=True)
        gh, gw = probs.shape[-2:]
        classes_grid = np.argmax(probs, axis=1).astype(np.uint8)
        named = name_structures(classes_grid, (spacing[0], spacing[1] * h / gh, spacing[2] * w / gw))
        class_map = upsample_labels(classes_grid, (h, w), 2) if classes else None
        labels = upsample_labels(named.labels, (h, w), len(STRUCTURES))
        ids = [i for i in range(1, len(STRUCTURES) + 1) if STRUCTURES[i - 1] in named.centroids]
        cents = ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, ids) if ids else []
        named.labels = labels
        named.centroids = {}
        for i, c in zip(ids, cents):
            if np.all(np.isfinite(c)):
                named.centroids[STRUCTURES[i - 1]] = (float(c[0]), float(c[1]), float(c[2]))
        c = named.centroids
        if "L5-S1" not in c and "L5" in c and "L4-L5" in c:
            # no L5-S1 disc segmented (the training masks have none): its centre mirrors L4-L5 about L5's centre
            c["L5-S1"] = tuple(2 * a - b for a, b in zip(c["L5"], c["L4-L5"]))  # type: ignore[assignment]
            named.estimated = ("L5-S1",)
        return class_map, named

    def predict(self, volume: Volume, *, check_qc: bool = True) -> LevelsOutput:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        qc = QCResult(True)
        if check_qc and self.gate is not None:
            qc = self.gate.check(volume, TASK)
            timings["qc"] = time.perf_counter() - t0
        if not qc.accepted:
            return LevelsOutput(
                model=self.info,
                series_uid=volume.series_uid,
                qc=qc,
                labels=None,
                structures=STRUCTURES,
                timings=timings,
            )
        t1 = time.perf_counter()
        canon, perm, flips = canonical_of(volume)
        spacing = tuple(float(volume.spacing[p]) for p in perm)
        _classes, named = self.segment_canonical(canon, spacing)  # type: ignore[arg-type]
        labels = from_canonical(named.labels, perm, flips)
        affine = volume.affine()
        centres_vox: dict[str, tuple[int, int, int]] = {}
        centres_mm: dict[str, tuple[float, float, float]] = {}
        for nm, c in named.centroids.items():
            kji = source_index(c, canon.shape, perm, flips)
            centres_vox[nm] = (round(kji[0]), round(kji[1]), round(kji[2]))
            mm = affine @ np.array([kji[0], kji[1], kji[2], 1.0])
            centres_mm[nm] = (round(float(mm[0]), 2), round(float(mm[1]), 2), round(float(mm[2]), 2))
        timings["segmentation"] = time.perf_counter() - t1
        return LevelsOutput(
            model=self.info,
            series_uid=volume.series_uid,
            qc=qc,
            labels=labels,
            structures=STRUCTURES,
            centres_vox=centres_vox,
            centres_mm=centres_mm,
            bodies_found=tuple(named.bodies),
            estimated=tuple(named.estimated),
            timings=timings,
        )


def _info(sha: str, version: str) -> ModelInfo:
    return ModelInfo(
        name=MODEL_NAME,
        version=version,
        weights_sha256=sha,
        task="segmentation",
        anatomy="lumbar_spine",
        demo_weights=True,
        notice=NOTICE,
    )
