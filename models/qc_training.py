"""Training and calibrating ``qc.anatomy`` on phantoms, synthetic other anatomy and real MRI.

Items are series; the samples are their slices (`models.qc.anatomy_input`: a few slices,
overlay band blanked, field-of-view relative grid). Every split is by group (patient, or the
series where the corpus names no patient), never by slice.

- **Phantoms** ``synthetic:N:SEED``: items ``SEED .. SEED+N-1``; 9 in 12 are phantoms of the nine
  anatomy/plane classes (every routed contrast, coarse matrices, some motion), 3 in 12 synthetic other
  anatomy (`models.negatives`). Calibration phantoms are the next ``N // 6`` seeds.
- **Real MRI** (`models.realdata`): a fixed quarter of the groups of every source with at least
  `MIN_GROUPS_TO_HOLD` groups (ACL slices, lumbar volumes, SPIDER patients) is *held*: never trained on,
  it calibrates the thresholds. Sources with fewer groups (teaching stacks, the Siemens knee, MNI152,
  pydicom-data) are trained on whole. Journal figure panels (arrows and letters drawn inside the
  image) are never trained on.
- **Sampling**: each epoch draws ``samples_per_epoch`` slices: 35 % phantoms, 12 % synthetic other,
  33 % real series of the served anatomies, 20 % real other anatomy; within the real shares each
  source weighs ``sqrt(series)``, each series alike, one random slice of it.
- **Augmentation** (per batch, torch): scale 0.75-1.35 (zoom in and out: screen exports are cropped to
  the anatomy, DICOM shows the whole field of view), rotation +-12 deg, shift +-10 %, left-right
  flip (not for sagittal classes: anterior stays left), gamma, gain, noise, blur, and random extra
  border bands (the overlay band is never a cue).
- **Calibration**: the model's distance scale is the 99th percentile of its series distances on held real
  series of the served anatomies (99.5th on calibration phantoms). The rule (`models.qc.decide`:
  contradiction, plane and support thresholds, and the distance threshold as a multiple of the scale) is
  chosen on predictions of models that never saw the source they predict
  (`models.qc_evaluation.choose_rule`), never on the held series alone: held series come from sources seen
  in training and are surer of themselves than a new site's series.

`leave_one_source_out` trains one model per real source without that source (same recipe,
same held groups of the others) and tests it on every series of the source.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.qc.classifier import AnatomyClassifier
from models.qc.motion_training import (
    ANATOMY_SEQUENCES,
    HEAVY_MOTION_FRACTION,
    HEAVY_MOTION_PX,
    IN_SPEC_MOTION_FRACTION,
    add_ghosting,
)
from models.qc.net import ANATOMY_CLASSES, AnatomyNet
from models.qc.preprocess import (
    INFER_SLICES,
    INFER_SPAN,
    MASK_BAND,
    SLICE_GRID,
    anatomy_input,
    motion_grid,
    motion_slices,
)

TRAIN_SLICES = 12  # slices kept per real series for training (evenly over TRAIN_SPAN)
TRAIN_SPAN = (0.15, 0.85)
PHANTOM_TRAIN_SLICES = 4
PHANTOM_TRAIN_SPAN = (0.2, 0.8)
HELD_FRACTION = 0.25
MIN_GROUPS_TO_HOLD = 8
SHARES = {"phantom": 0.35, "negative": 0.12, "real_in": 0.33, "real_other": 0.20}
CACHE_VERSION = "qc2d-1"  # preprocessed arrays
# bump when training or calibration changes: cached leave-one-source-out fold models are keyed by it
TRAINING_REVISION = 1


def cache_root() -> Path:
    """Preprocessed arrays live outside the repository: ``$MSKNODE_CACHE`` or ``~/.cache/msknode``."""
    return Path(os.environ.get("MSKNODE_CACHE") or Path.home() / ".cache" / "msknode") / "qc_anatomy"


def _code_key() -> str:
    text = json.dumps(
        [
            CACHE_VERSION,
            SLICE_GRID,
            MASK_BAND,
            INFER_SLICES,
            INFER_SPAN,
            TRAIN_SLICES,
            TRAIN_SPAN,
            PHANTOM_TRAIN_SLICES,
            PHANTOM_TRAIN_SPAN,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Item:
    """One series: its training slices and (for calibration / evaluation) its inference input."""

    key: str
    kind: str  # "phantom" | "negative" | "real"
    source: str  # real source, or "phantom" / "negative"
    group: str
    label: int  # index in ANATOMY_CLASSES
    anatomy: str  # knee | shoulder | lumbar_spine | the real other anatomy | "synthetic"
    plane: str
    train: np.ndarray  # (n, G, G) float16
    infer: np.ndarray | None = None  # (k, G, G) float16
    notes: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def in_anatomy(self) -> bool:
        return self.label != 0


# ------------------------------------------------------------------------------------------
# phantom and synthetic-other items


def _phantom_item(args) -> dict[str, Any]:
    idx, seed, with_infer = args
    torch.set_num_threads(1)
    n_cls = len(ANATOMY_CLASSES) - 1
    cls = idx % (n_cls + 3)  # 3 in 12 are "other"
    if cls >= n_cls:
        from models.negatives import generate_negative
        from models.transforms import detect_plane

        vol = generate_negative(seed)
        plane = detect_plane(vol)[0]
        label, anatomy = 0, "synthetic"
    else:
        from models.phantoms import SPEC, generate

        name = ANATOMY_CLASSES[cls + 1]
        anatomy, plane = name.split("/")
        rng = np.random.default_rng([seed, 5])
        default_plane = {"knee": "sagittal", "shoulder": "coronal", "lumbar_spine": "sagittal"}[anatomy]
        kw: dict[str, Any] = {} if plane == default_plane else {"orientation": plane}
        spec_matrix = SPEC.for_anatomy(anatomy).acquisition.matrix
        matrix = int(rng.choice([96, 128, 160]))
        u = rng.uniform()
        px = float(rng.uniform(*HEAVY_MOTION_PX)) if u < 0.15 else (float(rng.uniform(0.5, 3.0)) if u < 0.45 else 0.0)
        kw["motion_px"] = px * matrix / spec_matrix
        kw["sequence"] = str(rng.choice(ANATOMY_SEQUENCES[anatomy]))
        vol = generate(anatomy, seed, matrix=matrix, sub_slices=1, **kw).volume
        label = cls + 1
    out = {
        "train": anatomy_input(vol, plane, count=PHANTOM_TRAIN_SLICES, span=PHANTOM_TRAIN_SPAN)[:, 0].astype(
            np.float16
        ),
        "label": label,
        "anatomy": anatomy,
        "plane": plane,
    }
    if with_infer:
        out["infer"] = anatomy_input(vol, plane)[:, 0].astype(np.float16)
    return out


def phantom_items(
    n: int,
    seed: int,
    *,
    with_infer: bool = False,
    workers: int = 1,
    cache: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Item]:
    """Items of ``synthetic:n:seed`` (phantoms of the nine classes and synthetic other anatomy), cached."""
    path = cache_root() / _code_key() / f"phantoms-{n}-{seed}{'-infer' if with_infer else ''}.npz"
    if cache and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            labels, anat, planes, train = z["label"], z["anatomy"], z["plane"], z["train"]
            infer = z["infer"] if with_infer else None
    else:
        jobs = [(i, seed + i, with_infer) for i in range(n)]
        t0 = time.time()
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                rows = list(pool.imap(_phantom_item, jobs, chunksize=8))
        else:
            rows = []
            for i, j in enumerate(jobs):
                rows.append(_phantom_item(j))
                if log and (i + 1) % 300 == 0:
                    log(f"phantom items: {i + 1}/{n} ({time.time() - t0:.0f} s)")
        labels = np.array([r["label"] for r in rows])
        anat = np.array([r["anatomy"] for r in rows])
        planes = np.array([r["plane"] for r in rows])
        train = np.stack([r["train"] for r in rows])
        infer = None
        if with_infer:
            k = max(len(r["infer"]) for r in rows)
            infer = np.stack(
                [np.concatenate([r["infer"], np.repeat(r["infer"][-1:], k - len(r["infer"]), 0)]) for r in rows]
            )
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            arrays: dict[str, Any] = {"label": labels, "anatomy": anat, "plane": planes, "train": train}
            if infer is not None:
                arrays["infer"] = infer
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    items = []
    for i in range(len(labels)):
        kind = "negative" if int(labels[i]) == 0 else "phantom"
        items.append(
            Item(
                key=f"{kind}/{seed + i}",
                kind=kind,
                source=kind,
                group=f"{kind}:{seed + i}",
                label=int(labels[i]),
                anatomy=str(anat[i]),
                plane=str(planes[i]),
                train=train[i],
                infer=None if infer is None else infer[i],
            )
        )
    return items


# ------------------------------------------------------------------------------------------
# real items


def _real_arrays(series) -> dict[str, Any]:
    vol = series.volume()
    plane = series.plane
    return {
        "train": anatomy_input(vol, plane, count=TRAIN_SLICES, span=TRAIN_SPAN)[:, 0].astype(np.float16),
        "infer": anatomy_input(vol, plane)[:, 0].astype(np.float16),
    }


def real_items(
    root: Path | str | None = None, sources: Iterable[str] | None = None, *, log: Callable[[str], None] | None = None
) -> list[Item]:
    """One `Item` per series of the real corpus (`models.realdata.catalogue`), arrays cached per series."""
    from models.realdata import catalogue

    series = catalogue(root, sources)
    base = cache_root() / _code_key() / "real"
    base.mkdir(parents=True, exist_ok=True)
    out = []
    t0 = time.time()
    for i, s in enumerate(series):
        digest = hashlib.sha256(f"{s.key}|{s.path}|{_mtime(s.path)}".encode()).hexdigest()[:16]
        path = base / f"{digest}.npz"
        arrays: dict[str, Any] | None = None
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (OSError, ValueError):
                arrays = None
        if arrays is None:
            arrays = _real_arrays(s)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        label = ANATOMY_CLASSES.index(s.label)
        out.append(
            Item(
                key=s.key,
                kind="real",
                source=s.source,
                group=s.group,
                label=label,
                anatomy=s.anatomy,
                plane=s.plane,
                train=arrays["train"],
                infer=arrays["infer"],
                notes=s.notes,
            )
        )
        if log and (i + 1) % 100 == 0:
            log(f"real series: {i + 1}/{len(series)} ({time.time() - t0:.0f} s)")
    return out


def _mtime(path: str) -> int:
    try:
        return int(Path(path).stat().st_mtime)
    except OSError:
        return 0


def is_figure_panel(item) -> bool:
    return "figure panel" in (getattr(item, "notes", "") or "")


def held_groups(items: Iterable[Item]) -> set[str]:
    """The held quarter of the groups of every real source with at least MIN_GROUPS_TO_HOLD groups (fixed: a
    hash of the group name decides, so it does not depend on which other sources are present)."""
    by_source: dict[str, set[str]] = {}
    for it in items:
        if it.kind == "real":
            by_source.setdefault(it.source, set()).add(it.group)
    held: set[str] = set()
    for groups in by_source.values():
        if len(groups) < MIN_GROUPS_TO_HOLD:
            continue
        for g in groups:
            if zlib.crc32(g.encode()) % 1000 < HELD_FRACTION * 1000:
                held.add(g)
    return held


# ------------------------------------------------------------------------------------------
# training


def _augment(x: torch.Tensor, flip_ok: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=g)

    scale = torch.exp(u(math.log(0.75), math.log(1.35)))
    rot = u(-12.0, 12.0) * math.pi / 180
    tx, ty = u(-0.1, 0.1), u(-0.1, 0.1)
    cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    flip = flip_ok & (torch.rand(b, generator=g) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    gamma = torch.exp(torch.randn(b, 1, 1, 1, generator=g) * 0.25)
    gain = torch.exp(torch.randn(b, 1, 1, 1, generator=g) * 0.15)
    x = x.clamp(min=0) ** gamma * gain
    noisy = (torch.rand(b, 1, 1, 1, generator=g) < 0.4).float()
    x = x + noisy * torch.randn(x.shape, generator=g) * u(0.0, 0.05)[:, None, None, None]
    blur = torch.rand(b, generator=g) < 0.25
    if blur.any():
        x[blur] = nn.functional.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    band = torch.rand(b, generator=g) < 0.3
    if band.any():
        n = x.shape[-1]
        for i in torch.nonzero(band).flatten().tolist():
            t, bo, le, ri = (int(v) for v in (torch.rand(4, generator=g) * 0.12 * n))
            x[i, :, :t, :] = 0
            x[i, :, n - bo :, :] = 0
            x[i, :, :, :le] = 0
            x[i, :, :, n - ri :] = 0
    return x.clamp(min=0)


def _buckets(items: list[Item]) -> list[tuple[float, list[int]]]:
    """(share, item indices) per sampling bucket."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.kind != "real":
            groups.setdefault(it.kind, []).append(i)
        else:
            groups.setdefault(f"real:{'in' if it.in_anatomy else 'other'}:{it.source}", []).append(i)
    out = []
    for part, share in (("phantom", SHARES["phantom"]), ("negative", SHARES["negative"])):
        if part in groups:
            out.append((share, groups[part]))
    for side in ("in", "other"):
        keys = [k for k in groups if k.startswith(f"real:{side}:")]
        total = sum(math.sqrt(len(groups[k])) for k in keys)
        for k in keys:
            out.append((SHARES[f"real_{side}"] * math.sqrt(len(groups[k])) / total, groups[k]))
    s = sum(b[0] for b in out)
    return [(share / s, idx) for share, idx in out]


