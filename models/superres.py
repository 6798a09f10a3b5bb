"""Residual, data-consistent super-resolution (``superres``).

Through-plane ×2 (in-plane ×2 on request) for 2D multislice MR series:

1. *Interpolated input* ``U(y)``: the smoothest volume on the fine grid whose
   degradation is exactly the input (minimum second difference along the slice
   axis subject to ``S x = y``; one small matrix per slice count). In-plane ×2
   adds cubic interpolation whose low k-space is replaced by the input's.
2. *Learned detail*: a small 2.5D MONAI CNN (`SlabSRNet`) looks at each input
   slice with its neighbours (a slab) plus its interpolated sub-slices and
   predicts a residual for the ``f`` sub-slices of that slice. A per-series
   share of it (`SuperResModel.detail_gain`, 0..1) is checked on the series
   itself (degraded once more), so data unlike the training phantoms gets less.
3. *Data-consistency projection*: ``x ← x + B(y − A x)`` with the documented
   degradation operator ``A`` (`models.degradation`) and its right inverse ``B``.
   Because the projection is the last step, ``A(output) = input`` holds by
   construction up to float32 rounding; the error is still measured for every
   series and reported against ``CONSISTENCY_TOLERANCE``.

The output is therefore ``U(y) + (I − BA)·detail``: the input is never replaced,
the network can only add what the input cannot see (the null space of ``A``), and
with zero detail the output equals the interpolated input. The source series is
never modified; a new `Volume` with the new geometry is returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import Convolution
from scipy import ndimage
from torch import nn

from models.degradation import DegradationModel, kspace_down, kspace_up, slice_pseudo_inverse
from models.errors import ModelsError, RegistryError
from models.protocol import Checkpoint, load_checkpoint, save_checkpoint
from models.types import NOT_FOR_DIAGNOSTIC_USE, ModelInfo, QCResult, SuperResOutput, Volume

MODEL_NAME = "superres"
FORMAT = "msknode.superres/1"
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "superres" / "superres.pt"
CONSISTENCY_TOLERANCE = 1e-3  # relative RMS of A(output) - input
NONNEG_ITERATIONS = 2  # alternating projections (x >= 0, then A x = y) after the final projection
CHUNK_SLICES = 8  # input slices per network call (bounds peak memory)
BACKGROUND_LEVEL = 0.1  # normalised 8x8-block mean below which the block is background (network skipped)
BOX_MARGIN = 16  # pixels around the signal box, > the network's receptive-field radius (12)
CALIBRATION_WINDOW = 160  # in-plane window (pixels) for the per-series detail calibration


class SuperResError(ModelsError, ValueError):
    """Bad input for super-resolution or a bad checkpoint."""


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
        nn.init.zeros_(self.tail.conv.weight)
        nn.init.zeros_(self.tail.conv.bias)

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
    def build(cls, n_lr: int, config: SuperResConfig) -> "_Operators":
        f, sig = config.slice_factor, config.slice_sigma_frac
        s = DegradationModel(slice_factor=f, slice_sigma_frac=sig).slice_matrix(n_lr)
        return cls(
            s=torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)),
            pinv=torch.from_numpy(np.ascontiguousarray(slice_pseudo_inverse(n_lr, f, sig), dtype=np.float32)),
            base=torch.from_numpy(np.ascontiguousarray(smooth_consistent_matrix(n_lr, f, sig), dtype=np.float32)),
        )

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + _zmul(self.pinv, y - _zmul(self.s, x))


def slab_inputs(y: torch.Tensor, base: torch.Tensor, config: SuperResConfig,
                rows: torch.Tensor | None = None) -> torch.Tensor:
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


def forward_detail(net: nn.Module, y: torch.Tensor, ops: _Operators, config: SuperResConfig,
                   chunk: int | None = None, channels_last: bool = False,
                   skip_background: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised input y (..., n, H, W) -> (interpolated input, output before projection).

    ``chunk``: input slices per network call (the slab of each chunk is built on demand, so
    peak memory stays at one chunk). ``skip_background``: run the network only inside the
    box of the chunk's signal (no detail is added in empty background)."""
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
            out[..., r0:r1, c0:c1] = net(sub)[..., : r1 - r0, : c1 - c0]
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


# --------------------------------------------------------------------------------------
# geometry


