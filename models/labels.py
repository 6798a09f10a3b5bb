"""Labels: how training and evaluation data become targets for a task's heads.

A `TaskSpec` (`models.tasks`) is the inference contract of a model: its input, heads, network
and findings. How data is labelled for it lives here, in the data layer, one `TaskLabels` per
task (`LABELS`, `labels_for`):

- phantoms (`models.phantoms`): the exact per-head label (``phantom_labels``), the lesion masks
  (``lesion_masks``) and lesion centres (``lesion_keys``) for the evidence loss and the saliency
  hit rate, the contrast drawn per seed (``phantom_sequences``) and extra-role series
  (``phantom_extras``);
- MRNet (``mrnet:PATH``): the CSV column per head (``mrnet_columns``), the stack that feeds the
  model (``mrnet_plane``) and the spacing assumed for stacks without geometry;
- ``labels.csv`` of a DICOM folder (``dicomcsv:``) or of an images folder (``images:``, `models.images`):
  one column per head name.

A label value becomes the set of classes it allows on a head (`allowed_for`): a class name, an
index, or 0/1 (no finding / finding) on a head with negative classes; unknown allows every class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.tasks.base import Head, TaskSpec
from models.tasks.spine_stenosis import LEVELS
from models.types import Volume

_TRUE = {"1", "true", "yes", "y", "positive", "pos", "tear", "torn", "present"}
_FALSE = {"0", "false", "no", "n", "negative", "neg", "none", "absent", "normal", "intact"}


@dataclass
class Target:
    """Training/evaluation target of one case."""

    allowed: np.ndarray  # (n_heads, n_classes_max) bool; a row of all True = unknown label
    lesion: np.ndarray | None = None  # source-shaped float mask (n_heads, k, j, i) or None
    lesion_centers_mm: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # head -> mm
    info: dict[str, Any] = field(default_factory=dict)  # e.g. exact labels for reports


def allowed_for(head: Head, value: Any) -> np.ndarray:
    """Boolean mask over the classes of ``head`` compatible with a label value (class name, index, or 0/1
    for a head with negative classes)."""
    mask = np.zeros(len(head.classes), dtype=bool)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        mask[:] = True
        return mask
    text = str(value).strip().lower()
    if text == "" or text in {"?", "na", "nan", "unknown"}:
        mask[:] = True
        return mask
    lowered = [c.lower() for c in head.classes]
    if text in lowered:
        mask[lowered.index(text)] = True
        return mask
    if head.negative and text in _TRUE:
        mask[[head.classes.index(c) for c in head.positive]] = True
        return mask
    if head.negative and text in _FALSE:
        mask[[head.classes.index(c) for c in head.negative]] = True
        return mask
    try:
        idx = int(float(text))
    except ValueError:
        idx = -1
    if not head.negative and 0 <= idx < len(head.classes):
        mask[idx] = True
        return mask
    raise ValueError(f"label {value!r} is not one of {', '.join(head.classes)} (or 0/1) for {head.name!r}")


class TaskLabels:
    """The label mapping of one task. Subclasses set the class attributes and ``phantom_labels``."""

    task_name: str = ""
    lesion_masks: tuple[str, ...] = ()  # phantom mask name per head (same order as the heads)
    lesion_keys: tuple[str, ...] = ()  # key in phantom.labels["lesion_centers_mm"] per head
    mrnet_columns: tuple[str, ...] = ()  # MRNet csv name per head ("acl" -> train-acl.csv)
    mrnet_plane: str = "sagittal"  # which MRNet stack feeds the model
    mrnet_spacing_mm: tuple[float, float, float] = (3.0, 0.625, 0.625)  # MRNet .npy carry no geometry
    # contrasts of the task's input roles, drawn per phantom seed (name, weight); () = the spec's default sequence
    phantom_sequences: tuple[tuple[str, float], ...] = ()

    def __init__(self, task: TaskSpec) -> None:
        self.task = task

    # --- phantoms ---------------------------------------------------------------------
    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        """Per-head label value from phantom labels."""
        raise NotImplementedError

    def phantom_overrides(self) -> dict[str, Any]:
        """Overrides passed to ``models.phantoms.generate`` for this task's phantoms (every seed)."""
        return {}

    def phantom_overrides_for(self, seed: int) -> dict[str, Any]:
        """Overrides for one seed: ``phantom_overrides()`` plus the contrast drawn from ``phantom_sequences``."""
        ov = dict(self.phantom_overrides())
        if self.phantom_sequences and "sequence" not in ov:
            names = [n for n, _ in self.phantom_sequences]
            w = np.asarray([float(x) for _, x in self.phantom_sequences])
            rng = np.random.default_rng([int(seed), 4242])
            ov["sequence"] = names[int(rng.choice(len(names), p=w / w.sum()))]
        return ov

    def phantom_extras(self, phantom: Any, seed: int) -> dict[str, Volume]:
        """Extra-role volumes for a phantom case (default none)."""
        return {}

    def empty_allowed(self) -> np.ndarray:
        """(n_heads, n_classes_max): every class of each head allowed (an unknown label)."""
        a = np.zeros((len(self.task.heads), self.task.n_classes), dtype=bool)
        for i, h in enumerate(self.task.heads):
            a[i, : len(h.classes)] = True
        return a

    def target_from_phantom(self, phantom: Any) -> Target:
        task = self.task
        allowed = self.empty_allowed() & False
        values = self.phantom_labels(phantom.labels)
        for i, (h, v) in enumerate(zip(task.heads, values)):
            allowed[i, : len(h.classes)] = allowed_for(h, v)
        lesion = None
        if self.lesion_masks:
            shape = phantom.volume.array.shape
            lesion = np.stack(
                [np.asarray(phantom.masks.get(m, np.zeros(shape, bool)), dtype=np.float32) for m in self.lesion_masks]
            )
        centers: dict[str, tuple[float, float, float]] = {}
        lc = phantom.labels.get("lesion_centers_mm", {}) or {}
        for h, key in zip(task.heads, self.lesion_keys):
            if key in lc:
                x, y, z = (float(v) for v in lc[key])
                centers[h.name] = (x, y, z)
        info = {h.name: v for h, v in zip(task.heads, values)}
        return Target(allowed=allowed, lesion=lesion, lesion_centers_mm=centers, info=info)

    # --- MRNet and labels.csv rows ----------------------------------------------------
    def target_from_row(self, row: Mapping[str, Any]) -> Target:
        """From a labels.csv row (column per head name) or MRNet labels (keys = mrnet_columns)."""
        allowed = self.empty_allowed() & False
        info = {}
        for i, h in enumerate(self.task.heads):
            keys = [h.name]
            if i < len(self.mrnet_columns):
                keys.append(self.mrnet_columns[i])
            value = next((row[k] for k in keys if k in row), None)
            allowed[i, : len(h.classes)] = allowed_for(h, value)
            info[h.name] = value
        return Target(allowed=allowed, info=info)


