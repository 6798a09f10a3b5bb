"""QC / out-of-distribution gate: run before every model; refuse with a reason code.

Checks, cheapest first (the first failure is reported; every metric computed so far is
returned in ``QCResult.metrics``):

| reason code          | check                                                                  |
|----------------------|------------------------------------------------------------------------|
| wrong_modality       | Modality is present and not MR                                          |
| missing_geometry     | no ImagePositionPatient/ImageOrientationPatient (geometry assumed)      |
| localizer            | ImageType LOCALIZER/SCOUT, or a localizer/scout/survey description      |
| too_few_slices       | fewer slices than the model needs (InputSpec.min_slices)               |
| extreme_spacing      | slice spacing, pixel spacing or in-plane field of view out of range     |
| wrong_orientation    | slice normal too far from the model's plane (header geometry)          |
| empty_image          | (almost) no signal above the noise: nothing imaged                      |
| constant_image       | no variation in the pixels                                              |
| low_snr              | estimated SNR (median foreground / noise sigma) below ``min_snr``       |
| wrong_anatomy        | the anatomy classifier is confident the pixels show another body part   |
| wrong_orientation    | ... or very confident they show the right body part in another plane   |
| out_of_distribution  | the classifier's embedding is far from everything it was trained on    |
| motion               | the motion detector sees ghosting beyond the phantom spec              |
| qc_unavailable       | the anatomy classifier's weights are missing                           |

Who decides what: the plane comes from the header geometry (the slice normal). The anatomy
is the one the series was routed for (BodyPartExamined / routing); the pixel classifier
contradicts it when it is confident — P(another anatomy or "other") at or above
``contradiction_threshold`` — and the gate also refuses pixels that give the claimed anatomy
almost no support (P below ``support_threshold``: not recognisable as that anatomy) or whose
embedding lies far from its training data (``ood_threshold``, Mahalanobis distance). The pixels contradict the
header's plane only when very confident (``plane_threshold``). The four thresholds are
calibrated leave-one-source-out on real MRI (`models.qc_evaluation`) and stored with the
weights; `decide` is the rule.

The anatomy classifier (`AnatomyClassifier`, registry name ``qc.anatomy``) is a small
2-D CNN on a few central slices of the series (`anatomy_input`), each resampled over its
whole in-plane field of view (field-of-view relative: screen exports have no spacing),
after a border band is blanked (`mask_overlay`: burned-in orientation letters, slice
counters and scroll bars of screen exports lie there; every input is masked the same way,
in training and at inference). Slice logits are averaged. Classes: knee, shoulder and
lumbar spine in each of three planes, and "other". It learned from phantoms, synthetic
other anatomy (`models.negatives`) and real MRI (`models.realdata`; the training code is
`models.qc_training`). Out-of-distribution inputs are also caught by the Mahalanobis
distance of the series embedding to the class means of the claimed anatomy.

The package keeps inference apart from training:

- `gate`: `QCGate`, `decide`, `Thresholds`, `PixelVerdict`, the header checks and pixel statistics,
  `REASONS`;
- `classifier`: `AnatomyClassifier` (inference; its checkpoint through `models.protocol`);
- `net`: `AnatomyNet`, `MotionNet` and the classes;
- `preprocess`: what the networks read (`anatomy_input`, `mask_overlay`, `fov_slices`, `motion_input`);
- `motion_training`: `train_motion`, `attach_motion_detector`, `add_ghosting` and the training data
  constants (imported only to train; its names are re-exported here lazily).
"""

from __future__ import annotations

from typing import Any

from models.qc.classifier import AnatomyClassifier
from models.qc.gate import (
    BODY_PARTS,
    REASONS,
    PixelVerdict,
    QCGate,
    Thresholds,
    decide,
    header_anatomy,
    noise_sigma,
    pixel_metrics,
)
from models.qc.net import ANATOMIES, ANATOMY_CLASSES, EMBED_DIM, AnatomyNet, MotionNet
from models.qc.preprocess import (
    INFER_SLICES,
    INFER_SPAN,
    MASK_BAND,
    MOTION_GRID,
    MOTION_SLICES,
    SLICE_GRID,
    anatomy_input,
    fov_slices,
    mask_overlay,
    motion_grid,
    motion_input,
    motion_slices,
    slice_indices,
)

# training names: importing them loads `models.qc.motion_training` (never on the inference path)
_TRAINING = (
    "ANATOMY_SEQUENCES",
    "HEAVY_MOTION_FRACTION",
    "HEAVY_MOTION_PX",
    "IN_SPEC_MOTION_FRACTION",
    "add_ghosting",
    "attach_motion_detector",
    "train_motion",
)


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        from models.qc import motion_training

        return getattr(motion_training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANATOMIES",
    "ANATOMY_CLASSES",
    "ANATOMY_SEQUENCES",
    "BODY_PARTS",
    "EMBED_DIM",
    "HEAVY_MOTION_FRACTION",
    "HEAVY_MOTION_PX",
    "INFER_SLICES",
    "INFER_SPAN",
    "IN_SPEC_MOTION_FRACTION",
    "MASK_BAND",
    "MOTION_GRID",
    "MOTION_SLICES",
    "REASONS",
    "SLICE_GRID",
    "AnatomyClassifier",
    "AnatomyNet",
    "MotionNet",
    "PixelVerdict",
    "QCGate",
    "Thresholds",
    "add_ghosting",
    "anatomy_input",
    "attach_motion_detector",
    "decide",
    "fov_slices",
    "header_anatomy",
    "mask_overlay",
    "motion_grid",
    "motion_input",
    "motion_slices",
    "noise_sigma",
    "pixel_metrics",
    "slice_indices",
    "train_motion",
]
