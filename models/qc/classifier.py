"""The anatomy classifier ``qc.anatomy``: `AnatomyClassifier` (inference; its checkpoint through
`models.protocol`).

Slice logits are averaged over the series' central slices (`models.qc.preprocess.anatomy_input`);
out-of-distribution inputs are caught by the Mahalanobis distance of the series embedding to the class
means of the claimed anatomy. The optional motion detector (`MotionNet`) is stored in the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import RegistryError
from models.protocol import Checkpoint, load_checkpoint, save_checkpoint
from models.qc.gate import Thresholds
from models.qc.net import ANATOMIES, ANATOMY_CLASSES, AnatomyNet, MotionNet
from models.qc.preprocess import INFER_SLICES, INFER_SPAN, MASK_BAND, SLICE_GRID, anatomy_input, motion_input
from models.types import Volume


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
        return {
            "label": self.classes[k],
            "probability": float(p[k]),
            "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
            "anatomy_probabilities": anat_p,
            "distance": float(d[k]),
            "min_distance": float(min(d[i] for i, c in enumerate(self.classes) if c != "other")),
            "anatomy_distances": anat_d,
            "slices": len(x),
        }

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
        return {
            "format": self.FORMAT,
            "classes": list(self.classes),
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "mean": torch.as_tensor(self.mean, dtype=torch.float32),
            "precision": torch.as_tensor(self.precision, dtype=torch.float32),
            "ood_threshold": float(self.ood_threshold),
            "contradiction_threshold": float(self.contradiction_threshold),
            "plane_threshold": float(self.plane_threshold),
            "support_threshold": float(self.support_threshold),
            "distance_scale": float(self.distance_scale),
            "metadata": dict(self.metadata),
            "input": {
                "grid": SLICE_GRID,
                "slices": INFER_SLICES,
                "span": list(INFER_SPAN),
                "mask_band": list(MASK_BAND),
            },
            **(
                {"motion_state_dict": {k: v.detach().clone() for k, v in self.motion_net.state_dict().items()}}
                if self.motion_net is not None
                else {}
            ),
        }

    def save(self, path: Path) -> str:
        """Write the checkpoint and ``path.sha256`` (atomically, `models.protocol`); returns the hash."""
        return save_checkpoint(self.state(), Path(path))

    @classmethod
    def load(cls, path: Path, *, sha256: str | None = None) -> AnatomyClassifier:
        """Load a checkpoint, verified against ``sha256`` or the ``.sha256`` file beside it (and the card)."""
        return cls.from_checkpoint(load_checkpoint(Path(path), sha256))

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> AnatomyClassifier:
        """The classifier of a verified checkpoint (`models.protocol.load_checkpoint`)."""
        ck, path = ckpt.data, ckpt.path
        if ck.get("format") != cls.FORMAT:
            raise RegistryError(f"{path} is not a {cls.FORMAT} checkpoint (found {ck.get('format')})")
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
        return cls(
            net=net,
            mean=ck["mean"].double().numpy(),
            precision=ck["precision"].double().numpy(),
            ood_threshold=float(ck["ood_threshold"]),
            sha256=ckpt.sha256,
            metadata=dict(ck.get("metadata", {})),
            motion_net=motion,
            contradiction_threshold=float(ck.get("contradiction_threshold", 0.8)),
            plane_threshold=float(ck.get("plane_threshold", 0.9)),
            support_threshold=float(ck.get("support_threshold", 0.0)),
            distance_scale=float(ck.get("distance_scale", 1.0)),
        )

    def thresholds(self) -> Thresholds:
        return Thresholds(
            contradiction=self.contradiction_threshold,
            plane=self.plane_threshold,
            support=self.support_threshold,
            ood=self.ood_threshold,
        )
