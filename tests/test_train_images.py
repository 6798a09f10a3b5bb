"""``images:PATH`` training data (models.images): a folder per series — PNG slices, a NIfTI volume or a MATLAB
.mat array with a series.json sidecar — and a labels.csv with the dicomcsv label columns. The loader's geometry
per format, ``msknode train`` on it (per-epoch progress, a model card with every epoch, resume after the run is
killed), ``msknode evaluate`` on it, and the refusals of bad input (non-zero exit naming the file and problem)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import scipy.io
from PIL import Image

from models.data import open_cases
from models.errors import DataSpecError
from models.phantoms import generate
from models.tasks import TASKS
from support.env import ROOT

pytestmark = [pytest.mark.slow]

ACL = TASKS["knee.acl"]
SIDE = {"anatomy": "knee", "plane": "sagittal", "pixel_spacing_mm": [0.5, 0.625], "slice_spacing_mm": 3.5}
#: series folder, format, ACL label (the rows of labels.csv, in order)
SERIES = [
    ("png_a", "png", "intact"),
    ("nifti_a", "nifti", "complete"),
    ("mat_a", "mat", "intact"),
    ("png_b", "png", "1"),
    ("nifti_b", "nifti", "0"),
    ("mat_b", "mat", "partial"),
]


def _u8(arr: np.ndarray) -> np.ndarray:
    return np.clip(arr / np.percentile(arr, 99.5) * 255, 0, 255).astype(np.uint8)


def _nifti_affine(vol) -> np.ndarray:
    """The RAS+ affine of voxel (i, j, k) = (col, row, slice) of a Volume (whose affine is LPS of (k, j, i))."""
    lps = vol.affine()[:, [2, 1, 0, 3]]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _write_series(root, name: str, fmt: str, label: str, seed: int):
    acl = "intact" if label in ("intact", "0") else "complete"
    vol = generate("knee", seed, acl=acl, matrix=64, n_slices=14).volume
    d = root / name
    d.mkdir(parents=True)
    if fmt == "png":
        for k, plane in enumerate(_u8(vol.array)):
            Image.fromarray(plane).save(d / f"slice_{k + 1:03d}.png")
        (d / "series.json").write_text(json.dumps(SIDE))
    elif fmt == "nifti":
        nib.save(nib.Nifti1Image(np.transpose(vol.array, (2, 1, 0)), _nifti_affine(vol)), d / "volume.nii.gz")
    else:  # MATLAB's I(row, col, slice)
        scipy.io.savemat(d / "volume.mat", {"I": np.transpose(_u8(vol.array), (1, 2, 0)), "note": "knee"})
        (d / "series.json").write_text(json.dumps({**SIDE, "variable": "I"}))
    return vol


@pytest.fixture
def images_root(tmp_path):
    root = tmp_path / "site"
    vols = {name: _write_series(root, name, fmt, label, 883000 + i) for i, (name, fmt, label) in enumerate(SERIES)}
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["series", "acl"])
        w.writerows((name, label) for name, _, label in SERIES)
    (root / "unlabelled").mkdir()  # a folder without a row is ignored
    return root, vols


@pytest.fixture
def msknode(settings, capsys):
    """``msknode ARGS`` through its entry point (`node.cli.main`) in the test's process, on the test's data
    directory: a CompletedProcess with the exit status, stdout and stderr (not a terminal). A process per command
    would only add the model registry's import time (the run killed mid-training is a process of its own)."""
    from node.cli import main

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["msknode", *args], rc, out, err)

    return run


TRAIN = ("--epochs", "2", "--batch-size", "2", "--patch-steps", "0")
#: the killed run's length: enough epochs after the first checkpoint that the kill lands before the last one
RESUME_EPOCHS = 12