def superres_geometry(source: Volume, slice_factor: int, inplane_factor: int) -> dict[str, Any]:
    """Spacing, positions and per-slice source references of the super-resolved grid.

    Sub-slice ``s`` of input slice ``k`` sits at ``k + (s + 0.5)/f - 0.5`` input-slice units
    (the thick slice is split into ``f`` thinner slices covering the same extent). In-plane,
    pixel 0 keeps its centre and the spacing divides by the factor (DFT sampling).
    """
    pos = np.asarray(source.positions, dtype=np.float64).reshape(-1, 3)
    n = pos.shape[0]
    f, g = slice_factor, inplane_factor
    if n > 1:
        step = (pos[-1] - pos[0]) / (n - 1)
    else:
        step = source.normal * source.spacing[0]
    t = np.arange(n * f) / f + (0.5 / f - 0.5)
    positions = pos[0][None, :] + t[:, None] * step[None, :]
    src = np.arange(n * f) // f
    uids = tuple(source.sop_instance_uids[k] for k in src) if len(source.sop_instance_uids) == n else ()
    frames = tuple(source.frame_numbers[k] for k in src) if len(source.frame_numbers) == n else ()
    spacing = (source.spacing[0] / f, source.spacing[1] / g, source.spacing[2] / g)
    return {"positions": positions, "spacing": spacing, "sop_instance_uids": uids, "frame_numbers": frames}


# --------------------------------------------------------------------------------------
# the model


def _input_qc(volume: Volume) -> QCResult:
    a = volume.array
    if a.ndim != 3:
        return QCResult(False, "bad_shape", f"expected a 3-D volume, got shape {a.shape}")
    if a.shape[0] < 2:
        return QCResult(False, "too_few_slices", f"super-resolution needs at least 2 slices, got {a.shape[0]}")
    if min(a.shape[1:]) < 8:
        return QCResult(False, "bad_shape", f"in-plane size {a.shape[1:]} is too small")
    if not np.isfinite(a).all():
        return QCResult(False, "non_finite", "volume contains NaN or infinite values")
    if float(a.max()) - float(a.min()) <= 0:
        return QCResult(False, "constant_image", "volume is constant")
    return QCResult(True, metrics={"slices": float(a.shape[0])})


