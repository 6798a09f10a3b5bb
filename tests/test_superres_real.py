"""Super-resolution on real MR: ``evaluate superres --data realdir:PATH`` (every other slice taken away and
restored, against tricubic) and ``train superres`` on real + phantom volumes (progress, card, resume)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
REALDATA = Path(os.environ.get("MSKNODE_REALDATA") or ROOT.parent / "shared" / "realdata")
NO_REALDATA = f"the real-data corpus is not present at {REALDATA}"


@pytest.fixture
def msknode(settings, capsys):
    """``msknode ARGS`` through its entry point (`node.cli.main`) in the test's process, on the test's data
    directory: a CompletedProcess with the exit status, stdout and stderr. A process per command would only add
    the model registry's import time (the run stopped after its first epoch is a process of its own)."""
    from node.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["msknode", *args], rc, out, err)

    return run


def _check_restore_result(out: dict, n_scored: int) -> None:
    for key in ("n", "psnr_gain_db", "psnr_gain_db_ci", "ssim_gain", "ssim_gain_ci", "consistency_error"):
        assert key in out, key
    assert out["qc_accepted"] == n_scored
    assert len(out["consistency_error"]) == n_scored
    assert all(0 <= e <= out["consistency_tolerance"] for e in out["consistency_error"])
    assert out["consistency_error_mean"] == pytest.approx(np.mean(out["consistency_error"]), rel=1e-6)
    assert out["consistency_passed_rate"] == 1.0
    lo, hi = out["psnr_gain_db_ci"]
    assert math.isfinite(out["psnr_gain_db"]) and lo <= out["psnr_gain_db"] <= hi
    lo, hi = out["ssim_gain_ci"]
    assert -1 < lo <= out["ssim_gain"] <= hi < 1
    scored = [s for s in out["series"] if s["accepted"]]
    # the mean gain is the mean of the series' gains, and the gain is model minus tricubic
    assert out["psnr_gain_db"] == pytest.approx(np.mean([s["psnr_gain_db"] for s in scored]), abs=1e-3)
    assert out["psnr_gain_db"] == pytest.approx(out["psnr_db"] - out["psnr_tricubic_db"], abs=2e-3)
    # per source: the series of each source, and the pooled mean is the series-weighted mean of the sources
    by = out["by_source"]
    assert sum(g["n_scored"] for g in by.values()) == n_scored == sum(g["qc_accepted"] for g in by.values())
    pooled = sum(g["n_scored"] * g["psnr_gain_db"] for g in by.values()) / n_scored
    assert pooled == pytest.approx(out["psnr_gain_db"], abs=1e-3)


def test_restore_uses_only_the_kept_slices_and_scores_the_removed_ones():
    """Changing the removed slices changes the score but not the restoration; a volume linear along the
    slice axis is restored almost exactly by both the model and tricubic."""
    from models.superres import SuperResModel
    from models.superres.quality import restore_series

    model = SuperResModel.load(ROOT / "models" / "weights" / "superres" / "model.pt")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    disc = (((yy - 48) ** 2 + (xx - 48) ** 2) < 35**2).astype(np.float32)
    texture = 1.0 + 0.3 * np.sin(yy / 5.0) * np.cos(xx / 7.0)
    vol = np.stack([disc * texture * (100 + 4 * k) for k in range(13)]).astype(np.float32)
    r = restore_series({"m": model}, vol)
    assert r["kept"] == 7 and r["scored"] == 6
    assert r["psnr_tricubic"] > 45 and r["m"]["psnr"] > 40  # linear in z: nothing to guess
    assert r["m"]["consistency_error"] < 1e-5
    spoiled = vol.copy()
    spoiled[1::2] += rng.normal(0, 20, spoiled[1::2].shape).astype(np.float32) * disc
    s = restore_series({"m": model}, spoiled)
    assert s["m"]["psnr"] < r["m"]["psnr"] - 10 and s["psnr_tricubic"] < r["psnr_tricubic"] - 10
    assert s["m"]["consistency_error"] == pytest.approx(r["m"]["consistency_error"], abs=1e-7)
    assert s["m"]["detail_gain"] == pytest.approx(r["m"]["detail_gain"])


