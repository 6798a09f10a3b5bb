"""The QC gate: `QCGate.check` (header checks, pixel statistics, then the anatomy classifier's verdict)
and `decide`, the rule that turns the classifier's prediction into a verdict. The reason codes and who
decides what: the package docstring (`models.qc`); their wording for people: `REASONS`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from models.qc.preprocess import anatomy_input
from models.types import QCResult, Volume

if TYPE_CHECKING:
    from models.qc.classifier import AnatomyClassifier

REASONS = {
    "missing_series": "the input series for this model was not received",
    "wrong_modality": "not an MR series",
    "missing_geometry": "the series has no plane geometry (position/orientation)",
    "localizer": "localizer/scout series are never model input",
    "too_few_slices": "too few slices for this model",
    "extreme_spacing": "slice spacing, pixel spacing or field of view out of the model's range",
    "wrong_orientation": "the slices are not in the model's plane",
    "empty_image": "no signal above noise",
    "constant_image": "constant image",
    "low_snr": "signal-to-noise ratio too low",
    "motion": "heavy motion artefacts (ghosting)",
    "wrong_anatomy": "the pixels do not show the model's anatomy",
    "out_of_distribution": "the image is unlike anything the model was trained on",
    "qc_unavailable": "the QC anatomy classifier is not available",
}

_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_LOCALIZER_WORDS = ("localizer", "localiser", "scout", "survey", "3-plane", "3 plane", "tri-pilot", "aahscout")

# ------------------------------------------------------------------------------------------
# pixel statistics


def noise_sigma(array: np.ndarray) -> float:
    """Robust noise standard deviation: median |Laplacian-like 3x3 residual| per slice (Immerkaer)."""
    a = np.asarray(array, np.float32)
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    n = a.shape[0]
    picks = sorted({round(v) for v in np.linspace(0, n - 1, min(n, 6))})
    vals = []
    for s in picks:
        sl = a[s]
        r = ndimage.convolve(sl, k, mode="reflect")[1:-1, 1:-1]
        vals.append(np.abs(r).ravel())
    v = np.concatenate(vals) if vals else np.zeros(1)
    return float(np.median(v) / (0.6745 * 6.0))


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w = np.cumsum(hist)
    w2 = w[-1] - w
    m = np.cumsum(hist * centres)
    mt = m[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w / w[-1] - m) ** 2 / (w * w2)
    between[~np.isfinite(between)] = 0
    return float(centres[int(np.argmax(between))])


def pixel_metrics(volume: Volume) -> dict[str, float]:
    """Estimated SNR, foreground share and dynamic range of a volume."""
    a = np.asarray(volume.array, np.float32)
    step = max(1, round(max(a.shape[1:]) / 128))  # statistics on a ~128-pixel grid; noise at full resolution
    sub = a[:, ::step, ::step]
    flat = sub.ravel()
    _p1, _p50, p99 = (float(v) for v in np.percentile(flat, [1, 50, 99.5]))
    metrics: dict[str, float] = {"p99": p99, "range": float(flat.max() - flat.min())}
    if metrics["range"] <= 1e-6 * max(1.0, abs(p99)):
        metrics.update(snr=0.0, foreground_fraction=0.0)
        return metrics
    sigma = noise_sigma(a)
    metrics["noise_sigma"] = sigma
    smooth = ndimage.uniform_filter(sub, size=(1, 3, 3))
    thr = _otsu(smooth.ravel())
    fg = smooth > thr
    metrics["foreground_fraction"] = float(fg.mean())
    fg_med = float(np.median(sub[fg])) if fg.any() else 0.0
    metrics["snr"] = float(fg_med / sigma) if sigma > 0 else float("inf")
    return metrics


# BodyPartExamined values (spaces/underscores removed, upper case) -> anatomy
BODY_PARTS = {
    "KNEE": "knee",
    "SHOULDER": "shoulder",
    "LSPINE": "lumbar_spine",
    "LUMBAR": "lumbar_spine",
    "LUMBARSPINE": "lumbar_spine",
    "LSSPINE": "lumbar_spine",
    "SPINE": "lumbar_spine",
}


def header_anatomy(body_part: str | None) -> str | None:
    """The anatomy BodyPartExamined names (None when absent or not one of knee, shoulder, lumbar spine)."""
    return BODY_PARTS.get((body_part or "").upper().replace(" ", "").replace("_", ""))


# ------------------------------------------------------------------------------------------
# the gate


@dataclass(frozen=True)
class PixelVerdict:
    """What the pixels say about a claimed anatomy and plane (`decide`, `QCGate.check_pixels`)."""

    accepted: bool
    reason: str | None
    message: str | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class Thresholds:
    contradiction: float  # P(rival anatomy or "other") at or above which the pixels contradict the claim
    plane: float  # P(claimed anatomy in another plane) at or above which they contradict the header's plane
    support: float  # P(claimed anatomy) below which the pixels are not recognisable as it
    ood: float  # embedding distance to the claimed anatomy's classes above which the series is refused


def decide(
    pred: dict[str, Any],
    anatomy: str,
    plane: str,
    t: Thresholds,
    *,
    model: str | None = None,
    body_part: str | None = None,
) -> PixelVerdict:
    """The pixel verdict on a prediction (`AnatomyClassifier.predict`) for a series claimed to be ``anatomy``
    in ``plane`` (the plane of its header geometry): confident contradiction of the anatomy, then of the plane,
    then no support for the claim, then distance."""
    anat_p = pred["anatomy_probabilities"]
    expected = f"{anatomy}/{plane}"
    name = anatomy.replace("_", " ")
    m = {
        "anatomy_probability": float(anat_p.get(anatomy, 0.0)),
        "anatomy_plane_probability": float(pred["probabilities"].get(expected, 0.0)),
        "anatomy_distance": float(pred["anatomy_distances"].get(anatomy, float("inf"))),
    }
    rivals = {k: v for k, v in anat_p.items() if k != anatomy}
    rival = max(rivals, key=rivals.__getitem__)
    m["rival_probability"] = float(rivals[rival])
    reader = f"{model} reads {name}" if model else f"claimed {name}"
    if rivals[rival] >= t.contradiction:
        what = "something other than knee, shoulder or lumbar spine" if rival == "other" else rival.replace("_", " ")
        said = f" although the header says {body_part}" if body_part else ""
        return PixelVerdict(
            False, "wrong_anatomy", f"the pixels look like {what} (p={rivals[rival]:.2f}){said}; {reader}", m
        )
    same = {c: p for c, p in pred["probabilities"].items() if c.startswith(anatomy + "/") and c != expected}
    if same:
        seen = max(same, key=same.__getitem__)
        if same[seen] >= t.plane:
            return PixelVerdict(
                False,
                "wrong_orientation",
                f"the pixels look like a {name} {seen.split('/')[1]} series (p={same[seen]:.2f}) "
                f"although the header geometry says {plane}; {model or 'the model'} reads {plane} "
                "series",
                m,
            )
    if m["anatomy_probability"] < t.support:
        return PixelVerdict(
            False,
            "out_of_distribution",
            f"the pixels are not recognisable as {name} (p={m['anatomy_probability']:.2f}, at least "
            f"{t.support:.2f} needed; nearest: {rival.replace('_', ' ')} p={rivals[rival]:.2f}); "
            f"{reader}",
            m,
        )
    if m["anatomy_distance"] > t.ood:
        return PixelVerdict(
            False,
            "out_of_distribution",
            f"embedding distance {m['anatomy_distance']:.1f} to the {name} training data exceeds {t.ood:.1f}",
            m,
        )
    return PixelVerdict(True, None, None, m)


#: (what, id of the volume, id of the classifier or None, plane) -> (the volume, weakly; the classifier; the value)
_SEEN: dict[tuple[str, int, int, str | None], tuple[weakref.ref, Any, dict[str, Any]]] = {}


def _once_per_volume(
    what: str, volume: Volume, owner: Any, plane: str | None, compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``compute()`` for this volume object (and classifier and plane) once while the volume lives: the models of
    a pipeline that read the same series ask the gate the same pixel questions (the knee's ACL and meniscus models
    both read its sagittal fluid series). A copy of the value each time."""
    key = (what, id(volume), id(owner) if owner is not None else 0, plane)
    hit = _SEEN.get(key)
    if hit is not None and hit[0]() is volume and hit[1] is owner:
        return dict(hit[2])
    value = compute()

    def forget(_ref: weakref.ref) -> None:
        _SEEN.pop(key, None)

    _SEEN[key] = (weakref.ref(volume, forget), owner, value)
    return dict(value)


