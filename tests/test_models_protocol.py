"""The model protocol (`models.protocol`): one verified load for every model, one atomic save, every shipped
model loading through the one entry, inference apart from training, `models` never importing `node`."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import protocol
from models.classifier import ClassifierModel
from models.errors import WeightsIntegrityError, WeightsMissingError
from models.protocol import load_checkpoint, read_sha256_file, save_checkpoint, sha256_of, sha256_path
from models.registry import ENTRIES, REPO_WEIGHTS, Registry
from models.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _shipped_weights() -> list[Path]:
    return sorted(p for p in REPO_WEIGHTS.glob("*/*.pt"))


def _copy_shipped(tmp_path: Path, name: str) -> Path:
    src = REPO_WEIGHTS / name / ENTRIES[name].weights_file
    dst = tmp_path / name / src.name
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    shutil.copy(sha256_path(src), sha256_path(dst))
    return dst


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- load: verified before anything is deserialised ------------------------------------------------


@pytest.mark.parametrize("name", ["knee.acl", "superres", "qc.anatomy"])
def test_a_tampered_weights_file_is_refused_before_it_is_deserialised(tmp_path, monkeypatch, name):
    path = _copy_shipped(tmp_path, name)
    _flip_a_byte(path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a tampered file reached torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(WeightsIntegrityError) as exc:
        protocol.load(path)
    message = str(exc.value)
    assert "integrity check" in message and "sha256 mismatch" in message and str(path) in message
    assert read_sha256_file(sha256_path(path)) in message and sha256_of(path) in message
    with pytest.raises(WeightsIntegrityError, match="sha256 mismatch"):
        load_checkpoint(path)


def test_model_classes_refuse_tampered_weights_through_the_same_check(tmp_path):
    from models.superres import SuperResError, SuperResModel

    acl = _copy_shipped(tmp_path, "knee.acl")
    _flip_a_byte(acl)
    with pytest.raises(WeightsIntegrityError, match="sha256 mismatch"):
        ClassifierModel.load(acl, TASKS["knee.acl"])
    sr = _copy_shipped(tmp_path, "superres")
    _flip_a_byte(sr)
    with pytest.raises(SuperResError, match="sha256 mismatch"):
        SuperResModel.load(sr)
    # a hash given by the caller is checked the same way
    with pytest.raises(WeightsIntegrityError, match="the caller records"):
        load_checkpoint(acl, "0" * 64)


def test_weights_without_a_recorded_hash_or_with_a_disagreeing_card_are_refused(tmp_path):
    path = _copy_shipped(tmp_path, "knee.acl")
    sha256_path(path).unlink()
    with pytest.raises(WeightsMissingError, match="refusing unverified weights"):
        protocol.load(path)
    with pytest.raises(WeightsMissingError, match="not found"):
        protocol.load(tmp_path / "nowhere" / "model.pt")
    path = _copy_shipped(tmp_path / "b", "knee.acl")
    (path.parent / "card.json").write_text(json.dumps({"weights_file": "model.pt", "weights_sha256": "ab" * 32}))
    with pytest.raises(WeightsIntegrityError, match="model card"):
        protocol.load(path)
    # a card about another file does not apply
    (path.parent / "card.json").write_text(json.dumps({"weights_file": "other.pt", "weights_sha256": "ab" * 32}))
    assert protocol.load(path).info.weights_sha256 == sha256_of(path)


# --- save: atomic, hash recorded -------------------------------------------------------------------


def test_save_writes_the_file_and_its_hash(tmp_path):
    path = tmp_path / "deep" / "w.pt"
    digest = save_checkpoint({"format": "test/1", "x": torch.arange(4)}, path)
    assert digest == sha256_of(path) == read_sha256_file(sha256_path(path))
    assert sha256_path(path).read_text() == f"{digest}  w.pt\n"
    ck = load_checkpoint(path)
    assert ck.sha256 == digest and torch.equal(ck.data["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.pt", "w.pt.sha256"]


def test_an_interrupted_save_leaves_the_previous_weights_intact(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    old = save_checkpoint({"format": "test/1", "x": torch.ones(3)}, path)
    before = (path.read_bytes(), sha256_path(path).read_bytes())

    # serialisation fails half way (an object that cannot be pickled)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # torch raises either
        save_checkpoint({"format": "test/1", "x": torch.zeros(3), "bad": lambda: None}, path)
    assert (path.read_bytes(), sha256_path(path).read_bytes()) == before

    # the process dies while the new file is being written
    real_fsync = protocol.os.fsync

    def dying_fsync(fd):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(protocol.os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format": "test/1", "x": torch.zeros(3)}, path)
    monkeypatch.setattr(protocol.os, "fsync", real_fsync)
    assert (path.read_bytes(), sha256_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt", "w.pt.sha256"]  # no temporary file left
    assert load_checkpoint(path).sha256 == old


def test_a_model_save_that_fails_keeps_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    path = _copy_shipped(tmp_path, "knee.acl")
    model = ClassifierModel.load(path, TASKS["knee.acl"])
    before = path.read_bytes()
    monkeypatch.setattr(ClassifierModel, "state", lambda self: {"format": "x", "oops": lambda: None})
    with pytest.raises((pickle.PicklingError, AttributeError)):  # torch raises either
        model.save(path)
    assert path.read_bytes() == before
    assert ClassifierModel.load(path, TASKS["knee.acl"]).info.weights_sha256 == sha256_of(path)


# --- every shipped model through the one entry -------------------------------------------------------


def test_every_shipped_model_loads_through_the_one_entry():
    shipped = _shipped_weights()
    assert {p.parent.name for p in shipped} == set(ENTRIES), "a registry entry without weights, or weights without one"
    for path in shipped:
        recorded = read_sha256_file(sha256_path(path))
        model = protocol.load(path)
        sha = model.info.weights_sha256 if hasattr(model, "info") else model.sha256
        assert sha == recorded == sha256_of(path), path
        # and the registry goes through the same entry
        assert ENTRIES[path.parent.name].weights_file == path.name


def test_registry_loads_every_model_with_the_protocol(monkeypatch):
    seen = []
    real = protocol.load

    def spy(path, **kw):
        seen.append(Path(path).parent.name)
        return real(path, **kw)

    monkeypatch.setattr(protocol, "load", spy)
    reg = Registry()
    for name in sorted(ENTRIES):
        reg.get(name)
    assert sorted(set(seen)) == sorted(ENTRIES)


def _calls(tree: ast.AST, dotted: str) -> list[int]:
    mod, attr = dotted.split(".")
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == attr
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == mod
    ]


def test_weights_are_read_and_written_only_by_the_protocol():
    exempt = {"models/protocol.py"}
    bad = []
    for path in sorted(MODELS.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in exempt:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bad += [f"{rel}:{n} torch.{f}" for f in ("load", "save") for n in _calls(tree, f"torch.{f}")]
    assert not bad, bad


# --- import direction ----------------------------------------------------------------------------------


@pytest.mark.integration  # a fresh interpreter
def test_models_never_imports_node_when_every_module_is_imported():
    code = (
        "import importlib, pkgutil, sys, models\n"
        "names = [m.name for m in pkgutil.walk_packages(models.__path__, 'models.') if not m.name.endswith('__main__')]\n"
        "for n in names: importlib.import_module(n)\n"
        "bad = sorted(k for k in sys.modules if k == 'node' or k.startswith('node.'))\n"
        "print(len(names), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


@pytest.mark.integration  # a fresh interpreter
def test_inference_loads_no_training_code():
    """The node's path (registry -> every model -> pipeline) imports neither training loops nor data layers."""
    code = (
        "import sys\n"
        "from models.registry import ENTRIES, Registry\n"
        "import models.pipelines\n"
        "r = Registry()\n"
        "for n in ENTRIES: r.get(n)\n"
        "print(sorted(k for k in sys.modules if k.startswith('models')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = set(ast.literal_eval(r.stdout.strip().splitlines()[-1]))
    assert "models.superres.inference" in loaded and "models.classifier" in loaded
    training = {
        "models.training",
        "models.qc_training",
        "models.qc.motion_training",
        "models.superres.training",
        "models.data",
        "models.superres.data",
        "models.superres.quality",
        "models.evaluation",
        "models.labels",
    }
    assert not loaded & training, sorted(loaded & training)


# --- a TaskSpec is the inference contract; labels are the data layer's ----------------------------------


def test_task_specs_carry_no_label_mapping_and_every_task_has_one_in_the_data_layer():
    from dataclasses import fields

    from models.labels import LABELS, labels_for
    from models.tasks.base import InputSpec

    label_names = {
        "phantom_labels",
        "phantom_lesion_masks",
        "phantom_lesion_keys",
        "mrnet_columns",
        "phantom_sequences",
        "phantom_extras",
        "phantom_overrides",
        "phantom_overrides_for",
        "target_from_row",
        "target_from_phantom",
        "empty_allowed",
        "coronal_sequences",
    }
    for name, task in TASKS.items():
        assert not label_names & set(dir(task)), (name, sorted(label_names & set(dir(task))))
        assert labels_for(task).task is task
    assert not {f.name for f in fields(InputSpec)} & {"mrnet_plane", "mrnet_spacing_mm"}
    assert set(LABELS) == set(TASKS)
