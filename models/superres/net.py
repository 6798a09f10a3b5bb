"""Super-resolution network and the linear pieces training and inference share.

`SuperResConfig` (factors, slab context, width), `SlabSRNet` (the 2.5D MONAI CNN that predicts
the detail of the sub-slices of each input slice), the interpolated input ``U(y)``
(`smooth_consistent_matrix`), the projection onto ``A x = y`` (`_Operators`) and the forward
pass over slabs (`forward_detail`, optionally only inside the signal's box).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import numpy as np
import torch
from monai.networks.blocks import Convolution
from torch import nn

from models.degradation import DegradationModel, slice_pseudo_inverse

BACKGROUND_LEVEL = 0.1  # normalised 8x8-block mean below which the block is background (network skipped)
BOX_MARGIN = 16  # pixels around the signal box, > the network's receptive-field radius (12)


# --------------------------------------------------------------------------------------
# configuration and network


@dataclass(frozen=True)
class SuperResConfig:
    slice_factor: int = 2
    context: int = 2  # input slices on each side of the slice being refined
    width: int = 32
    blocks: int = 2  # residual blocks (two convolutions each)
    unshuffle: int = 2  # in-plane space-to-depth factor (cheap receptive field on CPU)
    slice_sigma_frac: float = 0.15  # must match the degradation model

    @property
    def in_channels(self) -> int:
        return 2 * self.context + 1 + self.slice_factor

    def degradation(self, inplane_factor: int = 1, snr: float | None = None) -> DegradationModel:
        return DegradationModel(
            slice_factor=self.slice_factor,
            inplane_factor=inplane_factor,
            slice_sigma_frac=self.slice_sigma_frac,
            snr=snr,
        )


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            Convolution(2, width, width, act="relu", norm=None),
            Convolution(2, width, width, conv_only=True),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SlabSRNet(nn.Module):
    """(N, 2c+1+f, H, W) slab of input slices + interpolated sub-slices -> (N, f, H, W) detail.

    Space-to-depth by ``unshuffle`` first, so every 3×3 convolution runs on a grid
    ``unshuffle²`` times smaller; depth-to-space at the end. H and W must be
    multiples of ``unshuffle`` (the caller pads). The last layer starts at zero,
    so an untrained network adds no detail.
    """

    def __init__(self, config: SuperResConfig) -> None:
        super().__init__()
        u = config.unshuffle
        self.unshuffle = nn.PixelUnshuffle(u) if u > 1 else nn.Identity()
        self.shuffle = nn.PixelShuffle(u) if u > 1 else nn.Identity()
        self.head = Convolution(2, config.in_channels * u * u, config.width, act="relu", norm=None)
        self.body = nn.Sequential(*[_ResBlock(config.width) for _ in range(config.blocks)])
        self.tail = Convolution(2, config.width, config.slice_factor * u * u, conv_only=True)
        tail_conv = cast(nn.Conv2d, self.tail.conv)  # MONAI's Convolution keeps its layer as ``conv``
        nn.init.zeros_(tail_conv.weight)
        assert tail_conv.bias is not None  # conv_only keeps the bias
        nn.init.zeros_(tail_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.tail(self.body(self.head(self.unshuffle(x)))))


# --------------------------------------------------------------------------------------
# linear pieces (interpolated input, projection), shared by training and inference


@lru_cache(maxsize=64)
def smooth_consistent_matrix(n_lr: int, factor: int, sigma_frac: float) -> np.ndarray:
    """(n_lr*factor, n_lr) matrix M: the minimum-second-difference x with S x = y is M y."""
    s = DegradationModel(slice_factor=factor, slice_sigma_frac=sigma_frac).slice_matrix(n_lr)
    n = s.shape[1]
    if n < 3:
        m = np.linalg.pinv(s)
    else:
        d2 = np.diff(np.eye(n), n=2, axis=0)
        kkt = np.zeros((n + n_lr, n + n_lr))
        kkt[:n, :n] = d2.T @ d2
        kkt[:n, n:] = s.T
        kkt[n:, :n] = s
        m = np.linalg.solve(kkt, np.vstack([np.zeros((n, n_lr)), np.eye(n_lr)]))[:n]
    m.setflags(write=False)
    return m


def _zmul(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a (m, n) matrix along the slice axis of (..., n, H, W)."""
    shape = x.shape
    flat = x.reshape(*shape[:-3], shape[-3], shape[-2] * shape[-1])
    out = torch.matmul(matrix, flat)
    return out.reshape(*shape[:-3], matrix.shape[0], shape[-2], shape[-1])


