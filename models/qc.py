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
| wrong_anatomy        | the anatomy classifier (pixels, not tags) sees another body part       |
| wrong_orientation    | ... or the right body part in another plane                            |
| out_of_distribution  | the classifier's embedding is far from everything it was trained on    |
| motion               | the classifier's motion head sees ghosting beyond the phantom spec     |
| qc_unavailable       | the anatomy classifier's weights are missing                           |

The anatomy classifier (`AnatomyClassifier`, registry name ``qc.anatomy``) is a small
MONAI 3-D CNN on a physically scaled grid (16 x 64 x 64 over 128 x 320 x 320 mm) trained
on phantoms of all three anatomies in all three planes and on synthetic
out-of-distribution volumes (`models.negatives`: brain, abdomen, limb, water phantom,
noise). Out-of-distribution inputs are also caught by the Mahalanobis distance of the
embedding to the training classes.
"""

from __future__ import annotations

import json
import math
import time
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
ANATOMY_GRID = (16, 64, 64)
ANATOMY_ROI_MM = (128.0, 320.0, 320.0)
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


class AnatomyNet(nn.Module):
    """Small MONAI 3-D CNN: (B, 1, 16, 64, 64) -> class logits, 128-d embedding."""

    def __init__(self, n_classes: int = len(ANATOMY_CLASSES), dropout: float = 0.2):
        super().__init__()
        from monai.networks.blocks import Convolution

        from models.nets import SpaceToDepth

        def conv(cin, cout, s=1):
            return Convolution(3, cin, cout, strides=s, kernel_size=3, act="relu", norm="batch")

        self.body = nn.Sequential(
            SpaceToDepth(2), conv(4, 16), conv(16, 32, 2), conv(32, 48, 2), conv(48, 64, (1, 2, 2)), conv(64, 64)
        )
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(128, n_classes)
        self.motion = nn.Linear(128, 1)  # logit of heavy motion (ghosting beyond the phantom spec)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return self.fc(self.drop(e)), e

    def motion_logit(self, e: torch.Tensor) -> torch.Tensor:
        return self.motion(e).squeeze(1)


def anatomy_input(volume: Volume, plane: str | None = None) -> np.ndarray:
    """Volume -> (1, 16, 64, 64) input of the anatomy classifier (canonical ``plane``; default: nearest)."""
    from models.transforms import preprocess

    img, _ = preprocess(volume, ANATOMY_GRID, ANATOMY_ROI_MM, plane)
    return img


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


def motion_input(volume: Volume) -> np.ndarray:
    """(MOTION_SLICES, 1, 128, 128): middle-half slices, each resampled over its whole field of view."""
    from models.transforms import apply_separable, interp_matrix, robust_scale

    a = np.asarray(volume.array, np.float32)
    n = a.shape[0]
    ks = sorted({int(round(v)) for v in np.linspace(n * 0.25, n * 0.75 - 1, MOTION_SLICES)})
    while len(ks) < MOTION_SLICES:
        ks.append(ks[-1])
    sub = a[ks]
    mj = interp_matrix(a.shape[1], (a.shape[1] / MOTION_GRID - 1) / 2, a.shape[1] / MOTION_GRID, MOTION_GRID)
    mi = interp_matrix(a.shape[2], (a.shape[2] / MOTION_GRID - 1) / 2, a.shape[2] / MOTION_GRID, MOTION_GRID)
    mk = np.eye(len(ks), dtype=np.float32)
    out = robust_scale(apply_separable(sub, mk, mj, mi))
    return out[:, None]


@dataclass
class AnatomyClassifier:
    net: AnatomyNet
    mean: np.ndarray  # (n_classes, 128) class means of the embedding
    precision: np.ndarray  # (128, 128) shared inverse covariance
    ood_threshold: float
    sha256: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    motion_net: MotionNet | None = None  # native-resolution motion detector (preferred over the coarse head)

    FORMAT = "msknode.anatomy/1"

    def motion_probability(self, volume: Volume) -> float | None:
        if self.motion_net is None:
            return None
        self.motion_net.eval()
        with torch.inference_mode():
            logits = self.motion_net(torch.from_numpy(motion_input(volume)))
        return float(torch.sigmoid(logits.mean()))

    def predict(self, volume: Volume, plane: str | None = None) -> dict[str, Any]:
        x = torch.from_numpy(anatomy_input(volume, plane)[None])
        self.net.eval()
        with torch.inference_mode():
            logits, emb = self.net(x)
            p_motion = float(torch.sigmoid(self.net.motion_logit(emb))[0])
        p = torch.softmax(logits, dim=1)[0].numpy()
        native = self.motion_probability(volume)
        if native is not None:
            p_motion = native
        k = int(np.argmax(p))
        e = emb[0].numpy().astype(np.float64)
        d = self.mahalanobis(e)
        return {"label": ANATOMY_CLASSES[k], "probability": float(p[k]),
                "probabilities": {c: float(v) for c, v in zip(ANATOMY_CLASSES, p)},
                "distance": float(d[k]), "min_distance": float(d[1:].min()), "motion_probability": p_motion}

    def mahalanobis(self, e: np.ndarray) -> np.ndarray:
        diff = self.mean - e[None, :]
        return np.sqrt(np.einsum("kd,de,ke->k", diff, self.precision, diff))

    def state(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "classes": list(ANATOMY_CLASSES),
                "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "mean": torch.as_tensor(self.mean), "precision": torch.as_tensor(self.precision),
                "ood_threshold": float(self.ood_threshold), "metadata": dict(self.metadata),
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
            raise RegistryError(f"{path} is not a {cls.FORMAT} checkpoint")
        if tuple(ck["classes"]) != ANATOMY_CLASSES:
            raise RegistryError(f"{path}: classes {ck['classes']} do not match the code")
        net = AnatomyNet()
        net.load_state_dict(ck["state_dict"])
        net.eval()
        motion = None
        if "motion_state_dict" in ck:
            motion = MotionNet()
            motion.load_state_dict(ck["motion_state_dict"])
            motion.eval()
        return cls(net=net, mean=ck["mean"].numpy(), precision=ck["precision"].numpy(),
                   ood_threshold=float(ck["ood_threshold"]), sha256=sha256, metadata=dict(ck.get("metadata", {})),
                   motion_net=motion)


# ------------------------------------------------------------------------------------------
# the gate


@dataclass
class QCGate:
    """``check(volume, task) -> QCResult``. ``anatomy`` None -> every series is refused (qc_unavailable)."""

    anatomy: AnatomyClassifier | None
    min_snr: float = 6.0  # estimated; phantoms of the spec (true SNR >= 8) estimate >= ~11
    max_motion_probability: float = 0.5
    min_foreground: float = 0.01
    min_anatomy_probability: float = 0.5

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
            return refuse("wrong_orientation",
                          f"slices are {angle:.0f} deg away from {spec.plane} (limit {spec.max_obliquity_deg:g}); "
                          f"{task.name} reads {spec.plane} series")
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
        m["motion_probability"] = pred["motion_probability"]
        expected = f"{task.anatomy}/{spec.plane}"
        m["anatomy_probability"] = pred["probabilities"].get(expected, 0.0)
        m["anatomy_distance"] = pred["distance"]
        header = f" although the header says {volume.body_part}" if volume.body_part else ""
        if pred["label"] != expected or pred["probabilities"][expected] < self.min_anatomy_probability:
            seen = pred["label"]
            if seen.split("/")[0] == task.anatomy:
                return refuse("wrong_orientation", f"the pixels show a {seen.replace('/', ' ')} series, "
                                                   f"not {expected.replace('/', ' ')}")
            what = "something other than knee, shoulder or lumbar spine" if seen == "other" else seen.replace("/", " ")
            return refuse("wrong_anatomy", f"the pixels look like {what} (p={pred['probability']:.2f}){header}; "
                                           f"{task.name} reads {task.anatomy}")
        dist = pred["distance"]
        if dist > self.anatomy.ood_threshold:
            return refuse("out_of_distribution", f"embedding distance {dist:.1f} to {expected} training data exceeds "
                                                 f"{self.anatomy.ood_threshold:.1f}")
        if pred["motion_probability"] > self.max_motion_probability:
            return refuse("motion", f"heavy motion ghosting (classifier p={pred['motion_probability']:.2f})")
        return QCResult(True, None, None, m)


# ------------------------------------------------------------------------------------------
# training the anatomy classifier

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


def _anatomy_item(args) -> tuple[np.ndarray, int, int]:
    """(input, anatomy class, heavy motion 0/1) of item ``idx``."""
    idx, seed = args
    torch.set_num_threads(1)
    n_phantom_classes = len(ANATOMY_CLASSES) - 1
    cls = idx % (n_phantom_classes + 3)  # 3 in 12 are "other"
    if cls >= n_phantom_classes:
        from models.negatives import generate_negative

        vol = generate_negative(seed)
        return anatomy_input(vol), 0, 0
    label = ANATOMY_CLASSES[cls + 1]
    anatomy, plane = label.split("/")
    from models.phantoms import SPEC, generate

    default_plane = _PHANTOM_PLANES[anatomy][0]
    kw: dict[str, Any] = {} if plane == default_plane else {"orientation": plane}
    rng = np.random.default_rng([seed, 5])
    heavy = bool(rng.uniform() < 0.25)
    # a coarse matrix and one sub-slice: the classifier's grid is 8 x 5 x 5 mm, finer rendering is wasted CPU.
    # Motion is drawn in pixels of the spec's default matrix and scaled to the coarse one, so "heavy" means the
    # same displacement in mm as on a full-resolution series (in-spec: up to 3 px of the default matrix).
    spec_matrix = SPEC.for_anatomy(anatomy).acquisition.matrix
    matrix = int(rng.choice([64, 96]))
    if heavy:
        px = float(rng.uniform(*HEAVY_MOTION_PX))
    else:
        px = float(rng.uniform(0.5, 3.0)) if rng.uniform() < 0.3 else 0.0
    kw["motion_px"] = px * matrix / spec_matrix
    # every contrast a site may route to the anatomy's models (knee sag_pd = PD without fat saturation, ...)
    kw["sequence"] = str(rng.choice(ANATOMY_SEQUENCES[anatomy]))
    ph = generate(anatomy, seed, matrix=matrix, sub_slices=1, **kw)
    return anatomy_input(ph.volume, plane), ANATOMY_CLASSES.index(label), int(heavy)


def anatomy_items(n: int, seed: int, workers: int = 1, log: Callable[[str], None] | None = None):
    jobs = [(i, seed + i) for i in range(n)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            items = []
            for i, it in enumerate(pool.imap(_anatomy_item, jobs, chunksize=8)):
                items.append(it)
                if log and (i + 1) % 200 == 0:
                    log(f"anatomy items: {i + 1}/{n}")
            return items
    items = []
    for i, job in enumerate(jobs):
        items.append(_anatomy_item(job))
        if log and (i + 1) % 100 == 0:
            log(f"anatomy items: {i + 1}/{n}")
    return items


def train_anatomy(n: int, seed: int, out_dir: Path, *, epochs: int = 12, threads: int = 2, workers: int = 1,
                  log: Callable[[str], None] = print) -> Path:
    """Train ``qc.anatomy`` on N generated items (phantoms of 9 anatomy/plane classes + synthetic others)."""
    from monai.utils import set_determinism

    torch.set_num_threads(threads)
    set_determinism(seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    items = anatomy_items(n, seed, workers=workers, log=log)
    log(f"{len(items)} anatomy items in {time.time() - t0:.0f} s")
    x = torch.from_numpy(np.stack([it[0] for it in items]).astype(np.float32))
    y = torch.as_tensor([it[1] for it in items])
    mo = torch.as_tensor([float(it[2]) for it in items])
    n_val = max(len(ANATOMY_CLASSES), int(0.15 * len(items)))
    xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    mt, mv = mo[:-n_val], mo[-n_val:]
    net = AnatomyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    bs = 32
    steps = epochs * math.ceil(len(xt) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    log_lines = []
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for i in range(0, len(xt) - bs + 1, bs):
            idx = perm[i : i + bs]
            xb = xt[idx]
            # augmentation: intensity scale/gamma, flips along the slice axis
            scale = torch.exp(torch.randn(len(idx), 1, 1, 1, 1, generator=g) * 0.15)
            xb = xb.clamp(min=0) ** torch.exp(torch.randn(len(idx), 1, 1, 1, 1, generator=g) * 0.1) * scale
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip] = torch.flip(xb[flip], dims=[2])
            logits, emb = net(xb)
            loss = nn.functional.cross_entropy(logits, yt[idx], label_smoothing=0.05)
            loss = loss + 0.5 * nn.functional.binary_cross_entropy_with_logits(net.motion_logit(emb), mt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        net.eval()
        with torch.inference_mode():
            lv, ev_ = net(xv)
            mp = (torch.sigmoid(net.motion_logit(ev_)) > 0.5).float()
        acc = float((lv.argmax(1) == yv).float().mean())
        macc = float((mp == mv).float().mean())
        line = {"epoch": ep, "loss": round(tot / len(xt), 4), "val_acc": round(acc, 4), "val_motion_acc": round(macc, 4)}
        log_lines.append(line)
        log(json.dumps(line))
    net.eval()
    with torch.inference_mode():
        _, et = net(xt)
        lv, ev = net(xv)
    et, ev = et.numpy().astype(np.float64), ev.numpy().astype(np.float64)
    ytn, yvn = yt.numpy(), yv.numpy()
    mean = np.stack([et[ytn == k].mean(axis=0) if (ytn == k).any() else et.mean(axis=0) for k in range(len(ANATOMY_CLASSES))])
    centred = et - mean[ytn]
    cov = np.cov(centred.T) + 1e-3 * np.eye(et.shape[1])
    cov = 0.9 * cov + 0.1 * np.diag(np.diag(cov))  # shrinkage
    precision = np.linalg.inv(cov)
    clf = AnatomyClassifier(net=net, mean=mean, precision=precision, ood_threshold=0.0)
    d_val = np.array([clf.mahalanobis(e)[k] for e, k in zip(ev, yvn) if k != 0])
    d_tr = np.array([clf.mahalanobis(e)[k] for e, k in zip(et, ytn) if k != 0])
    clf.ood_threshold = float(max(np.percentile(d_tr, 99.9), d_val.max()) * 1.5)
    val_acc = float((lv.argmax(1).numpy() == yvn).mean())
    confusion = np.zeros((len(ANATOMY_CLASSES),) * 2, int)
    for t, p in zip(yvn, lv.argmax(1).numpy()):
        confusion[t, p] += 1
    clf.metadata = {"version": "1", "training_data": f"anatomy:{n}:{seed}", "n_train": int(len(xt)),
                    "n_val": int(n_val), "val_accuracy": val_acc, "epochs": epochs,
                    "ood_threshold": clf.ood_threshold, "val_distance_max": float(d_val.max()),
                    "train_distance_p99": float(np.percentile(d_tr, 99))}
    path = out_dir / "model.pt"
    sha = clf.save(path)
    (out_dir / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log_lines))
    (out_dir / "train_summary.json").write_text(json.dumps(
        {**clf.metadata, "weights_sha256": sha, "classes": list(ANATOMY_CLASSES), "confusion_val": confusion.tolist()},
        indent=2) + "\n")
    log(json.dumps({"val_accuracy": val_acc, "ood_threshold": clf.ood_threshold}))
    return path


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
                 log: Callable[[str], None] = print) -> tuple[MotionNet, dict[str, Any]]:
    """Train MotionNet on N phantoms (all anatomies, default matrix): heavy (6-20 px) vs in-spec (0-3 px)."""
    torch.set_num_threads(threads)
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
    n_val = max(20, int(0.15 * n))
    xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
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
    stats = {"motion_training_data": f"motion:{n}:{seed}", "motion_val_accuracy": float(((pv > 0.5) == yvn).mean()),
             "motion_val_recall": float((pv[yvn] > 0.5).mean()) if yvn.any() else None,
             "motion_val_false_positive_rate": float((pv[~yvn] > 0.5).mean()) if (~yvn).any() else None}
    return net, stats


def attach_motion_detector(path: Path, n: int, seed: int, *, epochs: int = 12, threads: int = 2, workers: int = 1,
                           log: Callable[[str], None] = print) -> Path:
    """Train the native-resolution motion detector on N phantoms and store it with the anatomy classifier at
    ``path`` (weights, .sha256 and train_summary.json rewritten)."""
    from models.classifier import sha256_of

    path = Path(path)
    clf = AnatomyClassifier.load(path, sha256=sha256_of(path))
    net, stats = train_motion(n, seed, epochs=epochs, threads=threads, workers=workers, log=log)
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