def test_each_format_is_read_with_its_geometry_and_labels_in_csv_order(images_root):
    root, vols = images_root
    cases = list(open_cases(f"images:{root}", ACL))
    assert [c.key for c in cases] == [name for name, _, _ in SERIES]
    # the dicomcsv label mapping: class names and 0/1 on a head with a negative class
    assert [c.target.allowed[0].tolist() for c in cases] == [
        [True, False, False],
        [False, False, True],
        [True, False, False],
        [False, True, True],
        [True, False, False],
        [False, True, False],
    ]
    by = {c.key: c.volume for c in cases}
    # PNG slices: the sidecar's spacing, slices in file-name order, the sagittal display orientation
    png, src = by["png_a"], vols["png_a"]
    assert png.shape == (14, 64, 64) and png.spacing == (3.5, 0.5, 0.625)
    assert np.allclose(png.row_cosine, [0, 1, 0]) and np.allclose(
        png.col_cosine, [0, 0, -1]
    )  # anterior left, superior up
    assert np.array_equal(png.array, _u8(src.array).astype(np.float32))
    # NIfTI: geometry from the affine, the same patient positions and directions as the source volume
    nii, src = by["nifti_a"], vols["nifti_a"]
    assert nii.shape == src.shape and np.allclose(nii.array, src.array)
    assert np.allclose(nii.positions, src.positions, atol=1e-4)
    assert np.allclose(nii.row_cosine, src.row_cosine, atol=1e-6)
    assert np.allclose(nii.col_cosine, src.col_cosine, atol=1e-6)
    assert np.allclose(nii.spacing, src.spacing, atol=1e-5)
    # .mat: I(row, col, slice) becomes (slice, row, col)
    mat, src = by["mat_a"], vols["mat_a"]
    assert mat.shape == (14, 64, 64) and np.array_equal(mat.array, _u8(src.array).astype(np.float32))


def test_nifti_slices_run_along_the_normal_and_sidecar_overrides(images_root):
    root, vols = images_root
    src = vols["nifti_b"]
    # the same volume stored with its slice axis reversed (negative k step): read back ascending
    aff = _nifti_affine(src)
    aff[:3, 3] += aff[:3, 2] * (src.shape[0] - 1)
    aff[:3, 2] *= -1
    nib.save(nib.Nifti1Image(np.transpose(src.array[::-1], (2, 1, 0)), aff), root / "nifti_b" / "volume.nii.gz")
    vol = next(c.volume for c in open_cases(f"images:{root}", ACL) if c.key == "nifti_b")
    assert np.allclose(vol.array, src.array) and np.allclose(vol.positions, src.positions, atol=1e-4)
    # a sidecar with a plane overrides the affine: voxel axes read as displayed slices, spacing as given
    (root / "nifti_b" / "series.json").write_text(json.dumps({**SIDE, "plane": "coronal", "transpose": True}))
    vol = next(c.volume for c in open_cases(f"images:{root}", ACL) if c.key == "nifti_b")
    assert vol.spacing == (3.5, 0.5, 0.625) and np.allclose(vol.normal, [0, 1, 0])
    assert np.allclose(vol.array, np.swapaxes(src.array[::-1], 1, 2))  # the stored voxel order, transposed


def test_refusals_name_the_file_and_the_problem(images_root):
    root, _ = images_root

    def refused(match: str) -> None:
        with pytest.raises(DataSpecError, match=match):
            list(open_cases(f"images:{root}", ACL))

    labels = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(labels + "png_a,intact\n")
    refused(r"labels.csv line 8: series 'png_a' again \(first on line 2\)")
    (root / "labels.csv").write_text(labels + "../elsewhere,intact\n")
    refused("must be a folder below")
    (root / "labels.csv").write_text("name,acl\npng_a,intact\n")
    refused("needs a 'series' column")
    (root / "labels.csv").write_text("series,meniscus\npng_a,none\n")
    refused("no label column for knee.acl")
    (root / "labels.csv").write_text(labels)
    (root / "mat_b" / "series.json").write_text(json.dumps(SIDE))
    (root / "mat_b" / "volume.mat").write_bytes(
        b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(512)
    )
    refused(r"mat_b/volume.mat: a MATLAB v7.3 \(HDF5\) file, which is not read")
    scipy.io.savemat(root / "mat_b" / "volume.mat", {"I": np.zeros((8, 8, 3)), "GT": np.zeros((8, 8, 3))})
    refused(r"name the array to read with \"variable\"")
    (root / "mat_b" / "series.json").write_text(json.dumps({**SIDE, "anatomy": "shoulder", "variable": "I"}))
    refused("anatomy 'shoulder', but knee.acl takes knee")