# --- the tasks ------------------------------------------------------------------------------------

# both input roles of contract C3: sag_fluid (PD/T2 fat-sat or STIR) and sag_pd (PD/T1 without fat-sat)
SAGITTAL_KNEE_SEQUENCES = (("PD_FS", 0.5), ("PD", 0.2), ("T1", 0.1), ("T2_FS", 0.1), ("STIR", 0.1))


class KneeACLLabels(TaskLabels):
    task_name = "knee.acl"
    lesion_masks = ("acl_lesion",)
    lesion_keys = ("acl",)
    mrnet_columns = ("acl",)
    phantom_sequences = SAGITTAL_KNEE_SEQUENCES

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        return [labels["acl"]]


class KneeMeniscusLabels(TaskLabels):
    task_name = "knee.meniscus"
    lesion_masks = ("meniscus_lesion",)
    lesion_keys = ("meniscus",)
    mrnet_columns = ("meniscus",)
    phantom_sequences = SAGITTAL_KNEE_SEQUENCES
    coronal_sequences = ("PD_FS", "T2_FS")  # cor_fluid
    coronal_share = 3  # phantom seeds divisible by this get a coronal series (the second input channel)

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        if not labels["meniscus_tear"]:
            return ["none"]
        return [labels["meniscus_side"]]

    def phantom_extras(self, phantom: Any, seed: int) -> dict[str, Volume]:
        """A coronal fluid-sensitive series (PD or T2 fat-sat) of the same knee for every ``coronal_share``-th seed."""
        if int(seed) % self.coronal_share != 0:
            return {}
        from models.phantoms import generate
        from models.tasks.knee_meniscus import CORONAL_ROLE

        rng = np.random.default_rng([int(seed), 4343])
        sequence = self.coronal_sequences[int(rng.integers(len(self.coronal_sequences)))]
        cor = generate(
            "knee", int(seed), **{**self.phantom_overrides(), "orientation": "coronal", "sequence": sequence}
        )
        return {CORONAL_ROLE: cor.volume}


