"""Networks (MONAI blocks), sized for CPU inference.

`LesionNet`: a small anisotropic 3-D CNN for lesion-type classifiers.

    input (B, C, D, H, W)
    space-to-depth (1,2,2), lossless           D,   H/2, W/2   (no full-resolution convolutions: CPU)
    stem   3x3x3 conv                          D,   H/2, W/2
    down2  two 3x3x3 convs, the first stride 2 D/2, H/4, W/4
    down3  two 3x3x3 convs, stride (1,2,2)     D/2, H/8, W/8
    fuse   [down2, upsampled down3] -> 1x1x1   D/2, H/4, W/4   = feature map F (saliency layer)
    evidence  dropout + 1x1x1 conv -> one lesion-evidence map per head
    per head: attention pooling of F with softmax(evidence) + global mean of F + max evidence
              -> dropout -> linear -> class logits

The evidence map ties the decision to a place (Grad-CAM on F peaks where the lesion is);
where lesion masks exist (phantoms) it is also supervised. The dropout layers are the
MC-dropout layers; `forward_head` runs only the cheap part after F, so uncertainty
(many stochastic head passes) and saliency (gradients w.r.t. F) cost little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn


class SpaceToDepth(nn.Module):
    """(B, C, D, H, W) -> (B, C*f*f, D, H/f, W/f): lossless in-plane downsampling (H, W multiples of f)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.f = int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        f = self.f
        x = x.reshape(b, c, d, h // f, f, w // f, f).permute(0, 1, 4, 6, 2, 3, 5)
        return x.reshape(b, c * f * f, d, h // f, w // f)


class LesionNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        head_sizes: Sequence[int],
        channels: Sequence[int] = (16, 24, 48),
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.head_sizes = [int(h) for h in head_sizes]
        n_heads = len(self.head_sizes)

        def conv(cin, cout, k=3, s=1):
            return Convolution(3, cin, cout, strides=s, kernel_size=k, act="relu", norm="batch")

        self.s2d = SpaceToDepth(2)
        self.stem = conv(4 * in_channels, c1)  # D, H/2, W/2
        self.down2 = nn.Sequential(conv(c1, c2, s=2), conv(c2, c2))  # D/2, H/4, W/4
        self.down3 = nn.Sequential(conv(c2, c3, s=(1, 2, 2)), conv(c3, c3))  # D/2, H/8, W/8
        self.fuse = conv(c2 + c3, c2, k=1)
        self.drop_map = nn.Dropout(dropout)
        self.evidence = nn.Conv3d(c2, n_heads, kernel_size=1)
        self.drop_vec = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList([nn.Linear(2 * c2 + 1, n) for n in self.head_sizes])
        assert self.evidence.bias is not None  # a Conv3d has a bias unless bias=False
        nn.init.constant_(self.evidence.bias, -2.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The saliency layer F: (B, c2, D/2, H/4, W/4)."""
        s2 = self.down2(self.stem(self.s2d(x)))
        s3 = self.down3(s2)
        up = F.interpolate(s3, size=s2.shape[2:], mode="nearest")
        return self.fuse(torch.cat([s2, up], dim=1))

    def forward_head(self, feat: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """F -> (per-head class logits [(B, n_classes)], evidence maps (B, n_heads, d, h, w))."""
        ev = self.evidence(self.drop_map(feat))
        b, c = feat.shape[:2]
        flat_f = feat.reshape(b, c, -1)  # (B, C, N)
        gmean = flat_f.mean(dim=2)
        logits = []
        for h, clf in enumerate(self.classifiers):
            e = ev[:, h].reshape(b, -1)  # (B, N)
            att = torch.softmax(e, dim=1)
            pooled = torch.bmm(flat_f, att.unsqueeze(2)).squeeze(2)  # (B, C)
            emax = e.max(dim=1).values.unsqueeze(1)
            z = self.drop_vec(torch.cat([pooled, gmean, emax], dim=1))
            logits.append(clf(z))
        return logits, ev

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.forward_head(self.features(x))


def set_mc_dropout(net: nn.Module, enabled: bool) -> None:
    """Eval mode everywhere (batch norm frozen); dropout layers stochastic when ``enabled``."""
    net.eval()
    if enabled:
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.train()


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
