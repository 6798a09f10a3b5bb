"""``realdir:PATH``: real series without labels through every model's QC gate (`models.realdir`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import parse_spec
from models.errors import DataSpecError
from models.realdir import export_corpus, export_public_other, read_realdir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REALDATA = Path(os.environ.get("MSKNODE_REALDATA") or ROOT.parent / "shared" / "realdata")


def _phantom(anatomy: str, seed: int, **kw):
    from models.phantoms import generate

    return generate(anatomy, seed, **kw)


def _write_stack(folder: Path, array: np.ndarray, sidecar: dict | None, *, descending_names: bool = False) -> None:
    folder.mkdir(parents=True)
    a = np.asarray(array, np.float32)
    a = np.clip(255 * (a - a.min()) / max(1e-6, float(a.max() - a.min())), 0, 255).astype(np.uint8)
    n = len(a)
    for k, sl in enumerate(a):
        number = n - k if descending_names else k + 1
        Image.fromarray(sl).save(folder / f"slice_{number}.png")
    if sidecar is not None:
        (folder / "series.json").write_text(json.dumps(sidecar))


@pytest.fixture(scope="module")
def realdir(tmp_path_factory):
    """A sagittal knee phantom as a PNG stack (marked normal), the same knee as DICOM, a lumbar array."""
    from models.phantoms.dicom import write_dicom_series

    root = tmp_path_factory.mktemp("realdir")
    knee = _phantom("knee", 4100, acl="intact")
    sp = knee.volume.spacing
    _write_stack(
        root / "site" / "knee_png",
        knee.volume.array,
        {
            "anatomy": "knee",
            "plane": "sagittal",
            "pixel_spacing_mm": [sp[1], sp[2]],
            "slice_spacing_mm": sp[0],
            "label": "normal",
            "source": "phantom stack",
        },
    )
    write_dicom_series(knee, root / "site" / "knee_dicom", series_description="pd_tse_fs_sag", body_part="KNEE")
    spine = _phantom("lumbar_spine", 4101)
    (root / "spine").mkdir()
    np.save(root / "spine" / "volume.npy", spine.volume.array)
    s = spine.volume.spacing
    (root / "spine" / "series.json").write_text(
        json.dumps(
            {"anatomy": "lumbar_spine", "plane": "sagittal", "pixel_spacing_mm": [s[1], s[2]], "slice_spacing_mm": s[0]}
        )
    )
    return root, knee


def test_read_realdir_gives_each_series_with_geometry_and_sidecar(realdir):
    root, knee = realdir
    series = {rs.key: rs for rs in read_realdir(root)}
    assert set(series) == {"site/knee_png", "site/knee_dicom", "spine"}
    png, dcm = series["site/knee_png"], series["site/knee_dicom"]
    assert png.anatomy == "knee" and png.plane == "sagittal" and png.normal and png.source == "phantom stack"
    assert dcm.anatomy == "knee" and dcm.plane == "sagittal" and not dcm.normal  # from the DICOM headers
    assert png.volume.shape == knee.volume.shape == dcm.volume.shape
    assert np.allclose(png.volume.spacing, knee.volume.spacing, atol=1e-4)
    # the stack keeps the slice order of its file names and the grey levels of its images
    corr = np.corrcoef(png.volume.array.ravel(), knee.volume.array.ravel())[0, 1]
    assert corr > 0.99
    assert series["spine"].volume.shape == _phantom("lumbar_spine", 4101).volume.shape


def test_descending_order_and_field_of_view(tmp_path):
    arr = np.stack([np.full((20, 30), k, np.float32) for k in range(5)])
    _write_stack(
        tmp_path / "s",
        arr,
        {
            "anatomy": "other:hip",
            "plane": "coronal",
            "field_of_view_mm": 300,
            "slice_spacing_mm": 4,
            "order": "descending",
        },
    )
    (rs,) = read_realdir(tmp_path)
    assert rs.anatomy_group == "other"
    assert rs.volume.spacing == (4.0, 10.0, 10.0)
    assert [float(s.mean()) for s in rs.volume.array] == sorted(
        (float(s.mean()) for s in rs.volume.array), reverse=True
    )


@pytest.mark.parametrize(
    "sidecar, message",
    [
        (None, "needs a series.json"),
        ({"anatomy": "knee", "pixel_spacing_mm": 0.5}, "plane is required"),
        ({"anatomy": "knee", "plane": "oblique", "pixel_spacing_mm": 0.5}, "plane 'oblique'"),
        ({"anatomy": "elbow", "plane": "axial", "pixel_spacing_mm": 0.5}, "other:<name>"),
        ({"anatomy": "knee", "plane": "axial"}, "pixel_spacing_mm or field_of_view_mm"),
        ({"anatomy": "knee", "plane": "axial", "pixel_spacing_mm": -1}, "out of range"),
    ],
)
def test_bad_sidecars_are_refused_with_the_reason(tmp_path, sidecar, message):
    _write_stack(tmp_path / "s", np.ones((3, 8, 8)), sidecar)
    with pytest.raises(DataSpecError, match=message):
        list(read_realdir(tmp_path))


def test_realdir_spec_is_for_evaluation_only():
    spec = parse_spec("realdir:/some/where")
    assert spec.kind == "realdir" and str(spec) == "realdir:/some/where"
    from models.data import open_cases
    from models.tasks import TASKS

    with pytest.raises(DataSpecError, match="evaluation only"):
        next(open_cases(spec, TASKS["knee.acl"]))


@pytest.fixture
def evaluate(settings, capsys):
    """``msknode evaluate MODEL --data DATA --json`` through msknode's entry point (`node.cli.main`) in the test's
    process: a CompletedProcess with the exit status, stdout and stderr. A process per command would only add the
    model registry's import time."""
    from node.cli import main

    def run(model: str, data: str) -> subprocess.CompletedProcess:
        args = ["evaluate", model, "--data", data, "--json"]
        capsys.readouterr()
        rc = main(args)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["msknode", *args], rc, out, err)

    return run


