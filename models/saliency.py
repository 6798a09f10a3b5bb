"""Saliency: Grad-CAM on a network's feature map, mapped back into the input geometry.

This is the only place in inference where gradients are enabled: the feature map F is
computed without gradients, then the head runs with ``torch.enable_grad()`` on a leaf
copy of F, so the backward pass covers the (cheap) head only. Output: a float32 map in
[0, 1] with the shape of the source volume (0 outside the model's region of interest).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from models.transforms import Frame


def grad_cam(head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor) -> np.ndarray:
    """Grad-CAM of the scalar ``head(features)`` w.r.t. ``features`` (1, C, d, h, w) -> (d, h, w) >= 0."""
    with torch.inference_mode(False), torch.enable_grad():
        feat = features.detach().clone().requires_grad_(True)
        score = head(feat)
        if score.numel() != 1:
            raise ValueError("the saliency score must be a scalar")
        (grad,) = torch.autograd.grad(score, feat)
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)  # (1, C, 1, 1, 1)
    cam = torch.relu((weights * feat.detach()).sum(dim=1))[0]
    return cam.numpy().astype(np.float32)


def to_heatmap(cam: np.ndarray, frame: Frame) -> np.ndarray:
    """Feature-grid CAM -> network grid -> source geometry, scaled to [0, 1] (float32)."""
    cam = np.asarray(cam, np.float32)
    if cam.shape != frame.out_shape:
        # feature grid -> network grid: each feature voxel covers an equal block of the grid
        reps = [o / c for o, c in zip(frame.out_shape, cam.shape)]
        from models.transforms import apply_separable, interp_matrix

        ms = [
            interp_matrix(cam.shape[a], (0.5 / reps[a]) - 0.5, 1.0 / reps[a], frame.out_shape[a], antialias=False)
            for a in range(3)
        ]
        # samples beyond the first/last feature voxel centre are clamped rather than dropped
        for a, m in enumerate(ms):
            empty = m.sum(axis=1) == 0
            if empty.any():
                idx = np.flatnonzero(empty)
                m[idx, np.where(idx < frame.out_shape[a] / 2, 0, cam.shape[a] - 1)] = 1.0
        cam = apply_separable(cam, *ms)
    heat = frame.to_source(cam)
    heat = np.clip(heat, 0.0, None)
    top = float(heat.max())
    if top > 0:
        heat = heat / top
    return heat.astype(np.float32)