def test_volumes_and_labels_over_their_limits_are_refused(images_root, monkeypatch):
    import models.images

    root, _ = images_root
    monkeypatch.setattr(models.images, "MAX_VOXELS", 14 * 64 * 64 - 1)  # one voxel fewer than each volume
    with pytest.raises(DataSpecError, match=r"nifti_a/volume.nii.gz: 57344 voxels .* exceeds the limit"):
        list(open_cases(f"images:{root}", ACL))
    monkeypatch.setattr(models.images, "MAX_LABELS_BYTES", 40)
    with pytest.raises(DataSpecError, match=r"labels.csv: larger than 40 bytes"):
        list(open_cases(f"images:{root}", ACL))


def test_cli_refuses_bad_input_with_a_non_zero_exit_and_a_clear_message(images_root, tmp_path, msknode):
    root, _ = images_root
    labels = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(labels.replace("mat_a,intact", "mat_a,sprained"))
    run = msknode("train", "knee.acl", "--data", f"images:{root}", "--out", str(tmp_path / "o1"), *TRAIN)
    assert run.returncode == 2
    assert f"{root / 'labels.csv'} line 4, series 'mat_a': label 'sprained' is not one of intact" in run.stderr
    (root / "labels.csv").write_text(labels.replace("mat_a,intact", "mat_a,intact,extra"))
    run = msknode("evaluate", "knee.acl", "--data", f"images:{root}")
    assert run.returncode == 2 and "labels.csv line 4: more fields than the header (2)" in run.stderr
    (root / "labels.csv").write_text(labels)
    (root / "png_b" / "series.json").unlink()
    run = msknode("train", "knee.acl", "--data", f"images:{root}", "--out", str(tmp_path / "o2"), *TRAIN)
    assert run.returncode == 2
    assert f"{root / 'png_b'}: image slices need a series.json (plane, pixel spacing or field of view)" in run.stderr
    assert not (tmp_path / "o1" / "model.pt").exists() and not (tmp_path / "o2" / "model.pt").exists()


