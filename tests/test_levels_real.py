"""``lumbar_spine.levels`` on held-out real patients: ``msknode evaluate`` prints the figures, the levels
are anchored at the sacrum (the L5 found is the mask's lowest body), and the level SEG written into the
study of a real series passes dciodvfy with one coded segment per structure.

The real volumes (``lumbar_spine/segmented_volumes`` of the real-MRI corpus) are never stored in the
repository; without the corpus every test here is skipped with the reason. Only patients the shipped
model's card lists as held out (never trained on) are used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from models.levels.core import BODIES, DISCS, STRUCTURES
from models.registry import REPO_WEIGHTS, Registry

pytestmark = [pytest.mark.slow]

CARD = REPO_WEIGHTS / "lumbar_spine.levels" / "card.json"


def _root() -> Path:
    from models.realdata import realdata_root

    base = realdata_root()
    root = base / "lumbar_spine" / "segmented_volumes" if base is not None else None
    if root is None or not (root / "volumes.csv").is_file():
        pytest.skip(
            "the real MRI corpus (../shared/realdata or MSKNODE_REALDATA) has no lumbar_spine/segmented_volumes"
        )
    return root


def _held_out() -> list[str]:
    card = json.loads(CARD.read_text())
    return list(card["metrics"]["held_out_real"]["patients"])


def _subset(root: Path, keys: list[str], folder: Path) -> Path:
    """A spinevol folder of ``keys`` only (links to the real files, their volumes.csv rows)."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with (root / "volumes.csv").open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["file"].removesuffix(".npz") in keys]
        fields = reader.fieldnames
    assert fields is not None and len(rows) == len(keys)
    with (folder / "volumes.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    for k in keys:
        (folder / k).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / f"{k}.npz", folder / f"{k}.npz")
    return folder


def test_evaluate_prints_dice_per_structure_and_naming_accuracy_on_held_out_patients(tmp_path, settings, capsys):
    """``msknode evaluate`` through its entry point (`node.cli.main`) in the test's process: the same command,
    without a process that would only add the model registry's import time."""
    from node.cli import main

    root = _root()
    held = _held_out()
    # one held-out patient of each source: with one patient per source the split holds both out
    keys = [next(k for k in held if k.startswith("VB1/")), next(k for k in held if k.startswith("VB2/"))]
    data = _subset(root, keys, tmp_path / "vols")
    capsys.readouterr()
    rc = main(["evaluate", "lumbar_spine.levels", "--data", f"spinevol:{data}", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["n_patients"] == 2 and sorted(res["patients"]) == sorted(keys)
    assert set(res["dice"]) == set(BODIES) | set(DISCS[:-1])
    for nm, d in res["dice"].items():
        assert 0.0 <= d <= 1.0, nm
    assert res["mean_dice"] == pytest.approx(np.mean(list(res["dice"].values())), abs=1e-3)
    # bodies and discs are found whatever their names (class Dice), and the naming figures add up
    assert res["dice_body"] > 0.7 and res["dice_disc"] > 0.55
    per = {p["key"]: p for p in res["per_patient"]}
    named = sum(p["named_right"] for p in per.values()) / sum(p["n"] for p in per.values())
    assert res["level_naming_accuracy"] == pytest.approx(named, abs=1e-4)
    assert 0 <= res["patients_all_levels_correct"] <= 2
    # the same weights on the same patients: the per-patient naming the card records
    card = json.loads(CARD.read_text())
    recorded = {p["key"]: p["named_right"] for p in card["metrics"]["held_out_real"]["per_patient"]}
    assert {k: per[k]["named_right"] for k in keys} == {k: recorded[k] for k in keys}
    assert res["weights_sha256"] == card["weights_sha256"]


def test_the_l5_found_is_the_lowest_body_of_the_mask_on_a_held_out_patient():
    from models.levels.data import load_volumes
    from models.levels.evaluation import volume_of

    root = _root()
    key = next(k for k in _held_out() if k.startswith("VB2/"))
    sv = load_volumes(root, [key])[0]
    model = Registry().get("lumbar_spine.levels")
    out = model.predict(volume_of(sv), check_qc=False)
    assert out.labels is not None and out.labels.shape == sv.image.shape
    lowest = sv.gt == sv.order[-1]  # the mask's lowest body: L5, the sacrum below is unlabelled
    l5 = out.labels == STRUCTURES.index("L5") + 1
    dice = 2 * (lowest & l5).sum() / (lowest.sum() + l5.sum())
    assert dice > 0.7, f"the L5 found overlaps the mask's lowest body by Dice {dice:.2f}"
    # the body above is L4 and the disc between them L4-L5, below L4 and above L5 (rows run head -> feet)
    second = sv.gt == sv.order[-2]
    l4 = out.labels == STRUCTURES.index("L4") + 1
    assert 2 * (second & l4).sum() / (second.sum() + l4.sum()) > 0.7
    assert out.centres_vox["L4"][1] < out.centres_vox["L4-L5"][1] < out.centres_vox["L5"][1]
    assert out.bodies_found[-1] == "L5"
