"""``msknode evaluate lumbar_spine.discs --data spider:PATH --json`` on a folder of other patients in the
SPIDER layout (every key, sane values, the levels named from the image alone), and a short
``msknode train lumbar_spine.discs --data spider:PATH`` that writes its card and resumes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from support.spine_corpus import spider_root

pytestmark = [pytest.mark.slow]

KEYS = (
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


def copy_patients(src: Path, dst: Path, ids: set[str]) -> Path:
    """The files and table rows of ``ids`` in a new SPIDER-layout folder."""
    for sub in ("midsagittal_images", "disc_crops"):
        (dst / sub).mkdir(parents=True)
        for p in (src / sub).iterdir():
            if p.name.split("_")[0] in ids:
                shutil.copy(p, dst / sub / p.name)
    for name, key in (("radiological_gradings.csv", "Patient"), ("overview.csv", "new_file_name")):
        with open(src / name, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = [r for r in reader if r[key].split("_")[0].strip() in ids]
            fields = reader.fieldnames
        assert fields is not None
        with open(dst / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fields)
            w.writeheader()
            w.writerows(rows)
    return dst


@pytest.fixture
def run(settings, capsys):
    """``msknode ARGS`` through its entry point (`node.cli.main`) in the test's process, on the test's data
    directory: (exit status, stdout, stderr). A process per command would only add the model registry's import
    time."""
    from node.cli import main

    def _run(args: list[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = main(args)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["msknode", *args], rc, out, err)

    return _run


def test_evaluate_json_on_another_set_of_patients(tmp_path, run):
    from models.registry import Registry

    if not Registry().has_weights("lumbar_spine.discs"):
        pytest.skip("no lumbar_spine.discs weights installed")
    # held-out test patients (CRC32 split) of the corpus, two with a herniated disc, one without crops
    ids = {"4", "9", "15", "30", "56"}
    folder = copy_patients(spider_root(), tmp_path / "other_site", ids)
    res = run(["evaluate", "lumbar_spine.discs", "--data", f"spider:{folder}", "--json", "--bootstrap", "200"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for k in KEYS:
        assert k in out, k
    assert out["n_patients"] == 5
    assert 20 <= out["n_discs"] <= 25  # five lumbar discs each, located from the image alone
    assert 0.0 <= out["pfirrmann_accuracy"] <= out["pfirrmann_within_one"] <= 1.0
    assert out["pfirrmann_within_one"] >= 0.6
    lo, hi = out["pfirrmann_kappa_linear_ci"]
    assert -1.0 <= lo <= out["pfirrmann_kappa_linear"] <= hi <= 1.0
    assert 0.0 <= out["herniation_auc"] <= 1.0
    assert 0.0 <= out["herniation_sensitivity"] <= 1.0 and 0.0 <= out["herniation_specificity"] <= 1.0
    assert 0.0 <= out["ece"] <= 1.0
    assert sum(map(sum, out["pfirrmann_confusion"])) == out["n_discs"]
    # the crops of these patients score the localisation: the levels are named right
    loc = out["localisation"]
    assert loc["n_series"] >= 3 and loc["level_named_within_15mm"] >= 0.8, loc


def test_train_writes_a_card_and_resumes(tmp_path, run):
    # three training patients with crops, one validation and one held-out test patient (CRC32 split)
    folder = copy_patients(spider_root(), tmp_path / "few", {"6", "12", "17", "7", "9"})
    out = tmp_path / "run"
    args = ["train", "lumbar_spine.discs", "--data", f"spider:{folder}", "--out", str(out), "--epochs", "1"]
    first = run(args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "patients: 5 (train 3, validation 1, held-out test 1)" in first.stdout
    assert "localiser epoch 1/1: loss" in first.stdout and "validation levels named" in first.stdout
    assert "grader epoch 1/1: loss" in first.stdout and "validation kappa" in first.stdout
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "lumbar_spine.discs" and card["demo_weights"] is False
    assert "CC BY 4.0" in card["licence"] and "Scientific Data 11:264" in card["licence"]
    assert "not for diagnostic use" in card["notice"].lower()
    assert "5 patients" in card["training_data"]
    assert card["metrics"]["training_time_s"] > 0 and card["metrics"]["n_patients"] == 1
    assert [e["phase"] for e in card["recipe"]["epochs_log"]] == ["localiser", "grader"]
    assert (out / "MODEL_CARD.md").read_text().count("Not for diagnostic use") >= 1
    from models.protocol import sha256_of

    assert card["weights_sha256"] == sha256_of(out / "model.pt")
    # the same command again resumes after the last finished epoch: nothing is trained twice
    (out / "card.json").unlink()
    again = run(args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout
    assert "localiser epoch" not in again.stdout and "grader epoch" not in again.stdout
    assert json.loads((out / "card.json").read_text())["recipe"]["epochs_log"] == card["recipe"]["epochs_log"]
