"""The two small 2-D networks of ``lumbar_spine.discs``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_LEVELS = 5
HEAT = 64  # localiser output grid (1/4 of the input grid)


def _block(cin: int, cout: int, stride: int = 1, dil: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dil, dilation=dil, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DiscLocaliser(nn.Module):
    """(B, 1, 256, 256) grid image -> (B, 5, 64, 64) logits, one map per level L1-L2 ... L5-S1.

    The level is named by counting discs from the sacrum, so the coarsest map (1/8) gets dilated
    convolutions that see the whole image, and every map gets the normalised (row, col) position."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_block(3, w), _block(w, w))
        self.down1 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))  # 128
        self.down2 = nn.Sequential(_block(2 * w, 3 * w, 2), _block(3 * w, 3 * w))  # 64
        self.down3 = nn.Sequential(_block(3 * w, 4 * w, 2), _block(4 * w, 4 * w))  # 32
        self.context = nn.Sequential(
            _block(4 * w, 4 * w, dil=2), _block(4 * w, 4 * w, dil=4), _block(4 * w, 4 * w, dil=8)
        )
        self.fuse = nn.Sequential(_block(7 * w + 2, 4 * w), _block(4 * w, 4 * w))
        self.out = nn.Conv2d(4 * w, N_LEVELS, 1)

    @staticmethod
    def _coords(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([ys, xs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(torch.cat([x, self._coords(x)], dim=1))
        s2 = self.down2(self.down1(s))
        s3 = self.down3(s2)
        s3 = s3 + self.context(s3)
        up = F.interpolate(s3, size=s2.shape[2:], mode="bilinear", align_corners=False)
        f = self.fuse(torch.cat([s2, up, self._coords(s2)], dim=1))
        return self.out(f)


class DiscGrader(nn.Module):
    """(B, C, 64, 64) disc patch (and its wider context) + level one-hot -> Pfirrmann logits (B, 5), herniation, narrowing and
    bulging logits (B,) each."""

    def __init__(self, width: int = 24, dropout: float = 0.3, in_channels: int = 2):
        super().__init__()
        w = width
        self.in_channels = in_channels
        self.features = nn.Sequential(
            _block(in_channels, w),
            _block(w, w),
            nn.MaxPool2d(2),  # 32
            _block(w, 2 * w),
            _block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 16
            _block(2 * w, 4 * w),
            _block(4 * w, 4 * w),
            nn.MaxPool2d(2),  # 8
            _block(4 * w, 6 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(6 * w + N_LEVELS, 4 * w), nn.ReLU(inplace=True))
        self.grade = nn.Linear(4 * w, 5)
        self.binary = nn.Linear(4 * w, 3)  # herniation, narrowing, bulging

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x).flatten(1)
        onehot = F.one_hot(level.long(), N_LEVELS).to(f.dtype)
        h = self.fc(torch.cat([f, onehot], dim=1))
        return self.grade(h), self.binary(h)
