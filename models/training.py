"""Training loop for task models (MONAI data pipeline, PyTorch optimisation, CPU).

``train(task, data_spec, out_dir, ...)``:

1. items from the data spec on the task's network grid (`models.data.load_items`; phantoms
   are generated in worker processes and cached on disk when ``cache_root`` is given);
2. a fixed split: the last ``val_fraction`` of the items validate (never trained on);
3. epochs of AdamW with a one-cycle learning rate over MONAI ``Dataset``/``DataLoader``
   with MONAI augmentation (`models.transforms.training_augmentation`); loss = negative
   log of the probability of the label's allowed classes per head (a binary label on a
   3-class head allows both tear grades) + a lesion-evidence BCE where lesion masks exist;
4. a checkpoint after every epoch (``checkpoint.pt`` + ``.sha256``, written atomically by
   `models.protocol.save_checkpoint`: resumable), the best epoch by validation loss kept;
5. temperature scaling and the operating threshold (Youden's J) fitted on validation;
6. ``model.pt`` + ``model.pt.sha256``, ``recipe.json`` and ``train_log.jsonl`` in ``out_dir``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.classifier import ClassifierModel, build_net
from models.data import load_items, parse_spec
from models.errors import TrainingError, WeightsIntegrityError, WeightsMissingError
from models.protocol import load_checkpoint, save_checkpoint
from models.tasks.base import TaskSpec
from models.types import NOT_FOR_DIAGNOSTIC_USE, ModelInfo


@dataclass
class Recipe:
    data: str
    seed: int = 0
    epochs: int = 8
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    aux_pos_weight: float = 20.0
    augment: bool = True
    affine: bool = False  # random affine augmentation (rotation/scale/shift) on top of flips and intensity
    threads: int = 2
    max_steps: int | None = None  # stop early (smoke tests)
    init: str | None = None  # start from these weights (a checkpoint with its .sha256), e.g. to fine-tune on site data
    init_sha256: str | None = None  # recorded hash of ``init`` (filled in when training starts)
    patch_steps: int = 0  # lesion-patch pretraining steps before the whole-grid epochs (see pretrain_patches)
    patch_shape: tuple[int, int, int] = (12, 32, 32)
    patch_lr: float | None = None  # peak learning rate of the patch stage (default: lr)


def _collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {
        "image": torch.stack([torch.as_tensor(np.asarray(b["image"], np.float32)) for b in batch]),
        "allowed": torch.stack([torch.as_tensor(np.asarray(b["allowed"], bool)) for b in batch]),
    }
    if all("lesion" in b and b["lesion"] is not None for b in batch):
        out["lesion"] = torch.stack([torch.as_tensor(np.asarray(b["lesion"], np.float32)) for b in batch])
    return out


def allowed_nll(logits: list[torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
    """Mean over heads with a known label of -log sum_{allowed} softmax(logits)."""
    losses = []
    for h, lg in enumerate(logits):
        n = lg.shape[1]
        al = allowed[:, h, :n]
        known = ~al.all(dim=1)
        if not known.any():
            continue
        logp = torch.log_softmax(lg, dim=1)
        masked = logp.masked_fill(~al, float("-inf"))
        losses.append(-(torch.logsumexp(masked, dim=1)[known]).mean())
    if not losses:
        return logits[0].sum() * 0.0
    return torch.stack(losses).mean()


def evidence_loss(ev: torch.Tensor, lesion: torch.Tensor, pos_weight: float) -> torch.Tensor:
    target = (F.adaptive_max_pool3d(lesion, ev.shape[2:]) > 0.25).float()
    return F.binary_cross_entropy_with_logits(ev, target, pos_weight=torch.tensor(pos_weight))


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels, int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    r = np.arange(1, len(order) + 1, dtype=float)
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        r[i : j + 1] = (i + j + 2) / 2.0
        i = j + 1
    ranks[order] = r
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fit_temperature(logits: np.ndarray, allowed: np.ndarray) -> float:
    """Temperature minimising the allowed-class NLL of validation logits (1-D search, robust)."""
    lg = torch.as_tensor(logits, dtype=torch.float64)
    al = torch.as_tensor(allowed, dtype=torch.bool)

    def nll(t: float) -> float:
        logp = torch.log_softmax(lg / t, dim=1).masked_fill(~al, float("-inf"))
        return float(-(torch.logsumexp(logp, dim=1)).mean())

    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
    vals = [nll(t) for t in grid]
    best = float(grid[int(np.argmin(vals))])
    lo, hi = best / 1.06, best * 1.06  # golden-section refinement
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(30):
        c, d = b - g * (b - a), a + g * (b - a)
        if nll(c) < nll(d):
            b = d
        else:
            a = c
    return float((a + b) / 2)


def youden_threshold(p: np.ndarray, y: np.ndarray) -> float:
    best_t, best_j = 0.5, -1.0
    for t in np.unique(np.round(p, 4)):
        sens = float((p[y == 1] >= t).mean()) if (y == 1).any() else 0.0
        spec = float((p[y == 0] < t).mean()) if (y == 0).any() else 0.0
        j = sens + spec - 1
        if j > best_j + 1e-9 or (abs(j - best_j) <= 1e-9 and abs(t - 0.5) < abs(best_t - 0.5)):
            best_t, best_j = float(t), j
    return float(np.clip(best_t, 0.05, 0.95))


def _evaluate_val(net, items, task: TaskSpec, batch_size: int) -> dict[str, Any]:
    net.eval()
    logits_all: list[list[np.ndarray]] = [[] for _ in task.heads]
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            batch = _collate(items[i : i + batch_size])
            logits, _ = net(batch["image"])
            for h, lg in enumerate(logits):
                logits_all[h].append(lg.numpy())
    logits_np = [np.concatenate(x) for x in logits_all]
    allowed = np.stack([np.asarray(it["allowed"], bool) for it in items])
    with torch.no_grad():
        loss = float(allowed_nll([torch.as_tensor(x) for x in logits_np], torch.as_tensor(allowed)))
    out: dict[str, Any] = {"val_loss": loss, "logits": logits_np, "allowed": allowed}
    head = task.heads[0]
    if head.negative:
        n = len(head.classes)
        neg = [head.classes.index(c) for c in head.negative]
        p = torch.softmax(torch.as_tensor(logits_np[0]), dim=1).numpy()
        score = 1 - p[:, neg].sum(axis=1)
        al = allowed[:, 0, :n]
        known = ~al.all(axis=1)
        y = (~al[:, neg].any(axis=1)).astype(int)
        out["val_auc"] = binary_auc(score[known], y[known])
    return out


class PatchSampler:
    """Patches of ``shape`` (images, lesion masks, patch labels 1 = holds lesion) from network-grid items.

    Positive patches hold a random lesion voxel (jittered within the patch); every other patch is
    centred where a lesion of *another* item lies, on an item or a place without one, or (a quarter)
    anywhere on the grid. Most negatives are then drawn from the same places as positives (no position
    shortcut) and are the hard ones: the same anatomy, mimics included."""

    def __init__(self, items: list[dict[str, Any]], shape: Sequence[int], seed: int = 0):
        self.items = items
        self.shape = np.asarray(shape, int)
        self.rng = np.random.default_rng(seed)
        self.points = {}
        for i, it in enumerate(items):
            les = it.get("lesion")
            if les is not None:
                pts = np.argwhere(np.asarray(les[0]) > 0.5)
                if len(pts):
                    self.points[i] = pts
        if not self.points:
            raise TrainingError("patch pretraining needs items with lesion masks")
        self.with_lesion = sorted(self.points)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng, shape = self.rng, self.shape
        imgs, less, ys = [], [], []
        for k in range(n):
            src = self.with_lesion[int(rng.integers(len(self.with_lesion)))]
            pts = self.points[src]
            centre = pts[int(rng.integers(len(pts)))]
            item = self.items[src] if k % 2 == 0 else self.items[int(rng.integers(len(self.items)))]
            img = item["image"]
            grid = np.asarray(img.shape[1:])
            if k % 4 == 3:  # and a quarter anywhere on the grid: nothing else may look like a lesion
                centre = rng.integers(0, grid)
            jitter = rng.integers(-(shape // 3), shape // 3 + 1)
            lo = np.clip(centre + jitter - shape // 2, 0, np.maximum(grid - shape, 0))
            sl = (slice(None),) + tuple(slice(int(a), int(a + b)) for a, b in zip(lo, shape))
            imgs.append(np.asarray(img[sl], np.float32))
            les = item.get("lesion")
            patch_les = np.zeros_like(imgs[-1][:1]) if les is None else np.asarray(les[sl], np.float32)
            less.append(patch_les)
            ys.append(float(patch_les.max() > 0.5))
        return np.stack(imgs), np.stack(less), np.asarray(ys, np.float32)


def pretrain_patches(
    net, items: list[dict[str, Any]], task: TaskSpec, recipe: Recipe, *, log: Callable[[str], None] = print
) -> None:
    """Lesion-patch pretraining: ``recipe.patch_steps`` steps on small patches (``recipe.patch_shape``) around
    lesions and at the same places in other cases, with the lesion-evidence loss and a patch-level
    lesion / no-lesion loss on the head's evidence maximum. Small lesions (a meniscal tear line is a
    few dozen voxels of a quarter-million) give the whole-grid loss too little signal to learn from
    at first; on patches the features that see them are learnt in a fraction of the time, and the
    whole-grid epochs then learn the pooling and the classes."""
    sampler = PatchSampler(items, recipe.patch_shape, seed=recipe.seed + 101)
    rng = np.random.default_rng(recipe.seed + 102)
    lr = recipe.patch_lr or recipe.lr
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=recipe.patch_steps, pct_start=0.1)
    batch = max(16, 2 * recipe.batch_size)
    net.train()
    t0, sums = time.time(), [0.0, 0.0, 0]
    for step in range(1, recipe.patch_steps + 1):
        x, les, y = sampler.sample(batch)
        if task.input.flip_slices_ok:
            flip = rng.random(batch) < 0.5
            x[flip], les[flip] = x[flip][:, :, ::-1], les[flip][:, :, ::-1]
        xt = torch.as_tensor(np.ascontiguousarray(x))
        if task.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last_3d)
        feat = net.features(xt)
        ev = net.evidence(net.drop_map(feat))
        aux = evidence_loss(ev, torch.as_tensor(np.ascontiguousarray(les)), recipe.aux_pos_weight)
        emax = ev.flatten(2).max(dim=2).values[:, 0]
        patch = F.binary_cross_entropy_with_logits(emax, torch.as_tensor(y))
        loss = aux + patch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        sums[0] += float(aux.detach())
        sums[1] += float(patch.detach())
        sums[2] += 1
        if step % 100 == 0 or step == recipe.patch_steps:
            log(
                json.dumps(
                    {
                        "patch_step": step,
                        "aux": round(sums[0] / sums[2], 5),
                        "patch": round(sums[1] / sums[2], 5),
                        "seconds": round(time.time() - t0, 1),
                    }
                )
            )
            sums = [0.0, 0.0, 0]


def _resumable(ckpt_path: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The content of the epoch checkpoint ``ckpt_path`` when it exists and verifies (else None: start over)."""
    if not ckpt_path.is_file():
        return None
    try:
        return load_checkpoint(ckpt_path).data
    except (WeightsMissingError, WeightsIntegrityError) as e:
        log(f"not resuming: {e}")
        return None


