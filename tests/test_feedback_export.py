"""``msknode export feedback`` (node.ops.feedback_export) in-process: the dicomcsv: layout `msknode train` reads,
the latest answer per finding, skipped studies with their reason, and clear errors for bad requests."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.schema import FindingFeedback, Instance, Study
from support.feedback_rows import answered_study

pytestmark = [pytest.mark.slow]  # phantom series are generated and read (seconds each)


def _labels(path):
    with open(path, newline="") as fh:
        return {r["SeriesInstanceUID"]: r for r in csv.DictReader(fh)}


def test_export_is_a_dicomcsv_set_train_reads_with_the_latest_answer(settings, db, tmp_path):
    from models.data import open_cases
    from models.tasks import TASKS
    from node.ops.feedback_export import export_feedback

    a = answered_study(db, tmp_path, 41, "complete")
    b = answered_study(db, tmp_path, 42, "intact")
    answered_study(db, tmp_path, 43, "medial", model="knee.meniscus")
    # a second reader answered study b later, with another grade: the latest answer is the label
    with db.session() as s:
        first = s.scalars(
            select(FindingFeedback).join(Study, Study.id == FindingFeedback.study_id).where(Study.study_uid == b)
        ).one()
        later = FindingFeedback(
            **{
                c.key: getattr(first, c.key)
                for c in FindingFeedback.__table__.columns
                if c.key not in ("id", "created_by", "answer", "agree", "updated_at")
            },
            created_by="rob",
            answer="partial",
            agree=False,
            updated_at=first.updated_at + dt.timedelta(minutes=5),
        )
        s.add(later)
    out = tmp_path / "out"
    manifest = export_feedback(db, settings, model="knee.acl", out=out)
    assert manifest["studies"] == 2 and not manifest["deidentified"] and manifest["holdout_rule"] is None
    assert manifest["sides"]["all"]["labels"] == {"acl": {"complete": 1, "partial": 1}}
    labels = _labels(out / "labels.csv")
    with db.session() as s:
        series = {
            st.study_uid: st.series[0].series_uid for st in s.scalars(select(Study).where(Study.study_uid.in_([a, b])))
        }
    assert {uid: r["acl"] for uid, r in labels.items()} == {series[a]: "complete", series[b]: "partial"}
    # what msknode train reads: the same series with targets on the model's head
    cases = {c.key: c for c in open_cases(f"dicomcsv:{out}", TASKS["knee.acl"])}
    assert set(cases) == set(labels)
    assert cases[series[a]].target.info["acl"] == "complete"
    assert json.loads((out / "export.json").read_text())["answered_model_versions"] == ["1.0.0"]


def test_purged_series_are_skipped_with_the_reason_and_bad_requests_fail_clearly(settings, db, tmp_path, capsys):
    from node.cli import main

    answered_study(db, tmp_path, 51, "complete")
    gone = answered_study(db, tmp_path, 52, "intact")
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == gone)).one()
        for inst in s.scalars(select(Instance).where(Instance.series_id == study.series[0].id)):
            Path(inst.path).unlink()
    out = tmp_path / "out"
    assert main(["export", "feedback", "--model", "knee.acl", "--out", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["studies"] == 1 and manifest["skipped"] == {"series files missing (purged?)": 1}

    assert main(["export", "feedback", "--model", "knee.acl", "--out", str(out)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", "feedback", "--model", "knee.nothing", "--out", str(tmp_path / "o2")]) == 1
    assert "unknown model 'knee.nothing'" in capsys.readouterr().err
    assert main(["export", "feedback", "--model", "shoulder.rotator_cuff", "--out", str(tmp_path / "o3")]) == 1
    assert "no study with a radiologist's answer to shoulder.rotator_cuff" in capsys.readouterr().err
    assert main(["export", "feedback", "--model", "knee.acl", "--out", str(tmp_path / "o4"), "--holdout", "1"]) == 1
    assert "0 <= f < 1" in capsys.readouterr().err
