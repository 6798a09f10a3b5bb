"""The viewer on objects written by the real result writers (node.results) and rows the real pipeline code writes.

A knee series is turned into a `PipelineOutput` (an ACL finding with a heatmap blob, a
meniscus model refused by QC, a super-resolved volume), `node.results.build_results` writes
the SR, SEG, super-resolved series and SC, `node.jobs.runner.findings_from_output` gives the
`findings` rows, and `worklists.entries.upsert_for_job` writes the worklist entry. The
web must then place the SEG overlay where the heatmap was, map the super-resolved slices
and show the refusal.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.unit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture
def processed(settings, db, tmp_path):
    from node.db.schema import Finding, Instance, Job, JobInput, ResultObject, Series, Study
    from node.jobs.runner import findings_from_output
    from node.results import build_results, save
    from node.web.users import add_user
    from support.results_data import knee_output, volume_from_files, write_mr_series
    from worklists.entries import upsert_for_job
    from worklists.triage import compute, findings_from_pipeline, load_policy

    settings.ensure_dirs()
    paths = write_mr_series(settings.store_dir / "knee", n_slices=8, rows=40, cols=36, patient_name="REAL^WRITERS")
    vol = volume_from_files(paths)
    output = knee_output(vol)
    policy = load_policy(settings.triage_policy)
    triage = compute(findings_from_pipeline(output), policy)
    results = build_results(
        output=output,
        source_files={vol.series_uid: paths},
        triage=triage,
        predecessors=[],
        settings=settings,
        job_fingerprint="web-results-1",
    )
    import pydicom

    first = pydicom.dcmread(paths[0])
    with db.session() as s:
        st = Study(
            study_uid=vol.study_uid,
            patient_name=str(first.PatientName),
            patient_id=str(first.PatientID),
            study_date=str(first.StudyDate),
            study_time=str(first.get("StudyTime", "")),
        )
        s.add(st)
        s.flush()
        se = Series(
            study_id=st.id,
            series_uid=vol.series_uid,
            modality="MR",
            series_description="SAG PD FS",
            instances=len(paths),
            state="done",
            pipeline="knee",
            role="sag_fluid",
        )
        s.add(se)
        s.flush()
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            s.add(
                Instance(
                    series_id=se.id,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=str(p),
                    size=p.stat().st_size,
                )
            )
        job = Job(study_id=st.id, pipeline="knee", state="done", model_versions={"knee.acl": {"version": "0.1.0"}})
        s.add(job)
        s.flush()
        s.add(
            JobInput(
                job_id=job.id, series_id=se.id, role="sag_fluid", used_by=["knee.acl", "knee.meniscus", "superres"]
            )
        )
        for rec in findings_from_output(output):
            s.add(Finding(job_id=job.id, **rec.__dict__))
        for r in results:
            s.add(
                ResultObject(
                    job_id=job.id,
                    kind=r.kind,
                    sop_class_uid=r.sop_class_uid,
                    sop_instance_uid=r.sop_instance_uid,
                    series_uid=r.series_uid,
                    path=str(save(r, settings)),
                )
            )
        s.flush()
        entry = upsert_for_job(s, job_id=job.id, policy=policy, now=st.last_received_at)
        add_user(s, username="reader", password="reader-password-1", role="radiologist")
        ids = {"study": st.id, "series": se.id, "entry": entry.id}
    from node.web.app import create_app

    client = TestClient(create_app(settings, db))
    token = client.post("/api/auth/token", json={"username": "reader", "password": "reader-password-1"}).json()[
        "access_token"
    ]
    client.headers["Authorization"] = f"Bearer {token}"
    return {"client": client, "ids": ids, "vol": vol, "output": output}


def test_overlay_from_the_real_seg_sits_where_the_heatmap_was(processed):
    c, ids = processed["client"], processed["ids"]
    heat = processed["output"].outputs[0].findings[0].heatmap
    v = c.get(f"/api/studies/{ids['study']}/viewer").json()
    assert v["selected"]["id"] == ids["series"] and v["selected"]["slices"] == 8
    (overlay,) = v["overlays"]
    assert "ACL" in overlay["segments"][0]["label"]
    assert v["start_slice"] == 4
    for k in range(8):
        r = c.get(f"/api/studies/{ids['study']}/series/{ids['series']}/overlay/{overlay['result_id']}/{k}.png")
        alpha = np.asarray(Image.open(io.BytesIO(r.content)))[..., 3].astype(float)
        expected = heat[k] >= 0.06  # the SEG stores 8-bit fractions; the overlay is drawn from 0.05 up
        drawn = alpha > 0
        assert (drawn & expected).sum() >= 0.9 * expected.sum() and (drawn & ~(heat[k] >= 0.04)).sum() == 0, k
    assert v["superres"]["slices"] == 15 and v["superres"]["map"] == [0, 2, 4, 6, 8, 10, 12, 14]
    r = c.get(f"/api/studies/{ids['study']}/superres/{v['superres']['series_uid']}/slices/14.png")
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape == (40, 36)


def test_findings_refusal_and_superres_check_are_shown(processed):
    c, ids = processed["client"], processed["ids"]
    d = c.get(f"/api/studies/{ids['study']}").json()
    assert d["entry"]["priority"] == "URGENT" and d["entry"]["needs_review"]
    assert (
        "Meniscal tear not evaluated: the images are too noisy for the model - needs human review"
        in d["entry"]["reasons"]
    )
    refused = [f for f in d["findings"] if not f["evaluated"]]
    assert [(f["model"], f["qc_reason"]) for f in refused] == [("knee.meniscus", "low_snr")]
    assert refused[0]["qc_message"] is None  # the gate's own message is for the admin's view only
    (check,) = d["superres_checks"]
    assert check["consistency_passed"] is True and check["consistency_error"] == pytest.approx(0.012)
    assert {g["kind"] for g in d["results"]} == {"sr", "seg", "superres", "sc"}
    page = c.get(f"/studies/{ids['study']}")
    assert page.status_code == 200
    assert "Meniscal tear not evaluated: the images are too noisy for the model" in page.text and re.search(
        r"data consistency 0\.012", page.text
    )
