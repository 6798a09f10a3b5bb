"""A real lumbar spine MRI through the whole node: storescu -> ``msknode listen`` -> ``msknode worker``
(routing, QC gate, ``lumbar_spine.stenosis`` and ``lumbar_spine.discs``, SR, SEG) -> a real Orthanc PACS,
and the study page in Chromium.

The series is built at test time from the real-MRI corpus (``lumbar_spine/segmented_volumes``, a
T2 TSE exam of Chu et al., PLoS ONE 2015, resampled to 1 mm isotropic by its source): one sagittal
MR image per left-right slice, with the geometry of the array (``I[row, col, k]``: row 0 superior,
column 0 anterior, 1 mm) and what a scanner writes for a sagittal T2 TSE: nothing more (no
vendor, no scanner model; those are not known). It is never stored in the repository. Without the
corpus the test is skipped with the reason.

Asserted: the SR that reached Orthanc holds the stenosis group of every graded level and one
group per located disc with its Pfirrmann grade and herniation call (when the discs model's
weights are installed), is dciodvfy clean, and the study page shows the per-level table; a SEG of
the vertebral levels is checked once the levels model is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from selenium.webdriver.common.by import By
from sqlalchemy import select

from support import web_seed as ws
from support.browser import ADMIN, READER, login, shot, wait, web_server
from support.env import free_port
from support.jobs import ListenerProcess, storescu, wait_for
from support.node_stack import NodeWorker, node_env, study_job
from support.results_data import assert_valid, measurement_groups
from support.spine_series import write_sagittal_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VOLUME = "lumbar_spine/segmented_volumes/VB2/06.npz"
LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")


def real_volume() -> Path:
    from models.realdata import realdata_root

    root = realdata_root()
    path = root / VOLUME if root is not None else None
    if path is None or not path.is_file():
        pytest.skip(f"the real MRI corpus (../shared/realdata or MSKNODE_REALDATA) has no {VOLUME}")
    return path


def _orthanc_objects(orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Modality -> data sets of what Orthanc holds of the study besides the source MR series."""
    from io import BytesIO

    out: dict[str, list[pydicom.Dataset]] = {}
    for sops in orthanc.study_series(study_uid).values():
        for sop in sops:
            oid = orthanc.lookup(sop, "Instance")
            ds = pydicom.dcmread(BytesIO(orthanc.get_bytes(f"/instances/{oid}/file")))
            if ds.Modality in ("SR", "SEG"):
                out.setdefault(str(ds.Modality), []).append(ds)
    return out


def _value(group, suffix):
    vals = [v for p, _t, v in group if p.endswith(suffix)]
    return vals[0] if vals else None


def _level(group) -> str | None:
    return next((str(v) for p, _t, v in group if p.endswith("/Finding Site") and str(v).startswith("Level")), None)


