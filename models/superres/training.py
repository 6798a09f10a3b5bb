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

from models.errors import RegistryError, SuperResError
from models.protocol import load_checkpoint, save_checkpoint
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
    log_every: int = 100  # steps per epoch: a progress line (and, when asked, validation and a resume point)
    max_slices: int | None = None  # a random window of at most this many slices per step (long volumes)


def _fg_mean_and_scale(x: np.ndarray) -> tuple[float, float]:
    p99 = float(np.percentile(x[:, ::2, ::2], 99))
    fg = x[x > 0.1 * p99]
    return (float(fg.mean()) if fg.size else 1.0), float(np.percentile(x[:, ::2, ::2], 99.5)) or 1.0


def train_superres(
    volumes: list[np.ndarray],
    config: SuperResConfig | None = None,
    train: TrainConfig | None = None,
    log=None,
    *,
    init: SuperResModel | None = None,
    probabilities: np.ndarray | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    validate=None,
) -> tuple[SuperResModel, list[dict[str, float]]]:
    """Train the detail network on truth volumes, degraded on the fly by the fixed
    model (slice profile + Rician noise), through the data-consistency projection (L1 loss).

    ``init``: start from these weights (fine-tuning). ``probabilities``: how often each volume is drawn
    (default uniform). Every ``train.log_every`` steps (an *epoch*) a progress record goes to ``log``
    (with ``validate(model)``'s figures when given) and, with ``state_path``, the whole training state
    (network, optimiser, schedule, random generators, history) is written there; ``resume`` continues
    from that file."""
    config = init.config if init is not None else (config or SuperResConfig())
    train = train or TrainConfig()
    if not volumes:
        raise SuperResError("no training volumes")
    f = config.slice_factor
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    model = init if init is not None else SuperResModel.untrained(config, seed=train.seed)
    # Module.to takes memory_format; torch's overloads of it leave it out
    net = model.net.to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps, pct_start=0.1)
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(volumes),) or probabilities.min() < 0 or probabilities.sum() <= 0:
            raise SuperResError("probabilities: one non-negative weight per volume")
        probabilities = probabilities / probabilities.sum()
    first_step, elapsed = 1, 0.0
    history: list[dict[str, float]] = []
    if resume:
        if state_path is None or not Path(state_path).is_file():
            raise SuperResError(f"nothing to resume: no training state at {state_path}")
        try:
            saved = load_checkpoint(Path(state_path)).data
        except RegistryError as exc:
            raise SuperResError(f"cannot resume: {exc}") from None
        if int(saved["total_steps"]) != train.steps:
            raise SuperResError(f"{state_path} was written by a run of {saved['total_steps']} steps, not {train.steps}")
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        rng.bit_generator.state = json.loads(saved["numpy_rng"])
        history = json.loads(saved["history"])
        first_step, elapsed = int(saved["step"]) + 1, float(saved["seconds"])
        if log is not None:
            log({"resumed_at_step": first_step - 1, "of": train.steps})
    stats = [_fg_mean_and_scale(v) for v in volumes]
    fg_pixels = []  # crop centres: in-plane positions with signal on some slice
    for v, (_, sc) in zip(volumes, stats):
        pix = np.argwhere(v.max(axis=0) > 0.2 * sc)
        fg_pixels.append(pix if len(pix) else np.array([[v.shape[1] // 2, v.shape[2] // 2]]))
    if train.threads:
        torch.set_num_threads(train.threads)
    ops_cache: dict[int, _Operators] = {}
    run_loss = run_base = 0.0
    t0 = time.perf_counter() - elapsed
    for step in range(first_step, train.steps + 1):
        vi = (
            int(rng.integers(len(volumes))) if probabilities is None else int(rng.choice(len(volumes), p=probabilities))
        )
        vol = volumes[vi]
        if train.max_slices and vol.shape[0] > train.max_slices:
            z0 = int(rng.integers(0, vol.shape[0] - train.max_slices + 1))
            vol = vol[z0 : z0 + train.max_slices]
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
        if hr.shape[1:] == volumes[vi].shape[1:]:
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
            if validate is not None:
                net.eval()
                rec.update(validate(model))
                net.train()
            rec["seconds"] = time.perf_counter() - t0
            history.append(rec)
            run_loss = run_base = 0.0
            if state_path is not None:  # before the progress line: a reported epoch is a resume point
                _save_state(Path(state_path), net, opt, sched, rng, step, train.steps, history, rec["seconds"])
            if log is not None:
                log(rec)
    net.eval()
    return model, history


def _save_state(path: Path, net, opt, sched, rng, step: int, total: int, history, seconds: float) -> None:
    """The resume point (tensors and plain values only: loads with ``weights_only=True``), written atomically
    with its sha256 beside it (`models.protocol.save_checkpoint`)."""
    save_checkpoint(
        {
            "net": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "history": json.dumps(history),
            "step": step,
            "total_steps": total,
            "seconds": seconds,
        },
        path,
    )


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


# --------------------------------------------------------------------------------------
# the recipe on real MR + phantoms (the shipped weights' recipe since version 2)

EPOCH_STEPS = 50  # optimiser steps per epoch (progress line, validation, resume point)
FINE_TUNE_LR = 5e-4  # peak learning rate when starting from trained weights
PHANTOM_SHARE = 0.4  # share of the steps drawn from phantoms; the rest from the real families, equally
VALIDATION_SEED = 9_900_000  # fresh phantom seeds for the per-epoch validation (never trained on)
MAX_SLICES = 48


def _validation(real: list, held_out: list[str]):
    """Per-epoch validation: PSNR gain over tricubic (dB) on 3 fresh phantoms (simulated thick slices) and,
    when families are held out, on up to 3 of their real series (every other slice restored, central
    160 × 160 window, at most 24 slices)."""
    from models.superres.data import phantom_case
    from models.superres.quality import foreground_mask, psnr, restore_series

    cases = [phantom_case(a, VALIDATION_SEED + i) for i, a in enumerate(("knee", "shoulder", "lumbar_spine"))]
    held = [r for r in real if r.family in held_out][:3]
    windows = []
    for r in held:
        a = np.asarray(r.array, dtype=np.float32)[:24]
        h, w = a.shape[1:]
        windows.append(a[:, max(0, h // 2 - 80) : h // 2 + 80, max(0, w // 2 - 80) : w // 2 + 80])

    def validate(model: SuperResModel) -> dict[str, float]:
        deg = model.config.degradation()
        gains = []
        for c in cases:
            out, _ = model.enhance(c.lr)
            mask = foreground_mask(c.truth)
            gains.append(psnr(out, c.truth, mask) - psnr(deg.tricubic(c.lr), c.truth, mask))
        rec = {"val_phantom_psnr_gain_db": float(np.mean(gains))}
        if windows:
            rows = []
            for a in windows:
                try:
                    rows.append(restore_series({"m": model}, a))
                except SuperResError:
                    continue
            if rows:
                rec["val_heldout_psnr_gain_db"] = float(np.mean([r["m"]["psnr"] - r["psnr_tricubic"] for r in rows]))
        return rec

    return validate


def train_mix_to(
    out_dir: Path,
    *,
    realdata_root: Path | None,
    n_phantoms: int = 40,
    seed: int = TRAIN_SEED,
    exclude: tuple[str, ...] | list[str] = (),
    epochs: int | None = None,
    steps: int | None = None,
    init: Path | None = None,
    lr: float | None = None,
    threads: int = 1,
    resume: bool = False,
    log=None,
) -> dict[str, Any]:
    """Real MR (`models.superres.data.real_truth_volumes`, families in ``exclude`` left out) + phantoms as
    truth, the thick-slice acquisition simulated on the fly; fine-tuned from ``init`` when given.

    Writes ``out_dir``: ``model.pt`` (+ .sha256), ``training_log.json``, ``train_state.pt`` (the resume point,
    every epoch) and the model card (``card.json``, ``MODEL_CARD.md``) with the recipe, the per-epoch history
    and the training wall time. ``realdata_root=None``: phantoms only."""
    from models.cards import write_card
    from models.superres.data import REAL_FAMILIES, real_truth_volumes, resolve_families

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    held = resolve_families(exclude)
    every = real_truth_volumes(realdata_root, log=log) if realdata_root is not None else []
    real = [r for r in every if r.family not in held]
    validate = _validation([r for r in every if r.family in held][:3], held)
    del every
    phantoms = training_volumes(n_phantoms, seed=seed, log=log) if n_phantoms > 0 else []
    volumes: list[np.ndarray] = [*phantoms, *(r.array for r in real)]
    if not volumes:
        raise SuperResError("no training volumes (no phantoms and no real volumes)")
    families = sorted({r.family for r in real})
    weights = [PHANTOM_SHARE / len(phantoms) if real else 1.0 / len(phantoms)] * len(phantoms)
    real_share = (1.0 - PHANTOM_SHARE) if phantoms else 1.0
    for r in real:
        same = sum(1 for x in real if x.family == r.family)
        weights.append(real_share / len(families) / same)
    start = SuperResModel.load(init) if init is not None else None
    n_epochs = epochs or (8 if start is not None else 24)
    total = steps or n_epochs * EPOCH_STEPS
    train = TrainConfig(
        steps=total,
        lr=lr or (FINE_TUNE_LR if start is not None else TrainConfig.lr),
        seed=0,
        threads=threads,
        log_every=EPOCH_STEPS,
        max_slices=MAX_SLICES,
    )
    if log is not None:
        log({"phantoms": len(phantoms), "real_volumes": len(real), "families": families, "held_out": held})
    model, history = train_superres(
        volumes,
        SuperResConfig(),
        train,
        log=log,
        init=start,
        probabilities=np.asarray(weights),
        state_path=out_dir / "train_state.pt",
        resume=resume,
        validate=validate,
    )
    seconds = time.perf_counter() - t0
    train_seconds = float(history[-1]["seconds"]) if history else seconds
    model.metadata = {
        "version": "2",
        "config": asdict(model.config),
        "train": asdict(train),
        "phantoms": n_phantoms,
        "anatomies": list(TRAIN_ANATOMIES),
        "phantom_seeds": [seed, seed + n_phantoms - 1],
        "real_families": families,
        "real_volumes": [r.key for r in real],
        "held_out_families": held,
        "init_sha256": start.info.weights_sha256 if start is not None else None,
        "seconds": seconds,
    }
    digest = model.save(out_dir / "model.pt")
    (out_dir / "training_log.json").write_text(json.dumps({**model.metadata, "history": history}, indent=1))
    last = history[-1] if history else {}
    command = (
        f"msknode train superres --data synthetic:{n_phantoms}:{seed} --realdata "
        f"{'none' if realdata_root is None else 'PATH'} --out DIR"
        + "".join(f" --exclude-source {h}" for h in held)
        + (" --init WEIGHTS" if start is not None else "")
        + f" --epochs {n_epochs}"
    )
    write_card(
        out_dir,
        {
            "name": "superres",
            "version": "2",
            "task": "superres",
            "anatomy": "any",
            "weights_sha256": digest,
            "weights_file": "model.pt",  # the card describes model.pt, not the resume point beside it
            "notice": (
                "Demo weights trained on phantoms and a small real MR corpus. Not for diagnostic use."
                if real
                else "Demo weights trained on synthetic phantoms only. Not for diagnostic use."
            ),
            "training_data": {
                "phantoms": n_phantoms,
                "phantom_seeds": [seed, seed + n_phantoms - 1],
                "real_families": {f: list(REAL_FAMILIES[f]) for f in families},
                "real_volumes": len(real),
                "held_out_families": held,
                "sampling": f"{PHANTOM_SHARE:.0%} of steps phantoms, the rest the real families equally"
                if real and phantoms
                else "uniform",
            },
            "recipe": {
                "command": command,
                "init": str(init) if init is not None else None,
                "init_sha256": model.metadata["init_sha256"],
                "steps": total,
                "epochs": n_epochs,
                "steps_per_epoch": EPOCH_STEPS,
                "lr": train.lr,
                "max_slices_per_step": MAX_SLICES,
                "threads": threads,
                "wall_time_s": round(seconds, 1),
                "training_loop_s": round(train_seconds, 1),
            },
            "metrics": {k: round(float(v), 4) for k, v in last.items() if k.startswith(("l1", "val_"))},
            "evaluation_data": "per-epoch validation: 3 fresh phantoms (seeds from "
            f"{VALIDATION_SEED}, simulated thick slices) and up to 3 series of the held-out families "
            "(every other slice restored)",
            "reproduce": [command],
            "limitations": [
                "per-epoch validation only; run `msknode evaluate superres` (synthetic:N:SEED, realdir:PATH) "
                "before shipping",
                "trained through-plane only, on the fixed slice-profile degradation model",
            ],
            "tables": [
                {
                    "title": "Training progress (per epoch)",
                    "columns": ["step", "l1", "l1_interpolated", *sorted(k for k in last if k.startswith("val_"))],
                    "rows": [
                        [
                            h.get("step"),
                            round(float(h["l1"]), 5),
                            round(float(h["l1_interpolated"]), 5),
                            *(round(float(h[k]), 3) if k in h else None for k in sorted(last) if k.startswith("val_")),
                        ]
                        for h in history
                    ],
                }
            ],
        },
    )
    return {**model.metadata, "weights": str(out_dir / "model.pt"), "sha256": digest}
