"""Training the native-resolution motion detector (`MotionNet`) and the training data of the QC classes.

`train_motion` learns heavy ghosting (beyond the phantom spec) against in-spec motion on phantoms of
every anatomy and routed contrast, optionally with real series with added ghosting (`add_ghosting`,
`models.qc_training.real_motion_items`); `attach_motion_detector` stores it with an anatomy classifier.
Imported only to train.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.qc.classifier import AnatomyClassifier
from models.qc.net import MotionNet
from models.qc.preprocess import motion_input

ANATOMY_SEQUENCES = {
    "knee": ("PD_FS", "PD_FS", "PD", "T1", "T2_FS", "STIR"),
    "shoulder": ("T2_FS", "T2_FS", "PD_FS", "T1", "PD", "STIR"),
    "lumbar_spine": ("T2", "T2", "T1", "STIR", "T2_FS"),
}
HEAVY_MOTION_PX = (6.0, 20.0)  # ghost displacement beyond the phantom spec (<= 3 px), pixels of the default matrix
# the same as fractions of the phase-encode field of view (default matrices 192-256), for real images
HEAVY_MOTION_FRACTION = (0.03, 0.09)
IN_SPEC_MOTION_FRACTION = (0.002, 0.015)


def add_ghosting(
    array: np.ndarray,
    displacement: float,
    rng: np.random.Generator,
    *,
    pe_axis: int | None = None,
    cycles: float | None = None,
) -> np.ndarray:
    """Periodic phase-encode motion ghosting on magnitude images (n, rows, cols), as the phantoms render it:
    the k-space lines of a linear acquisition order are shifted by ``displacement`` (a fraction of the
    phase-encode field of view) x sin(2 pi cycles t)."""
    import scipy.fft

    a = np.asarray(array, np.float32)
    axis = int(rng.integers(1, 3)) if pe_axis is None else int(pe_axis)
    cycles = float(rng.uniform(2.0, 12.0)) if cycles is None else float(cycles)
    n_pe = a.shape[axis]
    kpe = np.fft.fftfreq(n_pe)
    order = np.argsort(np.argsort(kpe))
    disp = displacement * n_pe * np.sin(2 * np.pi * cycles * order / n_pe + rng.uniform(0, 2 * np.pi))
    ghost = np.exp(-2j * np.pi * kpe * disp).astype(np.complex64)
    shape = [1, 1, 1]
    shape[axis] = n_pe
    spec = scipy.fft.fft(a.astype(np.complex64), axis=axis, workers=1) * ghost.reshape(shape)
    return np.abs(scipy.fft.ifft(spec, axis=axis, workers=1)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# training the native-resolution motion detector


def _motion_item(args) -> tuple[np.ndarray, int]:
    idx, seed = args
    torch.set_num_threads(1)
    from models.phantoms import SPEC, generate

    anatomy = ("knee", "shoulder", "lumbar_spine")[idx % 3]
    rng = np.random.default_rng([seed, 11])
    u = rng.uniform()
    heavy = u < 0.4
    if heavy:
        px = float(rng.uniform(*HEAVY_MOTION_PX))
    elif u < 0.7:
        px = float(rng.uniform(0.5, 3.0))  # the spec's own motion range: in distribution, accepted
    else:
        px = 0.0
    # every contrast a site may route to the anatomy's models: ghosting must be told from contrast, not learned
    # as a property of the default sequence
    sequence = str(rng.choice(ANATOMY_SEQUENCES[anatomy]))
    ph = generate(
        anatomy,
        seed,
        motion_px=px,
        n_slices=8,
        sub_slices=1,
        sequence=sequence,
        matrix=SPEC.for_anatomy(anatomy).acquisition.matrix,
    )
    return motion_input(ph.volume), int(heavy)


def train_motion(
    n: int,
    seed: int,
    *,
    epochs: int = 12,
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] = print,
    extra_items: list[tuple[np.ndarray, int]] | None = None,
    extra_name: str = "",
    cache: Path | None = None,
) -> tuple[MotionNet, dict[str, Any]]:
    """Train MotionNet on N phantoms (all anatomies, default matrix): heavy (6-20 px) vs in-spec (0-3 px);
    ``extra_items`` ((MOTION_SLICES, 1, 128, 128) input, heavy 0/1), e.g. real series with and without
    added ghosting (`models.qc_training.real_motion_items`), join the training part (validation: phantoms).
    ``cache``: a file (outside the repository) holding the generated phantom inputs of N:SEED."""
    torch.set_num_threads(threads)
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            x = torch.from_numpy(z["x"].astype(np.float32))
            y = torch.from_numpy(z["y"].astype(np.float32))
    else:
        jobs = [(i, seed + i) for i in range(n)]
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                items = list(pool.imap(_motion_item, jobs, chunksize=8))
        else:
            items = []
            for i, j in enumerate(jobs):
                items.append(_motion_item(j))
                if (i + 1) % 100 == 0:
                    log(f"motion items: {i + 1}/{n}")
        x = torch.from_numpy(np.stack([it[0] for it in items]).astype(np.float32))  # (N, S, 1, H, W)
        y = torch.as_tensor([float(it[1]) for it in items])
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(cache).with_suffix(".tmp.npz")
            np.savez(tmp, x=x.numpy().astype(np.float16), y=y.numpy().astype(np.uint8))
            tmp.replace(cache)
    n_val = max(20, int(0.15 * n))
    xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    if extra_items:
        xt = torch.cat([xt, torch.from_numpy(np.stack([it[0] for it in extra_items]).astype(np.float32))])
        yt = torch.cat([yt, torch.as_tensor([float(it[1]) for it in extra_items])])
    net = MotionNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    bs = 16
    steps = epochs * math.ceil(len(xt) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    s_per = x.shape[1]

    def vol_logits(xb):
        return net(xb.reshape(-1, *xb.shape[2:])).reshape(len(xb), s_per).mean(dim=1)

    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for i in range(0, len(xt), bs):
            idx = perm[i : i + bs]
            xb = xt[idx] * torch.exp(torch.randn(len(idx), 1, 1, 1, 1, generator=g) * 0.1)
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip] = torch.flip(xb[flip], dims=[4])
            loss = nn.functional.binary_cross_entropy_with_logits(vol_logits(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        net.eval()
        with torch.inference_mode():
            pv = torch.sigmoid(vol_logits(xv))
        acc = float(((pv > 0.5).float() == yv).float().mean())
        log(json.dumps({"motion_epoch": ep, "loss": round(tot / len(xt), 4), "val_acc": round(acc, 4)}))
    net.eval()
    with torch.inference_mode():
        pvn = torch.sigmoid(vol_logits(xv)).numpy()
    yvn = yv.numpy().astype(bool)
    stats = {
        "motion_training_data": f"motion:{n}:{seed}" + (f" + {extra_name}" if extra_name else ""),
        "motion_val_accuracy": float(((pvn > 0.5) == yvn).mean()),
        "motion_val_recall": float((pvn[yvn] > 0.5).mean()) if yvn.any() else None,
        "motion_val_false_positive_rate": float((pvn[~yvn] > 0.5).mean()) if (~yvn).any() else None,
    }
    return net, stats


def attach_motion_detector(
    path: Path,
    n: int,
    seed: int,
    *,
    epochs: int = 12,
    threads: int = 2,
    workers: int = 1,
    log: Callable[[str], None] = print,
    extra_items: list[tuple[np.ndarray, int]] | None = None,
    extra_name: str = "",
    extra_stats: Callable[[MotionNet], dict[str, Any]] | None = None,
    cache: Path | None = None,
) -> Path:
    """Train the native-resolution motion detector on N phantoms (and ``extra_items``) and store it with the
    anatomy classifier at ``path`` (weights, .sha256 and train_summary.json rewritten). ``extra_stats(net)``
    adds figures measured on data the detector did not learn from."""
    from models.classifier import sha256_of

    path = Path(path)
    clf = AnatomyClassifier.load(path, sha256=sha256_of(path))
    net, stats = train_motion(
        n,
        seed,
        epochs=epochs,
        threads=threads,
        workers=workers,
        log=log,
        extra_items=extra_items,
        extra_name=extra_name,
        cache=cache,
    )
    if extra_stats is not None:
        stats.update(extra_stats(net))
    clf.motion_net = net
    clf.metadata = {**clf.metadata, **stats}
    sha = clf.save(path)
    summary = path.parent / "train_summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        data.update(stats)
        data["weights_sha256"] = sha
        summary.write_text(json.dumps(data, indent=2) + "\n")
    log(json.dumps({"motion_detector": stats, "weights_sha256": sha}))
    return path
