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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from models.errors import RegistryError
from models.types import QCResult, Volume

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

ANATOMY_CLASSES = (
    "other",
    "knee/sagittal", "knee/coronal", "knee/axial",
    "shoulder/coronal", "shoulder/sagittal", "shoulder/axial",
    "lumbar_spine/sagittal", "lumbar_spine/coronal", "lumbar_spine/axial",
)
_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_LOCALIZER_WORDS = ("localizer", "localiser", "scout", "survey", "3-plane", "3 plane", "tri-pilot", "aahscout")

# ------------------------------------------------------------------------------------------
# pixel statistics


def noise_sigma(array: np.ndarray) -> float:
    """Robust noise standard deviation: median |Laplacian-like 3x3 residual| per slice (Immerkaer)."""
    a = np.asarray(array, np.float32)
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    n = a.shape[0]
    picks = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, 6))})
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
    step = max(1, int(round(max(a.shape[1:]) / 128)))  # statistics on a ~128-pixel grid; noise at full resolution
    sub = a[:, ::step, ::step]
    flat = sub.ravel()
    p1, p50, p99 = (float(v) for v in np.percentile(flat, [1, 50, 99.5]))
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


# ------------------------------------------------------------------------------------------
# anatomy classifier

ANATOMIES = ("knee", "shoulder", "lumbar_spine")
SLICE_GRID = 96  # in-plane grid over the whole field of view (the longer side), square
INFER_SLICES = 5  # central slices read per series; their logits are averaged
INFER_SPAN = (0.3, 0.7)  # ... evenly spaced over this fraction of the series
# border band blanked in every image (fractions of rows top/bottom, of columns left/right): where screen
# exports carry orientation letters, "N of M" counters and scroll bars
MASK_BAND = (0.07, 0.11, 0.04, 0.04)
EMBED_DIM = 128

# BodyPartExamined values (spaces/underscores removed, upper case) -> anatomy
BODY_PARTS = {
    "KNEE": "knee", "SHOULDER": "shoulder", "LSPINE": "lumbar_spine", "LUMBAR": "lumbar_spine",
    "LUMBARSPINE": "lumbar_spine", "LSSPINE": "lumbar_spine", "SPINE": "lumbar_spine",
}


def header_anatomy(body_part: str | None) -> str | None:
    """The anatomy BodyPartExamined names (None when absent or not one of knee, shoulder, lumbar spine)."""
    return BODY_PARTS.get((body_part or "").upper().replace(" ", "").replace("_", ""))


def mask_overlay(image: np.ndarray, band: tuple[float, float, float, float] = MASK_BAND) -> np.ndarray:
    """Blank the border band of a 2-D image (or of every slice of a stack): top, bottom, left, right fractions."""
    a = np.array(image, np.float32, copy=True)
    h, w = a.shape[-2:]
    t, b, l, r = (int(math.ceil(f * n)) for f, n in zip(band, (h, h, w, w)))
    a[..., :t, :] = 0
    a[..., h - b :, :] = 0
    a[..., :, :l] = 0
    a[..., :, w - r :] = 0
    return a


def _canonical(volume: Volume, plane: str | None) -> tuple[np.ndarray, float, float, str]:
    """The array in the canonical layout of ``plane`` (default: nearest) and its (row, col) spacing."""
    from models.transforms import canonical_layout

    perm, flips, plane = canonical_layout(volume, plane)
    a = np.transpose(np.asarray(volume.array, np.float32), perm)
    for ax, f in enumerate(flips):
        if f:
            a = np.flip(a, axis=ax)
    spacing = [float(volume.spacing[p]) for p in perm]
    return a, spacing[1], spacing[2], plane


def slice_indices(n: int, count: int, span: tuple[float, float]) -> list[int]:
    """``count`` slice indices evenly over ``span`` (fractions) of ``n`` slices (fewer when n is small)."""
    if n <= 1:
        return [0]
    lo, hi = span[0] * (n - 1), span[1] * (n - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, max(1, count))})


