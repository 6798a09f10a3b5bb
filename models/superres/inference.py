"""Super-resolution inference: `SuperResModel` (loaded through `models.protocol`), the per-series
detail calibration, the data-consistency projection, the geometry of the new series, in-plane ×2."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.degradation import kspace_down, kspace_up
from models.errors import RegistryError, SuperResError
from models.protocol import Checkpoint, load_checkpoint, save_checkpoint
from models.superres.net import SlabSRNet, SuperResConfig, _Operators, _zmul, forward_detail
from models.types import NOT_FOR_DIAGNOSTIC_USE, ModelInfo, QCResult, SuperResOutput, Volume

MODEL_NAME = "superres"
FORMAT = "msknode.superres/1"
WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "weights" / "superres" / "model.pt"
CONSISTENCY_TOLERANCE = 1e-3  # relative RMS of A(output) - input
NONNEG_ITERATIONS = 2  # alternating projections (x >= 0, then A x = y) after the final projection
CHUNK_SLICES = 8  # input slices per network call (bounds peak memory)
CALIBRATION_WINDOW = 160  # in-plane window (pixels) for the per-series detail calibration
#: "1": the network in bfloat16, "0": float32, "auto" (default): bfloat16 where the CPU computes it natively
BF16_ENV = "MSKNODE_SUPERRES_BF16"


def native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16) and oneDNN uses it. Elsewhere
    bfloat16 is emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 20)
    except OSError:
        return False
    if not re.search(r"\b(avx512_bf16|amx_bf16)\b", flags):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16() -> bool:
    """Whether the super-resolution network runs in bfloat16: `BF16_ENV`, else `native_bf16`."""
    value = os.environ.get(BF16_ENV, "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("", "auto"):
        raise SuperResError(f"{BF16_ENV}={value!r}: expected 1, 0 or auto")
    return native_bf16()


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
    #: the network in bfloat16 (the interpolation, projection and consistency check stay float32); None: `use_bf16`
    bf16: bool | None = None

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = use_bf16()
        if self.channels_last:
            # Module.to takes memory_format; torch's overloads of it leave it out
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @classmethod
    def untrained(cls, config: SuperResConfig | None = None, seed: int = 0) -> SuperResModel:
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
    def load(cls, path: Path, expected_sha256: str | None = None, version: str | None = None) -> SuperResModel:
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
    def from_checkpoint(cls, ckpt: Checkpoint, version: str | None = None) -> SuperResModel:
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
    def _detail(self, y: torch.Tensor, ops: _Operators) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward_detail` as inference runs it: in chunks, background skipped, this model's layout and precision."""
        return forward_detail(
            self.net,
            y,
            ops,
            self.config,
            chunk=CHUNK_SLICES,
            channels_last=self.channels_last,
            skip_background=True,
            bf16=bool(self.bf16),
        )

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
        win = yt[: n_ll * f, (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
        ops = _Operators.build(n_ll, cfg)
        ll = _zmul(ops.s, win)
        base, pre = self._detail(ll, ops)
        bp = ops.project(base, ll)
        dp = ops.project(pre, ll) - bp
        den = float((dp * dp).sum())
        if den <= 0:
            return 0.0
        return float(min(max(float((dp * (win - bp)).sum()) / den, 0.0), 1.0))

    def enhance(
        self, y: np.ndarray, inplane: bool = False, detail: bool = True, gain: float | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
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
                base, pre = self._detail(yt, ops)
                x = base + a * (pre - base)
            else:
                x = _zmul(ops.base, yt)
            stats["network_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            x = ops.project(x, yt)
            for _ in range(NONNEG_ITERATIONS):  # pull background-noise undershoot towards >= 0, end consistent
                x = ops.project(torch.clamp_min(x, 0.0), yt)
            out = (x * scale).numpy()
        stats["projection_s"] = time.perf_counter() - t0
        if inplane:
            t0 = time.perf_counter()
            out = inplane_upsample(out, 2)
            stats["inplane_s"] = time.perf_counter() - t0
        return out, stats

    def predict(self, volume: Volume, inplane: bool = False) -> SuperResOutput:
        """Super-resolve one series; the source `Volume` is not modified."""
        t_start = time.perf_counter()
        cpu_start = time.process_time()
        qc = _input_qc(volume)
        g = 2 if inplane else 1
        tol = CONSISTENCY_TOLERANCE
        if not qc.accepted:
            return SuperResOutput(
                model=self.info,
                source=volume,
                volume=volume,
                qc=qc,
                consistency_error=math.nan,
                consistency_tolerance=tol,
                consistency_passed=False,
                timings={"total_s": time.perf_counter() - t_start},
            )
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
        attrs.update(
            {
                "derived_from_series_uid": volume.series_uid,
                "superres_slice_factor": self.config.slice_factor,
                "superres_inplane_factor": g,
                "slice_thickness": geo["spacing"][0],
                "image_type": ["DERIVED", "SECONDARY"],
            }
        )
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
            model=self.info,
            source=volume,
            volume=out,
            qc=qc,
            consistency_error=err,
            consistency_tolerance=tol,
            consistency_passed=bool(err <= tol),
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
