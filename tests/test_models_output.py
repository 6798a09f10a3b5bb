"""What a site ML engineer reads: one weights file name for every model, readable (not Python repr) text output,
small-sample warnings beside bootstrap intervals, strict JSON without NaN."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from models.cli import readable
from models.evaluation import finite_or_none, small_sample_warnings
from models.registry import ENTRIES, REPO_WEIGHTS, Registry

pytestmark = pytest.mark.unit


def test_every_shipped_model_deploys_as_model_pt():
    for name, entry in ENTRIES.items():
        assert entry.weights_file == "model.pt", name
        folder = REPO_WEIGHTS / name
        assert (folder / "model.pt").is_file() and (folder / "model.pt.sha256").is_file(), name
        assert (folder / "model.pt.sha256").read_text().split()[1] == "model.pt", name
        assert not list(folder.glob("*.pt")) or [p.name for p in folder.glob("*.pt")] == ["model.pt"], name


def test_a_site_folder_with_the_earlier_superres_file_name_still_loads(tmp_path):
    site = tmp_path / "superres"
    site.mkdir()
    shutil.copy(REPO_WEIGHTS / "superres" / "model.pt", site / "superres.pt")
    (site / "superres.pt.sha256").write_text(
        (REPO_WEIGHTS / "superres" / "model.pt.sha256").read_text().replace("model.pt", "superres.pt")
    )
    reg = Registry(tmp_path)
    assert reg.weights_path("superres") == site / "superres.pt"
    path, sha = reg.verify("superres")
    assert path == site / "superres.pt" and len(sha) == 64


def test_readable_output_has_no_python_reprs():
    card = json.loads((REPO_WEIGHTS / "superres" / "card.json").read_text())
    text = "\n".join(
        readable(
            {
                "training_data": card["training_data"],
                "qc_reasons": {"motion": 2, "low_snr": 1},
                "auc_ci": [0.81234, 0.9],
                "ok": True,
                "none": None,
            }
        )
    )
    assert "{" not in text and "'" not in text
    assert "qc_reasons: motion 2, low_snr 1" in text
    assert "auc_ci: [0.8123, 0.9]" in text
    assert "ok: yes" in text and "none: -" in text
    assert "phantoms: 150" in text  # nested mapping, one key per line


def test_small_samples_are_warned_about():
    w = small_sample_warnings(4, positives=2, negatives=2)
    assert any("only 4 cases" in x and "[1.0, 1.0]" in x for x in w)
    assert any("only 2 positive cases" in x for x in w) and any("only 2 negative cases" in x for x in w)
    assert small_sample_warnings(200, positives=80, negatives=120) == []


def test_results_are_strict_json():
    out = finite_or_none({"auc": float("nan"), "ci": [float("nan"), 1.0], "nested": {"x": math.inf}, "n": 3})
    assert out == {"auc": None, "ci": [None, 1.0], "nested": {"x": None}, "n": 3}
    json.dumps(out, allow_nan=False)