@dataclass
class _Operators:
    """Torch matrices for one slice count: S (n, fn), its pseudo-inverse (fn, n), base M (fn, n)."""

    s: torch.Tensor
    pinv: torch.Tensor
    base: torch.Tensor

    @classmethod
    def build(cls, n_lr: int, config: SuperResConfig) -> _Operators:
        f, sig = config.slice_factor, config.slice_sigma_frac
        s = DegradationModel(slice_factor=f, slice_sigma_frac=sig).slice_matrix(n_lr)
        return cls(
            s=torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)),
            pinv=torch.from_numpy(np.ascontiguousarray(slice_pseudo_inverse(n_lr, f, sig), dtype=np.float32)),
            base=torch.from_numpy(np.ascontiguousarray(smooth_consistent_matrix(n_lr, f, sig), dtype=np.float32)),
        )

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + _zmul(self.pinv, y - _zmul(self.s, x))


def slab_inputs(
    y: torch.Tensor, base: torch.Tensor, config: SuperResConfig, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., n, H, W) input and (..., f*n, H, W) base -> (..., k, 2c+1+f, H, W) network input
    for the input slices ``rows`` (default all n)."""
    n = y.shape[-3]
    f = config.slice_factor
    rows = torch.arange(n) if rows is None else rows
    offsets = torch.arange(-config.context, config.context + 1)
    idx = (rows[:, None] + offsets[None, :]).clamp(0, n - 1)  # (k, 2c+1)
    neighbours = y[..., idx, :, :]  # (..., k, 2c+1, H, W)
    sub = base.reshape(*base.shape[:-3], n, f, *base.shape[-2:])[..., rows, :, :, :]
    return torch.cat([neighbours, sub], dim=-3)


def forward_detail(
    net: nn.Module,
    y: torch.Tensor,
    ops: _Operators,
    config: SuperResConfig,
    chunk: int | None = None,
    channels_last: bool = False,
    skip_background: bool = False,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised input y (..., n, H, W) -> (interpolated input, output before projection).

    ``chunk``: input slices per network call (the slab of each chunk is built on demand, so
    peak memory stays at one chunk). ``skip_background``: run the network only inside the
    box of the chunk's signal (no detail is added in empty background). ``bf16``: the network alone runs in
    bfloat16 (autocast; its detail comes back as float32), the interpolation and everything else stay float32."""
    base = _zmul(ops.base, y)
    lead = y.shape[:-3]
    n, h, w = y.shape[-3:]
    u = config.unshuffle
    step = chunk or n
    parts = []
    for start in range(0, n, step):
        rows = torch.arange(start, min(start + step, n))
        slab = slab_inputs(y, base, config, rows).reshape(-1, config.in_channels, h, w)
        box = _signal_box(slab, u) if skip_background else (0, h, 0, w)
        out = torch.zeros(slab.shape[0], config.slice_factor, h, w, dtype=slab.dtype)
        if box is not None:
            r0, r1, c0, c1 = box
            sub = slab[..., r0:r1, c0:c1]
            ph, pw = (-(r1 - r0)) % u, (-(c1 - c0)) % u
            if ph or pw:
                sub = torch.nn.functional.pad(sub, (0, pw, 0, ph), mode="replicate")
            if channels_last:
                sub = sub.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                detail = net(sub)
            out[..., r0:r1, c0:c1] = detail[..., : r1 - r0, : c1 - c0].float()
        parts.append(out.reshape(*lead, len(rows), config.slice_factor, h, w))
    detail = torch.cat(parts, dim=-4).reshape(*lead, n * config.slice_factor, h, w)
    return base, base + detail


def _signal_box(slab: torch.Tensor, multiple: int) -> tuple[int, int, int, int] | None:
    """In-plane bounding box (with a margin wider than the network's receptive field) of the pixels
    where any input of the chunk exceeds BACKGROUND_LEVEL; None when there is no signal at all."""
    h, w = slab.shape[-2:]
    peak = slab.abs().flatten(0, -3).amax(dim=0)[None, None]
    # mean over 8x8 blocks: isolated noise pixels do not count as signal
    mask = torch.nn.functional.avg_pool2d(peak, 8, ceil_mode=True)[0, 0] > BACKGROUND_LEVEL
    mask = mask.repeat_interleave(8, dim=0).repeat_interleave(8, dim=1)[:h, :w]
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    m = BOX_MARGIN
    r0, r1 = max(int(rows[0]) - m, 0), min(int(rows[-1]) + 1 + m, h)
    c0, c1 = max(int(cols[0]) - m, 0), min(int(cols[-1]) + 1 + m, w)
    r0 -= r0 % multiple
    c0 -= c0 % multiple
    return r0, r1, c0, c1