def fit_net(
    items: list[Item],
    *,
    epochs: int,
    samples_per_epoch: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    log: Callable[[str], None] = print,
) -> tuple[AnatomyNet, list[dict[str, Any]]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    buckets = _buckets(items)
    shares = np.array([b[0] for b in buckets])
    net = AnatomyNet(len(ANATOMY_CLASSES))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, samples_per_epoch // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    sagittal = {i for i, c in enumerate(ANATOMY_CLASSES) if c.endswith("/sagittal")}
    lines = []
    for ep in range(epochs):
        net.train()
        t0 = time.time()
        tot, correct, seen = 0.0, 0, 0
        for _ in range(steps_per_epoch):
            which = rng.choice(len(buckets), size=batch_size, p=shares)
            picks = [buckets[b][1][rng.integers(len(buckets[b][1]))] for b in which]
            xs, ys = [], []
            for i in picks:
                it = items[i]
                xs.append(it.train[rng.integers(len(it.train))])
                ys.append(it.label)
            x = torch.from_numpy(np.stack(xs).astype(np.float32))[:, None]
            y = torch.as_tensor(ys)
            flip_ok = torch.as_tensor([lab not in sagittal for lab in ys])
            x = _augment(x, flip_ok, g)
            logits, _ = net(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        line = {
            "epoch": ep,
            "loss": round(tot / seen, 4),
            "train_acc": round(correct / seen, 4),
            "seconds": round(time.time() - t0, 1),
        }
        lines.append(line)
        log(json.dumps(line))
    net.eval()
    return net, lines


def _embeddings(net: AnatomyNet, arrays: list[np.ndarray], batch: int = 256) -> np.ndarray:
    x = np.concatenate(arrays).astype(np.float32)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(net.embed(torch.from_numpy(x[i : i + batch, None])).numpy())
    return np.concatenate(out).astype(np.float64)


def _shrunk_precision(centred: np.ndarray) -> np.ndarray:
    cov = np.cov(centred.T)
    d = cov.shape[0]
    cov = 0.9 * cov + 0.1 * np.trace(cov) / d * np.eye(d) + 1e-4 * np.eye(d)
    return np.linalg.inv(cov)


def fit_distance(clf: AnatomyClassifier, items: list[Item]) -> None:
    """Class means and a shared (shrunk) inverse covariance of the slice embeddings of the training items."""
    e = _embeddings(clf.net, [it.train for it in items])
    y = np.concatenate([[it.label] * len(it.train) for it in items])
    mean = np.stack([e[y == k].mean(axis=0) if (y == k).any() else e.mean(axis=0) for k in range(len(ANATOMY_CLASSES))])
    clf.mean, clf.precision = mean, _shrunk_precision(e - mean[y])


def training_items(real: list[Item], phantoms: list[Item], held: set[str]) -> list[Item]:
    """What a model learns from: phantoms and real series outside the held groups (figure panels never)."""
    return phantoms + [it for it in real if it.group not in held and not is_figure_panel(it)]


def _claim(it: Item) -> tuple[str, str]:
    return ANATOMY_CLASSES[it.label].split("/") if it.label else ("other", it.plane)  # type: ignore[return-value]


# the rule until a leave-one-source-out calibration replaces it (phantom-only training keeps it)
DEFAULT_RULE = {"contradiction": 0.8, "plane": 0.9, "support": 0.0, "ood_ratio": 1.25}


def distance_scale(clf: AnatomyClassifier, held_real: list[Item], cal_phantoms: list[Item]) -> dict[str, Any]:
    """The model's own in-distribution series distance: the larger of the 99th percentile over held real series
    and the 99.5th over calibration phantoms of the served anatomies (distance to the claimed anatomy)."""
    d: dict[str, list[float]] = {"real": [], "phantom": []}
    for name, items in (("real", held_real), ("phantom", cal_phantoms)):
        for it in items:
            if it.in_anatomy and it.infer is not None:
                pred = clf.predict_input(it.infer.astype(np.float32)[:, None])
                d[name].append(pred["anatomy_distances"][_claim(it)[0]])
    q_real = float(np.percentile(d["real"], 99)) if d["real"] else 0.0
    q_ph = float(np.percentile(d["phantom"], 99.5)) if d["phantom"] else 0.0
    clf.distance_scale = max(q_real, q_ph, 1e-6)
    return {
        "series": {"real": len(d["real"]), "phantom": len(d["phantom"])},
        "held_real_distance_p99": round(q_real, 3),
        "phantom_distance_p995": round(q_ph, 3),
        "distance_scale": round(clf.distance_scale, 3),
    }


def apply_rule(clf: AnatomyClassifier, rule: dict[str, float]) -> None:
    clf.contradiction_threshold = float(rule["contradiction"])
    clf.plane_threshold = float(rule["plane"])
    clf.support_threshold = float(rule["support"])
    clf.ood_threshold = float(rule["ood_ratio"]) * float(clf.distance_scale)


def calibrate(
    clf: AnatomyClassifier, held_real: list[Item], cal_phantoms: list[Item], rule: dict[str, float] | None = None
) -> dict[str, Any]:
    """Distance scale from held real series and calibration phantoms, then the thresholds of ``rule``
    (default `DEFAULT_RULE`; the shipped rule comes from `models.qc_evaluation.choose_rule`)."""
    stats = distance_scale(clf, held_real, cal_phantoms)
    rule = dict(rule or DEFAULT_RULE)
    apply_rule(clf, rule)
    stats.update(
        {
            "rule": rule,
            "contradiction_threshold": clf.contradiction_threshold,
            "plane_threshold": clf.plane_threshold,
            "support_threshold": clf.support_threshold,
            "ood_threshold": round(clf.ood_threshold, 4),
        }
    )
    return stats


@dataclass(frozen=True)
class Recipe:
    phantoms: int = 1800
    seed: int = 3100000
    epochs: int = 14
    samples_per_epoch: int = 6000
    batch_size: int = 64
    lr: float = 2e-3
    realdata: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_anatomy(
    out_dir: Path | str,
    recipe: Recipe = Recipe(),
    *,
    realdata_root: Path | str | None = None,
    exclude_sources: Iterable[str] = (),
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] = print,
    real: list[Item] | None = None,
    save: bool = True,
) -> tuple[AnatomyClassifier, dict[str, Any]]:
    """Train ``qc.anatomy`` (phantoms + synthetic other + real MRI unless ``recipe.realdata`` is False), calibrate
    it, and (``save``) write ``out_dir/model.pt`` + ``.sha256`` + ``train_summary.json``."""
    torch.set_num_threads(threads)
    exclude = set(exclude_sources)
    t0 = time.time()
    ph = phantom_items(recipe.phantoms, recipe.seed, workers=workers, log=log)
    n_cal = max(24, recipe.phantoms // 6)
    cal_ph = phantom_items(n_cal, recipe.seed + recipe.phantoms, with_infer=True, workers=workers, log=log)
    if recipe.realdata:
        if real is None:
            real = real_items(realdata_root, log=log)
        if not real:
            from models.errors import DataSpecError

            raise DataSpecError(
                "no real MRI found (MSKNODE_REALDATA or ../shared/realdata); train with --realdata none "
                "for phantoms only"
            )
    real = [it for it in (real or []) if it.source not in exclude]
    held = held_groups(real)
    train = training_items(real, ph, held)
    train_real = train[len(ph) :]
    held_real = [it for it in real if it.group in held]
    log(
        json.dumps(
            {
                "phantom_items": len(ph),
                "real_train_series": len(train_real),
                "real_held_series": len(held_real),
                "excluded_sources": sorted(exclude),
                "prepared_seconds": round(time.time() - t0, 1),
            }
        )
    )
    net, lines = fit_net(
        train,
        epochs=recipe.epochs,
        samples_per_epoch=recipe.samples_per_epoch,
        seed=recipe.seed,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        log=log,
    )
    clf = AnatomyClassifier(net=net, mean=np.zeros(1), precision=np.zeros(1), ood_threshold=0.0)
    fit_distance(clf, train)
    cal = calibrate(clf, held_real, cal_ph)
    by_source: dict[str, dict[str, int]] = {}
    for it in train_real:
        by_source.setdefault(it.source, {"series": 0, "slices": 0})
        by_source[it.source]["series"] += 1
        by_source[it.source]["slices"] += len(it.train)
    summary = {
        "version": "2",
        "recipe": recipe.as_dict(),
        "training_data": f"synthetic:{recipe.phantoms}:{recipe.seed}" + (" + realdata" if recipe.realdata else ""),
        "excluded_sources": sorted(exclude),
        "real_training_series": by_source,
        "real_held_series": len(held_real),
        "held_groups": sorted(held),
        "calibration": cal,
        "train_log": lines,
        "seconds": round(time.time() - t0, 1),
    }
    clf.metadata = {k: summary[k] for k in ("version", "recipe", "training_data", "excluded_sources", "calibration")}
    clf.metadata["held_groups"] = sorted(held)
    log(json.dumps({"calibration": cal}))
    if save:
        out = Path(out_dir)
        path = out / "model.pt"
        sha = clf.save(path)
        summary["weights_sha256"] = sha
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return clf, summary


# ------------------------------------------------------------------------------------------
# the motion detector on real images


def real_motion_items(
    items_series, seed: int, *, log: Callable[[str], None] | None = None
) -> list[tuple[np.ndarray, int]]:
    """Motion-detector items from real series (`models.realdata.CorpusSeries`): each as it is (in spec), with
    in-spec ghosting (0.2-1.5 % of the field of view) and with heavy ghosting (3-9 %)."""
    out = []
    rng = np.random.default_rng([seed, 23])
    for i, s in enumerate(items_series):
        a = np.asarray(s.volume().array, np.float32)
        sub = a[motion_slices(a.shape[0])]
        out.append((motion_grid(sub), 0))
        out.append((motion_grid(add_ghosting(sub, float(rng.uniform(*IN_SPEC_MOTION_FRACTION)), rng)), 0))
        out.append((motion_grid(add_ghosting(sub, float(rng.uniform(*HEAVY_MOTION_FRACTION)), rng)), 1))
        if log and (i + 1) % 100 == 0:
            log(f"real motion items: {i + 1}/{len(items_series)}")
    return out


MOTION_SERIES_PER_SOURCE = 120


def train_motion_detector(
    path: Path | str,
    n: int,
    seed: int,
    *,
    held: set[str] | None = None,
    realdata_root: Path | str | None = None,
    exclude_sources: Iterable[str] = (),
    use_real: bool = True,
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the motion detector on N:SEED phantoms and (``use_real``) real series of the training groups, with
    and without added ghosting (at most MOTION_SERIES_PER_SOURCE per source); report it on the held groups."""
    from models.qc.motion_training import attach_motion_detector
    from models.realdata import catalogue

    held = set(held or ())
    series = []
    if use_real:
        series = [
            s
            for s in catalogue(realdata_root)
            if s.source not in set(exclude_sources) and "figure panel" not in s.notes
        ]
    rng = np.random.default_rng([seed, 31])
    train_s: list = []
    for src in sorted({s.source for s in series}):
        mine = [s for s in series if s.source == src and s.group not in held]
        if len(mine) > MOTION_SERIES_PER_SOURCE:
            mine = [mine[i] for i in sorted(rng.choice(len(mine), MOTION_SERIES_PER_SOURCE, replace=False))]
        train_s += mine
    held_s = [s for s in series if s.group in held]
    extra = real_motion_items(train_s, seed, log=log) if train_s else None

    def held_stats(net) -> dict[str, Any]:
        if not held_s:
            return {}
        items = real_motion_items(held_s, seed + 1)
        x = torch.from_numpy(np.stack([it[0] for it in items]).astype(np.float32))
        net.eval()
        with torch.inference_mode():
            p = torch.sigmoid(net(x.reshape(-1, *x.shape[2:])).reshape(len(x), -1).mean(dim=1)).numpy()
        p = p.reshape(-1, 3)  # as is, in-spec ghosting, heavy ghosting
        return {
            "motion_real_held_series": len(p),
            "motion_real_held_false_positive_rate": round(float((p[:, 0] > 0.5).mean()), 4),
            "motion_real_held_in_spec_false_positive_rate": round(float((p[:, 1] > 0.5).mean()), 4),
            "motion_real_held_heavy_recall": round(float((p[:, 2] > 0.5).mean()), 4),
        }

    name = f"real series of the training groups ({len(train_s)}) as they are, with in-spec and heavy added ghosting"
    return attach_motion_detector(
        Path(path),
        n,
        seed,
        threads=threads,
        workers=workers,
        log=log,
        extra_items=extra,
        extra_name=name if train_s else "",
        extra_stats=held_stats,
        cache=cache_root() / f"motion-phantoms-v1-{n}-{seed}.npz",
    )


def set_loso_rule(
    out_dir: Path | str,
    clf: AnatomyClassifier,
    summary: dict[str, Any],
    recipe: Recipe,
    *,
    realdata_root: Path | str | None = None,
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[AnatomyClassifier, dict[str, Any]]:
    """Give the model the rule chosen leave-one-source-out (`models.qc_evaluation.loso_rule`: one model per real
    source, trained with the same recipe, cached) and save it again with its summary."""
    from models.qc_evaluation import loso_rule

    rule, info = loso_rule(realdata_root, recipe, threads=threads, workers=workers, log=log)
    apply_rule(clf, rule)
    cal = dict(summary.get("calibration", {}))
    cal.update(
        {
            "rule": rule,
            "rule_source": "leave-one-source-out",
            "rule_calibration": info["calibration"],
            "contradiction_threshold": clf.contradiction_threshold,
            "plane_threshold": clf.plane_threshold,
            "support_threshold": clf.support_threshold,
            "ood_threshold": round(clf.ood_threshold, 4),
        }
    )
    summary["calibration"] = cal
    clf.metadata["calibration"] = cal
    out = Path(out_dir)
    summary["weights_sha256"] = clf.save(out / "model.pt")
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(json.dumps({"rule": rule, "rule_calibration": info["calibration"]}))
    return clf, summary