def test_cli_evaluate_realdir_reports_qc_outputs_and_false_positive_rate(realdir, evaluate):
    root, _ = realdir
    r = evaluate("knee.acl", f"realdir:{root}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["model"] == "knee.acl" and out["n"] == 3
    assert out["qc_accepted"] + out["qc_refused"] == 3
    by_key = {s["key"]: s for s in out["series"]}
    # the spine is not a knee: refused by the gate, whatever the pixels
    assert not by_key["spine"]["accepted"]
    # both knees are the same phantom: accepted, and scored alike whether read from PNG or DICOM
    assert by_key["site/knee_png"]["accepted"] and by_key["site/knee_dicom"]["accepted"], out["series"]
    assert abs(by_key["site/knee_png"]["p_finding"] - by_key["site/knee_dicom"]["p_finding"]) < 0.15
    assert out["by_anatomy"]["knee"]["accepted_rate"] == 1.0
    assert out["normal_accepted"] == 1
    assert out["false_positive_rate"] in (0.0, 1.0)
    assert out["p_finding"]["min"] <= out["p_finding"]["median"] <= out["p_finding"]["max"]


def test_cli_evaluate_realdir_grading_model_and_superres(realdir, evaluate):
    root, _ = realdir
    r = evaluate("lumbar_spine.stenosis", f"realdir:{root}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["by_anatomy"]["lumbar_spine"]["n"] == 1
    assert set(out["predicted_classes"]) and all(
        sum(v.values()) == out["qc_accepted"] for v in out["predicted_classes"].values()
    )
    r = evaluate("superres", f"realdir:{root}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["n"] == 3 and out["qc_accepted"] >= 1 and out["consistency_passed_rate"] is not None


def test_cli_evaluate_realdir_bad_folder_exits_with_a_message(tmp_path, evaluate):
    r = evaluate("knee.acl", f"realdir:{tmp_path / 'missing'}")
    assert r.returncode == 2 and "does not exist" in r.stderr
    _write_stack(tmp_path / "s", np.ones((3, 8, 8)), None)
    r = evaluate("knee.acl", f"realdir:{tmp_path}")
    assert r.returncode == 2 and "series.json" in r.stderr


def test_export_public_other_writes_the_brain_in_three_planes(tmp_path):
    keys = export_public_other(tmp_path)
    assert len(keys) == 3
    series = {rs.plane: rs for rs in read_realdir(tmp_path)}
    assert set(series) == {"sagittal", "coronal", "axial"}
    assert all(rs.anatomy == "other:brain" and rs.volume.shape[0] >= 30 for rs in series.values())


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"the real-data corpus is not present at {REALDATA}")
def test_export_corpus_links_every_series_without_copying(tmp_path):
    keys = export_corpus(REALDATA, tmp_path)
    groups = {k.split("/")[0] for k in keys}
    assert groups == {"stacks", "dicom", "lumbar_volumes"}
    assert (
        sum(k.startswith("stacks/") for k in keys) == 14
    )  # knee 4, shoulder 4, elbow 3, hip 3 (figure panels left out)
    assert sum(k.startswith("lumbar_volumes/") for k in keys) == 28
    stack = tmp_path / "stacks" / "normal-knee-sagittal"
    assert all(p.is_symlink() for p in stack.glob("*.jpg"))
    # read back: every stack and DICOM series and the first lumbar volume (the other 27 are the same format;
    # reading them all only repeated that load)
    lumbar = sorted(p for p in (tmp_path / "lumbar_volumes").iterdir() if p.is_dir())
    assert len(lumbar) == 28
    for folder in lumbar[1:]:
        shutil.rmtree(folder)
    series = {rs.key: rs for rs in read_realdir(tmp_path)}
    assert len(series) == len(keys) - 27
    first = series[f"lumbar_volumes/{lumbar[0].name}"]
    assert first.anatomy == "lumbar_spine" and first.plane == "sagittal" and first.volume.shape[0] >= 30
    assert series["dicom/siemens_knee_sagittal"].anatomy == "knee"
    assert series["dicom/siemens_knee_sagittal"].plane == "sagittal"
    assert series["stacks/normal-hip-coronal"].anatomy == "other:hip"
    assert series["stacks/normal-knee-axial"].volume.shape[0] == 28


def test_record_real_data_in_generated_and_hand_written_cards(tmp_path):
    import shutil

    from models.cards import markdown, record_real_data
    from models.registry import REPO_WEIGHTS

    result = {
        "n": 4,
        "qc_accepted": 3,
        "qc_refused": 1,
        "qc_reasons": {"wrong_anatomy": 1},
        "positive_rate": 0.25,
        "false_positive_rate": 0.0,
        "weights_sha256": "ab" * 32,
        "series": [{"key": "x"}],
        "by_source": {"site": {"n": 4, "qc_accepted": 3, "qc_refused": 1, "qc_reasons": {"wrong_anatomy": 1}}},
    }
    for name in ("knee.acl", "superres"):
        folder = tmp_path / name
        shutil.copytree(REPO_WEIGHTS / name, folder, ignore=shutil.ignore_patterns("*.pt"))
        before = (folder / "MODEL_CARD.md").read_text()
        card = record_real_data(folder, result, data="four real series", command="msknode evaluate x")
        assert "series" not in card["real_data"]["figures"]
        stored = json.loads((folder / "card.json").read_text())
        assert stored["real_data"]["figures"]["false_positive_rate"] == 0.0
        md = (folder / "MODEL_CARD.md").read_text()
        assert "## On real scans (no labels)" in md and "| site | 4 | 3 | 1 (wrong_anatomy 1) |" in md
        assert md.count("## On real scans") == 1
        if name == "knee.acl":
            assert md == markdown(stored)
        else:
            assert md.startswith(before.split("## On real scans")[0].rstrip("\n"))
        record_real_data(folder, {**result, "n": 5}, data="five", command="c")  # replaced, not appended
        assert (folder / "MODEL_CARD.md").read_text().count("## On real scans") == 1