def read_log_epochs(log_path: Path) -> list[dict[str, Any]]:
    """The epoch records of ``train_log.jsonl``, one per epoch (the last written wins), in epoch order."""
    by_epoch: dict[int, dict[str, Any]] = {}
    if not Path(log_path).is_file():
        return []
    for line in Path(log_path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interruption
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[k] for k in sorted(by_epoch)]


def _same_recipe(saved: Any, recipe: dict[str, Any]) -> bool:
    """Whether a checkpoint's recipe is this one; the CPU threads (a machine setting) may differ."""
    if not isinstance(saved, dict):
        return False
    return {k: v for k, v in saved.items() if k != "threads"} == {k: v for k, v in recipe.items() if k != "threads"}


def _keep_log_epochs(log_path: Path, start_epoch: int) -> None:
    """Keeps in ``train_log.jsonl`` only the epochs before ``start_epoch`` (those the checkpoint holds)."""
    if not log_path.is_file():
        return
    kept = [r for r in read_log_epochs(log_path) if r["epoch"] < start_epoch]
    if not kept:
        log_path.unlink()
        return
    tmp = log_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(log_path)


class ProgressBar:
    """Per-epoch progress of `train` (its ``progress`` callback) with the loss and the validation metric.

    On a terminal: a bar redrawn in place (carriage return) with the running loss, finished by the epoch's
    validation loss and AUC. Elsewhere (CI logs, files): one line per epoch. ``write`` prints a log line
    without tearing a bar that is being drawn."""

    def __init__(self, stream: Any = None, *, tty: bool | None = None, width: int = 24, min_interval: float = 0.2):
        import sys

        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.width = width
        self.min_interval = min_interval
        self._drawn = False
        self._last = 0.0

    def _bar(self, done: int, total: int) -> str:
        filled = round(self.width * min(1.0, done / max(1, total)))
        return "[" + "#" * filled + "." * (self.width - filled) + f"] {done}/{total}"

    def __call__(self, ev: dict[str, Any]) -> None:
        epoch = f"epoch {int(ev['epoch']) + 1}/{ev['epochs']}"
        if ev.get("event") == "step":
            now = time.monotonic()
            if not self.tty or (now - self._last < self.min_interval and ev["batch"] < ev["batches"]):
                return
            self._last = now
            self.stream.write(f"\r{epoch} {self._bar(ev['batch'], ev['batches'])} loss {ev['loss']:.4f}")
            self.stream.flush()
            self._drawn = True
            return
        auc = ev.get("val_auc")
        text = (
            f"{epoch} {self._bar(ev['batches'], ev['batches'])} loss {ev['loss']:.4f} "
            f"val_loss {ev['val_loss']:.4f} val_auc {'-' if auc is None else f'{auc:.3f}'} {ev['seconds']:.1f} s"
        )
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        self._drawn = False

    def write(self, message: str, out: Any = None) -> None:
        """Prints ``message`` (to ``out``, default stdout) below a bar being drawn, which the next step redraws."""
        import sys

        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
        print(message, file=out if out is not None else sys.stdout, flush=True)


