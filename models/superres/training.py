"""Super-resolution training: the detail network learnt on noise-free phantoms degraded on the fly,
through the data-consistency projection; the whole recipe (`train_to`). Inference never imports it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import SuperResError
from models.superres.data import TRAIN_ANATOMIES, TRAIN_SEED, training_volumes
from models.superres.inference import SuperResModel
from models.superres.net import SuperResConfig, _Operators, _zmul, forward_detail


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


def train_superres(
    volumes: list[np.ndarray], config: SuperResConfig | None = None, train: TrainConfig | None = None, log=None
) -> tuple[SuperResModel, list[dict[str, float]]]:
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
    # Module.to takes memory_format; torch's overloads of it leave it out
    net = model.net.to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
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
            vol = vol[z0 : z0 + train.reformat_slices]
        phase = int(rng.integers(f)) if vol.shape[0] >= 2 * f + 1 else 0
        n_hr = (vol.shape[0] - phase) // f * f
        hr = vol[phase : phase + n_hr]
        h, w = hr.shape[1:]
        c = min(train.crop, h, w)
        if vol.shape[1:] == volumes[vi].shape[1:]:
            centres = fg_pixels[vi]
            pick = centres[rng.integers(len(centres), size=train.crops)]
        else:
            pick = np.stack([rng.integers(0, h, size=train.crops), rng.integers(0, w, size=train.crops)], axis=1)
        ys = np.clip(pick[:, 0] - c // 2 + rng.integers(-c // 4, c // 4 + 1, size=train.crops), 0, h - c)
        xs = np.clip(pick[:, 1] - c // 2 + rng.integers(-c // 4, c // 4 + 1, size=train.crops), 0, w - c)
        crops = np.stack([hr[:, y : y + c, x : x + c] for y, x in zip(ys, xs)])  # (B, n_hr, c, c)
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
            rec = {
                "step": step,
                "l1": run_loss / k,
                "l1_interpolated": run_base / k,
                "seconds": time.perf_counter() - t0,
            }
            history.append(rec)
            if log is not None:
                log(rec)
            run_loss = run_base = 0.0
    net.eval()
    return model, history


def train_to(
    out_dir: Path,
    *,
    n_phantoms: int = 150,
    seed: int = TRAIN_SEED,
    steps: int = TrainConfig.steps,
    threads: int = 1,
    reformat_share: float = 0.0,
    log=None,
) -> dict[str, Any]:
    """The whole training recipe: phantoms -> `train_superres` -> ``out_dir/model.pt`` (+ .sha256,
    training_log.json). Returns the recipe with the weights' sha256."""
    out_dir = Path(out_dir)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    vols = training_volumes(n_phantoms, seed=seed, log=log)
    train = TrainConfig(steps=steps, seed=0, threads=threads, reformat_share=reformat_share)
    model, history = train_superres(vols, SuperResConfig(), train, log=log)
    model.metadata = {
        "version": "1",
        "config": asdict(model.config),
        "train": asdict(train),
        "phantoms": n_phantoms,
        "anatomies": list(TRAIN_ANATOMIES),
        "phantom_seeds": [seed, seed + n_phantoms - 1],
        "seconds": time.perf_counter() - t0,
    }
    digest = model.save(out_dir / "model.pt")
    (out_dir / "training_log.json").write_text(json.dumps({**model.metadata, "history": history}, indent=1))
    return {**model.metadata, "weights": str(out_dir / "model.pt"), "sha256": digest}
