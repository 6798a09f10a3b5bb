"""Studies the node processed (in shadow) with a radiologist's answer: the index, job, finding and
``finding_feedback`` rows over real phantom DICOM files, for the feedback export tests.

Stands for a silent trial in which radiologists answered (the answering itself goes through the
feedback API in its own tests).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom

from node.db.schema import Finding, FindingFeedback, Instance, Job, JobInput, Series, Study

PATIENT = "DOE^JANE"


def answered_study(db, tmp_path: Path, seed: int, answer: str, *, model: str = "knee.acl") -> str:
    """A knee study the node processed in shadow, with a radiologist's answer to ``model``; its study UID."""
    from models.phantoms import generate, write_dicom_series

    # the series knee.acl reads (sag_fluid); the phantom's truth is the radiologist's answer
    phantom = generate(
        "knee", seed, sequence="PD_FS", orientation="sagittal", acl=answer if model == "knee.acl" else "intact"
    )
    files = write_dicom_series(
        phantom,
        tmp_path / f"study{seed}",
        series_description="SAG PD FS",
        patient_name=PATIENT,
        patient_id=f"PID{seed}",
    )
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    now = dt.datetime.now(dt.UTC)
    with db.session() as s:
        study = Study(study_uid=str(first.StudyInstanceUID), patient_name=PATIENT, patient_id=f"PID{seed}")
        s.add(study)
        s.flush()
        series = Series(
            study_id=study.id,
            series_uid=str(first.SeriesInstanceUID),
            modality="MR",
            state="done",
            pipeline="knee",
            role="sag_fluid",
            instances=len(files),
        )
        s.add(series)
        s.flush()
        for k, path in enumerate(files, start=1):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            s.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=str(path),
                    size=path.stat().st_size,
                    instance_number=k,
                )
            )
        job = Job(study_id=study.id, pipeline="knee", state="done", input_fingerprint=f"fp{seed}", finished_at=now)
        s.add(job)
        s.flush()
        s.add(JobInput(job_id=job.id, series_id=series.id, role="sag_fluid", used_by=[model]))
        code, scale = ("acl_tear", ["intact", "partial", "complete"])
        if model == "knee.meniscus":
            code, scale, answer = "meniscal_tear", ["none", "medial", "lateral"], "medial"
        finding = Finding(
            job_id=job.id,
            model_name=model,
            model_version="1.0.0",
            weights_sha256="0" * 64,
            code=code,
            label=code,
            positive=False,
            probability=0.2,
            shadow=True,
        )
        s.add(finding)
        s.flush()
        s.add(
            FindingFeedback(
                study_id=study.id,
                job_id=job.id,
                finding_id=finding.id,
                finding_key=code,
                code=code,
                model_name=model,
                model_version="1.0.0",
                weights_sha256="0" * 64,
                scale=scale,
                ai_answer=scale[0],
                ai_positive=False,
                ai_probability=0.2,
                agree=answer == scale[0],
                answer=answer,
                answer_positive=answer != scale[0],
                source="web",
                created_by="rita",
                created_at=now,
                updated_at=now,
            )
        )
    return str(first.StudyInstanceUID)