class ShoulderRotatorCuffLabels(TaskLabels):
    task_name = "shoulder.rotator_cuff"
    lesion_masks = ("cuff_lesion",)
    lesion_keys = ("cuff",)
    mrnet_plane = "coronal"
    # the input role cor_fluid: coronal-oblique T2 or PD fat-sat (or STIR)
    phantom_sequences = (("T2_FS", 0.5), ("PD_FS", 0.35), ("STIR", 0.15))

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        return [labels["cuff"]]


LEVEL_RADIUS_MM = 7.0  # radius of the level-location ball (about half the canal's AP diameter)


def level_ball(volume: Volume, centre_kji: Sequence[float], radius_mm: float = LEVEL_RADIUS_MM) -> np.ndarray:
    """Boolean mask (volume shape) of the voxels within ``radius_mm`` of a voxel-index centre."""
    shape = volume.array.shape
    mask = np.zeros(shape, dtype=bool)
    sl = []
    for a in range(3):
        r = int(np.ceil(radius_mm / volume.spacing[a]))
        c = round(float(centre_kji[a]))
        sl.append(slice(max(0, c - r), min(shape[a], c + r + 1)))
    if any(s.start >= s.stop for s in sl):
        return mask
    grids = np.meshgrid(
        *[(np.arange(s.start, s.stop) - float(centre_kji[a])) * volume.spacing[a] for a, s in enumerate(sl)],
        indexing="ij",
    )
    mask[tuple(sl)] = sum(g * g for g in grids) <= radius_mm * radius_mm
    return mask


class LumbarStenosisLabels(TaskLabels):
    """Exact grades per level; the lesion map of each level head is a ball around its canal centre
    (``level_centers_vox``: present at every level, normal ones too), so each head learns to pool the
    canal at its own level and the peak of its evidence map locates the level."""

    task_name = "lumbar_spine.stenosis"
    lesion_keys = LEVELS

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        grades = labels["stenosis"]
        return [grades[level] for level in LEVELS]

    def target_from_phantom(self, phantom: Any) -> Target:
        target = super().target_from_phantom(phantom)
        centres = phantom.labels["level_centers_vox"]
        target.lesion = np.stack([level_ball(phantom.volume, centres[level]).astype(np.float32) for level in LEVELS])
        return target


class LumbarDiscsLabels(TaskLabels):
    """``lumbar_spine.discs`` learns from real gradings only: SPIDER-layout folders (``spider:PATH``), read by
    `models.discs.spider` (IVD label 1 = L5-S1 ... 5 = L1-L2; Pfirrmann grade, herniation, narrowing,
    bulging per disc). There are no phantom labels for it."""

    task_name = "lumbar_spine.discs"

    def phantom_labels(self, labels: Mapping[str, Any]) -> list[Any]:
        raise ValueError("lumbar_spine.discs has no phantom labels; it trains on spider:PATH (models.discs.spider)")


#: task name -> its label mapping
LABELS: dict[str, type[TaskLabels]] = {
    cls.task_name: cls
    for cls in (KneeACLLabels, KneeMeniscusLabels, ShoulderRotatorCuffLabels, LumbarStenosisLabels, LumbarDiscsLabels)
}


def labels_for(task: TaskSpec) -> TaskLabels:
    """The label mapping of ``task`` (`LABELS`)."""
    try:
        cls = LABELS[task.name]
    except KeyError:
        raise KeyError(f"no label mapping for {task.name!r} in models.labels.LABELS") from None
    return cls(task)
