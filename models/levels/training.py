"""Training of ``lumbar_spine.levels`` on real segmented volumes (``spinevol:PATH``).

Recipe: the patient split of `models.levels.data.split_keys` (train / validation / held-out test; the
test patients are never trained on nor used to choose anything); 2-D sagittal slices at ``GRID_MM``,
random crops of ``CROP`` pixels; spatial augmentation (rotation, scale, shift), slice thickness
(1 - 5 adjacent 1 mm slices averaged, like a 3 - 5 mm clinical slice), and contrast augmentation so a
T1 or a T2 series both work: gamma, a random non-monotone intensity curve (an inverted or re-ordered
tissue contrast; the real volumes are 8-bit rescaled), a smooth multiplicative bias field and noise.
Loss: cross-entropy + soft Dice (body, disc), ignored pixels excluded. AdamW, one-cycle learning rate,
a fixed number of epochs (the last epoch is shipped: nothing is chosen on the test patients).

Every epoch prints a progress bar with the running loss, then the validation Dice (body, disc) of the
validation patients, and writes ``checkpoint.pt`` (+ .sha256) so ``train`` resumes after an interruption.
At the end ``model.pt`` is written and the card (`write_levels_card`) with the held-out evaluation.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.levels.core import grid_shape, scale_intensity
from models.levels.data import IGNORE, SpineVolume, list_keys, load_volumes, patients_of, split_keys, targets_of
from models.levels.model import LevelsModel
from models.protocol import load_checkpoint, save_checkpoint

CROP = 128
SACRAL_CROPS = 0.35  # share of crops centred below the lowest labelled body (L5 / sacrum)


@dataclass
class Recipe:
    data: str
    epochs: int = 16
    steps_per_epoch: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    max_steps: int | None = None
    augment: bool = True
    threads: int = 1


@dataclass
class Prepared:
    key: str
    image: np.ndarray  # (K, gh, gw) float32 at GRID_MM (scaled)
    classes: np.ndarray  # (K, gh, gw) uint8 (255 ignored)
    spine_slices: np.ndarray  # slice indices with a vertebral body
    lowest: np.ndarray  # (K, gh, gw) bool: the lowest labelled body (L5) at the grid


def prepare(vol: SpineVolume) -> Prepared:
    classes, _ = targets_of(vol)
    _k, h, w = vol.image.shape
    gh, gw = grid_shape((h, w), (vol.spacing[1], vol.spacing[2]))
    x = torch.from_numpy(scale_intensity(vol.image))[:, None]
    img = F.interpolate(x, size=(gh, gw), mode="bilinear", antialias=True, align_corners=False)[:, 0].numpy()
    cls = F.interpolate(torch.from_numpy(classes)[:, None].float(), size=(gh, gw), mode="nearest")[:, 0]
    spine = np.nonzero((classes == 1).any(axis=(1, 2)))[0]
    low_t = torch.from_numpy((vol.gt == vol.order[-1]).astype(np.float32))[:, None]
    low = F.interpolate(low_t, size=(gh, gw), mode="nearest")[:, 0].numpy() > 0.5
    return Prepared(vol.key, img.astype(np.float32), cls.numpy().astype(np.uint8), spine, low)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> torch.Tensor:
    coarse = torch.from_numpy(rng.normal(0.0, strength, size=(1, 1, 4, 4)).astype(np.float32))
    return torch.exp(F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True))[0, 0]


def augment_intensity(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One 2-D slice (H, W) in ~[0, 1.5] -> a re-contrasted slice in ~[0, 1]."""
    x = x.clamp(0, 1.5) / 1.5
    fg = x > 0.03
    u = rng.uniform()
    if u < 0.4:
        # a random intensity curve through 6 knots (may invert or reorder tissue contrasts); air stays dark
        knots = np.sort(rng.uniform(0, 1, 4))
        xs = np.concatenate([[0.0, 0.03], knots, [1.0]])
        ys = np.concatenate([[0.0, rng.uniform(0.0, 0.15)], rng.uniform(0.05, 1.0, 4), [rng.uniform(0.2, 1.0)]])
        xs = np.maximum.accumulate(xs + np.arange(len(xs)) * 1e-4)
        lut = np.interp(x.numpy(), xs, ys).astype(np.float32)
        x = torch.from_numpy(lut)
    elif u < 0.6:
        # inversion-like: bright tissue dark and the other way round inside the body
        x = torch.where(fg, 1.0 - x * rng.uniform(0.7, 1.0), x)
    x = x.clamp(0, 1) ** float(np.exp(rng.uniform(-0.6, 0.6)))
    if rng.uniform() < 0.7:
        x = x * _bias_field(rng, (int(x.shape[0]), int(x.shape[1])), rng.uniform(0.1, 0.4))
    if rng.uniform() < 0.7:
        x = x + torch.from_numpy(rng.normal(0, rng.uniform(0.005, 0.06), size=x.shape).astype(np.float32))
    x = x.clamp(min=0)
    top = torch.quantile(x.flatten()[:: max(1, x.numel() // 20000)], 0.995).clamp(min=1e-3)
    return (x / top).clamp(0, 1.5)


def sample_batch(
    prepared: list[Prepared], rng: np.random.Generator, batch: int, augment: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(batch):
        p = prepared[int(rng.integers(len(prepared)))]
        k_max = p.image.shape[0]
        if p.spine_slices.size and rng.uniform() < 0.85:
            k = int(rng.choice(p.spine_slices))
        else:
            k = int(rng.integers(k_max))
        half = int(rng.integers(0, 3)) if augment else 0  # 1 - 5 slices averaged
        lo, hi = max(0, k - half), min(k_max, k + half + 1)
        x = torch.from_numpy(p.image[lo:hi].mean(axis=0))
        y = torch.from_numpy(p.classes[k].astype(np.int64))
        if augment:
            ang = math.radians(rng.uniform(-15, 15))
            sc = float(np.exp(rng.uniform(-0.18, 0.18)))
            theta = torch.tensor(
                [
                    [math.cos(ang) / sc, -math.sin(ang) / sc, rng.uniform(-0.1, 0.1)],
                    [math.sin(ang) / sc, math.cos(ang) / sc, rng.uniform(-0.1, 0.1)],
                ],
                dtype=torch.float32,
            )[None]
            grid = F.affine_grid(theta, [1, 1, *x.shape], align_corners=False)
            x = F.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]
            y = F.grid_sample(y[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[
                0, 0
            ].long()
            x = augment_intensity(x, rng)
        # crop CROP x CROP around a random point near the spine (pad first)
        h, w = x.shape
        ph, pw = max(0, CROP - h), max(0, CROP - w)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
            h, w = x.shape
        body = torch.nonzero(y == 1)
        u = rng.uniform()
        if u < SACRAL_CROPS and p.lowest[k].any():
            # around the lumbosacral junction: where L5 must be told from S1 (in the un-augmented frame; the
            # affine moves it by a few pixels at most)
            rr, cc = np.nonzero(p.lowest[k])
            cy = int(rr.max()) + int(rng.integers(-10, 30))
            cx = int(cc.mean()) + int(rng.integers(-30, 31))
        elif body.shape[0] and u < 0.9:
            cy, cx = body[int(rng.integers(body.shape[0]))].tolist()
            cy += int(rng.integers(-40, 41))
            cx += int(rng.integers(-30, 31))
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        r0 = int(np.clip(cy - CROP // 2, 0, h - CROP))
        c0 = int(np.clip(cx - CROP // 2, 0, w - CROP))
        xs.append(x[r0 : r0 + CROP, c0 : c0 + CROP])
        ys.append(y[r0 : r0 + CROP, c0 : c0 + CROP])
    return torch.stack(xs)[:, None].float(), torch.stack(ys)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, ignore_index=IGNORE)
    valid = (y != IGNORE).float()[:, None]
    probs = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(torch.where(y == IGNORE, 0, y), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1.0 - dice[1:]).mean()


@torch.no_grad()
def validate(net: torch.nn.Module, prepared: list[Prepared]) -> dict[str, float]:
    """Dice of body and disc over the validation patients' spine slices (network grid, ignored pixels out)."""
    net.eval()
    inter = np.zeros(3)
    total = np.zeros(3)
    for p in prepared:
        ks = p.spine_slices
        x = torch.from_numpy(p.image[ks])[:, None]
        h, w = x.shape[-2:]
        mult = 16
        x = F.pad(x, (0, (-w) % mult, 0, (-h) % mult))
        pred = torch.cat([net(x[i : i + 8]) for i in range(0, x.shape[0], 8)])[..., :h, :w].argmax(1).numpy()
        y = p.classes[ks]
        valid = y != IGNORE
        for c in (1, 2):
            a, b = (pred == c) & valid, (y == c) & valid
            inter[c] += (a & b).sum()
            total[c] += a.sum() + b.sum()
    net.train()
    return {
        "dice_body": round(float(2 * inter[1] / max(total[1], 1)), 4),
        "dice_disc": round(float(2 * inter[2] / max(total[2], 1)), 4),
    }


def _bar(done: int, total: int, width: int = 30) -> str:
    n = int(width * done / max(total, 1))
    return "[" + "#" * n + "." * (width - n) + f"] {done}/{total}"


def train_levels(
    root: Path,
    out_dir: Path,
    recipe: Recipe,
    *,
    log: Callable[[str], None] = print,
    resume: bool = True,
    write_card: bool = True,
    progress=None,
    card_phantoms: int = 0,
    card_stenosis=None,
) -> Path:
    """Train on the spinevol folder ``root``; writes ``out_dir/model.pt`` (+ .sha256, card) and returns its path."""
    torch.set_num_threads(max(1, int(recipe.threads)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list_keys(root)
    split = split_keys(keys, patients=patients_of(root))
    if not split["train"]:
        from models.errors import TrainingError

        raise TrainingError(f"spinevol:{root}: no training patients after the split {split}")
    t_prep = time.perf_counter()
    train_p = [prepare(v) for v in load_volumes(root, split["train"])]
    val_p = [prepare(v) for v in load_volumes(root, split["val"])] if split["val"] else []
    log(f"prepared {len(train_p)} training and {len(val_p)} validation volumes in {time.perf_counter() - t_prep:.0f} s")
    torch.manual_seed(recipe.seed)
    model = LevelsModel.new(recipe.channels)
    net = model.net
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    total_steps = recipe.epochs * recipe.steps_per_epoch
    if recipe.max_steps is not None:
        total_steps = min(total_steps, recipe.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(total_steps, 2), pct_start=0.15)
    history: list[dict[str, Any]] = []
    start_epoch, step, seconds_before = 0, 0, 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        try:
            ck = load_checkpoint(ckpt_path).data
            if ck.get("recipe") != {**asdict(recipe), "channels": list(recipe.channels)}:
                log(f"checkpoint {ckpt_path} was made with another recipe; starting over")
            else:
                net.load_state_dict(ck["state_dict"])
                opt.load_state_dict(ck["optimizer"])
                sched.load_state_dict(ck["scheduler"])
                start_epoch, step = int(ck["epoch"]), int(ck["step"])
                history = json.loads(ck["history"])
                seconds_before = float(ck["seconds"])
                log(f"resumed from {ckpt_path} at epoch {start_epoch}")
        except Exception as e:  # an unreadable checkpoint: start over
            log(f"checkpoint {ckpt_path} not usable ({e}); starting over")
    t0 = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        if step >= total_steps:
            break
        rng = np.random.default_rng([recipe.seed, epoch])
        te = time.perf_counter()
        losses = []
        n_steps = min(recipe.steps_per_epoch, total_steps - step)
        for i in range(n_steps):
            x, y = sample_batch(train_p, rng, recipe.batch_size, recipe.augment)
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if progress is not None:
                progress(f"\repoch {epoch + 1}/{recipe.epochs} {_bar(i + 1, n_steps)} loss {np.mean(losses[-20:]):.4f}")
        val = validate(net, val_p) if val_p else {}
        rec = {
            "epoch": epoch + 1,
            "steps": step,
            "loss": round(float(np.mean(losses)), 5),
            **{f"val_{k}": v for k, v in val.items()},
            "seconds": round(time.perf_counter() - te, 1),
        }
        history.append(rec)
        if progress is not None:
            progress("\n")
        save_checkpoint(
            {
                "format": "msknode.levels-training/1",
                "state_dict": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "history": json.dumps(history),
                "seconds": seconds_before + time.perf_counter() - t0,
                "recipe": {**asdict(recipe), "channels": list(recipe.channels)},
            },
            ckpt_path,
        )
        log(
            f"epoch {epoch + 1}/{recipe.epochs}: loss {rec['loss']:.4f}"
            + "".join(f", validation {k} {v:.3f}" for k, v in val.items())
            + f" ({rec['seconds']:.0f} s)"
        )
    wall = seconds_before + time.perf_counter() - t0
    model.metadata = {
        "recipe": {**asdict(recipe), "channels": list(recipe.channels)},
        "split": split,
        "history": json.dumps(history),
        "wall_time_s": round(wall, 1),
    }
    path = out_dir / "model.pt"
    model.save(path)
    (out_dir / "train_log.json").write_text(json.dumps({"history": history, "split": split}, indent=1) + "\n")
    log(f"trained {step} steps in {wall / 60:.1f} min (this machine, {recipe.threads} thread(s))")
    if write_card:
        from models.levels.evaluation import write_levels_card

        write_levels_card(
            out_dir,
            root,
            recipe=recipe,
            split=split,
            history=history,
            wall_time_s=wall,
            log=log,
            phantoms=card_phantoms,
            stenosis_model=card_stenosis,
        )
    return path


def stderr_progress(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()
