"""``msknode train lumbar_spine.levels --data spinevol:PATH``: per-epoch progress with the loss and the
validation Dice, a checkpoint per epoch that a rerun resumes from after the process was killed, and a
model card written at the end (data, split, recipe, held-out figures, wall time).

Runs on four real volumes of the corpus (linked into a temporary spinevol folder; skipped with the reason
when the corpus is absent), a few optimiser steps per epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.protocol import load

pytestmark = [pytest.mark.slow]

KEYS = ["VB2/02", "VB2/04", "VB2/05", "VB2/07"]


def _folder(tmp: Path) -> Path:
    import csv

    from models.realdata import realdata_root

    base = realdata_root()
    root = base / "lumbar_spine" / "segmented_volumes" if base is not None else None
    if root is None or not (root / "volumes.csv").is_file():
        pytest.skip(
            "the real MRI corpus (../shared/realdata or MSKNODE_REALDATA) has no lumbar_spine/segmented_volumes"
        )
    out = tmp / "spinevol"
    (out / "VB2").mkdir(parents=True)
    with (root / "volumes.csv").open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["file"].removesuffix(".npz") in KEYS]
        fields = reader.fieldnames
    assert fields is not None
    with (out / "volumes.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    for k in KEYS:
        os.symlink(root / f"{k}.npz", out / f"{k}.npz")
    return out


def _cmd(data: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "msknode"
    return [str(exe), "train", "lumbar_spine.levels", "--data", f"spinevol:{data}", "--out", str(out),
            "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "2"]  # fmt: skip


def test_train_reports_each_epoch_resumes_after_a_kill_and_writes_the_card(tmp_path, settings, capsys, monkeypatch):
    data = _folder(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "MSKNODE_TORCH_THREADS": "1"}
    # first run: killed once its first epoch is written
    proc = subprocess.Popen(_cmd(data, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 240
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1/2:"):
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(lines)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    first = "".join(lines)
    assert "epoch 1/2: loss" in first and "validation dice_body" in first and "validation dice_disc" in first, first
    assert (out / "checkpoint.pt").is_file() and not (out / "model.pt").exists()

    # the same command again (msknode's entry point, in the test's process: a process of its own would only add
    # the model registry's import time): resumes at epoch 1, trains epoch 2 only, writes weights and card
    import torch

    from node.cli import main

    monkeypatch.setenv("MSKNODE_TORCH_THREADS", "1")  # the recipe resumed is the first run's (one thread)
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        rc = main(_cmd(data, out)[1:])
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stdout + stderr
    assert f"resumed from {out / 'checkpoint.pt'} at epoch 1" in stdout
    assert "epoch 1/2:" not in stdout and "epoch 2/2: loss" in stdout
    model = load(out / "model.pt")
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "lumbar_spine.levels" and card["weights_sha256"] == model.info.weights_sha256
    split = model.metadata["split"]
    assert sorted(split["train"] + split["val"] + split["test"]) == KEYS
    assert not set(split["test"]) & set(split["train"] + split["val"])
    assert [h["epoch"] for h in card["recipe"]["history"]] == [1, 2]
    real = card["metrics"]["held_out_real"]
    assert real["patients"] == split["test"] and real["n_patients"] == len(split["test"])
    assert {"dice", "mean_dice", "level_naming_accuracy"} <= set(real)
    assert card["metrics"]["wall_time_s"] > 0 and "phantoms" in card["metrics"]
    assert "fastcleverseg" in card["training_data"] and "not stated" in card["training_data"]
    md = (out / "MODEL_CARD.md").read_text()
    assert "lumbar_spine.levels" in md and "not for diagnostic use" in md.lower()