def fov_slices(canonical: np.ndarray, row_mm: float, col_mm: float, ks: list[int], grid: int = SLICE_GRID) -> np.ndarray:
    """Slices ``ks`` of a canonical array, overlay band blanked, each resampled to grid x grid over a square of
    the longer physical side (centred; the shorter side is zero-padded) and scaled by the series' 99.5th
    percentile -> (len(ks), grid, grid) float32."""
    from models.transforms import apply_separable, interp_matrix, robust_scale

    sub = mask_overlay(canonical[ks])
    h, w = sub.shape[1:]
    side = max(h * row_mm, w * col_mm)
    sj, si = side / grid / row_mm, side / grid / col_mm
    mj = interp_matrix(h, (h - 1) / 2 - (grid - 1) / 2 * sj, sj, grid)
    mi = interp_matrix(w, (w - 1) / 2 - (grid - 1) / 2 * si, si, grid)
    out = apply_separable(sub, np.eye(len(ks), dtype=np.float32), mj, mi)
    return robust_scale(np.clip(out, 0, None))


def anatomy_input(volume: Volume, plane: str | None = None, *, count: int = INFER_SLICES,
                  span: tuple[float, float] = INFER_SPAN) -> np.ndarray:
    """Volume -> (slices, 1, SLICE_GRID, SLICE_GRID) input of the anatomy classifier (canonical layout of
    ``plane``; default: the nearest plane of the slice normal)."""
    a, rs, cs, _ = _canonical(volume, plane)
    return fov_slices(a, rs, cs, slice_indices(a.shape[0], count, span))[:, None]