def test_a_real_lumbar_series_reaches_the_pacs_and_the_study_page(settings, db, orthanc, browser, tmp_path):
    npz = real_volume()
    study_uid, paths = write_sagittal_series(
        npz, tmp_path / "series", patient_name="LUMBAR^REAL", patient_id="LSPINE-REAL-06", accession="ACC-LS-06"
    )
    for path in (paths[0], paths[len(paths) // 2]):
        assert_valid(path, "the real series as written for the test")
    from models.pipelines import PIPELINES

    # the models the lumbar pipeline runs: those whose weights ship (models.pipelines decides, as in the worker)
    spec = PIPELINES["lumbar_spine"]
    discs_installed = "lumbar_spine.discs" in spec.models
    levels_installed = spec.levels == "lumbar_spine.levels"
    print("lumbar pipeline:", spec.models, "levels:", spec.levels)
    port = free_port()
    destination = {"type": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    env = node_env(
        settings,
        port,
        MSKNODE_LISTENER_PROCESSES="1",
        MSKNODE_ACTIVATE_MODELS="all",  # results reach the PACS (no silent trial)
        MSKNODE_DESTINATIONS=json.dumps([destination]),
    )
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    worker = None
    try:
        listener.wait_ready(port)
        worker = NodeWorker(env, tmp_path / "worker.log").start()
        assert storescu(port, paths).wait(300) == 0
        try:
            job = wait_for(
                lambda: study_job(db, study_uid, ("done", "failed", "dead")),
                1200,
                interval=1.0,
                what="the lumbar study's job finished",
            )
        except AssertionError:
            print(worker.output()[-6000:])
            raise
        assert job.state == "done", worker.output()[-6000:]

        from node.db.schema import Finding, OutboxItem, ResultObject

        with db.session() as s:
            findings = list(s.scalars(select(Finding).where(Finding.job_id == job.id)))
            codes_seen = {(f.model_name, f.code, f.evaluated, f.qc_reason) for f in findings}
            print("findings:", sorted(codes_seen, key=str))
            assert not [f for f in findings if f.model_name == "lumbar_spine.stenosis" and not f.evaluated], (
                "the QC gate refused the real lumbar series for stenosis grading"
            )

        def all_sent():
            with db.session() as s:
                q = select(OutboxItem.state).join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
                states = list(s.scalars(q.where(ResultObject.job_id == job.id)))
            return states and all(st == "sent" for st in states)

        wait_for(all_sent, 300, interval=1.0, what="every result object acknowledged by Orthanc")
    finally:
        if worker is not None:
            worker.stop(graceful=False)
        listener.stop(graceful=False)

    objects = _orthanc_objects(orthanc, study_uid)
    (sr,) = objects["SR"]
    sr_path = tmp_path / "sr_from_orthanc.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    assert_valid(sr_path, "lumbar SR from Orthanc")
    groups = measurement_groups(sr)
    stenosis = {_level(g): g for g in groups if _value(g, "/Finding") == "Spinal stenosis"}
    assert sorted(stenosis) == [f"Level of {lv.replace('-', '/')} intervertebral disc" for lv in LEVELS]
    assert all(_value(g, "/Severity") in ("Normal", "Mild", "Moderate", "Severe") for g in stenosis.values())

    discs = [g for g in groups if _value(g, "/Finding") == "Intervertebral disc structure"]
    if discs_installed:
        assert discs, "the discs model is installed but the SR has no disc group"
        for g in discs:
            assert str(_value(g, "/Pfirrmann grade")).startswith("Pfirrmann grade ")
            assert _value(g, "/Herniation of intervertebral disc") in ("Present", "Absent")
            assert 0.0 <= float(_value(g, "/Probability of disc herniation")) <= 1.0
            assert _value(g, "/Algorithm Name") == "lumbar_spine.discs"
        disc_levels = sorted(_level(g) for g in discs)
        print("disc levels in the SR:", disc_levels)

    for i, seg in enumerate(objects.get("SEG", [])):
        seg_path = tmp_path / f"seg_{i}.dcm"
        seg.save_as(seg_path, enforce_file_format=True)
        assert_valid(seg_path, f"SEG {i} from Orthanc")
    level_segs = [seg for seg in objects.get("SEG", []) if seg.get("ContentLabel") == "AI_LEVELS"]
    print("level SEGs in the PACS:", len(level_segs), "(levels model installed)" if levels_installed else "")
    if levels_installed:
        assert len(level_segs) == 1, "the levels model is installed but no SEG of the levels reached the PACS"
        labels = {str(s.SegmentLabel) for s in level_segs[0].SegmentSequence}
        print("level SEG segments:", sorted(labels))
        assert any(f"{lv} intervertebral disc" in labels for lv in LEVELS), labels
        assert any(label.endswith("vertebral body") for label in labels), labels
        if discs_installed:  # the disc groups of the SR point at their discs in the level SEG
            seg_uid = str(level_segs[0].SOPInstanceUID)
            linked = [
                _level(g)
                for g in discs
                if any(vt == "IMAGE" and p.endswith("/Referenced Segment") and v[1] == seg_uid for p, vt, v in g)
            ]
            print("disc groups with their level SEG segment:", linked)
            assert linked, "no disc group references the level SEG"

    # the study page: the level table, from the node's own database
    ws.add_users(db, admin=ADMIN, radiologist=READER)
    with web_server(settings.data_dir, tmp_path / "web.log") as base:
        login(browser, base, READER)
        with db.session() as s:
            from node.db.schema import Study

            study_id = s.scalar(select(Study.id).where(Study.study_uid == study_uid))
        browser.get(f"{base}/studies/{study_id}")
        wait(browser, 30).until(lambda x: x.find_element(By.ID, "stenosis-levels"))
        rows = {
            r.get_attribute("data-level"): r
            for r in browser.find_elements(By.CSS_SELECTOR, "#stenosis-levels tr.level-row")
        }
        assert list(rows)[-5:] == list(LEVELS)
        for level in LEVELS:
            grade = rows[level].find_element(By.CSS_SELECTOR, "td.level-cell.stenosis .grade").text
            assert grade in ("normal", "mild", "moderate", "severe"), (level, grade)
        shot(browser, tmp_path / "study_page.png")
        if discs_installed:
            # every disc of the SR shows on the page with the same Pfirrmann grade and herniation call
            for g in discs:
                level = str(_level(g)).removeprefix("Level of ").removesuffix(" intervertebral disc").replace("/", "-")
                row = rows[level]
                pfirrmann = row.find_element(By.CSS_SELECTOR, "td.level-cell.degeneration .pfirrmann").text
                call = row.find_element(By.CSS_SELECTOR, "td.level-cell.herniation .herniation-call").text
                assert pfirrmann == str(_value(g, "/Pfirrmann grade")).replace(" grade", ""), (level, pfirrmann)
                assert (
                    call == {"Present": "present", "Absent": "absent"}[_value(g, "/Herniation of intervertebral disc")]
                )
            # triage read the same findings: a degenerated disc (Pfirrmann III-V) scores by the shipped rule
            reasons = browser.find_element(By.ID, "reasons").text
            if any(_value(g, "/Degeneration of intervertebral disc") == "Present" for g in discs):
                assert "[rule disc_degeneration]" in reasons, reasons
