"""A few training steps on each data layout (synthetic:N:SEED, mrnet:PATH[:SPLIT], dicomcsv:PATH) with small
generated data; data-spec parsing and refusals; checkpoints that load through the registry."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from models.classifier import ClassifierModel, sha256_of
from models.data import load_items, open_cases, parse_spec
from models.errors import DataSpecError
from models.labels import allowed_for
from models.phantoms import generate, write_dicom_series
from models.registry import Registry
from models.tasks import TASKS
from models.training import Recipe, allowed_nll, train

ACL = TASKS["knee.acl"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _train_and_check(spec: str, out, **kw):
    before = {k: v.clone() for k, v in ACL.build_net().state_dict().items()}
    path = train(ACL, Recipe(data=spec, epochs=1, batch_size=2, max_steps=3, threads=2, **kw), out, log=lambda m: None)
    assert path.is_file()
    assert path.with_name("model.pt.sha256").read_text().split()[0] == sha256_of(path)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and np.isfinite(log[-1]["loss"]) and log[-1]["step"] >= 1
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["data"] == spec and recipe["task"] == "knee.acl"
    model = ClassifierModel.load(path, ACL, sha256=sha256_of(path))
    after = model.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].dtype.is_floating_point)
    return model


def test_parse_specs():
    assert parse_spec("synthetic:200:5000000").n == 200
    s = parse_spec("mrnet:/data/MRNet-v1.0:valid")
    assert (str(s.path), s.split) == ("/data/MRNet-v1.0", "valid")
    assert parse_spec("mrnet:/data/MRNet-v1.0").split == "train"
    assert str(parse_spec("dicomcsv:/x/y").path) == "/x/y"
    for bad in ("synthetic:ten:1", "synthetic:5", "nifti:/x", "mrnet:", "plain"):
        with pytest.raises(DataSpecError):
            parse_spec(bad)


def test_binary_labels_on_a_three_class_head():
    allowed = torch.tensor([[[False, True, True]], [[True, False, False]], [[True, True, True]]])
    logits = [torch.tensor([[0.0, 2.0, 2.0], [3.0, 0.0, 0.0], [9.0, -9.0, 0.0]])]
    loss = float(allowed_nll(logits, allowed))
    p = torch.softmax(logits[0], dim=1)
    expected = -(torch.log(p[0, 1] + p[0, 2]) + torch.log(p[1, 0])) / 2  # unknown third label ignored
    assert loss == pytest.approx(float(expected), rel=1e-5)
    head = ACL.heads[0]
    assert allowed_for(head, "1").tolist() == [False, True, True]
    assert allowed_for(head, "intact").tolist() == [True, False, False]
    assert allowed_for(head, "").tolist() == [True, True, True]
    with pytest.raises(ValueError):
        allowed_for(head, "maybe")


def test_training_steps_on_synthetic_phantoms(tmp_path):
    model = _train_and_check("synthetic:4:880000", tmp_path / "syn")
    assert model.metadata["training_data"] == "synthetic:4:880000"
    # the checkpoint loads through the registry from a site folder
    site = tmp_path / "site" / "knee.acl"
    site.mkdir(parents=True)
    for name in ("model.pt", "model.pt.sha256"):
        (site / name).write_bytes((tmp_path / "syn" / name).read_bytes())
    assert Registry(tmp_path / "site").get("knee.acl").info.weights_sha256 == sha256_of(site / "model.pt")


def _mrnet_layout(root, split="train", n=4):
    """MRNet layout from small phantoms: SPLIT/{sagittal,coronal,axial}/NNNN.npy (uint8) + SPLIT-*.csv."""
    labels = {"acl": [], "meniscus": [], "abnormal": []}
    for plane in ("sagittal", "coronal", "axial"):
        (root / split / plane).mkdir(parents=True)
    for i in range(n):
        acl = "complete" if i % 2 else "intact"
        ph = generate("knee", 881000 + i, acl=acl, matrix=64, n_slices=14)
        arr = ph.volume.array
        u8 = np.clip(arr / np.percentile(arr, 99.5) * 255, 0, 255).astype(np.uint8)
        key = f"{1130 + i:04d}"
        for plane in ("sagittal", "coronal", "axial"):
            np.save(root / split / plane / f"{key}.npy", u8)
        labels["acl"].append((key, int(acl != "intact")))
        labels["meniscus"].append((key, ph.labels["meniscus_tear"]))
        labels["abnormal"].append((key, 1))
    for name, rows in labels.items():
        with open(root / f"{split}-{name}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)


def test_training_steps_on_mrnet_layout(tmp_path):
    _mrnet_layout(tmp_path / "mrnet", "valid")
    cases = list(open_cases(f"mrnet:{tmp_path / 'mrnet'}:valid", ACL))
    assert [c.key for c in cases] == ["1130", "1131", "1132", "1133"]
    assert [c.target.allowed[0].tolist() for c in cases[:2]] == [[True, False, False], [False, True, True]]
    assert cases[0].volume.shape == (14, 64, 64)
    _train_and_check(f"mrnet:{tmp_path / 'mrnet'}:valid", tmp_path / "out")
    with pytest.raises(DataSpecError, match="train-"):
        list(open_cases(f"mrnet:{tmp_path / 'mrnet'}:train", ACL))
    (tmp_path / "mrnet" / "valid" / "sagittal" / "1133.npy").unlink()
    with pytest.raises(DataSpecError, match="1133"):
        list(open_cases(f"mrnet:{tmp_path / 'mrnet'}:valid", ACL))


def _dicomcsv_layout(root, n=4):
    rows = []
    for i in range(n):
        acl = ("intact", "partial", "complete", "intact")[i % 4]
        ph = generate("knee", 882000 + i, acl=acl, matrix=64, n_slices=14)
        files = write_dicom_series(ph, root / f"series{i}")
        import pydicom

        rows.append({"SeriesInstanceUID": pydicom.dcmread(files[0]).SeriesInstanceUID, "acl": acl})
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["SeriesInstanceUID", "acl"])
        w.writeheader()
        w.writerows(rows)
    return rows


def test_training_steps_on_dicom_folder_with_labels_csv(tmp_path):
    rows = _dicomcsv_layout(tmp_path / "dc")
    items = load_items(f"dicomcsv:{tmp_path / 'dc'}", ACL)
    assert len(items) == 4 and items[0]["image"].shape == (1, *ACL.input.shape)
    _train_and_check(f"dicomcsv:{tmp_path / 'dc'}", tmp_path / "out")
    # a labelled series that is not there, and a bad label, are refused with the series named
    with open(tmp_path / "dc" / "labels.csv", "a") as fh:
        fh.write("1.2.3.4.5,complete\n")
    with pytest.raises(DataSpecError, match="not found"):
        list(open_cases(f"dicomcsv:{tmp_path / 'dc'}", ACL))
    with open(tmp_path / "dc" / "labels.csv", "w") as fh:
        fh.write(f"SeriesInstanceUID,acl\n{rows[0]['SeriesInstanceUID']},sprained\n")
    with pytest.raises(DataSpecError, match="sprained"):
        list(open_cases(f"dicomcsv:{tmp_path / 'dc'}", ACL))


def test_cli_trains_qc_anatomy_with_its_motion_detector(tmp_path, settings, capsys):
    """`msknode train qc.anatomy` trains the anatomy classifier and the motion detector into one verified file
    (msknode's entry point, `node.cli.main`, in the test's process: a process would only add the import time)."""
    from models.qc import AnatomyClassifier
    from node.cli import main

    out = tmp_path / "qc"
    args = ["train", "qc.anatomy", "--data", "synthetic:36:9900000", "--epochs", "1", "--realdata", "none",
            "--motion", "24:9900100", "--out", str(out)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        rc = main(args)
        assert rc == 0, capsys.readouterr().err[-3000:]
        path = out / "model.pt"
        clf = AnatomyClassifier.load(path)  # verified against the .sha256 file written beside it
        assert clf.motion_net is not None and clf.sha256 == sha256_of(path)
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["weights_sha256"] == sha256_of(path) and summary["motion_training_data"] == "motion:24:9900100"
        capsys.readouterr()
        rc = main(args[:-4] + ["--motion", "lots", "--out", str(tmp_path / "x")])
        assert rc != 0 and "--motion" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def _line_items(n: int, seed: int) -> list[dict]:
    """Toy network-grid items: noise, a bright blob in every item, and in every other item a one-voxel
    line (the lesion) at a random place."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        img = rng.normal(0.3, 0.05, (2, 16, 40, 64)).astype(np.float32)
        les = np.zeros((1, 16, 40, 64), np.float32)
        k, j, c = rng.integers(2, 14), rng.integers(4, 36), rng.integers(4, 50)
        img[0, k - 1 : k + 2, j - 1 : j + 2, c - 1 : c + 2] += 0.6  # a distractor in every item
        if i % 2:
            k, j, c = rng.integers(2, 14), rng.integers(4, 36), rng.integers(4, 50)
            img[0, k, j, c : c + 8] += 0.5
            les[0, k, j, c : c + 8] = 1.0
        allowed = np.zeros((1, 3), bool)
        allowed[0, 1 if i % 2 else 0] = True
        items.append(
            {"image": img.astype(np.float16), "lesion": les.astype(np.float16), "allowed": allowed, "key": str(i)}
        )
    return items


