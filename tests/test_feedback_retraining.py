"""From radiologists' answers to a new model version in use, on knee phantom studies:

``msknode export feedback --deidentify --holdout`` (the answered studies as dicomcsv:, PS3.15 basic profile) →
``msknode train knee.acl --init registry`` (one short epoch, fine-tuned from the shipped weights; the card records
the site data) → ``msknode evaluate --compare registry`` (old and new weights on the same held-out studies) →
``msknode deployments register`` + ``activate`` (audited) → the next study through the real ``msknode listen``
and ``msknode worker`` is reported by the new version: its findings and its SR name it. The commands before the
listener and worker run through msknode's entry point in the test's process.

The answered studies are index, job and feedback rows over real phantom DICOM files (what the node holds after a
silent trial in which radiologists answered; the answering itself is tested with the feedback API).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.db.schema import Finding, ResultObject, Series
from support.env import free_port
from support.feedback_rows import PATIENT, answered_study
from support.jobs import ListenerProcess, storescu, wait_for
from support.node_stack import NodeWorker, node_env, study_job
from support.results_data import dciodvfy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NEW_VERSION = "1.1.0-site1"
#: seed -> the radiologist's ACL answer (the phantom's truth)
ANSWERS = {21: "intact", 22: "complete", 23: "partial", 24: "intact", 25: "complete", 26: "intact", 27: "complete"}


@pytest.fixture
def msknode(settings, capsys):
    """``msknode ARGS`` through its entry point (`node.cli.main`) in the test's process, on the node's data
    directory; asserts exit status 0 and returns (stdout, stderr). A process per command would only add the model
    registry's import time; the listener and worker that report the next study are processes of their own."""
    from node.cli import main

    def run(*args: str) -> tuple[str, str]:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        assert rc == 0, f"msknode {' '.join(args)}: {err[-3000:]}"
        return out, err

    return run


def test_export_train_evaluate_activate_and_the_next_sr_names_the_new_version(settings, db, tmp_path, msknode):
    from models.phantoms import generate, write_dicom_series

    for seed, answer in ANSWERS.items():
        answered_study(db, tmp_path, seed, answer)
    answered_study(db, tmp_path, 28, "medial", model="knee.meniscus")  # answers to another model: not exported
    port = free_port()
    env = node_env(
        settings,
        port,
        MSKNODE_TORCH_THREADS="2",
    )

    # 1. export: de-identified, two held-out studies
    out = tmp_path / "export"
    manifest = json.loads(
        msknode(
            "export",
            "feedback",
            "--model",
            "knee.acl",
            "--out",
            str(out),
            "--deidentify",
            "--holdout",
            "0.25",
            "--json",
        )[0]
    )
    assert manifest["studies"] == len(ANSWERS) and manifest["deidentified"]
    assert manifest["sides"]["train"]["studies"] == 5 and manifest["sides"]["holdout"]["studies"] == 2
    exported: dict[str, str] = {}
    for side in ("train", "holdout"):
        with open(out / side / "labels.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                exported[row["SeriesInstanceUID"]] = row["acl"]
    assert sorted(exported.values()) == sorted(ANSWERS.values())
    with db.session() as s:
        originals = set(s.scalars(select(Series.series_uid)))
    assert not set(exported) & originals  # UIDs replaced
    files = sorted(out.rglob("*.dcm"))
    assert len({str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}) == len(ANSWERS)
    for f in files[:: max(1, len(files) // 10)]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert PATIENT not in str(ds.get("PatientName", "")) and not str(ds.get("PatientID", "")).startswith("PID")
        assert str(ds.SeriesInstanceUID) in exported
        assert b"DOE^JANE" not in f.read_bytes()
        errors, _ = dciodvfy(f)
        assert not errors, errors  # a de-identified copy is still a valid MR object

    # 2. fine-tune from the shipped weights on the exported training studies (one short epoch)
    runs = tmp_path / "run"
    stdout, _ = msknode(
        "train",
        "knee.acl",
        "--data",
        f"dicomcsv:{out / 'train'}",
        "--init",
        "registry",
        "--out",
        str(runs),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--patch-steps",
        "0",
        "--no-augment",
    )
    assert "fine-tuning from the registry's weights" in stdout
    card = json.loads((runs / "card.json").read_text())
    assert card["site_data"]["studies"] == 5 and card["site_data"]["deidentified"] is True
    assert card["site_data"]["model"] == "knee.acl" and "Site data: 5 studies" in card["training_data"]
    assert "fine-tuned from" in card["training_data"] and "models/weights/knee.acl/model.pt" in card["training_data"]

    # 3. old and new weights on the same held-out studies
    stdout, _ = msknode(
        "evaluate",
        "knee.acl",
        "--data",
        f"dicomcsv:{out / 'holdout'}",
        "--weights",
        str(runs / "model.pt"),
        "--compare",
        "registry",
        "--bootstrap",
        "50",
        "--json",
    )
    compared = json.loads(stdout)
    assert compared["old"]["weights"] == "registry" and compared["new"]["weights"] == str(runs / "model.pt")
    assert compared["old"]["n"] == compared["new"]["n"] == 2
    assert compared["old"]["weights_sha256"] != compared["new"]["weights_sha256"]
    assert compared["warnings"]  # two held-out cases: the figures say how little they rest on

    # 4. register the new weights as a site version and activate it for the knee pipeline (audited)
    msknode("deployments", "register", "knee.acl", "--weights", str(runs), "--version", NEW_VERSION, "--by", "mlops")
    msknode("deployments", "activate", "knee.acl", "--version", NEW_VERSION, "--pipeline", "knee", "--by", "dora",
            "--reason", "held-out comparison")  # fmt: skip
    listing = json.loads(msknode("deployments", "--json")[0])
    acl = {(d["version"], d["selected"], d["state"]) for d in listing if d["model"] == "knee.acl"}
    assert (NEW_VERSION, True, "active") in acl and ("1.0.0", False, "shadow") in acl

    # 5. the next study through the real listener and worker is reported by the new version
    nxt = write_dicom_series(
        generate("knee", 31, sequence="PD_FS", orientation="sagittal", acl="complete"),
        tmp_path / "next",
        series_description="SAG PD FS",
    )
    study_uid = str(pydicom.dcmread(nxt[0], stop_before_pixels=True).StudyInstanceUID)
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    worker = None
    try:
        listener.wait_ready(port)
        worker = NodeWorker(env, tmp_path / "worker.log").start()
        assert storescu(port, nxt).wait(120) == 0

        try:
            job = wait_for(lambda: study_job(db, study_uid), 300, interval=0.5, what="the next study's job done")
        except AssertionError:
            print(worker.output()[-4000:])
            raise
    finally:
        if worker is not None:
            worker.stop(graceful=False)
        listener.stop()
    assert job.model_versions["knee.acl"]["version"] == NEW_VERSION
    assert job.model_versions["knee.acl"]["state"] == "active"
    with db.session() as s:
        rows = s.scalars(select(Finding).where(Finding.job_id == job.id, Finding.model_name == "knee.acl")).all()
        sr = s.scalars(select(ResultObject).where(ResultObject.job_id == job.id, ResultObject.kind == "sr")).one()
    assert rows and {(f.model_version, f.shadow) for f in rows} == {(NEW_VERSION, False)}
    sr_path = Path(sr.path) if Path(sr.path).is_absolute() else settings.data_dir / sr.path
    assert NEW_VERSION in str(pydicom.dcmread(sr_path))  # the algorithm identification of its findings
    errors, _ = dciodvfy(sr_path)
    assert not errors, errors