class AnatomyNet(nn.Module):
    """Small MONAI 2-D CNN: (B, 1, 96, 96) slices -> class logits and a 128-d embedding (mean + max pooled)."""

    def __init__(self, n_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        from monai.networks.blocks import Convolution

        def conv(cin, cout, s=1):
            return Convolution(2, cin, cout, strides=s, kernel_size=3, act="relu", norm="batch")

        self.body = nn.Sequential(conv(1, 16, 2), conv(16, 16), conv(16, 32, 2), conv(32, 32), conv(32, 48, 2),
                                  conv(48, 48), conv(48, 64, 2), conv(64, 64))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(EMBED_DIM, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return self.fc(self.drop(e)), e


MOTION_GRID = 128  # in-plane grid over the whole field of view (ghosts are a field-of-view-relative pattern)
MOTION_SLICES = 4  # slices from the middle half of the series


class MotionNet(nn.Module):
    """Small 2-D CNN on in-plane slices at near-native resolution -> logit of heavy motion ghosting."""

    def __init__(self):
        super().__init__()
        from monai.networks.blocks import Convolution

        def conv(cin, cout, s=1):
            return Convolution(2, cin, cout, strides=s, kernel_size=3, act="relu", norm="batch")

        self.body = nn.Sequential(conv(1, 16, 2), conv(16, 24, 2), conv(24, 32, 2), conv(32, 48, 2), conv(48, 48))
        self.fc = nn.Linear(96, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) slices -> (B,) logits."""
        f = self.body(x)
        return self.fc(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)).squeeze(1)


def motion_slices(n: int) -> list[int]:
    """The MOTION_SLICES slice indices (middle half) the motion detector reads of an n-slice series."""
    ks = sorted({int(round(v)) for v in np.linspace(n * 0.25, n * 0.75 - 1, MOTION_SLICES)})
    ks = [min(max(k, 0), n - 1) for k in ks]
    while len(ks) < MOTION_SLICES:
        ks.append(ks[-1])
    return ks


def motion_grid(slices: np.ndarray) -> np.ndarray:
    """(n, rows, cols) slices -> (n, 1, 128, 128), each resampled over its whole field of view, scaled."""
    from models.transforms import apply_separable, interp_matrix, robust_scale

    a = np.asarray(slices, np.float32)
    mj = interp_matrix(a.shape[1], (a.shape[1] / MOTION_GRID - 1) / 2, a.shape[1] / MOTION_GRID, MOTION_GRID)
    mi = interp_matrix(a.shape[2], (a.shape[2] / MOTION_GRID - 1) / 2, a.shape[2] / MOTION_GRID, MOTION_GRID)
    mk = np.eye(len(a), dtype=np.float32)
    return robust_scale(apply_separable(a, mk, mj, mi))[:, None]


def motion_input(volume: Volume) -> np.ndarray:
    """(MOTION_SLICES, 1, 128, 128): middle-half slices, each resampled over its whole field of view."""
    a = np.asarray(volume.array, np.float32)
    return motion_grid(a[motion_slices(a.shape[0])])


def add_ghosting(array: np.ndarray, displacement: float, rng: np.random.Generator, *, pe_axis: int | None = None,
                 cycles: float | None = None) -> np.ndarray:
    """Periodic phase-encode motion ghosting on magnitude images (n, rows, cols), as the phantoms render it:
    the k-space lines of a linear acquisition order are shifted by ``displacement`` (a fraction of the
    phase-encode field of view) x sin(2 pi cycles t)."""
    import scipy.fft

    a = np.asarray(array, np.float32)
    axis = int(rng.integers(1, 3)) if pe_axis is None else int(pe_axis)
    cycles = float(rng.uniform(2.0, 12.0)) if cycles is None else float(cycles)
    n_pe = a.shape[axis]
    kpe = np.fft.fftfreq(n_pe)
    order = np.argsort(np.argsort(kpe))
    disp = displacement * n_pe * np.sin(2 * np.pi * cycles * order / n_pe + rng.uniform(0, 2 * np.pi))
    ghost = np.exp(-2j * np.pi * kpe * disp).astype(np.complex64)
    shape = [1, 1, 1]
    shape[axis] = n_pe
    spec = scipy.fft.fft(a.astype(np.complex64), axis=axis, workers=1) * ghost.reshape(shape)
    return np.abs(scipy.fft.ifft(spec, axis=axis, workers=1)).astype(np.float32)


@dataclass
class AnatomyClassifier:
    net: AnatomyNet
    mean: np.ndarray  # (n_classes, EMBED_DIM) class means of the slice embedding
    precision: np.ndarray  # (EMBED_DIM, EMBED_DIM) shared inverse covariance
    ood_threshold: float  # series distance to the claimed anatomy's nearest class mean above which it is refused
    sha256: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    motion_net: MotionNet | None = None
    contradiction_threshold: float = 0.8  # P(another anatomy or other) at which the pixels contradict the header
    plane_threshold: float = 0.9  # P(the claimed anatomy in another plane) at which the pixels contradict it
    support_threshold: float = 0.0  # below this P(claimed anatomy) the pixels are not recognisable as it
    distance_scale: float = 1.0  # this model's in-distribution series distance (ood_threshold = ratio x scale)
    classes: tuple[str, ...] = ANATOMY_CLASSES

    FORMAT = "msknode.anatomy/2"

    def motion_probability(self, volume: Volume) -> float | None:
        if self.motion_net is None:
            return None
        self.motion_net.eval()
        with torch.inference_mode():
            logits = self.motion_net(torch.from_numpy(motion_input(volume)))
        return float(torch.sigmoid(logits.mean()))

    def slice_outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(S, 1, G, G) slices -> (mean logits (n_classes,), mean embedding (EMBED_DIM,))."""
        self.net.eval()
        with torch.inference_mode():
            logits, emb = self.net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return logits.mean(0).numpy().astype(np.float64), emb.mean(0).numpy().astype(np.float64)

    def predict_input(self, x: np.ndarray) -> dict[str, Any]:
        logits, e = self.slice_outputs(x)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = int(np.argmax(p))
        d = self.mahalanobis(e)
        anat_p = {a: float(sum(p[i] for i, c in enumerate(self.classes) if c.startswith(a + "/"))) for a in ANATOMIES}
        anat_p["other"] = float(p[self.classes.index("other")])
        anat_d = {a: float(min(d[i] for i, c in enumerate(self.classes) if c.startswith(a + "/"))) for a in ANATOMIES}
        anat_d["other"] = float(d[self.classes.index("other")])
        return {"label": self.classes[k], "probability": float(p[k]),
                "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
                "anatomy_probabilities": anat_p, "distance": float(d[k]),
                "min_distance": float(min(d[i] for i, c in enumerate(self.classes) if c != "other")),
                "anatomy_distances": anat_d, "slices": int(len(x))}

    def predict(self, volume: Volume, plane: str | None = None) -> dict[str, Any]:
        """Anatomy/plane of a series from its pixels. ``plane``: the canonical layout to read it in (the
        header's plane; default the nearest plane of the slice normal). Keys: label, probability,
        probabilities (per class), anatomy_probabilities (marginal per anatomy and "other"), distance (to the
        predicted class), min_distance (to any anatomy class), anatomy_distances, motion_probability."""
        out = self.predict_input(anatomy_input(volume, plane))
        out["motion_probability"] = self.motion_probability(volume)
        return out

    def mahalanobis(self, e: np.ndarray) -> np.ndarray:
        diff = self.mean - e[None, :]
        return np.sqrt(np.maximum(np.einsum("kd,de,ke->k", diff, self.precision, diff), 0.0))

    def state(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "classes": list(self.classes),
                "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "mean": torch.as_tensor(self.mean, dtype=torch.float32),
                "precision": torch.as_tensor(self.precision, dtype=torch.float32),
                "ood_threshold": float(self.ood_threshold),
                "contradiction_threshold": float(self.contradiction_threshold),
                "plane_threshold": float(self.plane_threshold), "support_threshold": float(self.support_threshold),
                "distance_scale": float(self.distance_scale), "metadata": dict(self.metadata),
                "input": {"grid": SLICE_GRID, "slices": INFER_SLICES, "span": list(INFER_SPAN),
                          "mask_band": list(MASK_BAND)},
                **({"motion_state_dict": {k: v.detach().clone() for k, v in self.motion_net.state_dict().items()}}
                   if self.motion_net is not None else {})}

    def save(self, path: Path) -> str:
        from models.classifier import sha256_of

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state(), path)
        digest = sha256_of(path)
        path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
        return digest

    @classmethod
    def load(cls, path: Path, *, sha256: str) -> "AnatomyClassifier":
        ck = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("format") != cls.FORMAT:
            found = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
            raise RegistryError(f"{path} is not a {cls.FORMAT} checkpoint (found {found})")
        if tuple(ck["classes"]) != ANATOMY_CLASSES:
            raise RegistryError(f"{path}: classes {ck['classes']} do not match the code")
        inp = ck.get("input", {})
        if inp and (inp.get("grid") != SLICE_GRID or tuple(inp.get("mask_band", MASK_BAND)) != MASK_BAND):
            raise RegistryError(f"{path}: input {inp} does not match the code's preprocessing")
        net = AnatomyNet(len(ANATOMY_CLASSES))
        net.load_state_dict(ck["state_dict"])
        net.eval()
        motion = None
        if "motion_state_dict" in ck:
            motion = MotionNet()
            motion.load_state_dict(ck["motion_state_dict"])
            motion.eval()
        return cls(net=net, mean=ck["mean"].double().numpy(), precision=ck["precision"].double().numpy(),
                   ood_threshold=float(ck["ood_threshold"]), sha256=sha256, metadata=dict(ck.get("metadata", {})),
                   motion_net=motion, contradiction_threshold=float(ck.get("contradiction_threshold", 0.8)),
                   plane_threshold=float(ck.get("plane_threshold", 0.9)),
                   support_threshold=float(ck.get("support_threshold", 0.0)),
                   distance_scale=float(ck.get("distance_scale", 1.0)))

    def thresholds(self) -> "Thresholds":
        return Thresholds(contradiction=self.contradiction_threshold, plane=self.plane_threshold,
                          support=self.support_threshold, ood=self.ood_threshold)


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


def decide(pred: dict[str, Any], anatomy: str, plane: str, t: Thresholds, *, model: str | None = None,
           body_part: str | None = None) -> PixelVerdict:
    """The pixel verdict on a prediction (`AnatomyClassifier.predict`) for a series claimed to be ``anatomy``
    in ``plane`` (the plane of its header geometry): confident contradiction of the anatomy, then of the plane,
    then no support for the claim, then distance."""
    anat_p = pred["anatomy_probabilities"]
    expected = f"{anatomy}/{plane}"
    name = anatomy.replace("_", " ")
    m = {"anatomy_probability": float(anat_p.get(anatomy, 0.0)),
         "anatomy_plane_probability": float(pred["probabilities"].get(expected, 0.0)),
         "anatomy_distance": float(pred["anatomy_distances"].get(anatomy, float("inf")))}
    rivals = {k: v for k, v in anat_p.items() if k != anatomy}
    rival = max(rivals, key=rivals.get)
    m["rival_probability"] = float(rivals[rival])
    reader = f"{model} reads {name}" if model else f"claimed {name}"
    if rivals[rival] >= t.contradiction:
        what = "something other than knee, shoulder or lumbar spine" if rival == "other" else rival.replace("_", " ")
        said = f" although the header says {body_part}" if body_part else ""
        return PixelVerdict(False, "wrong_anatomy", f"the pixels look like {what} (p={rivals[rival]:.2f}){said}; "
                                                    f"{reader}", m)
    same = {c: p for c, p in pred["probabilities"].items() if c.startswith(anatomy + "/") and c != expected}
    if same:
        seen = max(same, key=same.get)
        if same[seen] >= t.plane:
            return PixelVerdict(False, "wrong_orientation",
                                f"the pixels look like a {name} {seen.split('/')[1]} series (p={same[seen]:.2f}) "
                                f"although the header geometry says {plane}; {model or 'the model'} reads {plane} "
                                "series", m)
    if m["anatomy_probability"] < t.support:
        return PixelVerdict(False, "out_of_distribution",
                            f"the pixels are not recognisable as {name} (p={m['anatomy_probability']:.2f}, at least "
                            f"{t.support:.2f} needed; nearest: {rival.replace('_', ' ')} p={rivals[rival]:.2f}); "
                            f"{reader}", m)
    if m["anatomy_distance"] > t.ood:
        return PixelVerdict(False, "out_of_distribution",
                            f"embedding distance {m['anatomy_distance']:.1f} to the {name} training data exceeds "
                            f"{t.ood:.1f}", m)
    return PixelVerdict(True, None, None, m)


@dataclass
class QCGate:
    """``check(volume, task) -> QCResult``. ``anatomy`` None -> every series is refused (qc_unavailable)."""

    anatomy: AnatomyClassifier | None
    min_snr: float = 6.0  # estimated; phantoms of the spec (true SNR >= 8) estimate >= ~11
    max_motion_probability: float = 0.5
    min_foreground: float = 0.01
    thresholds: Thresholds | None = None  # None: the classifier's calibrated thresholds (stored with its weights)

    def judge(self, pred: dict[str, Any], anatomy: str, plane: str, *, model: str | None = None,
              body_part: str | None = None) -> PixelVerdict:
        """`decide` with this gate's thresholds."""
        assert self.anatomy is not None
        return decide(pred, anatomy, plane, self.thresholds or self.anatomy.thresholds(), model=model,
                      body_part=body_part)

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

        def refuse(reason: str, message: str) -> QCResult:
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
        angle = float(np.degrees(np.arccos(np.clip(normal[_PLANE_AXIS[spec.plane]] / (np.linalg.norm(normal) + 1e-12), -1, 1))))
        m["obliquity_deg"] = angle
        if angle > spec.max_obliquity_deg:
            nearest = ("sagittal", "coronal", "axial")[int(np.argmax(normal))]
            return refuse("wrong_orientation",
                          f"the header geometry puts the slices {angle:.0f} deg away from {spec.plane} (nearest plane: "
                          f"{nearest}; limit {spec.max_obliquity_deg:g} deg); {task.name} reads {spec.plane} series")
        px = pixel_metrics(volume)
        m.update({k: float(v) for k, v in px.items()})
        if px["range"] <= 1e-6 * max(1.0, abs(px["p99"])):
            return refuse("constant_image", "every pixel has the same value")
        if px["foreground_fraction"] < self.min_foreground or px["p99"] <= 0:
            return refuse("empty_image", "no imaged anatomy above the noise")
        if px["snr"] < self.min_snr:
            return refuse("low_snr", f"estimated SNR {px['snr']:.1f} below {self.min_snr:g}")
        if self.anatomy is None:
            return refuse("qc_unavailable", "anatomy classifier weights (qc.anatomy) are missing; cannot check the pixels")
        pred = self.anatomy.predict(volume, spec.plane)
        verdict = self.judge(pred, task.anatomy, spec.plane, model=task.name, body_part=volume.body_part)
        m.update(verdict.metrics)
        if pred["motion_probability"] is not None:
            m["motion_probability"] = float(pred["motion_probability"])
        if not verdict.accepted:
            return refuse(verdict.reason, verdict.message)
        if pred["motion_probability"] is not None and pred["motion_probability"] > self.max_motion_probability:
            return refuse("motion", f"heavy motion ghosting (detector p={pred['motion_probability']:.2f})")
        return QCResult(True, None, None, m)


# ------------------------------------------------------------------------------------------
# phantoms of the classes (training data; models.qc_training)

_PHANTOM_PLANES = {
    "knee": ("sagittal", "coronal", "axial"),
    "shoulder": ("coronal", "sagittal", "axial"),
    "lumbar_spine": ("sagittal", "coronal", "axial"),
}


ANATOMY_SEQUENCES = {
    "knee": ("PD_FS", "PD_FS", "PD", "T1", "T2_FS", "STIR"),
    "shoulder": ("T2_FS", "T2_FS", "PD_FS", "T1", "PD", "STIR"),
    "lumbar_spine": ("T2", "T2", "T1", "STIR", "T2_FS"),
}
HEAVY_MOTION_PX = (6.0, 20.0)  # ghost displacement beyond the phantom spec (<= 3 px), pixels of the default matrix
# the same as fractions of the phase-encode field of view (default matrices 192-256), for real images
HEAVY_MOTION_FRACTION = (0.03, 0.09)
IN_SPEC_MOTION_FRACTION = (0.002, 0.015)


# ------------------------------------------------------------------------------------------
# training the native-resolution motion detector


def _motion_item(args) -> tuple[np.ndarray, int]:
    idx, seed = args
    torch.set_num_threads(1)
    from models.phantoms import SPEC, generate

    anatomy = ("knee", "shoulder", "lumbar_spine")[idx % 3]
    rng = np.random.default_rng([seed, 11])
    u = rng.uniform()
    heavy = u < 0.4
    if heavy:
        px = float(rng.uniform(*HEAVY_MOTION_PX))
    elif u < 0.7:
        px = float(rng.uniform(0.5, 3.0))  # the spec's own motion range: in distribution, accepted
    else:
        px = 0.0
    # every contrast a site may route to the anatomy's models: ghosting must be told from contrast, not learned
    # as a property of the default sequence
    sequence = str(rng.choice(ANATOMY_SEQUENCES[anatomy]))
    ph = generate(anatomy, seed, motion_px=px, n_slices=8, sub_slices=1, sequence=sequence,
                  matrix=SPEC.for_anatomy(anatomy).acquisition.matrix)
    return motion_input(ph.volume), int(heavy)


def train_motion(n: int, seed: int, *, epochs: int = 12, threads: int = 2, workers: int = 1,
                 log: Callable[[str], None] = print, extra_items: list[tuple[np.ndarray, int]] | None = None,
                 extra_name: str = "", cache: Path | None = None) -> tuple[MotionNet, dict[str, Any]]:
    """Train MotionNet on N phantoms (all anatomies, default matrix): heavy (6-20 px) vs in-spec (0-3 px);
    ``extra_items`` ((MOTION_SLICES, 1, 128, 128) input, heavy 0/1), e.g. real series with and without
    added ghosting (`models.qc_training.real_motion_items`), join the training part (validation: phantoms).
    ``cache``: a file (outside the repository) holding the generated phantom inputs of N:SEED."""
    torch.set_num_threads(threads)
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            x = torch.from_numpy(z["x"].astype(np.float32))
            y = torch.from_numpy(z["y"].astype(np.float32))
    else:
        jobs = [(i, seed + i) for i in range(n)]
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                items = list(pool.imap(_motion_item, jobs, chunksize=8))
        else:
            items = []
            for i, j in enumerate(jobs):
                items.append(_motion_item(j))
                if (i + 1) % 100 == 0:
                    log(f"motion items: {i + 1}/{n}")
        x = torch.from_numpy(np.stack([it[0] for it in items]).astype(np.float32))  # (N, S, 1, H, W)
        y = torch.as_tensor([float(it[1]) for it in items])
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(cache).with_suffix(".tmp.npz")
            np.savez(tmp, x=x.numpy().astype(np.float16), y=y.numpy().astype(np.uint8))
            tmp.replace(cache)
    n_val = max(20, int(0.15 * n))
    xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    if extra_items:
        xt = torch.cat([xt, torch.from_numpy(np.stack([it[0] for it in extra_items]).astype(np.float32))])
        yt = torch.cat([yt, torch.as_tensor([float(it[1]) for it in extra_items])])
    net = MotionNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    bs = 16
    steps = epochs * math.ceil(len(xt) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    s_per = x.shape[1]

    def vol_logits(xb):
        return net(xb.reshape(-1, *xb.shape[2:])).reshape(len(xb), s_per).mean(dim=1)

    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for i in range(0, len(xt), bs):
            idx = perm[i : i + bs]
            xb = xt[idx] * torch.exp(torch.randn(len(idx), 1, 1, 1, 1, generator=g) * 0.1)
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip] = torch.flip(xb[flip], dims=[4])
            loss = nn.functional.binary_cross_entropy_with_logits(vol_logits(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        net.eval()
        with torch.inference_mode():
            pv = torch.sigmoid(vol_logits(xv))
        acc = float(((pv > 0.5).float() == yv).float().mean())
        log(json.dumps({"motion_epoch": ep, "loss": round(tot / len(xt), 4), "val_acc": round(acc, 4)}))
    net.eval()
    with torch.inference_mode():
        pv = torch.sigmoid(vol_logits(xv)).numpy()
    yvn = yv.numpy().astype(bool)
    stats = {"motion_training_data": f"motion:{n}:{seed}" + (f" + {extra_name}" if extra_name else ""),
             "motion_val_accuracy": float(((pv > 0.5) == yvn).mean()),
             "motion_val_recall": float((pv[yvn] > 0.5).mean()) if yvn.any() else None,
             "motion_val_false_positive_rate": float((pv[~yvn] > 0.5).mean()) if (~yvn).any() else None}
    return net, stats


def attach_motion_detector(path: Path, n: int, seed: int, *, epochs: int = 12, threads: int = 2, workers: int = 1,
                           log: Callable[[str], None] = print, extra_items: list[tuple[np.ndarray, int]] | None = None,
                           extra_name: str = "", extra_stats: Callable[[MotionNet], dict[str, Any]] | None = None,
                           cache: Path | None = None) -> Path:
    """Train the native-resolution motion detector on N phantoms (and ``extra_items``) and store it with the
    anatomy classifier at ``path`` (weights, .sha256 and train_summary.json rewritten). ``extra_stats(net)``
    adds figures measured on data the detector did not learn from."""
    from models.classifier import sha256_of

    path = Path(path)
    clf = AnatomyClassifier.load(path, sha256=sha256_of(path))
    net, stats = train_motion(n, seed, epochs=epochs, threads=threads, workers=workers, log=log,
                              extra_items=extra_items, extra_name=extra_name, cache=cache)
    if extra_stats is not None:
        stats.update(extra_stats(net))
    clf.motion_net = net
    clf.metadata = {**clf.metadata, **stats}
    sha = clf.save(path)
    summary = path.parent / "train_summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        data.update(stats)
        data["weights_sha256"] = sha
        summary.write_text(json.dumps(data, indent=2) + "\n")
    log(json.dumps({"motion_detector": stats, "weights_sha256": sha}))
    return path