@dataclass
class SuperResModel:
    """A loaded super-resolution model: network + configuration + identity."""

    net: SlabSRNet
    config: SuperResConfig
    info: ModelInfo
    metadata: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    @classmethod
    def untrained(cls, config: SuperResConfig | None = None, seed: int = 0) -> "SuperResModel":
        config = config or SuperResConfig()
        torch.manual_seed(seed)
        net = SlabSRNet(config).eval()
        info = ModelInfo(name=MODEL_NAME, version="untrained", weights_sha256="", task="superres", anatomy="any")
        return cls(net=net, config=config, info=info)

    def state(self) -> dict[str, Any]:
        """Checkpoint content (tensors and plain values only; loads with weights_only=True)."""
        return {
            "format": FORMAT,
            "config": asdict(self.config),
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "metadata": dict(self.metadata),
        }

    def save(self, path: Path) -> str:
        """Write the checkpoint and ``path.sha256`` (atomically, `models.protocol`); returns the hash."""
        return save_checkpoint(self.state(), path)

    @classmethod
    def load(cls, path: Path, expected_sha256: str | None = None, version: str | None = None) -> "SuperResModel":
        """Load a checkpoint, verified against ``expected_sha256`` or the ``.sha256`` file beside it."""
        path = Path(path)
        if not path.is_file():
            raise SuperResError(f"super-resolution weights not found: {path}")
        try:
            ckpt = load_checkpoint(path, expected_sha256)
        except RegistryError as exc:
            raise SuperResError(str(exc)) from exc
        return cls.from_checkpoint(ckpt, version=version)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, version: str | None = None) -> "SuperResModel":
        """The model of a verified checkpoint (`models.protocol.load_checkpoint`)."""
        data = ckpt.data
        if data.get("format") != FORMAT:
            raise SuperResError(f"{ckpt.path} is not a super-resolution checkpoint")
        config = SuperResConfig(**data["config"])
        net = SlabSRNet(config)
        net.load_state_dict(data["state_dict"])
        net.eval()
        meta = dict(data.get("metadata", {}))
        info = ModelInfo(
            name=MODEL_NAME,
            version=version or str(meta.get("version", "0")),
            weights_sha256=ckpt.sha256,
            task="superres",
            anatomy="any",
            demo_weights=True,
            notice=NOT_FOR_DIAGNOSTIC_USE,
        )
        return cls(net=net, config=config, info=info, metadata=meta)

    # ---------------------------------------------------------------------------------
    def detail_gain(self, yt: torch.Tensor) -> float:
        """Self-calibrated share of the learned detail for one series (0..1).

        The input is degraded once more by the same model (S, noise-free) on a central
        in-plane window, super-resolved, and the gain ``a`` minimising ‖P(base + a·detail) − input‖
        is taken (least squares, clipped to [0, 1]). On data unlike the training phantoms
        the detail stops helping and ``a`` falls towards 0 (the interpolated input).
        """
        cfg = self.config
        f = cfg.slice_factor
        n_ll = yt.shape[0] // f
        if n_ll < 2:
            return 0.0  # too few slices to check the detail on this series: add none
        h, w = yt.shape[1:]
        ch, cw = min(h, CALIBRATION_WINDOW), min(w, CALIBRATION_WINDOW)
        win = yt[: n_ll * f, (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
        ops = _Operators.build(n_ll, cfg)
        ll = _zmul(ops.s, win)
        base, pre = forward_detail(self.net, ll, ops, cfg, chunk=CHUNK_SLICES, channels_last=self.channels_last,
                                   skip_background=True)
        bp = ops.project(base, ll)
        dp = ops.project(pre, ll) - bp
        den = float((dp * dp).sum())
        if den <= 0:
            return 0.0
        return float(min(max(float((dp * (win - bp)).sum()) / den, 0.0), 1.0))

    def enhance(self, y: np.ndarray, inplane: bool = False, detail: bool = True,
                gain: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """Input array (n, H, W) -> super-resolved array and figures (timings ``*_s``, ``detail_gain``).

        ``detail=False``: the interpolated input only; ``gain`` fixes the detail share instead of
        calibrating it on the series (``detail_gain``)."""
        stats: dict[str, float] = {}
        t0 = time.perf_counter()
        y = np.ascontiguousarray(y, dtype=np.float32)
        sub = y[:, ::4, ::4]
        scale = float(np.percentile(sub, 99.5)) or float(np.abs(y).max()) or 1.0
        cfg = self.config
        ops = _Operators.build(y.shape[0], cfg)
        yt = torch.from_numpy(y) / scale
        stats["prepare_s"] = time.perf_counter() - t0
        with torch.inference_mode():
            t0 = time.perf_counter()
            a = 0.0
            if detail:
                a = self.detail_gain(yt) if gain is None else float(gain)
            stats["calibration_s"] = time.perf_counter() - t0
            stats["detail_gain"] = a
            t0 = time.perf_counter()
            if a > 0:
                base, pre = forward_detail(self.net, yt, ops, cfg, chunk=CHUNK_SLICES,
                                           channels_last=self.channels_last, skip_background=True)
                x = base + a * (pre - base)
            else:
                x = _zmul(ops.base, yt)
            stats["network_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            x = ops.project(x, yt)
            for _ in range(NONNEG_ITERATIONS):  # pull background-noise undershoot towards >= 0, end consistent
                x = ops.project(torch.clamp_min(x, 0.0), yt)
            x = (x * scale).numpy()
        stats["projection_s"] = time.perf_counter() - t0
        if inplane:
            t0 = time.perf_counter()
            x = inplane_upsample(x, 2)
            stats["inplane_s"] = time.perf_counter() - t0
        return x, stats

    def predict(self, volume: Volume, inplane: bool = False) -> SuperResOutput:
        """Super-resolve one series; the source `Volume` is not modified."""
        t_start = time.perf_counter()
        cpu_start = time.process_time()
        qc = _input_qc(volume)
        g = 2 if inplane else 1
        tol = CONSISTENCY_TOLERANCE
        if not qc.accepted:
            return SuperResOutput(model=self.info, source=volume, volume=volume, qc=qc,
                                  consistency_error=math.nan, consistency_tolerance=tol, consistency_passed=False,
                                  timings={"total_s": time.perf_counter() - t_start})
        y = np.asarray(volume.array, dtype=np.float32)
        x, stats = self.enhance(y, inplane=inplane)
        timings = {k: v for k, v in stats.items() if k.endswith("_s")}
        qc = replace(qc, metrics={**qc.metrics, "detail_gain": stats["detail_gain"]})
        t0 = time.perf_counter()
        deg = self.config.degradation(inplane_factor=g)
        err = deg.consistency_error(x, y)
        timings["consistency_s"] = time.perf_counter() - t0
        geo = superres_geometry(volume, self.config.slice_factor, g)
        attrs = dict(volume.attributes)
        attrs.update({
            "derived_from_series_uid": volume.series_uid,
            "superres_slice_factor": self.config.slice_factor,
            "superres_inplane_factor": g,
            "slice_thickness": geo["spacing"][0],
            "image_type": ["DERIVED", "SECONDARY"],
        })
        out = replace(
            volume,
            array=x.astype(np.float32),
            spacing=geo["spacing"],
            positions=geo["positions"],
            sop_instance_uids=geo["sop_instance_uids"],
            frame_numbers=geo["frame_numbers"],
            attributes=attrs,
        )
        timings["total_s"] = time.perf_counter() - t_start
        timings["cpu_s"] = time.process_time() - cpu_start  # CPU seconds of this process (all threads)
        return SuperResOutput(
            model=self.info, source=volume, volume=out, qc=qc,
            consistency_error=err, consistency_tolerance=tol, consistency_passed=bool(err <= tol),
            timings=timings,
        )


def _cubic_double(x: torch.Tensor, dim: int) -> torch.Tensor:
    """×2 along one dim: sample 2j = x[j], 2j+1 = Catmull-Rom cubic at j + 0.5 (edges replicated)."""
    n = x.shape[dim]
    first = x.narrow(dim, 0, 1)
    last = x.narrow(dim, n - 1, 1)
    p = torch.cat([first, x, last, last], dim=dim)
    mid = 0.5625 * (p.narrow(dim, 1, n) + p.narrow(dim, 2, n)) - 0.0625 * (p.narrow(dim, 0, n) + p.narrow(dim, 3, n))
    out = torch.stack([x, mid], dim=dim + 1)
    shape = list(x.shape)
    shape[dim] = 2 * n
    return out.reshape(shape)


def inplane_upsample(x: np.ndarray, factor: int = 2) -> np.ndarray:
    """In-plane ×2: cubic interpolation whose low k-space is replaced by the input's (K(out) = x)."""
    if factor != 2:
        raise SuperResError(f"in-plane factor {factor} is not supported (only 2)")
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        up = _cubic_double(_cubic_double(t, 1), 2).numpy()
    resid = x - kspace_down(up, factor)
    return up + kspace_up(resid, factor)


# --------------------------------------------------------------------------------------
# metrics (foreground PSNR / SSIM against the high-resolution truth)


def foreground_mask(hr: np.ndarray) -> np.ndarray:
    """Voxels above 10 % of the 99th percentile of the truth, dilated by one voxel in-plane."""
    p99 = float(np.percentile(hr, 99))
    mask = hr > 0.1 * p99
    return ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool))


def psnr(x: np.ndarray, hr: np.ndarray, mask: np.ndarray) -> float:
    """PSNR over the mask, peak = maximum of the truth in the mask."""
    peak = float(hr[mask].max())
    mse = float(np.mean((x[mask].astype(np.float64) - hr[mask]) ** 2))
    return 10.0 * math.log10(peak * peak / max(mse, 1e-20))


def ssim(x: np.ndarray, hr: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM over the mask (per-slice Gaussian window, sigma 1.5 px; K1=0.01, K2=0.03)."""
    peak = float(hr[mask].max())
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=(0, 1.5, 1.5), truncate=3.5)

    a = x.astype(np.float64)
    b = hr.astype(np.float64)
    ma, mb = blur(a), blur(b)
    saa = blur(a * a) - ma * ma
    sbb = blur(b * b) - mb * mb
    sab = blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma * ma + mb * mb + c1) * (saa + sbb + c2))
    return float(s[mask].mean())


# --------------------------------------------------------------------------------------
# evaluation: fresh cases, the fixed degradation, SR vs tricubic


@dataclass
class SRCase:
    """One evaluation case: the high-resolution truth and the low-resolution input made from it."""

    name: str
    truth: np.ndarray  # (f*n, H, W) (in-plane mode: (f*n, g*H, g*W))
    lr: np.ndarray  # (n, H, W)


def lr_snr_range(anatomy: str, slice_factor: int = 2) -> tuple[float, float]:
    """SNR of the thick-slice input: the phantom spec's SNR range times the slice factor
    (signal per voxel grows with the slice thickness, noise does not)."""
    from models.phantoms import SPEC

    lo, hi = SPEC.for_anatomy(anatomy).acquisition.snr
    return lo * slice_factor, hi * slice_factor


def phantom_truth(anatomy: str, seed: int, **overrides: Any) -> np.ndarray:
    """Noise-free phantom volume (same anatomy and nuisances as the seed's noisy one)."""
    from models.phantoms import generate

    return np.asarray(generate(anatomy, seed, snr=None, **overrides).volume.array, dtype=np.float32)


def phantom_case(anatomy: str, seed: int, *, slice_factor: int = 2, inplane_factor: int = 1,
                 slice_sigma_frac: float = 0.15) -> SRCase:
    """Truth = noise-free phantom; input = S (and K) of it plus Rician noise at an SNR drawn
    log-uniformly from `lr_snr_range` with a generator seeded by (seed, anatomy)."""
    truth = phantom_truth(anatomy, seed)
    rng = np.random.default_rng([int(seed), 7919, len(anatomy)])
    lo, hi = lr_snr_range(anatomy, slice_factor)
    snr = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    deg = DegradationModel(slice_factor, inplane_factor, slice_sigma_frac, snr=snr)
    truth = deg.crop_to_multiple(truth)
    return SRCase(name=f"{anatomy}:{seed}", truth=truth, lr=deg.degrade(truth, rng))


def volume_case(name: str, truth: np.ndarray, *, snr: float | None, seed: int = 0, slice_factor: int = 2,
                inplane_factor: int = 1, slice_sigma_frac: float = 0.15) -> SRCase:
    """A case from any volume used as truth (e.g. real MR), degraded by the fixed model."""
    deg = DegradationModel(slice_factor, inplane_factor, slice_sigma_frac, snr=snr)
    truth = deg.crop_to_multiple(np.asarray(truth, dtype=np.float32))
    return SRCase(name=name, truth=truth, lr=deg.degrade(truth, np.random.default_rng(seed)))


def evaluate_cases(model: "SuperResModel", cases, *, inplane: bool = False,
                   keep_cases: bool = False) -> dict[str, Any]:
    """Foreground PSNR/SSIM of the model and of tricubic on the same inputs, and their gains.

    Keys: ``n``, ``psnr_gain_db``, ``ssim_gain`` (means over cases of model − tricubic),
    ``psnr_gain_ci`` (95 % bootstrap), ``psnr_db``, ``psnr_tricubic_db``, ``ssim``,
    ``ssim_tricubic``, ``consistency_error_max``, ``consistency_passed`` (all cases),
    ``consistency_tolerance``, ``seconds_per_case``; ``cases`` with per-case figures if asked.
    """
    g = 2 if inplane else 1
    deg = model.config.degradation(inplane_factor=g)
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        out, stats = model.enhance(case.lr, inplane=inplane)
        base = deg.tricubic(case.lr)
        mask = foreground_mask(case.truth)
        err = deg.consistency_error(out, case.lr)
        rows.append({
            "name": case.name,
            "psnr": psnr(out, case.truth, mask), "psnr_tricubic": psnr(base, case.truth, mask),
            "ssim": ssim(out, case.truth, mask), "ssim_tricubic": ssim(base, case.truth, mask),
            "consistency_error": err, "detail_gain": stats["detail_gain"],
        })
    n = len(rows)
    if n == 0:
        raise SuperResError("no evaluation cases")
    gain_p = np.array([r["psnr"] - r["psnr_tricubic"] for r in rows])
    gain_s = np.array([r["ssim"] - r["ssim_tricubic"] for r in rows])
    boot = np.random.default_rng(0).integers(0, n, size=(1000, n))
    ci = np.percentile(gain_p[boot].mean(axis=1), [2.5, 97.5])
    result: dict[str, Any] = {
        "n": n,
        "psnr_gain_db": float(gain_p.mean()),
        "psnr_gain_ci": [float(ci[0]), float(ci[1])],
        "ssim_gain": float(gain_s.mean()),
        "psnr_db": float(np.mean([r["psnr"] for r in rows])),
        "psnr_tricubic_db": float(np.mean([r["psnr_tricubic"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "ssim_tricubic": float(np.mean([r["ssim_tricubic"] for r in rows])),
        "psnr_gain_positive_share": float(np.mean(gain_p > 0)),
        "detail_gain_mean": float(np.mean([r["detail_gain"] for r in rows])),
        "consistency_error_max": float(max(r["consistency_error"] for r in rows)),
        "consistency_tolerance": CONSISTENCY_TOLERANCE,
        "consistency_passed": bool(all(r["consistency_error"] <= CONSISTENCY_TOLERANCE for r in rows)),
        "seconds_per_case": (time.perf_counter() - t0) / n,
    }
    if keep_cases:
        result["cases"] = rows
    return result


# --------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
    crops: int = 6  # in-plane crops per step, all from one volume (full slice extent)
    crop: int = 64
    lr: float = 2e-3
    snr_range: tuple[float, float] = (15.0, 150.0)  # log-uniform input SNR
    clean_share: float = 0.1  # share of steps without added noise
    reformat_share: float = 0.0  # share of steps on reformatted volumes (a fine in-plane axis as slice axis)
    reformat_slices: int = 48
    seed: int = 0
    threads: int = 2
    log_every: int = 100


def _fg_mean_and_scale(x: np.ndarray) -> tuple[float, float]:
    p99 = float(np.percentile(x[:, ::2, ::2], 99))
    fg = x[x > 0.1 * p99]
    return (float(fg.mean()) if fg.size else 1.0), float(np.percentile(x[:, ::2, ::2], 99.5)) or 1.0


def train_superres(volumes: list[np.ndarray], config: SuperResConfig | None = None,
                   train: TrainConfig | None = None, log=None) -> tuple["SuperResModel", list[dict[str, float]]]:
    """Train the detail network on noise-free truth volumes, degraded on the fly by the fixed
    model (slice profile + Rician noise), through the data-consistency projection (L1 loss)."""
    config = config or SuperResConfig()
    train = train or TrainConfig()
    if not volumes:
        raise SuperResError("no training volumes")
    f = config.slice_factor
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    model = SuperResModel.untrained(config, seed=train.seed)
    net = model.net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps, pct_start=0.1)
    stats = [_fg_mean_and_scale(v) for v in volumes]
    fg_pixels = []  # crop centres: in-plane positions with signal on some slice
    for v, (_, sc) in zip(volumes, stats):
        pix = np.argwhere(v.max(axis=0) > 0.2 * sc)
        fg_pixels.append(pix if len(pix) else np.array([[v.shape[1] // 2, v.shape[2] // 2]]))
    if train.threads:
        torch.set_num_threads(train.threads)
    ops_cache: dict[int, _Operators] = {}
    history: list[dict[str, float]] = []
    run_loss = run_base = 0.0
    t0 = time.perf_counter()
    for step in range(1, train.steps + 1):
        vi = int(rng.integers(len(volumes)))
        vol = volumes[vi]
        fg_mean, scale = stats[vi]
        if rng.uniform() < train.reformat_share:
            # a reformat: a fine in-plane axis becomes the slice axis (finer, differently shaped
            # structure along z than the native slices), windowed to a slab of slices
            vol = vol.transpose((1, 0, 2) if rng.uniform() < 0.5 else (2, 1, 0))
            z0 = int(rng.integers(0, max(1, vol.shape[0] - train.reformat_slices + 1)))
            vol = vol[z0:z0 + train.reformat_slices]
        phase = int(rng.integers(f)) if vol.shape[0] >= 2 * f + 1 else 0
        n_hr = (vol.shape[0] - phase) // f * f
        hr = vol[phase:phase + n_hr]
        h, w = hr.shape[1:]
        c = min(train.crop, h, w)
        if vol.shape[1:] == volumes[vi].shape[1:]:
            centres = fg_pixels[vi]
            pick = centres[rng.integers(len(centres), size=train.crops)]
        else:
            pick = np.stack([rng.integers(0, h, size=train.crops), rng.integers(0, w, size=train.crops)], axis=1)
        ys = np.clip(pick[:, 0] - c // 2 + rng.integers(-c // 4, c // 4 + 1, size=train.crops), 0, h - c)
        xs = np.clip(pick[:, 1] - c // 2 + rng.integers(-c // 4, c // 4 + 1, size=train.crops), 0, w - c)
        crops = np.stack([hr[:, y:y + c, x:x + c] for y, x in zip(ys, xs)])  # (B, n_hr, c, c)
        if rng.uniform() < 0.5:
            crops = crops[:, ::-1]
        if rng.uniform() < 0.5:
            crops = crops[..., ::-1]
        if rng.uniform() < 0.5:
            crops = crops.swapaxes(-1, -2)
        s = scale * float(np.exp(rng.uniform(-0.2, 0.2)))
        truth = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32)) / s
        n_lr = n_hr // f
        ops = ops_cache.get(n_lr) or ops_cache.setdefault(n_lr, _Operators.build(n_lr, config))
        y = _zmul(ops.s, truth)
        if rng.uniform() >= train.clean_share:
            snr = float(np.exp(rng.uniform(*np.log(train.snr_range))))
            sigma = fg_mean / s / snr
            y = torch.sqrt((y + sigma * torch.randn_like(y)) ** 2 + (sigma * torch.randn_like(y)) ** 2)
        base, pre = forward_detail(net, y, ops, config, channels_last=True)
        out = ops.project(pre, y)
        loss = torch.nn.functional.l1_loss(out, truth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            run_base += float(torch.nn.functional.l1_loss(ops.project(base, y), truth))
        run_loss += float(loss.detach())
        if step % train.log_every == 0 or step == train.steps:
            k = train.log_every if step % train.log_every == 0 else step % train.log_every
            rec = {"step": step, "l1": run_loss / k, "l1_interpolated": run_base / k,
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            if log is not None:
                log(rec)
            run_loss = run_base = 0.0
    net.eval()
    return model, history


# --------------------------------------------------------------------------------------
# data for training and the real-MR check; command line (python -m models.superres)

TRAIN_SEED = 7_000_000  # phantom seeds TRAIN_SEED + i are training data; never evaluate on them
TRAIN_ANATOMIES = ("knee", "knee", "knee", "shoulder", "lumbar_spine")


def training_volumes(n_phantoms: int, *, seed: int = TRAIN_SEED, anatomies=TRAIN_ANATOMIES,
                     thin_share: float = 0.5, log=None) -> list[np.ndarray]:
    """Noise-free training truth: phantoms with seeds ``seed + i`` (anatomies in turn); a share
    ``thin_share`` of them re-acquired with 1.5-2 mm slices and no gap (finer through-plane truth)."""
    rng = np.random.default_rng(seed)
    vols: list[np.ndarray] = []
    for i in range(n_phantoms):
        anatomy = anatomies[i % len(anatomies)]
        over: dict[str, Any] = {}
        if rng.uniform() < thin_share:
            over = {"slice_thickness": float(rng.uniform(1.5, 2.0)), "slice_gap_fraction": 0.0}
        vols.append(phantom_truth(anatomy, seed + i, **over))
        if log is not None and (i + 1) % 20 == 0:
            log({"phantoms": i + 1})
    return vols


def real_mr_cases(snr: float | None) -> list[SRCase]:
    """Real MR never used in training: the MNI152 T1 template shipped inside nilearn (sagittal
    slices) and the Enhanced MR multi-frame file of pydicom-data (emri_small.dcm)."""
    import nibabel
    import nilearn
    import pydicom
    from pydicom.data import get_testdata_file

    cases = []
    data_dir = Path(nilearn.__file__).parent / "datasets" / "data"
    for path in sorted(data_dir.glob("mni_icbm152_t1_*.nii*")):
        arr = np.asarray(nibabel.load(str(path)).get_fdata(), dtype=np.float32)  # (x, y, z): x = sagittal slices
        cases.append(volume_case(f"mni152:{path.name}", arr, snr=snr, seed=1))
    emri = get_testdata_file("emri_small.dcm")
    if emri:
        arr = pydicom.dcmread(emri).pixel_array.astype(np.float32)
        cases.append(volume_case("pydicom-data:emri_small.dcm", arr, snr=snr, seed=2))
    return cases


def train_to(out_dir: Path, *, n_phantoms: int = 150, seed: int = TRAIN_SEED, steps: int = TrainConfig.steps,
             threads: int = 1, reformat_share: float = 0.0, log=None) -> dict[str, Any]:
    """The whole training recipe: phantoms -> `train_superres` -> ``out_dir/superres.pt`` (+ .sha256,
    training_log.json). Returns the recipe with the weights' sha256."""
    import json

    out_dir = Path(out_dir)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    vols = training_volumes(n_phantoms, seed=seed, log=log)
    train = TrainConfig(steps=steps, seed=0, threads=threads, reformat_share=reformat_share)
    model, history = train_superres(vols, SuperResConfig(), train, log=log)
    model.metadata = {
        "version": "1", "config": asdict(model.config), "train": asdict(train), "phantoms": n_phantoms,
        "anatomies": list(TRAIN_ANATOMIES), "phantom_seeds": [seed, seed + n_phantoms - 1],
        "seconds": time.perf_counter() - t0,
    }
    digest = model.save(out_dir / "superres.pt")
    (out_dir / "training_log.json").write_text(json.dumps({**model.metadata, "history": history}, indent=1))
    return {**model.metadata, "weights": str(out_dir / "superres.pt"), "sha256": digest}


def evaluate_synthetic(model: "SuperResModel", n: int, seed: int, *, anatomy: str = "knee",
                       inplane: bool = False) -> dict[str, Any]:
    """`evaluate_cases` on ``n`` fresh phantoms ``seed .. seed+n-1`` (refuses training seeds)."""
    _check_fresh(n, seed)
    g = 2 if inplane else 1
    cases = (phantom_case(anatomy, seed + i, inplane_factor=g) for i in range(n))
    result = evaluate_cases(model, cases, inplane=inplane)
    result["qc_refused"] = 0  # the fixed degradation of a phantom is always a valid input
    return result


def _check_fresh(n: int, seed: int) -> None:
    if n < 1 or seed < 0:
        raise SuperResError("N must be >= 1 and SEED >= 0")
    if seed < TRAIN_SEED + 10_000 and seed + n > TRAIN_SEED:
        raise SuperResError(f"seeds {seed}..{seed + n - 1} overlap the training seeds {TRAIN_SEED}..{TRAIN_SEED + 9_999}")


def _parse_synthetic(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "synthetic":
        raise SuperResError(f"data spec {spec!r}: expected synthetic:N:SEED")
    try:
        return int(parts[1]), int(parts[2])
    except ValueError as exc:
        raise SuperResError(f"data spec {spec!r}: N and SEED must be integers") from exc


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m models.superres", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on noise-free phantoms")
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--phantoms", type=int, default=150)
    tr.add_argument("--steps", type=int, default=TrainConfig.steps)
    tr.add_argument("--seed", type=int, default=TRAIN_SEED)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--reformat-share", type=float, default=0.0)
    ev = sub.add_parser("evaluate", help="foreground PSNR/SSIM gain over tricubic")
    ev.add_argument("--weights", type=Path, default=WEIGHTS_PATH)
    ev.add_argument("--data", default="synthetic:200:9000000", help="synthetic:N:SEED, or 'real' for real MR")
    ev.add_argument("--anatomy", default="knee")
    ev.add_argument("--snr", type=float, default=None, help="input SNR for --data real (default: no added noise)")
    ev.add_argument("--inplane", action="store_true")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            log = lambda rec: print(json.dumps(rec), file=sys.stderr, flush=True)  # noqa: E731
            recipe = train_to(args.out, n_phantoms=args.phantoms, seed=args.seed, steps=args.steps,
                              threads=args.threads, reformat_share=args.reformat_share, log=log)
            print(json.dumps({"weights": recipe["weights"], "sha256": recipe["sha256"]}))
            return 0
        torch.set_num_threads(args.threads)
        model = SuperResModel.load(args.weights)
        if args.data == "real":
            result = evaluate_cases(model, real_mr_cases(args.snr), inplane=args.inplane, keep_cases=True)
        else:
            n, seed = _parse_synthetic(args.data)
            result = evaluate_synthetic(model, n, seed, anatomy=args.anatomy, inplane=args.inplane)
        result.update({"model": MODEL_NAME, "weights_sha256": model.info.weights_sha256, "data": args.data})
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                print(f"{k}: {v}")
        return 0
    except (SuperResError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
