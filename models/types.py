"""The types that cross the `models` boundary.

`node` hands `models` a `Volume` per input series (built by `models.io`), and gets back
plain results: `ModelOutput` (QC outcome, findings with probabilities, uncertainty,
grades and heatmaps) and `SuperResOutput`. Nothing here knows about DICOM networking,
the database or Celery.

Array conventions: a volume is ``(slices, rows, cols)`` = ``(k, j, i)``, float32,
slices sorted by position along the slice normal (ascending). ``spacing`` is
``(slice_spacing, row_spacing, col_spacing)`` in mm. ``row_cosine``/``col_cosine``
are the DICOM ImageOrientationPatient halves and ``normal = cross(row, col)``;
``positions[k]`` is ImagePositionPatient of slice k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

NOT_FOR_DIAGNOSTIC_USE = "Demo weights trained on synthetic phantoms only. Not for diagnostic use."


@dataclass(frozen=True)
class Volume:
    array: np.ndarray  # (slices, rows, cols) float32
    spacing: tuple[float, float, float]  # (slice, row, col) in mm
    positions: np.ndarray  # (slices, 3) ImagePositionPatient per slice, mm
    row_cosine: tuple[float, float, float]
    col_cosine: tuple[float, float, float]
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str | None = None
    sop_class_uid: str | None = None
    # source of every slice: SOP Instance UID and, for multi-frame objects, the frame number (1-based)
    sop_instance_uids: tuple[str, ...] = ()
    frame_numbers: tuple[int | None, ...] = ()
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    laterality: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)  # extra header facts (e.g. sequence, TR/TE)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_cosine), np.asarray(self.col_cosine))

    def affine(self) -> np.ndarray:
        """4x4 matrix from voxel index (k, j, i, 1) to patient coordinates (x, y, z, 1) in mm."""
        a = np.eye(4)
        n = self.normal
        if len(self.positions) > 1:
            step = (np.asarray(self.positions[-1]) - np.asarray(self.positions[0])) / (len(self.positions) - 1)
        else:
            step = n * self.spacing[0]
        a[:3, 0] = step
        a[:3, 1] = np.asarray(self.col_cosine) * self.spacing[1]
        a[:3, 2] = np.asarray(self.row_cosine) * self.spacing[2]
        a[:3, 3] = np.asarray(self.positions[0])
        return a


@dataclass(frozen=True)
class ModelInfo:
    name: str  # e.g. "knee.acl"
    version: str
    weights_sha256: str
    task: str  # "binary", "multiclass", "grading", "superres"
    anatomy: str  # "knee", "shoulder", "lumbar_spine"
    demo_weights: bool = True
    notice: str = NOT_FOR_DIAGNOSTIC_USE


@dataclass(frozen=True)
class QCResult:
    accepted: bool
    reason: str | None = None  # a reason code, e.g. "wrong_anatomy", "too_few_slices", "low_snr"
    message: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Finding:
    code: str  # "acl_tear", "meniscal_tear", "rotator_cuff_tear", "spinal_stenosis"
    label: str  # human text, e.g. "Complete ACL tear"
    probability: float | None  # P(finding present); None where not evaluated
    uncertainty: float | None  # std of the probability (MC dropout / ensemble)
    positive: bool  # probability at or above the model's reporting threshold
    threshold: float | None = None
    grade: str | None = None  # e.g. "partial", "complete", "full_thickness", "severe"
    grade_probabilities: dict[str, float] | None = None
    level: str | None = None  # vertebral level, e.g. "L4-L5"
    site: str | None = None  # e.g. "anterior cruciate ligament", "medial meniscus"
    location: tuple[int, int, int] | None = None  # (slice, row, col) voxel of the peak evidence
    location_mm: tuple[float, float, float] | None = None  # patient coordinates of that voxel
    heatmap: np.ndarray | None = None  # saliency in the input geometry, [0, 1], shape of the volume


@dataclass
class ModelOutput:
    model: ModelInfo
    series_uid: str
    qc: QCResult
    findings: list[Finding]  # empty when QC refused the input
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step

    @property
    def evaluated(self) -> bool:
        return self.qc.accepted


@dataclass
class SuperResOutput:
    model: ModelInfo
    source: Volume
    volume: Volume  # the super-resolved volume, new geometry, same frame of reference
    qc: QCResult
    consistency_error: float  # relative RMS difference between degrade(output) and the input
    consistency_tolerance: float
    consistency_passed: bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class LevelsOutput:
    """Vertebral bodies and discs of a sagittal spine series, named (``lumbar_spine.levels``)."""

    model: ModelInfo
    series_uid: str
    qc: QCResult
    # (slices, rows, cols) uint8 in the input geometry: 0 background, else 1 + index into ``structures``
    labels: np.ndarray | None
    structures: tuple[str, ...]  # ("L1", ..., "L5", "L1-L2", ..., "L5-S1")
    centres_vox: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # structure -> (slice, row, col)
    centres_mm: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # patient coordinates
    bodies_found: tuple[str, ...] = ()  # every body found head -> feet (may include T12, T11 ...)
    estimated: tuple[str, ...] = ()  # centres placed without voxels in ``labels`` (e.g. L5-S1 from L4-L5 and L5)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def found(self) -> tuple[str, ...]:
        """The named structures present in ``labels``."""
        return tuple(s for s in self.structures if s in self.centres_vox and s not in self.estimated)


@dataclass
class PipelineOutput:
    pipeline: str  # "knee", "shoulder", "lumbar_spine"
    outputs: list[ModelOutput]
    superres: list[SuperResOutput]
    used_series: dict[str, list[str]]  # model name -> series UIDs it took as input
    timings: dict[str, float] = field(default_factory=dict)
    levels: list[LevelsOutput] = field(default_factory=list)  # vertebra / disc segmentation (lumbar spine)