def train(
    task: TaskSpec,
    recipe: Recipe,
    out_dir: Path,
    *,
    cache_root: Path | None = None,
    workers: int = 1,
    log: Callable[[str], None] = print,
    resume: bool = True,
    items: list[dict[str, Any]] | None = None,
    val_items: list[dict[str, Any]] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train ``task`` per ``recipe``; returns the path of the written ``model.pt``.

    ``items`` / ``val_items``: network-grid items prepared elsewhere (``recipe.data`` then only describes them);
    without ``val_items`` the last ``val_fraction`` of the items validates. ``progress`` (e.g. a `ProgressBar`)
    gets ``{"event": "step", ...}`` after every optimiser step and ``{"event": "epoch", ...}`` (the epoch's
    log record) once its checkpoint is written."""
    from monai.data import DataLoader, Dataset
    from monai.utils import set_determinism

    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(recipe.threads)))
    set_determinism(seed=recipe.seed)
    if items is None:
        spec: Any = parse_spec(recipe.data)
        t_data = time.time()
        items = load_items(spec, task, workers=workers, cache_root=cache_root, log=log)
        log(f"{len(items)} cases from {spec} in {time.time() - t_data:.0f} s")
    else:
        spec = recipe.data
    if len(items) < 4:
        raise TrainingError(f"{spec}: {len(items)} cases are too few to train (need at least 4)")
    if val_items is None:
        n_val = max(1, round(len(items) * recipe.val_fraction))
        train_items, val_items = items[:-n_val], items[-n_val:]
        split_rule = (
            f"the last {recipe.val_fraction:.0%} of the cases in the order of the data spec validate "
            f"(chose the epoch, the temperature and the threshold; never trained on); by case, never by slice"
        )
    else:
        train_items = items
        split_rule = "validation cases given separately (never trained on)"
    split = split_record(task, train_items, val_items, split_rule)
    log(f"split: {split['n_train']} train / {split['n_validation']} validation cases ({split_rule})")
    for w in split["warnings"]:
        log(f"WARNING: {w}")
    allowed = np.stack([np.asarray(it["allowed"], bool) for it in train_items])
    known = ~allowed.all(axis=2)
    if not known.any():
        raise TrainingError(f"{spec}: no case carries a label for {task.name}")

    transform = None
    if recipe.augment:
        from models.transforms import training_augmentation

        has_lesion = "lesion" in train_items[0]
        aug = training_augmentation(
            flip_slices=task.input.flip_slices_ok,
            affine=recipe.affine,
            lesion_key="lesion" if has_lesion else None,
            seed=recipe.seed,
        )

        def transform(item):
            d = dict(item)
            d["image"] = np.asarray(d["image"], np.float32)
            if has_lesion:
                d["lesion"] = np.asarray(d["lesion"], np.float32)
            d = aug(d)
            d["image"] = np.asarray(d["image"], np.float32)
            if has_lesion:
                d["lesion"] = np.asarray(d["lesion"], np.float32)
            return d

    ds = Dataset(train_items, transform=transform)
    gen = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(
        ds,
        batch_size=recipe.batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=_collate,
        generator=gen,
        drop_last=len(train_items) > recipe.batch_size,
    )
    net = build_net(task)
    if recipe.init:
        init = Path(recipe.init)
        try:
            start = ClassifierModel.load(init, task)  # verified against the .sha256 beside it
        except WeightsMissingError:
            raise TrainingError(f"--init {init}: the weights and their .sha256 are required") from None
        except WeightsIntegrityError as e:
            raise TrainingError(f"--init {init}: {e}") from None
        net.load_state_dict(start.net.state_dict())
        digest = start.info.weights_sha256
        recipe.init_sha256 = digest
        log(f"initialised from {init} (sha256 {digest})")
    ckpt_path = out_dir / "checkpoint.pt"
    ck = _resumable(ckpt_path, log) if resume else None
    if recipe.patch_steps > 0 and ck is None:
        pretrain_patches(net, train_items, task, recipe, log=log)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, len(loader))
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.15)
    log_path = out_dir / "train_log.jsonl"
    start_epoch = 0
    best: dict[str, Any] = {"val_loss": float("inf"), "epoch": -1, "state": None}
    if ck is not None and ck.get("task") == task.name and _same_recipe(ck.get("recipe"), asdict(recipe)):
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start_epoch = int(ck["epoch"]) + 1
        best = {"val_loss": float(ck["best_val_loss"]), "epoch": int(ck["best_epoch"]), "state": ck["best_state"]}
        if ck.get("generator") is not None:
            gen.set_state(ck["generator"])
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")
    elif ck is not None:
        log(f"not resuming: {ckpt_path} was written for another task or recipe; training starts over")
    _keep_log_epochs(log_path, start_epoch)  # a fresh start forgets an earlier run's epochs
    (out_dir / "recipe.json").write_text(
        json.dumps({"task": task.name, "task_version": task.version, **asdict(recipe), "split": split}, indent=2) + "\n"
    )
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, recipe.epochs):
        net.train()
        t0 = time.time()
        sums = {"loss": 0.0, "cls": 0.0, "aux": 0.0}
        n_batches = 0
        for batch in loader:
            logits, ev = net(batch["image"])
            cls = allowed_nll(logits, batch["allowed"])
            aux = evidence_loss(ev, batch["lesion"], recipe.aux_pos_weight) if "lesion" in batch else cls * 0.0
            loss = cls + task.net.aux_weight * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            n_batches += 1
            sums["loss"] += float(loss.detach())
            sums["cls"] += float(cls.detach())
            sums["aux"] += float(aux.detach())
            if progress is not None:
                progress(
                    {
                        "event": "step",
                        "epoch": epoch,
                        "epochs": recipe.epochs,
                        "batch": n_batches,
                        "batches": steps_per_epoch,
                        "loss": sums["loss"] / n_batches,
                    }
                )
            if recipe.max_steps is not None and step >= recipe.max_steps:
                break
        val = _evaluate_val(net, val_items, task, recipe.batch_size)
        rec = {
            "epoch": epoch,
            "step": step,
            "seconds": round(time.time() - t0, 1),
            **{k: round(v / max(1, n_batches), 5) for k, v in sums.items()},
            "val_loss": round(val["val_loss"], 5),
            "val_auc": (round(val["val_auc"], 4) if math.isfinite(val.get("val_auc", math.nan)) else None),
            "lr": opt.param_groups[0]["lr"],
        }
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log(json.dumps(rec))
        if val["val_loss"] < best["val_loss"]:
            best = {
                "val_loss": val["val_loss"],
                "epoch": epoch,
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            }
        save_checkpoint(
            {
                "task": task.name,
                "recipe": asdict(recipe),
                "epoch": epoch,
                "net": net.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "best_val_loss": best["val_loss"],
                "best_epoch": best["epoch"],
                "best_state": best["state"],
                "generator": gen.get_state(),
            },
            ckpt_path,
        )
        if progress is not None:
            progress({"event": "epoch", "epochs": recipe.epochs, "batches": steps_per_epoch, **rec})
        if recipe.max_steps is not None and step >= recipe.max_steps:
            break
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    val = _evaluate_val(net, val_items, task, recipe.batch_size)
    if "val_auc" in val and not math.isfinite(val["val_auc"]):
        val["val_auc"] = None  # one class only in validation (warned above); JSON has no NaN
    temperature = fit_temperature(val["logits"][0], val["allowed"][:, 0, : len(task.heads[0].classes)])
    threshold = 0.5
    head = task.heads[0]
    if head.negative:
        neg = [head.classes.index(c) for c in head.negative]
        p = torch.softmax(torch.as_tensor(val["logits"][0]) / temperature, dim=1).numpy()
        al = val["allowed"][:, 0, : len(head.classes)]
        known = ~al.all(axis=1)
        y = (~al[:, neg].any(axis=1)).astype(int)
        score = 1 - p[:, neg].sum(axis=1)
        if known.any() and len(np.unique(y[known])) == 2:
            threshold = youden_threshold(score[known], y[known])
    meta = {
        "version": task.version,
        "demo_weights": True,
        "notice": NOT_FOR_DIAGNOSTIC_USE,
        "training_data": str(spec),
        "n_train": len(train_items),
        "n_val": len(val_items),
        "best_epoch": best["epoch"],
        "val_loss": val["val_loss"],
        "val_auc": val.get("val_auc"),
        "recipe": asdict(recipe),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info = ModelInfo(name=task.name, version=task.version, weights_sha256="", task=task.kind, anatomy=task.anatomy)
    model = ClassifierModel(task=task, net=net, info=info, temperature=temperature, threshold=threshold, metadata=meta)
    path = out_dir / "model.pt"
    sha = model.save(path)
    summary = {
        "weights": str(path),
        "weights_sha256": sha,
        "temperature": temperature,
        "threshold": threshold,
        "best_epoch": best["epoch"],
        "val_loss": val["val_loss"],
        "val_auc": val.get("val_auc"),
    }
    summary["warnings"] = split["warnings"]
    epochs_log = read_log_epochs(log_path)
    summary["wall_time_s"] = round(time.time() - t_start, 1)
    summary["epoch_seconds_total"] = round(sum(float(r.get("seconds") or 0) for r in epochs_log), 1)
    summary["resumed_at_epoch"] = start_epoch if start_epoch > 0 else None
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_training_card(
        out_dir, task, recipe, summary, split, temperature=temperature, threshold=threshold, epochs_log=epochs_log
    )
    log(json.dumps(summary))
    return path


def _class_of(allowed_row: np.ndarray, classes: Sequence[str]) -> str | None:
    """The label a case carries on one head: its class, "any of a, b" (a binary label on a graded head),
    or None (no label)."""
    ok = [c for c, a in zip(classes, allowed_row[: len(classes)]) if a]
    if len(ok) == len(classes):
        return None
    return ok[0] if len(ok) == 1 else "any of " + ", ".join(ok)


def split_record(
    task: TaskSpec, train_items: list[dict[str, Any]], val_items: list[dict[str, Any]], rule: str
) -> dict[str, Any]:
    """The split as recorded in recipe.json: the case ids on each side, the label counts per head on each side,
    and a warning for every class of a head that the validation cases lack (their AUC and threshold are then
    undefined or meaningless) or that the training cases lack."""
    out: dict[str, Any] = {
        "rule": rule,
        "n_train": len(train_items),
        "n_validation": len(val_items),
        "train_cases": [str(it.get("key", i)) for i, it in enumerate(train_items)],
        "validation_cases": [str(it.get("key", i)) for i, it in enumerate(val_items)],
        "label_counts": {},
        "warnings": [],
    }
    covered: dict[tuple[str, str], set[str]] = {}  # (side, head) -> classes some labelled case allows
    for side, rows in (("train", train_items), ("validation", val_items)):
        for h, head in enumerate(task.heads):
            counts: dict[str, int] = {}
            seen = covered.setdefault((side, head.name), set())
            for it in rows:
                row = np.asarray(it["allowed"], bool)[h][: len(head.classes)]
                label = _class_of(row, head.classes)
                counts[label or "unlabelled"] = counts.get(label or "unlabelled", 0) + 1
                if label is not None:
                    seen.update(c for c, ok in zip(head.classes, row) if ok)
            out["label_counts"].setdefault(side, {})[head.name] = counts
    for head in task.heads:
        for c in head.classes:
            if c not in covered[("validation", head.name)]:
                out["warnings"].append(
                    f"no validation case of {head.name} = {c!r} ({len(val_items)} validation "
                    "cases): validation AUC, temperature and threshold cannot reflect it; "
                    "train on more cases or give validation cases that hold every class"
                )
            if c not in covered[("train", head.name)]:
                out["warnings"].append(f"no training case of {head.name} = {c!r}: the model cannot learn it")
    if len(val_items) < 20:
        out["warnings"].append(f"only {len(val_items)} validation cases: the validation figures are very uncertain")
    return out


def _reproduce(task: TaskSpec, recipe: Recipe) -> str:
    parts = [
        f"msknode train {task.name} --data {recipe.data} --out OUT --epochs {recipe.epochs}",
        f"--batch-size {recipe.batch_size} --lr {recipe.lr:g} --seed {recipe.seed}",
    ]
    if recipe.max_steps is not None:
        parts.append(f"--max-steps {recipe.max_steps}")
    if not recipe.augment:
        parts.append("--no-augment")
    if recipe.init:
        parts.append(f"--init {recipe.init}")
    parts.append(f"--patch-steps {recipe.patch_steps}")
    if recipe.patch_lr is not None:
        parts.append(f"--patch-lr {recipe.patch_lr:g}")
    return " ".join(parts)


def write_training_card(
    out_dir: Path,
    task: TaskSpec,
    recipe: Recipe,
    summary: dict[str, Any],
    split: dict[str, Any],
    *,
    temperature: float,
    threshold: float,
    epochs_log: list[dict[str, Any]] | None = None,
) -> None:
    """card.json + MODEL_CARD.md of freshly trained weights, from what training knows: the data spec, the cases on
    each side of the split, the recipe, the figures of every epoch (``epochs_log``), the wall time and the
    validation figures (which chose the epoch and the calibration, so they are not an independent estimate:
    `msknode evaluate` on held-out cases gives that)."""
    from models.cards import write_card

    init = f", fine-tuned from {recipe.init} (sha256 {recipe.init_sha256})" if recipe.init else ""
    metrics = {
        "validation_loss": round(float(summary["val_loss"]), 5),
        "best_epoch": summary["best_epoch"],
        "temperature": round(float(temperature), 4),
        "threshold": round(float(threshold), 4),
        "n_train": split["n_train"],
        "n_validation": split["n_validation"],
    }
    auc = summary.get("val_auc")
    metrics["validation_auc"] = None if auc is None else round(float(auc), 4)  # None: one class in validation
    if summary.get("wall_time_s") is not None:
        metrics["wall_time_s"] = summary["wall_time_s"]  # of the run that finished (after a resume: that run only)
    if summary.get("epoch_seconds_total") is not None:
        metrics["epoch_seconds_total"] = summary["epoch_seconds_total"]  # every epoch, resumed runs included
    if summary.get("resumed_at_epoch") is not None:
        metrics["resumed_at_epoch"] = summary["resumed_at_epoch"]
    epoch_columns = ["epoch", "step", "seconds", "loss", "val_loss", "val_auc", "lr"]
    epoch_rows = [
        ["-" if r.get(c) is None else (f"{r[c]:.3g}" if c == "lr" else r[c]) for c in epoch_columns]
        for r in (epochs_log or [])
    ]
    card = {
        **task.card_facts(),
        "version": task.version,
        "weights_file": "model.pt",
        "weights_sha256": summary["weights_sha256"],
        "demo_weights": False,
        "notice": "Weights trained with msknode train on the data named below; validated on their own split "
        "only. Not for diagnostic use.",
        "training_data": f"{recipe.data}: {split['n_train']} training cases{init}; validation "
        f"{split['n_validation']} cases. Label counts: {json.dumps(split['label_counts'])}. "
        f"The case ids of each side are in recipe.json.",
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "threads"} | {"split": split["rule"]},
        "metrics": metrics,
        "evaluation_data": f"the validation split ({split['n_validation']} cases), which chose the epoch, the "
        "temperature and the threshold: not an independent estimate; run msknode evaluate on "
        "held-out cases before use",
        "evaluation_note": "Validation figures of training only.",
        "reproduce": [_reproduce(task, recipe), f"msknode evaluate {task.name} --data HELD_OUT --weights OUT/model.pt"],
        "limitations": [
            "Not for diagnostic use.",
            *split["warnings"],
            "Figures come from the validation split that also chose the epoch and calibration.",
        ],
    }
    if epoch_rows:
        card["epochs"] = [{c: r.get(c) for c in epoch_columns} for r in epochs_log or []]
        card["tables"] = [
            {
                "title": "Per epoch (counted from 0 like best_epoch): training loss, validation loss and AUC",
                "columns": epoch_columns,
                "rows": epoch_rows,
            }
        ]
    site = site_data(recipe.data)
    if site is not None:
        card["site_data"] = site
        card["training_data"] += (
            f" Site data: {site.get('studies')} studies answered by the site's radiologists "
            f"(msknode export feedback, {site.get('exported_at')}), "
            + ("de-identified." if site.get("deidentified") else "not de-identified.")
        )
    write_card(out_dir, card)


def site_data(data: str) -> dict[str, Any] | None:
    """What a ``dicomcsv:`` folder written by ``msknode export feedback`` says of itself (its ``export.json``):
    the model, the number of studies and labels, the versions the radiologists answered, the de-identification
    and the split; None for other data."""
    if not str(data).startswith("dicomcsv:"):
        return None
    manifest = Path(str(data).split(":", 1)[1]) / "export.json"
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    keys = (
        "model",
        "exported_at",
        "side",
        "studies",
        "sides",
        "answered_model_versions",
        "deidentified",
        "deidentification_profile",
        "holdout_fraction",
        "holdout_rule",
        "source",
    )
    return {"data": str(data), **{k: m[k] for k in keys if k in m}}
