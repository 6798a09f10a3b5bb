"""``msknode train lumbar_spine.discs --data spider:PATH``.

Two phases, one resumable run (``train_state.pt`` in the output folder after every epoch; run the same
command again to resume from the last finished epoch):

1. localiser: the training patients' series whose crops name their discs (`models.discs.spider`);
   one heatmap per level, spatial-softmax cross-entropy against a Gaussian at the disc centre; random
   zoom/rotation/shift and intensity (gamma, contrast) augmentation; the epoch kept is the one naming
   the validation patients' levels best;
2. grader: patches around every graded disc of every training series (T1, T2, T2 SPACE), centred on
   the crop-derived centre where there is one, else on the trained localiser's (the crops exist for
   only about half of the patients); Pfirrmann cross-entropy + herniation (+ narrowing and bulging as
   auxiliary) binary cross-entropy; the epoch kept is the best on the validation patients graded
   end to end from the image alone (localiser + grader): linear kappa + herniation AUC / 4.

Then the grade and herniation temperatures and the herniation threshold (Youden) are fitted on the
validation patients, the held-out test patients are evaluated once (never used before), and the
weights, sha256, ``card.json`` and ``MODEL_CARD.md`` are written.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from models.discs.evaluation import figures, predict_patients
from models.discs.images import (
    CONTEXT_MM,
    GRID,
    PATCH,
    PATCH_MM,
    disc_input,
    normalise_pair,
    normalise_patch,
    patch,
    to_grid,
)
from models.discs.model import TTA_OFFSETS_MM, DiscModel, decode_heatmaps
from models.discs.nets import HEAT, DiscGrader, DiscLocaliser
from models.discs.spider import Patient, load_spider
from models.errors import DataSpecError
from models.protocol import load_checkpoint
from models.tasks.spine_discs import LEVELS, TASK
from models.types import ModelInfo

PRECUT = 96  # grader patches are cut once at this size, augmented crops of PATCH are taken from them
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
CITATION = (
    "van der Graaf JW, van Hooff ML, Buckens CFM, et al. Lumbar spine segmentation in MR images: a dataset and "
    "a public benchmark. Scientific Data 11:264 (2024), doi:10.1038/s41597-024-03090-w"
)


@dataclass
class DiscRecipe:
    data: str
    seed: int = 0
    loc_epochs: int = 30
    grade_epochs: int = 30
    loc_batch: int = 8
    grade_batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    heat_sigma: float = 1.0  # localiser target Gaussian, heat-grid pixels (4 grid pixels)
    herniation_pos_weight: float = 4.0
    label_smoothing: float = 0.05
    augment: bool = True
    threads: int = 1
    min_peak: float = 0.1
    grader_channels: int = 2  # disc patch + wider context
    loc_zoom_min: float = 0.8  # localiser augmentation: zoom range, and the share of images blanked above L1-L2
    loc_zoom_max: float = 1.2
    loc_cut_top: float = 0.0


# --- data ----------------------------------------------------------------------------------------


def _centres(root: Path, out: Path, patients: list[Patient], log) -> None:
    """Disc centres from the crops, cached in the output folder (keyed by series and image size)."""
    from models.discs.spider import crop_centres

    cache_p = out / "centres.json"
    cache: dict[str, Any] = json.loads(cache_p.read_text()) if cache_p.is_file() else {}
    changed = False
    for pt in patients:
        for s in pt.series:
            key = f"{s.key}:{s.path.stat().st_size}"
            if key not in cache:
                cache[key] = {k: list(v) for k, v in crop_centres(root, s, pt.n_graded).items()}
                changed = True
            s.centres = {k: (float(v[0]), float(v[1])) for k, v in cache[key].items()}
    if changed:
        cache_p.write_text(json.dumps(cache))
    n = sum(1 for pt in patients for s in pt.series if s.centres)
    log(f"disc centres from crops: {n} series")


def _loc_items(patients: list[Patient]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(grid image (GRID, GRID), level centres in grid pixels (5, 2), NaN where unknown)."""
    items = []
    for pt in patients:
        for s in pt.series:
            if not s.centres:
                continue
            img, gm = to_grid(s.canonical())
            pts = np.full((len(LEVELS), 2), np.nan, np.float32)
            for i, lv in enumerate(LEVELS):
                if lv in s.centres:
                    y, x = gm.to_grid(*s.centres[lv])
                    pts[i] = (float(y), float(x))
            items.append((img, pts))
    return items


