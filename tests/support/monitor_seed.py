"""Synthetic history for the monitoring tests: many studies of one pipeline, written as database rows.

`seed_history` writes, per study, the rows the worker would have written (studies, a routed
series with its acquisition facts, a done job with its input, the model's finding row, the
worklist entry through the real `worklists.entries.upsert_for_job`), spread over past weeks,
with a chosen positive rate, QC refusal rate and reading delay; `answer` records radiologists'
answers through the real `worklists.feedback.record`. No DICOM files: the dashboard reads rows.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from pydicom.uid import generate_uid

SOURCE_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class Phase:
    """A stretch of history: `n` studies evenly spread from `start_days_ago` to `end_days_ago`."""

    n: int
    start_days_ago: float
    end_days_ago: float
    positive_rate: float
    refused_rate: float = 0.0
    manufacturer: str = "SIEMENS"
    field_strength: float = 3.0
    read_after_minutes: float | None = None  # marked read this long after arrival (None: unread)
    pixel_spacing_mm: float = 0.4  # what the QC gate measured on the accepted input
    qc_distance: float = 1.0


def seed_history(
    db,
    policy,
    *,
    now: dt.datetime,
    phases: list[Phase],
    pipeline: str = "knee",
    model: str = "knee.acl",
    version: str = "1.0.0",
    seed: int = 0,
) -> list[int]:
    """Writes the studies of every phase; returns their study ids (oldest first)."""
    from node.db.schema import Finding, Job, JobInput, Series, Study
    from worklists.entries import mark_read, upsert_for_job

    rng = random.Random(seed)
    ids = []
    with db.session() as s:
        for ph in phases:
            k_pos = round(ph.positive_rate * ph.n)
            k_ref = round(ph.refused_rate * ph.n)
            kinds = ["refused"] * k_ref + ["pos"] * k_pos + ["neg"] * (ph.n - k_pos - k_ref)
            rng.shuffle(kinds)
            span = ph.start_days_ago - ph.end_days_ago
            for i, kind in enumerate(kinds):
                at = now - dt.timedelta(days=ph.start_days_ago - span * (i + 0.5) / ph.n)
                st = Study(study_uid=generate_uid(prefix=SOURCE_ROOT), first_received_at=at, last_received_at=at)
                s.add(st)
                s.flush()
                se = Series(
                    study_id=st.id,
                    series_uid=generate_uid(prefix=SOURCE_ROOT),
                    modality="MR",
                    manufacturer=ph.manufacturer,
                    instances=20,
                    state="done",
                    pipeline=pipeline,
                    role="sag_fluid",
                    contrast="PD_FS",
                    acquisition={"magnetic_field_strength": ph.field_strength, "repetition_time": 3000.0},
                    first_received_at=at,
                    last_received_at=at,
                )
                s.add(se)
                s.flush()
                job = Job(
                    study_id=st.id,
                    pipeline=pipeline,
                    state="done",
                    attempts=1,
                    created_at=at,
                    started_at=at,
                    finished_at=at + dt.timedelta(seconds=30),
                    enqueue_pending=False,
                    model_versions={model: {"version": version, "weights_sha256": "cd" * 32}},
                )
                s.add(job)
                s.flush()
                s.add(JobInput(job_id=job.id, series_id=se.id, role="sag_fluid", used_by=[model]))
                common = dict(
                    job_id=job.id,
                    model_name=model,
                    model_version=version,
                    weights_sha256="cd" * 32,
                    series_uid=se.series_uid,
                )
                if kind == "refused":
                    s.add(
                        Finding(
                            **common,
                            code=model,
                            label=f"{model}: not evaluated (motion)",
                            evaluated=False,
                            qc_reason="motion",
                        )
                    )
                else:
                    pos = kind == "pos"
                    probs = (
                        {"intact": 0.1, "partial": 0.3, "complete": 0.6}
                        if pos
                        else {"intact": 0.9, "partial": 0.07, "complete": 0.03}
                    )
                    s.add(
                        Finding(
                            **common,
                            code="acl_tear",
                            label="Complete ACL tear" if pos else "No ACL tear",
                            evaluated=True,
                            probability=0.9 if pos else 0.1,
                            uncertainty=0.05,
                            positive=pos,
                            grade="complete" if pos else None,
                            details={
                                "grade_probabilities": probs,
                                "qc_metrics": {
                                    "pixel_spacing_mm": ph.pixel_spacing_mm,
                                    "anatomy_distance": ph.qc_distance,
                                    "snr": 25.0,
                                },
                            },
                        )
                    )
                s.flush()
                entry = upsert_for_job(s, job_id=job.id, policy=policy, now=at + dt.timedelta(seconds=40))
                if ph.read_after_minutes is not None:
                    mark_read(s, entry_id=entry.id, actor="rob", now=at + dt.timedelta(minutes=ph.read_after_minutes))
                ids.append(st.id)
    return ids


def answer(db, study_ids: list[int], *, user: str, agree_rate: float, now: dt.datetime, seed: int = 1) -> None:
    """Records `user`'s answer to each study's finding: agreeing for a share `agree_rate`, else the
    opposite answer (a positive called intact, a negative called complete). Skips refused studies."""
    from sqlalchemy import select

    from node.db.schema import Finding, Job
    from worklists.entries import mark_read
    from worklists.feedback import Answer, record
    from worklists.tables import WorklistEntry

    rng = random.Random(seed)
    with db.session() as s:
        for sid in study_ids:
            f = s.scalars(
                select(Finding)
                .join(Job, Job.id == Finding.job_id)
                .where(Job.study_id == sid, Finding.evaluated.is_(True))
            ).first()
            if f is None:
                continue
            entry = s.scalars(select(WorklistEntry).where(WorklistEntry.study_id == sid)).one()
            was_read = entry.status == "read"
            if was_read:  # answers are given before the read; the seed writes them in that order
                read_at, read_by = entry.read_at, entry.read_by
                mark_read(s, entry_id=entry.id, actor="rob", now=now, read=False)
            if rng.random() < agree_rate:
                a = Answer(agree=True)
            else:
                a = Answer(agree=False, answer="intact" if f.positive else "complete")
            record(s, study_id=sid, actor=user, answer=a, now=now, finding_id=f.id)
            if was_read:
                entry.status, entry.read_at, entry.read_by = "read", read_at, read_by