def test_patch_sampler_draws_lesion_patches_and_negatives_from_the_same_places():
    from models.training import PatchSampler

    items = _line_items(20, 1)
    sampler = PatchSampler(items, (8, 16, 16), seed=0)
    x, les, y = sampler.sample(64)
    assert x.shape == (64, 2, 8, 16, 16) and les.shape == (64, 1, 8, 16, 16)
    assert np.array_equal(y, (les.reshape(64, -1).max(axis=1) > 0.5).astype(np.float32))
    assert y[::2].all()  # every other patch is centred on a lesion of its own item
    assert 0 < y[1::2].sum() < 32  # the rest: other items at those places, or anywhere


def test_patch_pretraining_teaches_the_evidence_map_a_one_voxel_line(tmp_path):
    from models.training import binary_auc, pretrain_patches

    torch.manual_seed(0)
    task = TASKS["knee.meniscus"]
    net = task.build_net()
    train_items, test_items = _line_items(60, 2), _line_items(40, 3)

    def evidence_auc():
        net.eval()
        with torch.inference_mode():
            x = torch.stack([torch.as_tensor(it["image"].astype(np.float32)) for it in test_items])
            ev = net.evidence(net.features(x.contiguous(memory_format=torch.channels_last_3d)))
        score = ev.flatten(1).max(dim=1).values.numpy()
        return binary_auc(score, np.array([int(it["allowed"][0, 1]) for it in test_items]))

    before = evidence_auc()
    logs: list[str] = []
    recipe = Recipe(data="toy", patch_steps=150, patch_shape=(8, 16, 16), lr=3e-3, batch_size=8)
    pretrain_patches(net, train_items, task, recipe, log=logs.append)
    after = evidence_auc()
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert json.loads(logs[-1])["patch_step"] == 150