def _augment_loc(
    imgs: torch.Tensor,
    pts: torch.Tensor,
    rng: np.random.Generator,
    zoom: tuple[float, float] = (0.8, 1.2),
    cut_top: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random zoom/rotation/shift (points follow) and intensity changes of a (B, 1, G, G) batch."""
    b = imgs.shape[0]
    thetas, new_pts = [], pts.clone()
    for i in range(b):
        s = float(rng.uniform(*zoom))
        a = float(rng.uniform(-0.2, 0.2))
        t = rng.uniform(-0.15, 0.15, 2)
        A = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * s  # output -> input (x, y)
        thetas.append(np.concatenate([A, t[:, None]], axis=1))
        # grid pixel (y, x) -> normalised (x, y), align_corners=False
        p = pts[i].numpy().astype(np.float64)
        xy_in = np.stack([(2 * p[:, 1] + 1) / GRID - 1, (2 * p[:, 0] + 1) / GRID - 1], axis=1)
        xy_out = (xy_in - t[None]) @ np.linalg.inv(A).T
        new_pts[i, :, 0] = torch.from_numpy(((xy_out[:, 1] + 1) * GRID - 1) / 2)
        new_pts[i, :, 1] = torch.from_numpy(((xy_out[:, 0] + 1) * GRID - 1) / 2)
    theta = torch.tensor(np.stack(thetas), dtype=torch.float32)
    grid = F.affine_grid(theta, list(imgs.shape), align_corners=False)
    out = F.grid_sample(imgs, grid, align_corners=False, padding_mode="zeros")
    gamma = torch.tensor(rng.uniform(0.6, 1.6, b), dtype=torch.float32).view(b, 1, 1, 1)
    gain = torch.tensor(rng.uniform(0.8, 1.2, b), dtype=torch.float32).view(b, 1, 1, 1)
    out = out.clamp(min=0).pow(gamma) * gain
    out = out + 0.02 * torch.randn(out.shape, generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))))
    # a field of view that ends higher or lower on the spine: the image above a random row over L1-L2 is blank
    for i in range(b):
        top = float(new_pts[i, 0, 0]) if torch.isfinite(new_pts[i, 0, 0]) else float("nan")
        if cut_top > 0 and np.isfinite(top) and top > 24 and rng.random() < cut_top:
            out[i, :, : int(rng.uniform(0, top - 16))] = 0.0
    return out.clamp(0, 1.5), new_pts


def _heat_loss(logits: torch.Tensor, pts: torch.Tensor, sigma: float) -> torch.Tensor:
    """Spatial-softmax cross-entropy against a normalised Gaussian at each known level centre."""
    b, c, h, w = logits.shape
    hp = (pts + 0.5) * (HEAT / GRID) - 0.5  # heat-grid pixels
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    valid = torch.isfinite(hp).all(dim=2) & (hp[..., 0] >= 0) & (hp[..., 0] < h) & (hp[..., 1] >= 0) & (hp[..., 1] < w)
    hp = torch.nan_to_num(hp, nan=-100.0)
    g = torch.exp(-((ys - hp[..., 0, None, None]) ** 2 + (xs - hp[..., 1, None, None]) ** 2) / (2 * sigma**2))
    g = g / g.flatten(2).sum(dim=2).clamp(min=1e-12)[..., None, None]
    logp = torch.log_softmax(logits.flatten(2), dim=2).view(b, c, h, w)
    per = -(g * logp).flatten(2).sum(dim=2)
    return (per * valid).sum() / valid.sum().clamp(min=1)


def _loc_val(loc: DiscLocaliser, patients: list[Patient], min_peak: float) -> dict[str, float]:
    """Level naming on series with crop-derived centres: share within 15 mm, median error."""
    loc.eval()
    errs = []
    for pt in patients:
        for s in pt.series:
            if not s.centres:
                continue
            canon = s.canonical()
            img, gm = to_grid(canon)
            with torch.inference_mode():
                lg = loc(torch.from_numpy(img)[None, None])[0]
            found = {d.level: d for d in decode_heatmaps(lg, gm, min_peak)}
            sr, sc = canon.spacing
            for lv, (r, c) in s.centres.items():
                d = found.get(lv)
                errs.append(math.inf if d is None else math.hypot((d.row - r) * sr, (d.col - c) * sc))
    if not errs:
        return {"val_named": float("nan"), "val_median_mm": float("nan")}
    e = np.array(errs)
    return {"val_named": float((e <= 15.0).mean()), "val_median_mm": float(np.median(e))}


@dataclass
class GradeItem:
    patch: np.ndarray  # (channels, PRECUT, PRECUT) canonical intensities around the centre (not renormalised)
    level: int
    grade: int  # 0..4
    herniation: int
    narrowing: int
    bulging: int


def _grade_items(patients: list[Patient], model: DiscModel, channels: int) -> list[GradeItem]:
    items = []
    for pt in patients:
        for s in pt.series:
            canon = s.canonical()
            centres = dict(s.centres)
            if len(centres) < len(LEVELS):
                for d in model.locate(canon):
                    centres.setdefault(d.level, (d.row, d.col))
            for lv, (r, c) in centres.items():
                lab = pt.discs.get(lv)
                if lab is None:
                    continue
                raw = np.stack(
                    [patch(canon, r, c, size=PRECUT, mm=mm, normalise=False) for mm in (PATCH_MM, CONTEXT_MM)][
                        :channels
                    ]
                )
                items.append(
                    GradeItem(raw, LEVELS.index(lv), lab.pfirrmann - 1, lab.herniation, lab.narrowing, lab.bulging)
                )
    return items


def _augment_patch(raw: np.ndarray, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """(channels, PATCH, PATCH) crop of a precut patch (and its context): the same random rotation, zoom and
    shift (in mm) for every channel, then intensity changes."""
    c0 = (PRECUT - 1) / 2
    d = np.arange(PATCH, dtype=np.float64) - (PATCH - 1) / 2
    dy, dx = np.meshgrid(d, d, indexing="ij")
    if augment:
        a, s = rng.uniform(-0.25, 0.25), rng.uniform(0.88, 1.12)
        ty, tx = rng.uniform(-3.2, 3.2), rng.uniform(-2.7, 2.7)  # mm
    else:
        a, s, ty, tx = 0.0, 1.0, 0.0, 0.0
    ca, sa = math.cos(a) * s, math.sin(a) * s
    chans = []
    for ch, mm in zip(raw, (PATCH_MM, CONTEXT_MM)):
        yy, xx = c0 + ty / mm + ca * dy - sa * dx, c0 + tx / mm + sa * dy + ca * dx
        chans.append(map_coordinates(ch, [yy, xx], order=1, mode="constant"))
    out = normalise_pair(chans[0], chans[1]) if len(chans) == 2 else normalise_patch(chans[0])[None]
    if augment:
        out = np.clip(out, 0, None) ** rng.uniform(0.7, 1.4) * rng.uniform(0.85, 1.15)
        out = out + rng.normal(0, 0.02, out.shape)
    return out.astype(np.float32)


def _val_views(patients: list[Patient], model: DiscModel, channels: int) -> list[dict[str, Any]]:
    """Validation discs graded end to end: the trained localiser's centres, the test-time views, labels."""
    views = []
    for pt in patients:
        s = pt.eval_series()
        if s is None:
            continue
        canon = s.canonical()
        sr, sc = canon.spacing
        for d in model.locate(canon):
            lab = pt.discs.get(d.level)
            if lab is None:
                continue
            xs = np.stack([disc_input(canon, d.row + dy / sr, d.col + dx / sc, channels) for dy, dx in TTA_OFFSETS_MM])
            views.append(
                {
                    "x": xs,
                    "level": LEVELS.index(d.level),
                    "grade": lab.pfirrmann - 1,
                    "herniation": lab.herniation,
                    "patient": pt.id,
                }
            )
    return views


def _val_logits(grader: DiscGrader, views: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    grader.eval()
    if not views:
        return np.zeros((0, 5)), np.zeros((0,))
    x = torch.from_numpy(np.concatenate([v["x"] for v in views]))
    lv = torch.tensor([v["level"] for v in views for _ in TTA_OFFSETS_MM])
    with torch.inference_mode():
        g, b = grader(x, lv)
    n, k = len(views), len(TTA_OFFSETS_MM)
    return g.view(n, k, 5).mean(dim=1).numpy(), b.view(n, k, 3)[..., 0].mean(dim=1).numpy()


def _grade_val(grader: DiscGrader, views: list[dict[str, Any]]) -> dict[str, float]:
    from models.discs.evaluation import linear_kappa
    from models.training import binary_auc

    g, b = _val_logits(grader, views)
    if not len(g):
        return {"val_kappa": float("nan"), "val_auc": float("nan"), "val_acc": float("nan"), "score": -1.0}
    yt = np.array([v["grade"] for v in views])
    yh = np.array([v["herniation"] for v in views])
    yp = g.argmax(axis=1)
    k = linear_kappa(yt, yp)
    auc = binary_auc(b, yh)
    score = (k if np.isfinite(k) else 0.0) + 0.25 * (auc if np.isfinite(auc) else 0.5)
    return {"val_kappa": float(k), "val_auc": float(auc), "val_acc": float((yt == yp).mean()), "score": float(score)}


def _fit_temperatures(grader: DiscGrader, views: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(grade temperature, herniation temperature, herniation threshold) on the validation discs."""
    from models.discs.evaluation import youden_threshold

    g, b = _val_logits(grader, views)
    if not len(g):
        return 1.0, 1.0, 0.5
    yt = torch.tensor([v["grade"] for v in views])
    yh = np.array([v["herniation"] for v in views], float)
    gl = torch.from_numpy(g).double()
    grid = np.exp(np.linspace(np.log(0.3), np.log(5.0), 81))
    tg = float(grid[int(np.argmin([float(F.cross_entropy(gl / t, yt)) for t in grid]))])
    bl = torch.from_numpy(b).double()
    yb = torch.from_numpy(yh)
    th = float(grid[int(np.argmin([float(F.binary_cross_entropy_with_logits(bl / t, yb)) for t in grid]))])
    ph = 1.0 / (1.0 + np.exp(-b / th))
    thr = youden_threshold(ph, yh.astype(int)) if 0 < yh.sum() < len(yh) else 0.5
    return tg, th, float(thr)


def _choose_decode(grader: DiscGrader, views: list[dict[str, Any]], temperature: float) -> str:
    """ "argmax" or "median": whichever gives the validation discs the higher linear-weighted kappa (ties: argmax)."""
    from models.discs.evaluation import linear_kappa
    from models.tasks.spine_discs import median_grade

    g, _ = _val_logits(grader, views)
    if not len(g):
        return "argmax"
    p = torch.softmax(torch.from_numpy(g).double() / temperature, dim=1).numpy()
    yt = np.array([v["grade"] for v in views])
    k_arg = linear_kappa(yt, p.argmax(axis=1))
    k_med = linear_kappa(yt, np.array([int(median_grade(row)) - 1 for row in p]))
    return "median" if np.isfinite(k_med) and k_med > k_arg + 1e-9 else "argmax"


# --- the run --------------------------------------------------------------------------------------


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """The training state after an epoch, written (atomically, with its sha256) by `models.protocol`."""
    from models.protocol import save_checkpoint

    save_checkpoint(state, path)


def _end_epoch(out: Path, state_p: Path, rec: dict[str, Any], state: dict[str, Any]) -> None:
    """After an epoch: the training state to resume from, then the epoch's line in the training log."""
    _save_state(state_p, state)
    with open(out / LOG_FILE, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def train_discs(
    root: Path | str,
    out: Path | str,
    recipe: DiscRecipe,
    *,
    log: Callable[[str], None] = print,
    resume: bool = True,
) -> Path:
    """Train, calibrate, evaluate on the held-out patients, write weights and card; returns the weights path."""
    t_run = time.perf_counter()
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    patients = load_spider(root)
    _centres(root, out, patients, log)
    split = {k: [p for p in patients if p.split == k] for k in ("train", "val", "test")}
    log(
        f"patients: {len(patients)} (train {len(split['train'])}, validation {len(split['val'])}, "
        f"held-out test {len(split['test'])})"
    )
    if not split["train"]:
        raise DataSpecError(f"spider:{root}: no training patients (split by CRC32 of the patient id)")
    val = split["val"]
    val_note = "validation patients"
    if not val:
        val, val_note = split["train"], "no validation patients: epochs and calibration chosen on the training set"
        log(f"WARNING: {val_note}")
    state_p = out / STATE_FILE
    state: dict[str, Any] = {}
    if resume and state_p.is_file():
        try:
            state = load_checkpoint(state_p).data
            if state.get("recipe") != asdict(recipe):
                log(f"{state_p} was written by another recipe; starting afresh")
                state = {}
            else:
                log(f"resumed from {state_p} ({state['phase']} epoch {state['epoch']})")
        except Exception as e:  # a torn or foreign file: start afresh
            log(f"cannot resume from {state_p} ({e}); starting afresh")
            state = {}
    loc, grader = DiscLocaliser(), DiscGrader(in_channels=recipe.grader_channels)
    epochs_log: list[dict[str, Any]] = state.get("epochs_log", [])
    seconds_before = float(state.get("seconds", 0.0))
    # --- phase 1: localiser
    loc_items = _loc_items(split["train"])
    if not loc_items:
        raise DataSpecError(f"spider:{root}: no training series has disc crops that name its discs")
    opt = torch.optim.AdamW(loc.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    start, best, best_loc = 0, state.get("best_loc_score", -math.inf), state.get("best_loc")
    if state.get("phase") == "loc":
        loc.load_state_dict(state["loc"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"] + 1
    elif state.get("phase") == "grade":
        start = recipe.loc_epochs
    steps_per = max(1, math.ceil(len(loc_items) / recipe.loc_batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.loc_epochs * steps_per)
    for _ in range(start * steps_per):
        sched.step()
    for epoch in range(start, recipe.loc_epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng(recipe.seed * 1000 + epoch)
        loc.train()
        order = rng.permutation(len(loc_items))
        losses = []
        for i in range(0, len(order), recipe.loc_batch):
            idx = order[i : i + recipe.loc_batch]
            x = torch.from_numpy(np.stack([loc_items[j][0] for j in idx]))[:, None]
            p = torch.from_numpy(np.stack([loc_items[j][1] for j in idx]))
            if recipe.augment:
                x, p = _augment_loc(x, p, rng, (recipe.loc_zoom_min, recipe.loc_zoom_max), recipe.loc_cut_top)
            loss = _heat_loss(loc(x), p, recipe.heat_sigma)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        v = _loc_val(loc, val, recipe.min_peak)
        score = (v["val_named"] if np.isfinite(v["val_named"]) else 0.0) - 1e-3 * min(v["val_median_mm"], 100.0)
        if best_loc is None or score > best:
            best, best_loc = score, {k: t.detach().clone() for k, t in loc.state_dict().items()}
        rec = {
            "phase": "localiser",
            "epoch": epoch,
            "loss": round(float(np.mean(losses)), 4),
            "val_named_within_15mm": round(v["val_named"], 4),
            "val_median_error_mm": round(v["val_median_mm"], 2),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        epochs_log.append(rec)
        log(
            f"localiser epoch {epoch + 1}/{recipe.loc_epochs}: loss {rec['loss']:.4f}, validation levels named "
            f"{rec['val_named_within_15mm']:.3f} (median error {rec['val_median_error_mm']:.1f} mm), {rec['seconds']:.0f} s"
        )
        seconds_before += time.perf_counter() - t0
        _end_epoch(
            out,
            state_p,
            rec,
            {
                "recipe": asdict(recipe),
                "phase": "loc",
                "epoch": epoch,
                "loc": loc.state_dict(),
                "opt": opt.state_dict(),
                "best_loc": best_loc,
                "best_loc_score": best,
                "epochs_log": epochs_log,
                "seconds": seconds_before,
            },
        )
    assert best_loc is not None
    loc.load_state_dict(best_loc)
    loc.eval()
    info = ModelInfo(TASK.name, TASK.version, "", TASK.kind, TASK.anatomy, demo_weights=False)
    model = DiscModel(task=TASK, localiser=loc, grader=grader, info=info, min_peak=recipe.min_peak)
    # --- phase 2: grader
    t_prep = time.perf_counter()
    items = _grade_items(split["train"], model, recipe.grader_channels)
    views = _val_views(val, model, recipe.grader_channels)
    log(
        f"grader: {len(items)} training discs, {len(views)} validation discs (prepared in "
        f"{time.perf_counter() - t_prep:.0f} s)"
    )
    seconds_before += time.perf_counter() - t_prep
    gopt = torch.optim.AdamW(grader.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gsteps = max(1, math.ceil(len(items) / recipe.grade_batch))
    gsched = torch.optim.lr_scheduler.OneCycleLR(gopt, max_lr=recipe.lr, total_steps=recipe.grade_epochs * gsteps)
    gstart, gbest, best_grader = 0, state.get("best_grade_score", -math.inf), state.get("best_grader")
    if state.get("phase") == "grade":
        grader.load_state_dict(state["grader"])
        gopt.load_state_dict(state["opt"])
        gstart = state["epoch"] + 1
        for _ in range(gstart * gsteps):
            gsched.step()
    pos_w = torch.tensor([recipe.herniation_pos_weight, 1.0, 1.0])
    aux_w = torch.tensor([1.0, 0.3, 0.3])
    for epoch in range(gstart, recipe.grade_epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng(recipe.seed * 1000 + 500 + epoch)
        grader.train()
        order = rng.permutation(len(items))
        losses = []
        for i in range(0, len(order), recipe.grade_batch):
            batch = [items[j] for j in order[i : i + recipe.grade_batch]]
            x = torch.from_numpy(np.stack([_augment_patch(it.patch, rng, recipe.augment) for it in batch]))
            lv = torch.tensor([it.level for it in batch])
            yg = torch.tensor([it.grade for it in batch])
            yb = torch.tensor([[it.herniation, it.narrowing, it.bulging] for it in batch], dtype=torch.float32)
            g, b = grader(x, lv)
            lb = F.binary_cross_entropy_with_logits(b, yb, pos_weight=pos_w, reduction="none").mean(dim=0)
            loss = F.cross_entropy(g, yg, label_smoothing=recipe.label_smoothing) + (lb * aux_w).sum()
            gopt.zero_grad()
            loss.backward()
            gopt.step()
            gsched.step()
            losses.append(loss.item())
        v = _grade_val(grader, views)
        if best_grader is None or v["score"] > gbest:
            gbest, best_grader = v["score"], {k: t.detach().clone() for k, t in grader.state_dict().items()}
        rec = {
            "phase": "grader",
            "epoch": epoch,
            "loss": round(float(np.mean(losses)), 4),
            "val_kappa_linear": round(v["val_kappa"], 4),
            "val_accuracy": round(v["val_acc"], 4),
            "val_herniation_auc": round(v["val_auc"], 4) if np.isfinite(v["val_auc"]) else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        epochs_log.append(rec)
        log(
            f"grader epoch {epoch + 1}/{recipe.grade_epochs}: loss {rec['loss']:.4f}, validation kappa "
            f"{rec['val_kappa_linear']:.3f}, accuracy {rec['val_accuracy']:.3f}, herniation AUC "
            f"{rec['val_herniation_auc']}, {rec['seconds']:.0f} s"
        )
        seconds_before += time.perf_counter() - t0
        _end_epoch(
            out,
            state_p,
            rec,
            {
                "recipe": asdict(recipe),
                "phase": "grade",
                "epoch": epoch,
                "grader": grader.state_dict(),
                "opt": gopt.state_dict(),
                "best_loc": best_loc,
                "best_loc_score": best,
                "best_grader": best_grader,
                "best_grade_score": gbest,
                "epochs_log": epochs_log,
                "seconds": seconds_before,
            },
        )
    assert best_grader is not None
    grader.load_state_dict(best_grader)
    grader.eval()
    t0 = time.perf_counter()
    tg, th, thr = _fit_temperatures(grader, views)
    model.grade_temperature, model.herniation_temperature, model.threshold = tg, th, thr
    model.decode = _choose_decode(grader, views, tg)
    log(
        f"calibration on the {val_note}: grade temperature {tg:.3f}, herniation temperature {th:.3f}, "
        f"herniation threshold {thr:.3f}"
    )
    log(f"grade reported: the {model.decode} of the calibrated distribution (chosen on the {val_note})")
    # --- held-out test patients: evaluated once, after everything was chosen
    test_fig = None
    if split["test"]:
        rows = predict_patients(model, split["test"])
        test_fig = figures(rows, threshold=thr)
        log(f"held-out test: {json.dumps({k: test_fig.get(k) for k in _KEYS})}")
    val_fig = figures(predict_patients(model, val), threshold=thr, bootstrap=200)
    seconds_before += time.perf_counter() - t0
    model.metadata = {
        "version": TASK.version,
        "demo_weights": False,
        "trained_on": f"spider:{root.name}",
        "n_patients_train": len(split["train"]),
    }
    path = out / "model.pt"
    sha = model.save(path)
    wall = round(time.perf_counter() - t_run, 1)
    card = build_card(
        root,
        recipe,
        split,
        test_fig,
        val_fig,
        epochs_log,
        sha,
        wall,
        round(seconds_before, 1),
        n_loc=len(loc_items),
        n_items=len(items),
        val_note=val_note,
        calibration=(tg, th, thr),
        decode=model.decode,
    )
    from models.cards import write_card

    write_card(out, card)
    log(f"training time {seconds_before / 60:.1f} min (this run {wall / 60:.1f} min); card: {out / 'card.json'}")
    return path


_KEYS = (
    "n_patients",
    "n_discs",
    "pfirrmann_accuracy",
    "pfirrmann_within_one",
    "pfirrmann_kappa_linear",
    "pfirrmann_kappa_linear_ci",
    "herniation_auc",
    "herniation_sensitivity",
    "herniation_specificity",
    "ece",
)


def build_card(
    root: Path,
    recipe: DiscRecipe,
    split: dict[str, list[Patient]],
    test_fig: dict[str, Any] | None,
    val_fig: dict[str, Any],
    epochs_log: list[dict[str, Any]],
    sha: str,
    wall: float,
    seconds: float,
    *,
    n_loc: int,
    n_items: int,
    val_note: str,
    calibration: tuple[float, float, float],
    decode: str = "argmax",
) -> dict[str, Any]:
    n_all = sum(len(v) for v in split.values())
    metrics: dict[str, Any] = {}
    if test_fig is not None:
        metrics = {k: test_fig.get(k) for k in _KEYS}
        for k in (
            "pfirrmann_kappa_quadratic",
            "pfirrmann_ece",
            "pfirrmann_per_grade_accuracy",
            "pfirrmann_per_level_accuracy",
            "herniation_positives",
            "herniation_threshold",
            "located_rate",
            "localisation",
        ):
            metrics[k] = test_fig.get(k)
    metrics["training_time_s"] = seconds
    metrics["training_time_min"] = round(seconds / 60, 1)
    tables = []
    if test_fig is not None and test_fig.get("pfirrmann_confusion"):
        tables.append(
            {
                "title": "Held-out test: Pfirrmann confusion matrix (rows true grade, columns predicted)",
                "columns": ["true \\ predicted", "1", "2", "3", "4", "5"],
                "rows": [[str(g + 1), *row] for g, row in enumerate(test_fig["pfirrmann_confusion"])],
            }
        )
    tables.append(
        {
            "title": "Training epochs",
            "columns": ["phase", "epoch", "loss", "validation", "seconds"],
            "rows": [
                [
                    e["phase"],
                    e["epoch"],
                    e["loss"],
                    (
                        f"levels named {e['val_named_within_15mm']}, median {e['val_median_error_mm']} mm"
                        if e["phase"] == "localiser"
                        else f"kappa {e['val_kappa_linear']}, acc {e['val_accuracy']}, herniation AUC {e['val_herniation_auc']}"
                    ),
                    e["seconds"],
                ]
                for e in epochs_log
            ],
        }
    )
    return {
        "name": TASK.name,
        "version": TASK.version,
        "task": TASK.kind,
        "anatomy": TASK.anatomy,
        "description": TASK.description,
        "input": TASK.card_facts()["input"],
        "outputs": TASK.card_facts()["outputs"],
        "weights_file": "model.pt",
        "weights_sha256": sha,
        "demo_weights": False,
        "notice": (
            f"Learned from {len(split['train'])} training and {len(split['val'])} validation patients of the SPIDER "
            f"lumbar spine MRI dataset (SPIDER-derived gradings, CC BY 4.0; {len(split['test'])} more held out for "
            "the figures). Research weights: not for diagnostic use."
        ),
        "training_data": (
            f"Real patients: SPIDER-derived mid-sagittal lumbar MRI (T1, T2, T2 SPACE) with per-disc radiological "
            f"gradings (Pfirrmann grade, herniation, narrowing, bulging), folder `{root.name}` in the SPIDER mid-sagittal "
            f"layout: {n_all} patients, split by patient (CRC32 of the patient id mod 10: 0-5 train, 6-7 validation, "
            f"8-9 held-out test): {len(split['train'])} train, {len(split['val'])} validation, {len(split['test'])} "
            f"held-out test patients. The held-out patients were never trained on nor used to choose epochs, "
            f"calibration or threshold. Localiser trained on {n_loc} training series whose disc crops name their "
            f"discs (crop positions found by template matching; IVD label 1 = L5-S1 ... 5 = L1-L2); grader on "
            f"{n_items} training discs of every training series. Source: SPIDER (van der Graaf et al., Scientific "
            f"Data 11:264, 2024), CC BY 4.0. The SPIDER organisers' own hidden test patients are not in this corpus."
        ),
        "licence": (
            "Trained on SPIDER-derived gradings and images, CC BY 4.0 (attribution): " + CITATION + ". "
            "Not for diagnostic use."
        ),
        "citation": CITATION,
        "recipe": {
            "train": asdict(recipe),
            "split": {k: len(v) for k, v in split.items()},
            "validation": val_note,
            "calibration": {
                "grade_reported": decode,
                "grade_temperature": calibration[0],
                "herniation_temperature": calibration[1],
                "herniation_threshold": calibration[2],
                "chosen_on": "validation patients",
            },
            "epochs_log": epochs_log,
            "validation_figures": {k: val_fig.get(k) for k in _KEYS},
        },
        "metrics": metrics,
        "tables": tables,
        "evaluation_data": (
            f"the {len(split['test'])} held-out test patients of `{root.name}` (CRC32 split), each graded from one "
            "mid-sagittal image (T2, else T2 SPACE, else T1) with the discs located and named by the model"
        ),
        "evaluation_note": (
            "Grading figures over the discs the model located (a disc it did not locate gets no finding; see "
            "located_rate). Linear-weighted kappa CI: 95 % bootstrap over patients. Localisation: share of discs "
            "whose level centre lies within 15 mm of the crop-derived centre, on test series with matching crops. "
            "Anchors: Pfirrmann inter-rater kappa about 0.6, intra-rater about 0.8 (Niemeyer 2021); published "
            "networks 0.78-0.82 accuracy on their own data."
        ),
        "reproduce": [
            f"msknode train {TASK.name} --data spider:PATH/lumbar_spine/spider_midsagittal --out OUT "
            f"--epochs {recipe.grade_epochs} --seed {recipe.seed}",
            f"msknode evaluate {TASK.name} --data spider:PATH --json",
        ],
        "limitations": [
            "Not for diagnostic use.",
            "Reads one mid-sagittal slice (the central slice of the series); a scoliotic or off-centre spine "
            "may be graded on a parasagittal slice.",
            f"Small data: {len(split['train'])} training patients; herniation is rare (about 5 % of discs), so "
            "its AUC, sensitivity and threshold are uncertain.",
            "Gradings come from one SPIDER reading; T1-only patients are graded with labels defined on T2.",
            "Images are 8-bit PNG exports of the SPIDER series, not DICOM; real DICOM input has not been "
            "validated against labelled data.",
        ],
    }