def test_train_shows_progress_writes_the_card_and_evaluate_prints_metrics(images_root, tmp_path, msknode):
    root, _ = images_root
    out = tmp_path / "run"
    run = msknode("train", "knee.acl", "--data", f"images:{root}", "--out", str(out), *TRAIN)
    assert run.returncode == 0, run.stderr
    assert f"6 cases from images:{root}" in run.stdout and "split: 5 train / 1 validation cases" in run.stdout
    # no terminal: one progress line per epoch on stderr, with the loss and the validation figures
    lines = [x for x in run.stderr.splitlines() if x.startswith("epoch ")]
    assert [x.split(" [")[0] for x in lines] == ["epoch 1/2", "epoch 2/2"], run.stderr
    assert all(" loss " in x and " val_loss " in x and " val_auc " in x for x in lines)
    assert "\r" not in run.stderr
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert f"val_loss {log[0]['val_loss']:.4f}" in lines[0]

    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "knee.acl" and card["training_data"].startswith(f"images:{root}: 5 training cases")
    assert card["recipe"]["data"] == f"images:{root}" and "last 15%" in card["recipe"]["split"]
    assert [e["epoch"] for e in card["epochs"]] == [0, 1]
    assert card["epochs"][1]["val_loss"] == log[1]["val_loss"]
    assert card["metrics"]["wall_time_s"] > 0 and card["metrics"]["epoch_seconds_total"] >= 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["split"]["validation_cases"] == ["mat_b"]
    md = (out / "MODEL_CARD.md").read_text()
    assert "### Per epoch" in md and f"images:{root}" in md and "| wall_time_s |" in md

    ev = msknode(
        "evaluate", "knee.acl", "--data", f"images:{root}", "--weights", str(out / "model.pt"), "--json",
        "--bootstrap", "50",
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["n"] == 6 and result["data"] == f"images:{root}"
    assert result["auc"] is not None and 0.0 <= result["auc"] <= 1.0
    assert "sensitivity" in result and "specificity" in result


def test_a_killed_run_resumes_where_its_checkpoint_left_off(images_root, tmp_path, msknode):
    """Killed once its first checkpoint is written; the resumed run trains only the epochs after it."""
    root, _ = images_root
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "node.cli", "train", "knee.acl", "--data", f"images:{root}", "--out", str(out)]
    cmd += ["--epochs", str(RESUME_EPOCHS), "--batch-size", "2", "--patch-steps", "0"]
    env = {**os.environ, "MSKNODE_TORCH_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt.sha256").is_file():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # as a lost machine: no clean-up
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists()
    done_before = [json.loads(x)["epoch"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert done_before and done_before[-1] < RESUME_EPOCHS - 1

    run = msknode(*cmd[3:])  # the same command again
    assert run.returncode == 0, run.stderr
    resumed = [x for x in run.stdout.splitlines() if x.startswith("resumed from")]
    assert len(resumed) == 1, run.stdout
    start = int(resumed[0].rsplit(" ", 1)[1])
    assert 1 <= start <= done_before[-1] + 1
    # the log holds every epoch once; only the epochs after the checkpoint ran again
    log = [json.loads(x)["epoch"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(RESUME_EPOCHS))
    progress = [x for x in run.stderr.splitlines() if x.startswith("epoch ")]
    assert progress[0].startswith(f"epoch {start + 1}/{RESUME_EPOCHS} ") and len(progress) == RESUME_EPOCHS - start
    card = json.loads((out / "card.json").read_text())
    assert card["metrics"]["resumed_at_epoch"] == start and len(card["epochs"]) == RESUME_EPOCHS


def test_progress_bar_redraws_in_place_on_a_terminal_and_log_lines_do_not_tear_it():
    import io

    from models.training import ProgressBar

    term, out = io.StringIO(), io.StringIO()
    bar = ProgressBar(term, tty=True, width=10, min_interval=0.0)
    for b in (1, 2):
        bar({"event": "step", "epoch": 0, "epochs": 3, "batch": b, "batches": 2, "loss": 0.5 * b})
    bar.write('{"epoch": 0}', out)
    bar({"event": "epoch", "epoch": 0, "epochs": 3, "batches": 2, "loss": 0.75, "val_loss": 0.61, "val_auc": 0.8,
         "seconds": 1.25})  # fmt: skip
    assert term.getvalue() == (
        "\repoch 1/3 [#####.....] 1/2 loss 0.5000"
        "\repoch 1/3 [##########] 2/2 loss 1.0000"
        "\r\033[K"
        "\r\033[Kepoch 1/3 [##########] 2/2 loss 0.7500 val_loss 0.6100 val_auc 0.800 1.2 s\n"
    )
    assert out.getvalue() == '{"epoch": 0}\n'
    # no terminal: the steps draw nothing, the epoch is one plain line
    log = io.StringIO()
    plain = ProgressBar(log, tty=False)
    plain({"event": "step", "epoch": 1, "epochs": 3, "batch": 1, "batches": 2, "loss": 0.5})
    plain({"event": "epoch", "epoch": 1, "epochs": 3, "batches": 2, "loss": 0.5, "val_loss": 0.4, "val_auc": None,
           "seconds": 2.0})  # fmt: skip
    assert log.getvalue() == "epoch 2/3 [########################] 2/2 loss 0.5000 val_loss 0.4000 val_auc - 2.0 s\n"