@dataclass
class QCGate:
    """``check(volume, task) -> QCResult``. ``anatomy`` None -> every series is refused (qc_unavailable)."""

    anatomy: AnatomyClassifier | None
    min_snr: float = 6.0  # estimated; phantoms of the spec (true SNR >= 8) estimate >= ~11
    max_motion_probability: float = 0.5
    min_foreground: float = 0.01
    thresholds: Thresholds | None = None  # None: the classifier's calibrated thresholds (stored with its weights)

    def judge(
        self, pred: dict[str, Any], anatomy: str, plane: str, *, model: str | None = None, body_part: str | None = None
    ) -> PixelVerdict:
        """`decide` with this gate's thresholds."""
        assert self.anatomy is not None
        return decide(
            pred, anatomy, plane, self.thresholds or self.anatomy.thresholds(), model=model, body_part=body_part
        )

    def check_pixels(self, volume: Volume, anatomy: str, plane: str, *, model: str | None = None) -> PixelVerdict:
        """The anatomy classifier's verdict on ``volume`` claimed as ``anatomy`` in ``plane`` (no header or
        pixel-statistics checks: also for single slices and screen exports)."""
        if self.anatomy is None:
            return PixelVerdict(False, "qc_unavailable", "anatomy classifier weights (qc.anatomy) are missing", {})
        pred = self.anatomy.predict_input(anatomy_input(volume, plane))
        return self.judge(pred, anatomy, plane, model=model, body_part=volume.body_part)

    def check(self, volume: Volume, task) -> QCResult:
        spec = task.input
        m: dict[str, float] = {"slices": float(volume.array.shape[0])}
        attrs = volume.attributes or {}

        def refuse(reason: str | None, message: str | None) -> QCResult:
            return QCResult(False, reason, message, dict(m))

        if volume.modality and volume.modality.upper() != "MR":
            return refuse("wrong_modality", f"modality {volume.modality} is not MR; {task.name} reads MR only")
        if attrs.get("geometry_assumed"):
            return refuse("missing_geometry", "the series carries no ImagePositionPatient/ImageOrientationPatient")
        desc = " ".join(str(v) for v in (volume.series_description, attrs.get("protocol_name")) if v).lower()
        image_type = [str(v).upper() for v in attrs.get("image_type", [])]
        if attrs.get("localizer") or "LOCALIZER" in image_type or any(w in desc for w in _LOCALIZER_WORDS):
            return refuse("localizer", f"series {volume.series_uid} is a localizer/scout; never model input")
        n = volume.array.shape[0]
        if n < spec.min_slices:
            return refuse("too_few_slices", f"{n} slice(s); {task.name} needs at least {spec.min_slices}")
        ss, rs, cs = volume.spacing
        fov = float(min(volume.array.shape[1] * rs, volume.array.shape[2] * cs))
        m.update(slice_spacing_mm=float(ss), pixel_spacing_mm=float(max(rs, cs)), fov_mm=fov)
        lo, hi = spec.slice_spacing_mm
        if not lo <= ss <= hi:
            return refuse("extreme_spacing", f"slice spacing {ss:.2f} mm outside {lo:g}-{hi:g} mm")
        lo, hi = spec.pixel_spacing_mm
        if not lo <= max(rs, cs) <= hi:
            return refuse("extreme_spacing", f"pixel spacing {max(rs, cs):.2f} mm outside {lo:g}-{hi:g} mm")
        lo, hi = spec.fov_mm
        if not lo <= fov <= hi:
            return refuse("extreme_spacing", f"in-plane field of view {fov:.0f} mm outside {lo:g}-{hi:g} mm")
        normal = np.abs(volume.normal)
        angle = float(
            np.degrees(np.arccos(np.clip(normal[_PLANE_AXIS[spec.plane]] / (np.linalg.norm(normal) + 1e-12), -1, 1)))
        )
        m["obliquity_deg"] = angle
        if angle > spec.max_obliquity_deg:
            nearest = ("sagittal", "coronal", "axial")[int(np.argmax(normal))]
            return refuse(
                "wrong_orientation",
                f"the header geometry puts the slices {angle:.0f} deg away from {spec.plane} (nearest plane: "
                f"{nearest}; limit {spec.max_obliquity_deg:g} deg); {task.name} reads {spec.plane} series",
            )
        px = _once_per_volume("pixels", volume, None, None, lambda: pixel_metrics(volume))
        m.update({k: float(v) for k, v in px.items()})
        if px["range"] <= 1e-6 * max(1.0, abs(px["p99"])):
            return refuse("constant_image", "every pixel has the same value")
        if px["foreground_fraction"] < self.min_foreground or px["p99"] <= 0:
            return refuse("empty_image", "no imaged anatomy above the noise")
        if px["snr"] < self.min_snr:
            return refuse("low_snr", f"estimated SNR {px['snr']:.1f} below {self.min_snr:g}")
        if self.anatomy is None:
            return refuse(
                "qc_unavailable", "anatomy classifier weights (qc.anatomy) are missing; cannot check the pixels"
            )
        anatomy = self.anatomy
        pred = _once_per_volume("anatomy", volume, anatomy, spec.plane, lambda: anatomy.predict(volume, spec.plane))
        verdict = self.judge(pred, task.anatomy, spec.plane, model=task.name, body_part=volume.body_part)
        m.update(verdict.metrics)
        if pred["motion_probability"] is not None:
            m["motion_probability"] = float(pred["motion_probability"])
        if not verdict.accepted:
            return refuse(verdict.reason, verdict.message)
        if pred["motion_probability"] is not None and pred["motion_probability"] > self.max_motion_probability:
            return refuse("motion", f"heavy motion ghosting (detector p={pred['motion_probability']:.2f})")
        return QCResult(True, None, None, m)
