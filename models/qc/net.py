"""The QC networks: `AnatomyNet` (anatomy/plane classes and a series embedding) and `MotionNet`
(heavy motion ghosting), and the classes the anatomy network predicts."""

from __future__ import annotations

import torch
from torch import nn

ANATOMY_CLASSES = (
    "other",
    "knee/sagittal",
    "knee/coronal",
    "knee/axial",
    "shoulder/coronal",
    "shoulder/sagittal",
    "shoulder/axial",
    "lumbar_spine/sagittal",
    "lumbar_spine/coronal",
    "lumbar_spine/axial",
)

ANATOMIES = ("knee", "shoulder", "lumbar_spine")
EMBED_DIM = 128


class AnatomyNet(nn.Module):
    """Small MONAI 2-D CNN: (B, 1, 96, 96) slices -> class logits and a 128-d embedding (mean + max pooled)."""

    def __init__(self, n_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        from monai.networks.blocks import Convolution

        def conv(cin, cout, s=1):
            return Convolution(2, cin, cout, strides=s, kernel_size=3, act="relu", norm="batch")

        self.body = nn.Sequential(
            conv(1, 16, 2),
            conv(16, 16),
            conv(16, 32, 2),
            conv(32, 32),
            conv(32, 48, 2),
            conv(48, 48),
            conv(48, 64, 2),
            conv(64, 64),
        )
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(EMBED_DIM, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return self.fc(self.drop(e)), e


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
