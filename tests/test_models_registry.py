"""Model registry: weights verified against their sha256 before use; corrupted or unverified weights refused
(API and CLI); site folder searched before the repository; model cards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from models.classifier import ClassifierModel, build_net, sha256_of
from models.errors import UnknownModelError, WeightsIntegrityError, WeightsMissingError
from models.registry import REPO_WEIGHTS, Registry
from models.tasks import TASKS
from models.types import NOT_FOR_DIAGNOSTIC_USE, ModelInfo
from support.cli import msknode


def _site_weights(root: Path, *, seed: int = 0, version_note: str = "site") -> Path:
    """A freshly initialised knee.acl checkpoint in a site weights folder."""
    task = TASKS["knee.acl"]
    torch.manual_seed(seed)
    model = ClassifierModel(
        task=task,
        net=build_net(task).eval(),
        info=ModelInfo("knee.acl", "site", "", task.kind, task.anatomy),
        metadata={"version": f"1.0.0-{version_note}"},
    )
    path = root / "knee.acl" / "model.pt"
    model.save(path)
    return path


def test_site_weights_load_verified_and_take_precedence(tmp_path):
    path = _site_weights(tmp_path)
    reg = Registry(tmp_path)
    assert reg.weights_path("knee.acl") == path
    model = reg.get("knee.acl")
    assert model.info.weights_sha256 == sha256_of(path)
    assert model.info.version == "1.0.0-site"
    assert reg.get("knee.acl") is model  # loaded once per registry


def test_corrupted_weights_are_refused(tmp_path):
    path = _site_weights(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    reg = Registry(tmp_path)
    with pytest.raises(WeightsIntegrityError, match="integrity check") as exc:
        reg.get("knee.acl")
    assert str(path) in str(exc.value)
    card = next(c for c in reg.list() if c["name"] == "knee.acl")
    assert card["status"] == "refused" and card["weights_sha256"] is None


def test_replaced_weights_with_stale_hash_are_refused(tmp_path):
    path = _site_weights(tmp_path, seed=0)
    recorded = path.with_name("model.pt.sha256").read_text()
    _site_weights(tmp_path, seed=1)  # other weights, then the old hash put back
    path.with_name("model.pt.sha256").write_text(recorded)
    with pytest.raises(WeightsIntegrityError):
        Registry(tmp_path).get("knee.acl")


def test_weights_without_recorded_hash_are_refused(tmp_path):
    path = _site_weights(tmp_path)
    path.with_name("model.pt.sha256").unlink()
    with pytest.raises(WeightsMissingError, match="refusing unverified weights"):
        Registry(tmp_path).get("knee.acl")


def test_unknown_model_and_missing_weights(tmp_path):
    reg = Registry(tmp_path, include_repo=False)
    with pytest.raises(UnknownModelError, match=r"unknown model 'knee\.pcl'"):
        reg.get("knee.pcl")
    with pytest.raises(WeightsMissingError, match=r"no weights for 'knee\.acl'"):
        reg.get("knee.acl")


def test_shipped_cards_list_hash_and_notice():
    cards = {c["name"]: c for c in Registry().list()}
    assert {"knee.acl", "superres", "qc.anatomy"} <= set(cards)
    acl = cards["knee.acl"]
    assert acl["status"] == "verified"
    assert acl["weights_sha256"] == sha256_of(REPO_WEIGHTS / "knee.acl" / "model.pt")
    assert acl["task"] == "binary" and acl["anatomy"] == "knee"
    assert acl["input"]["roles"] == ["sag_fluid", "sag_pd"]
    assert acl["notice"] == NOT_FOR_DIAGNOSTIC_USE
    assert "phantoms" in acl["training_data"].lower()
    assert {"auc", "auc_ci", "ece", "saliency_hit_rate", "shortcut_auc"} <= set(acl["metrics"])
    assert "not for diagnostic use" in (REPO_WEIGHTS / "knee.acl" / "MODEL_CARD.md").read_text().lower()


def test_cli_models_list_json_and_refusal_of_corrupted_site_weights(tmp_path, capsys):
    def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k.startswith("MSKNODE_")}
        return msknode(capsys, *args, **{**env, **(env_extra or {})})

    res = _cli("models", "list", "--json")
    assert res.returncode == 0, res.stderr
    names = {c["name"] for c in json.loads(res.stdout)}
    assert "knee.acl" in names

    site = tmp_path / "site"
    shutil.copytree(REPO_WEIGHTS / "knee.acl", site / "knee.acl")
    w = site / "knee.acl" / "model.pt"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    res = _cli(
        "evaluate",
        "knee.acl",
        "--data",
        "synthetic:2:123",
        "--json",
        env_extra={"MSKNODE_WEIGHTS_DIR": str(site), "MSKNODE_DATA_DIR": str(tmp_path / "data")},
    )
    assert res.returncode == 3
    assert "integrity check" in res.stderr and res.stdout.strip() == ""
