"""Evaluation of ``lumbar_spine.levels``: held-out real patients, phantoms, and the stenosis model's levels.

Real volumes (``spinevol:PATH``): only the held-out test patients of the split (`split_keys`) are scored,
through the inference path (`LevelsModel.predict` on a `Volume` built from the array):

- ``dice``: Dice per named structure (L1..L5 bodies, L1-L2..L4-L5 discs; L5-S1 has no reference: the
  masks stop at L5) between the predicted and the reference label of that name, so a structure found
  but misnamed counts as missed; ``dice_body`` / ``dice_disc``: the classes whatever the name;
- ``level_naming_accuracy``: of the reference structures (bodies L1..L5 and discs L1-L2..L4-L5), the
  share whose overlapping prediction carries the same name (the predicted name with most voxels inside
  the reference structure); ``patients_all_levels_correct``: patients with every structure named right;
- ``disc_centre_error_mm``: distance between the predicted and the reference disc centroids.

Phantoms (``synthetic:N:SEED``): the phantom masks have discs (all levels) but bodies only together with
the posterior elements and the sacrum, so the phantom figures are the disc Dice (all discs, classes) and
the level naming of the discs: a predicted disc is named right when the nearest phantom level centre
(head-feet) carries its name.

Stenosis levels (`stenosis_levels`): on the held-out real volumes, the head-feet distance between the
stenosis model's peak of each level and the reference disc centre, and whether the nearest reference disc
is the right one, against the same for this model's disc centres.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.levels.core import BODIES, DISCS, STRUCTURES
from models.levels.data import (
    SpineVolume,
    disc_centres_vox,
    list_keys,
    load_volumes,
    patients_of,
    split_keys,
    targets_of,
)
from models.types import Volume

REF_STRUCTURES = BODIES + DISCS[:-1]  # what the real masks can name


def volume_of(sv: SpineVolume) -> Volume:
    """A sagittal `Volume` of a canonical spine array: rows head -> feet (patient -z), columns anterior ->
    posterior (+y), slices along -x, 1 mm."""
    k = sv.image.shape[0]
    positions = np.array([[-float(i) * sv.spacing[0], 0.0, 0.0] for i in range(k)])
    return Volume(
        array=sv.image.astype(np.float32),
        spacing=sv.spacing,
        positions=positions,
        row_cosine=(0.0, 1.0, 0.0),
        col_cosine=(0.0, 0.0, -1.0),
        study_uid="",
        series_uid=f"spinevol:{sv.key}",
        modality="MR",
        body_part="LSPINE",
        series_description=f"{sv.key} sagittal",
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(a.sum()) + int(b.sum())
    return None if s == 0 else float(2 * int((a & b).sum()) / s)


def score_volume(labels: np.ndarray, sv: SpineVolume) -> dict[str, Any]:
    classes, named = targets_of(sv)
    out: dict[str, Any] = {"key": sv.key, "dice": {}, "named": {}, "disc_centre_error_mm": {}}
    for nm in REF_STRUCTURES:
        i = STRUCTURES.index(nm) + 1
        ref = named == i
        if not ref.any():
            continue
        out["dice"][nm] = _dice(labels == i, ref)
        inside = labels[ref]
        inside = inside[inside > 0]
        got = STRUCTURES[int(np.bincount(inside).argmax()) - 1] if inside.size else None
        out["named"][nm] = got
    valid = classes != 255
    body_ids = [STRUCTURES.index(b) + 1 for b in BODIES]
    disc_ids = [STRUCTURES.index(d) + 1 for d in DISCS]
    # class Dice within the named range (L1 .. L5): the reference names only L bodies and their discs
    ref_body = np.isin(named, body_ids)
    ref_disc = np.isin(named, disc_ids)
    out["dice_body"] = _dice(np.isin(labels, body_ids) & valid, ref_body)
    out["dice_disc"] = _dice(np.isin(labels, disc_ids[:-1]) & valid, ref_disc)
    ref_c = disc_centres_vox(named)
    pred_c = disc_centres_vox(labels)
    for d in DISCS[:-1]:
        if d in ref_c and d in pred_c:
            out["disc_centre_error_mm"][d] = float(
                np.linalg.norm((np.array(ref_c[d]) - np.array(pred_c[d])) * np.array(sv.spacing))
            )
    return out


def summarise(per: list[dict[str, Any]]) -> dict[str, Any]:
    dice: dict[str, float] = {}
    for nm in REF_STRUCTURES:
        vals = [p["dice"][nm] for p in per if p["dice"].get(nm) is not None]
        if vals:
            dice[nm] = round(float(np.mean(vals)), 4)
    n_named = sum(len(p["named"]) for p in per)
    n_right = sum(1 for p in per for nm, got in p["named"].items() if got == nm)
    body_named = [(nm, got) for p in per for nm, got in p["named"].items() if nm in BODIES]
    disc_named = [(nm, got) for p in per for nm, got in p["named"].items() if nm in DISCS]
    errs = [e for p in per for e in p["disc_centre_error_mm"].values()]
    return {
        "dice": dice,
        "mean_dice": round(float(np.mean(list(dice.values()))), 4) if dice else None,
        "dice_body": round(float(np.mean([p["dice_body"] for p in per if p["dice_body"] is not None])), 4),
        "dice_disc": round(float(np.mean([p["dice_disc"] for p in per if p["dice_disc"] is not None])), 4),
        "level_naming_accuracy": round(n_right / n_named, 4) if n_named else None,
        "body_naming_accuracy": round(sum(a == b for a, b in body_named) / max(len(body_named), 1), 4),
        "disc_naming_accuracy": round(sum(a == b for a, b in disc_named) / max(len(disc_named), 1), 4),
        "patients_all_levels_correct": sum(all(got == nm for nm, got in p["named"].items()) for p in per),
        "disc_centre_error_mm_median": round(float(np.median(errs)), 2) if errs else None,
        "n_patients": len(per),
    }


def held_out_keys(root: Path | str, part: str = "test") -> list[str]:
    return split_keys(list_keys(root), patients=patients_of(root))[part]


def evaluate_real(
    model, root: Path | str, *, keys: list[str] | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    keys = held_out_keys(root) if keys is None else keys
    per = []
    for sv in load_volumes(root, keys):
        t0 = time.perf_counter()
        out = model.predict(volume_of(sv), check_qc=False)
        per.append(score_volume(out.labels, sv))
        if log:
            right = sum(1 for nm, got in per[-1]["named"].items() if got == nm)
            log(
                f"{sv.key}: {right}/{len(per[-1]['named'])} named right, bodies found {' '.join(out.bodies_found)} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
    res = summarise(per)
    res["patients"] = keys
    res["per_patient"] = [
        {"key": p["key"], "named_right": sum(1 for nm, got in p["named"].items() if got == nm), "n": len(p["named"])}
        for p in per
    ]
    return res


def evaluate_phantoms(model, n: int, seed: int, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    from models.levels.model import canonical_of
    from models.phantoms import generate

    dices, right, total, si_err = [], 0, 0, []
    for s in range(seed, seed + n):
        ph = generate("lumbar_spine", s)
        vol = ph.volume
        out = model.predict(vol, check_qc=False)
        canon, perm, _flips = canonical_of(vol)
        spacing = tuple(float(vol.spacing[p]) for p in perm)
        classes, _ = model.segment_canonical(canon, spacing, classes=True)
        ref_disc, _, _ = canonical_of(
            Volume(ph.masks["discs"].astype(np.float32), vol.spacing, vol.positions, vol.row_cosine, vol.col_cosine)
        )
        d = _dice(classes == 2, ref_disc > 0.5)
        if d is not None:
            dices.append(d)
        centres = {k: np.asarray(v, float) for k, v in ph.labels["level_centers_mm"].items()}
        for nm, c in out.centres_mm.items():
            if nm not in DISCS:
                continue
            # head-feet is patient z
            nearest = min(centres, key=lambda lv: abs(centres[lv][2] - c[2]))
            total += 1
            right += int(nearest == nm)
            if nm in centres:
                si_err.append(abs(centres[nm][2] - c[2]))
        if log:
            log(f"phantom {s}: discs {' '.join(d for d in DISCS if d in out.centres_mm)}")
    return {
        "data": f"synthetic:{n}:{seed}",
        "n_phantoms": n,
        "dice_disc_all_levels": round(float(np.mean(dices)), 4) if dices else None,
        "disc_naming_accuracy": round(right / total, 4) if total else None,
        "discs_found": total,
        "discs_expected": 5 * n,
        "disc_head_feet_error_mm_median": round(float(np.median(si_err)), 2) if si_err else None,
    }


def stenosis_levels(
    levels_model, stenosis_model, root: Path | str, *, keys: list[str] | None = None, log=None
) -> dict[str, Any]:
    """Level placement of the stenosis model (peak of each level head) vs this model's disc centres, both
    against the reference disc centres of the held-out real volumes (head-feet distance in mm, and whether
    the nearest reference disc has the level's name)."""
    from models.types import QCResult

    keys = held_out_keys(root) if keys is None else keys
    rows: dict[str, list[tuple[float, bool]]] = {"stenosis": [], "levels": []}
    for sv in load_volumes(root, keys):
        vol = volume_of(sv)
        _, named = targets_of(sv)
        ref = {k: v for k, v in disc_centres_vox(named).items() if k in DISCS}
        ref_z = {k: float((vol.affine() @ np.array([c[0], c[1], c[2], 1.0]))[2]) for k, c in ref.items()}
        if not ref_z:
            continue
        sten = stenosis_model.predict(vol, saliency=True, uncertainty=False, qc=QCResult(True))
        placed = {"stenosis": {f.level: f.location_mm[2] for f in sten.findings if f.level and f.location_mm}}
        lv = levels_model.predict(vol, check_qc=False)
        placed["levels"] = {k: c[2] for k, c in lv.centres_mm.items() if k in DISCS}
        for who, zs in placed.items():
            for level, z in zs.items():
                if level not in ref_z:
                    continue
                nearest = min(ref_z, key=lambda r: abs(ref_z[r] - z))
                rows[who].append((abs(ref_z[level] - z), nearest == level))
        if log:
            log(f"{sv.key}: stenosis peaks {placed['stenosis']}, levels {placed['levels']}, reference {ref_z}")
    out: dict[str, Any] = {"patients": keys, "levels_compared": "L1-L2 .. L4-L5 (the reference has no L5-S1)"}
    for who, r in rows.items():
        out[who] = {
            "n": len(r),
            "head_feet_error_mm_median": round(float(np.median([e for e, _ in r])), 2) if r else None,
            "head_feet_error_mm_mean": round(float(np.mean([e for e, _ in r])), 2) if r else None,
            "level_correct": round(float(np.mean([ok for _, ok in r])), 4) if r else None,
        }
    return out


def _training_constants() -> dict[str, Any]:
    from models.levels import training

    return {"crop_px": training.CROP, "sacral_crops": training.SACRAL_CROPS}


def write_levels_card(
    out_dir: Path,
    root: Path | str,
    *,
    recipe,
    split: dict[str, list[str]],
    history: list[dict[str, Any]],
    wall_time_s: float,
    log: Callable[[str], None] = print,
    phantoms: int = 0,
    stenosis_model=None,
) -> dict[str, Any]:
    """card.json + MODEL_CARD.md of freshly trained weights in ``out_dir`` (held-out real evaluation, and the
    phantom / stenosis comparison when asked)."""
    from models.cards import write_card
    from models.levels.model import NOTICE, TASK, LevelsModel
    from models.protocol import load

    model = load(Path(out_dir) / "model.pt")
    assert isinstance(model, LevelsModel)
    real = evaluate_real(model, root, keys=split["test"], log=log)
    metrics: dict[str, Any] = {"held_out_real": real, "wall_time_s": round(float(wall_time_s), 1)}
    if history:
        metrics["last_epoch"] = history[-1]
    if phantoms:
        metrics["phantoms"] = evaluate_phantoms(model, phantoms, 7_700_000, log=log)
    if stenosis_model is not None:
        metrics["stenosis_levels"] = stenosis_levels(model, stenosis_model, root, keys=split["test"], log=log)
    n = {k: len(v) for k, v in split.items()}
    where = str(root)
    if where.rstrip("/").endswith("lumbar_spine/segmented_volumes"):
        where = "the real-MRI corpus, lumbar_spine/segmented_volumes"
    card = {
        **TASK.card_facts(),
        "version": model.info.version,
        "weights_file": "model.pt",
        "weights_sha256": model.info.weights_sha256,
        "demo_weights": True,
        "notice": NOTICE,
        "training_data": (
            f"Real sagittal lumbar MRI with vertebral-body masks ({where}): VB1 (Zukic et al., Computer Graphics "
            "Forum 33:190-204, 2014; multi-centre, T1 and T2) and VB2 (Chu et al., PLoS ONE 10(11):e0143327, 2015; "
            "T2 TSE, T11-L5), both as re-packed in the JonathanRamos/fastcleverseg repository (GPL-3.0; the licence "
            "of the underlying datasets is not stated there). 1 mm isotropic, intensities rescaled to 8 bits by the "
            f"source authors. One volume per patient except VB1 DzZ (T1 and T2 of one patient, kept together). "
            f"Split by patient (deterministic hash per source): train {n['train']} volumes {split['train']}, "
            f"validation {n['val']} {split['val']} (progress only), held-out test {n['test']} {split['test']} "
            "(never trained on, nothing chosen on them). Discs are not labelled in the source: the disc target "
            "between two consecutive bodies is, per sagittal slice and antero-posterior column crossing both, the "
            "gap between the lower endplate of the upper body and the upper endplate of the lower one (at most "
            "20 mm). Above the highest labelled body and in a 4 mm margin below L5 the loss is not applied; the "
            "L5-S1 disc and the sacrum are background (a third of the crops are centred at the lumbosacral junction)."
        ),
        "recipe": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(recipe).items()},
            "network": "MONAI UNet 2-D (3 classes: background, vertebral body, disc), instance norm, one residual "
            "unit per level, every sagittal slice at 2 mm in-plane",
            "augmentation": "rotation +-15 deg, scale +-18 %, shift; 1-5 adjacent slices averaged (slice "
            "thickness); contrast: random non-monotone intensity curve or inversion inside the body, gamma, bias "
            "field, Gaussian noise",
            "loss": "cross-entropy + soft Dice (body, disc), ignored pixels out",
            "crop_px": _training_constants()["crop_px"],
            "sacral_crops": _training_constants()["sacral_crops"],
            "naming": "3-D components of the body class (>= 2.5 cm^3) ordered head -> feet; the lowest is L5 "
            "(anchored at the sacrum: S1 is background in every target, so the lowest body found is the last "
            "mobile one), L4 .. L1 above it; discs named by the bodies their centroid lies between, a disc below "
            "L5 is L5-S1",
            "history": history,
        },
        "metrics": metrics,
        "evaluation_data": (
            f"Held-out real patients of the split ({', '.join(split['test'])}), scored at 1 mm through the "
            "inference path; Dice per named structure (a misnamed structure counts as missed), naming accuracy of "
            "L1..L5 bodies and L1-L2..L4-L5 discs. Phantoms: disc Dice (all discs) and disc naming against the "
            "phantom level centres."
        ),
        "reproduce": "msknode train lumbar_spine.levels --data realdata:auto --out DIR (MSKNODE_TORCH_THREADS=1); "
        "msknode evaluate lumbar_spine.levels --data realdata:auto --json",
        "limitations": [
            "Not for diagnostic use.",
            f"Trained on {n['train']} real volumes from two research datasets; the L5-S1 disc has no reference "
            "mask (it is background in training: usually not segmented, its centre is then estimated).",
            "Naming assumes a normal count of lumbar vertebrae (5) and a sacrum below L5; transitional "
            "vertebrae (lumbarised S1, sacralised L5) will be misnamed.",
            "Bodies are counted from the sacrum upwards; a series whose field of view cuts off the sacrum "
            "has no anchor.",
        ],
    }
    write_card(Path(out_dir), card)
    return card
