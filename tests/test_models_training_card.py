"""What `msknode train` leaves beside the weights for a site ML engineer: a model card written from what training
knows (shown by `models list` from a site weights folder), the split printed and recorded case by case in
recipe.json, and a warning when validation lacks a class."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def msknode(settings, capsys, monkeypatch):
    """``msknode ARGS`` through its entry point (`node.cli.main`) in the test's process, on the test's data
    directory, with ``env`` (MSKNODE_* settings) set for the call: a CompletedProcess with the exit status, stdout
    and stderr. A process per command would only add the model registry's import time."""
    from node.cli import main

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, v)
            capsys.readouterr()
            rc = main(list(args))
            out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["msknode", *args], rc, out, err)

    return run


def test_train_writes_card_and_split_record_and_models_list_shows_them(tmp_path, msknode):
    out = tmp_path / "weights" / "knee.acl"
    run = msknode(
        "train",
        "knee.acl",
        "--data",
        "synthetic:8:881500",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--patch-steps",
        "0",
    )
    assert run.returncode == 0, run.stderr
    # the split is printed, and a validation set without every class is warned about
    assert "split: 7 train / 1 validation cases" in run.stdout
    assert "WARNING: no validation case of" in run.stdout
    assert "WARNING: only 1 validation cases" in run.stdout

    recipe = json.loads((out / "recipe.json").read_text())
    split = recipe["split"]
    assert split["n_train"] == 7 and split["n_validation"] == 1
    assert len(split["train_cases"]) == 7 and len(split["validation_cases"]) == 1
    assert not set(split["train_cases"]) & set(split["validation_cases"])
    assert sum(split["label_counts"]["validation"]["acl"].values()) == 1
    assert any("no validation case of acl" in w for w in split["warnings"])

    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "knee.acl" and card["demo_weights"] is False
    assert card["weights_sha256"] == (out / "model.pt.sha256").read_text().split()[0]
    assert "synthetic:8:881500" in card["training_data"] and "7 training cases" in card["training_data"]
    assert card["metrics"]["n_validation"] == 1 and card["metrics"]["validation_auc"] is None  # one class: no AUC
    assert any("no validation case of acl" in x for x in card["limitations"])
    assert "not for diagnostic use" in card["notice"].lower()
    assert "phantom" not in card["notice"].lower()
    md = (out / "MODEL_CARD.md").read_text()
    assert "Demo weights" not in md and "synthetic:8:881500" in md and "msknode train knee.acl" in md
    summary = json.loads((out / "train_summary.json").read_text())  # strict JSON: no NaN
    assert summary["val_auc"] is None

    # the site's weights folder: models list shows the site card, not the shipped one
    listed = msknode("models", "list", "--json", env={"MSKNODE_WEIGHTS_DIR": str(tmp_path / "weights")})
    assert listed.returncode == 0, listed.stderr
    acl = next(c for c in json.loads(listed.stdout) if c["name"] == "knee.acl")
    assert acl["weights_sha256"] == card["weights_sha256"]
    assert acl["training_data"] == card["training_data"]
    assert acl["demo_weights"] is False
    text = msknode("models", "list", env={"MSKNODE_WEIGHTS_DIR": str(tmp_path / "weights")})
    assert "7 training cases" in text.stdout


def test_evaluate_on_a_handful_of_cases_warns_and_prints_text_not_reprs(msknode):
    run = msknode("evaluate", "knee.acl", "--data", "synthetic:4:5990000", "--bootstrap", "50")
    assert run.returncode == 0, run.stderr
    assert "WARNING: only 4 cases" in run.stdout
    assert "{" not in run.stdout and "'" not in run.stdout
    js = msknode("evaluate", "knee.acl", "--data", "synthetic:4:5990000", "--bootstrap", "50", "--json")
    result = json.loads(js.stdout.strip().splitlines()[-1])
    assert any("only 4 cases" in w for w in result["warnings"])