def test_cli_evaluate_realdir_on_the_public_brain(tmp_path, msknode):
    """nilearn's MNI152 (every machine) as a realdir: the keys, CIs, per-series consistency, per source."""
    from models.realdir import export_public_other

    keys = export_public_other(tmp_path / "rd")
    assert len(keys) == 3
    r = msknode("evaluate", "superres", "--data", f"realdir:{tmp_path / 'rd'}", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["n"] == 3
    _check_restore_result(out, 3)
    assert set(out["by_source"]) == {"nilearn MNI152 T1 template"}
    assert "every other slice" in out["method"]


@pytest.mark.skipif(not REALDATA.is_dir(), reason=NO_REALDATA)
def test_cli_evaluate_realdir_on_real_knee_dicom_and_lumbar_volume(tmp_path, msknode):
    """The Siemens knee DICOM copied into a tmp realdir and one lumbar volume written as volume.npz."""
    rd = tmp_path / "rd"
    knee = rd / "site" / "knee"
    knee.mkdir(parents=True)
    for f in sorted((REALDATA / "knee" / "siemens_sagittal_dicom").iterdir()):
        if f.is_file():
            shutil.copy(f, knee / f"x{f.name}")
    npz = sorted((REALDATA / "lumbar_spine" / "segmented_volumes").glob("*/*.npz"))[0]
    with np.load(npz) as z:
        arr = np.transpose(np.asarray(z["I"]), (2, 0, 1))
    spine = rd / "site" / "spine"
    spine.mkdir(parents=True)
    np.savez(spine / "volume.npz", I=arr)
    (spine / "series.json").write_text(
        json.dumps(
            {
                "anatomy": "lumbar_spine",
                "plane": "sagittal",
                "pixel_spacing_mm": 1.0,
                "slice_spacing_mm": 1.0,
                "source": "lumbar",
            }
        )
    )
    r = msknode("evaluate", "superres", "--data", f"realdir:{rd}", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["n"] == 2
    _check_restore_result(out, 2)
    assert set(out["by_source"]) == {"knee", "lumbar"}
    knee_row = next(s for s in out["series"] if s["key"] == "site/knee")
    assert knee_row["slices_scored"] == 12  # 25 slices: 13 kept, 12 between two kept
    # the knee DICOM is restored better than by tricubic (model card: real held-out sources)
    assert knee_row["psnr_gain_db"] > 0, knee_row


@pytest.mark.skipif(not REALDATA.is_dir(), reason=NO_REALDATA)
def test_real_truth_volumes_mask_overlays_and_leave_out_held_out_families():
    from models.superres.data import real_truth_volumes

    vols = real_truth_volumes(REALDATA, exclude=["shoulder", "lumbar", "brain", "other"])
    assert {v.family for v in vols} == {"knee"}
    keys = {v.key for v in vols}
    assert "siemens_knee/sagittal" in keys and any(k.startswith("knee_stacks/") for k in keys)
    for v in vols:
        if v.key.startswith("knee_stacks/"):
            assert v.array.dtype == np.uint8
            h = v.array.shape[1]
            assert not v.array[:, : int(0.07 * h)].any() and not v.array[:, h - int(0.11 * h) :].any()
            assert v.array[:, h // 2].any()


def test_cli_train_shows_epochs_writes_the_card_and_resumes(tmp_path, msknode):
    """A short phantom run fine-tuned from the shipped weights: stopped after its first epoch, resumed."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "node.cli",
        "train",
        "superres",
        "--data",
        "synthetic:2:7000000",
        "--realdata",
        "none",
        "--init",
        "registry",
        "--epochs",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "MSKNODE_TORCH_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("epoch 1:"):
                first = line
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert first is not None and "loss" in first and "phantom_psnr_gain_db" in first, first
    assert (out / "train_state.pt").is_file() and not (out / "model.pt").exists()
    r = msknode(*cmd[3:], "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '"resumed_at_step": 50' in r.stdout and "epoch 2: step 100" in r.stdout
    assert "epoch 1:" not in r.stdout  # the first epoch was not trained again
    card = json.loads((out / "card.json").read_text())
    log = json.loads((out / "training_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [50, 100]
    assert card["weights_sha256"] == (out / "model.pt.sha256").read_text().split()[0]
    assert card["recipe"]["wall_time_s"] > 0 and card["recipe"]["training_loop_s"] > 0
    assert "val_phantom_psnr_gain_db" in card["metrics"]
    md = (out / "MODEL_CARD.md").read_text()
    assert "Training progress (per epoch)" in md and "not for diagnostic use" in md.lower()
    # resuming a run of another length is refused with a message
    r = msknode(*cmd[3:-4], "--epochs", "3", "--out", str(out), "--resume")
    assert r.returncode == 2 and "100 steps" in r.stderr


def test_cli_train_refuses_an_unknown_source_family(tmp_path, msknode):
    r = msknode(
        "train", "superres", "--data", "synthetic:2:7000000", "--realdata", "none", "--exclude-source", "ankle",
        "--out", str(tmp_path / "x"),
    )  # fmt: skip
    assert r.returncode == 2 and "ankle" in r.stderr and "knee, shoulder, lumbar, brain, other" in r.stderr
    assert not (tmp_path / "x" / "model.pt").exists()


@pytest.mark.skipif(not REALDATA.is_dir(), reason=NO_REALDATA)
def test_cli_train_on_real_knee_with_the_other_families_held_out(tmp_path, msknode):
    """realdata:PATH + phantoms, every family but the knee held out: the card and the checkpoint say what was
    trained on, and the per-epoch line carries the held-out families' validation gain.

    PATH is a corpus of the knee and shoulder folders only (links into the real corpus): the training volumes
    (the knee family) and the held-out validation series (the first three of the held-out families: shoulder
    stacks) are those of the whole corpus, without loading the lumbar volumes only to leave them out."""
    corpus = tmp_path / "corpus"
    for part in ("knee/teaching_stacks", "knee/siemens_sagittal_dicom", "shoulder/teaching_stacks"):
        (corpus / part).parent.mkdir(parents=True, exist_ok=True)
        (corpus / part).symlink_to(REALDATA / part, target_is_directory=True)
    out = tmp_path / "run"
    held = ["shoulder", "lumbar", "brain", "other"]
    r = msknode(
        "train", "superres", "--data", f"realdata:{corpus}", "--phantoms", "2", "--epochs", "1",
        *(a for h in held for a in ("--exclude-source", h)), "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "epoch 1: step 50" in r.stdout and "heldout_psnr_gain_db" in r.stdout
    card = json.loads((out / "card.json").read_text())
    assert set(card["training_data"]["real_families"]) == {"knee"}
    assert card["training_data"]["held_out_families"] == held
    assert card["training_data"]["real_volumes"] >= 2 and card["training_data"]["phantoms"] == 2
    assert "val_heldout_psnr_gain_db" in card["metrics"]
    log = json.loads((out / "training_log.json").read_text())
    assert all(k.startswith(("knee_stacks/", "siemens_knee/")) for k in log["real_volumes"])
    from models.superres import SuperResModel

    model = SuperResModel.load(out / "model.pt")
    assert model.metadata["held_out_families"] == held and model.info.weights_sha256 == card["weights_sha256"]
