"""A trained task model: network + calibration + identity; checkpoint format and inference.

Checkpoint (``torch.save`` of plain tensors and values, loaded with ``weights_only=True``):
``{"format": "msknode.classifier/1", "task": name, "net": {...}, "state_dict": ...,
"temperature": T, "threshold": t, "metadata": {...}}``; saved and loaded through
`models.protocol` (atomic save, sha256 verified before anything is deserialised).

``predict(volume)``: QC gate -> preprocessing (`models.transforms`) -> feature map under
``torch.inference_mode`` -> calibrated probabilities (temperature scaling) -> MC-dropout
uncertainty (`models.uncertainty`) -> Grad-CAM heatmap in the input geometry
(`models.saliency`, the only pass with gradients) -> `Finding` objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import RegistryError
from models.nets import LesionNet, set_mc_dropout
from models.predicting import gated_predict, model_info
from models.protocol import Checkpoint, load_checkpoint, save_checkpoint, sha256_of
from models.saliency import grad_cam, to_heatmap
from models.tasks.base import HeadResult, TaskSpec, volume_peak
from models.types import ModelInfo, ModelOutput, QCResult, Volume
from models.uncertainty import mc_dropout_probabilities

FORMAT = "msknode.classifier/1"


__all__ = ["FORMAT", "ClassifierModel", "build_net", "head_score", "sha256_of"]


def build_net(task: TaskSpec):
    return task.build_net()


def head_score(logits: torch.Tensor, head, kind: str) -> torch.Tensor:
    """Scalar the saliency explains: log-odds of the positive classes, or the top class logit."""
    lg = logits[0]
    if kind == "finding" and head.negative:
        pos = [head.classes.index(c) for c in head.positive]
        neg = [head.classes.index(c) for c in head.negative]
        return torch.logsumexp(lg[pos], 0) - torch.logsumexp(lg[neg], 0)
    return lg[int(torch.argmax(lg))]


@dataclass
class ClassifierModel:
    task: TaskSpec
    net: LesionNet
    info: ModelInfo
    temperature: float = 1.0
    threshold: float = 0.5
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: Any = None  # models.qc.QCGate; None = no gate (training/evaluation internals)
    mc_samples: int = 24

    # --- persistence --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": self.task.name,
            "net": {
                "in_channels": int(self.task.input.channels),
                "head_sizes": self.task.head_sizes,
                "channels": list(self.task.net.channels),
                "dropout": float(self.task.net.dropout),
            },
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "temperature": float(self.temperature),
            "threshold": float(self.threshold),
            "metadata": dict(self.metadata),
        }

    def save(self, path: Path) -> str:
        """Write the checkpoint and ``<file>.sha256`` beside it (atomically); returns the sha256."""
        return save_checkpoint(self.state(), path)

    @classmethod
    def load(cls, path: Path, task: TaskSpec, *, sha256: str | None = None, gate: Any = None) -> ClassifierModel:
        """Load a checkpoint for ``task``, verified against ``sha256`` (default: the ``.sha256`` file beside it)."""
        return cls.from_checkpoint(load_checkpoint(path, sha256), task, gate=gate)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, task: TaskSpec, *, gate: Any = None) -> ClassifierModel:
        """The model of a verified checkpoint (`models.protocol.load_checkpoint`) for ``task``."""
        path, data = ckpt.path, ckpt.data
        if data.get("format") != FORMAT:
            raise RegistryError(f"{path} is not a {FORMAT} checkpoint")
        if data.get("task") != task.name:
            raise RegistryError(f"{path} holds weights of {data.get('task')!r}, not {task.name!r}")
        net_cfg = data["net"]
        if list(net_cfg["head_sizes"]) != task.head_sizes or tuple(net_cfg["channels"]) != tuple(task.net.channels):
            raise RegistryError(f"{path}: network shape {net_cfg} does not match the code of {task.name}")
        net = build_net(task)
        try:
            net.load_state_dict(data["state_dict"], strict=True)
        except RuntimeError as e:
            raise RegistryError(f"{path}: weights do not fit the network of {task.name}: {e}") from None
        net.eval()
        meta = dict(data.get("metadata", {}))
        info = model_info(task, ckpt.sha256, meta, demo_weights=True)
        return cls(
            task=task,
            net=net,
            info=info,
            temperature=float(data.get("temperature", 1.0)),
            threshold=float(data.get("threshold", 0.5)),
            metadata=meta,
            gate=gate,
        )

    # --- inference ------------------------------------------------------------------------
    def preprocess(self, volume: Volume, extras=None):
        return self.task.network_input(volume, extras or {})

    def probabilities(self, x: torch.Tensor) -> list[np.ndarray]:
        """Batch (B, 1, D, H, W) -> per head (B, n_classes) calibrated probabilities (deterministic)."""
        set_mc_dropout(self.net, False)
        with torch.inference_mode():
            logits, _ = self.net(x)
        return [torch.softmax(lg / self.temperature, dim=1).numpy() for lg in logits]

    def analyse(
        self,
        volume: Volume,
        *,
        extras=None,
        saliency: bool = True,
        uncertainty: bool = True,
        timings: dict[str, float] | None = None,
    ) -> list[HeadResult]:
        """Head results for one volume (+ extra-role volumes) without QC."""
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        img, frame = self.preprocess(volume, extras)
        x = torch.from_numpy(np.ascontiguousarray(img[None], dtype=np.float32))
        timings["preprocess_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        set_mc_dropout(self.net, False)
        # test-time views: the series, and its mirror along the slice axis when the task averages over both
        flip = bool(self.task.flip_tta and self.task.input.flip_slices_ok)
        with torch.inference_mode():
            feats = [self.net.features(x)] + ([self.net.features(torch.flip(x, dims=[2]))] if flip else [])
            outs = [self.net.forward_head(f) for f in feats]
            logits = [torch.stack([o[0][h] for o in outs]).mean(dim=0) for h in range(len(self.task.heads))]
            evidence = torch.stack([o[1] if i == 0 else torch.flip(o[1], dims=[2]) for i, o in enumerate(outs)]).mean(
                dim=0
            )
        probs = [torch.softmax(lg / self.temperature, dim=1)[0].numpy() for lg in logits]
        timings["inference_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mc: list[np.ndarray] | None = None
        if uncertainty and self.mc_samples > 1:
            mc_t = mc_dropout_probabilities(self.net, feats, samples=self.mc_samples, temperature=self.temperature)
            mc = [m.numpy() for m in mc_t]
        timings["uncertainty_s"] = time.perf_counter() - t0
        results = []
        t_sal = 0.0
        for h, head in enumerate(self.task.heads):
            p = probs[h]
            std = mc[h].std(axis=0) if mc is not None else np.zeros_like(p)
            p_find = p_std = None
            if head.negative:
                neg = [head.classes.index(c) for c in head.negative]
                p_find = float(1.0 - p[neg].sum())
                if mc is not None:
                    p_std = float((1.0 - mc[h][:, neg].sum(axis=1)).std())
                else:
                    p_std = 0.0
            heat = peak_vox = peak_mm = None
            if saliency:
                ts = time.perf_counter()
                kind = self.task.score_of(h)

                def score(f, _h=h, _head=head, _kind=kind):
                    lg, _ = self.net.forward_head(f)
                    return head_score(lg[_h], _head, _kind)

                cams = [grad_cam(score, f) for f in feats]
                cam = np.mean([c if i == 0 else c[::-1] for i, c in enumerate(cams)], axis=0)
                cam = self.task.head_saliency(h, cam, evidence[0, h].numpy())
                heat = to_heatmap(cam, frame)
                peak_vox, peak_mm = volume_peak(volume, heat)
                t_sal += time.perf_counter() - ts
            results.append(
                HeadResult(
                    head=head,
                    probabilities=p,
                    std=std,
                    p_finding=p_find,
                    p_finding_std=p_std,
                    heatmap=heat,
                    peak_vox=peak_vox,
                    peak_mm=peak_mm,
                )
            )
        timings["saliency_s"] = t_sal
        return results

    def predict(
        self,
        volume: Volume,
        *,
        extras=None,
        saliency: bool = True,
        uncertainty: bool = True,
        qc: QCResult | None = None,
    ) -> ModelOutput:
        """QC gate + analysis -> ModelOutput (no findings when QC refuses the series)."""
        return gated_predict(
            self,
            volume,
            qc,
            lambda timings: self.analyse(
                volume, extras=extras, saliency=saliency, uncertainty=uncertainty, timings=timings
            ),
        )
