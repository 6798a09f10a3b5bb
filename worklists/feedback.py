"""A radiologist's answer to the AI, per finding: agree or disagree, and their own answer on the model's scale.

Every evaluated finding row of a study's current job can be answered, the model's negative
results too ("no ACL tear" is a finding row with ``positive = False``): that is how a reader
says the model missed something. A finding the QC gate refused cannot be answered (the model
said nothing). Both answers are recorded on the model's scale (`scale_of`), normal first, so
the dashboard can count true and false positives and the export can write labels.

One record per user and finding reference (study, ``finding_key``); its author may change it
until the study is marked read, after which it is locked. Every write adds an audit event
(``feedback.record``, old and new answer) in the caller's transaction. Logs name ids and UIDs only.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.schema import Finding, FindingFeedback, Job, ResultObject, Study
from worklists import audit
from worklists.errors import EntryNotFound, InvalidChange
from worklists.tables import WorklistEntry
from worklists.triage import finding_name

log = logging.getLogger(__name__)

MAX_COMMENT = 1000
SOURCES = ("web", "api")

#: each finding code's scale, normal first (the model's output classes); a finding whose row
#: carries grade probabilities uses their keys instead, in this order when they match
SCALES: dict[str, tuple[str, ...]] = {
    "acl_tear": ("intact", "partial", "complete"),
    "meniscal_tear": ("none", "medial", "lateral"),
    "rotator_cuff_tear": ("none", "partial", "full_thickness"),
    "spinal_stenosis": ("normal", "mild", "moderate", "severe"),
    "disc_degeneration": ("1", "2", "3", "4", "5"),  # Pfirrmann grade per disc
}
BINARY = ("absent", "present")
#: how many classes at the start of a code's scale are negative findings (1 unless said here): a
#: Pfirrmann grade I or II disc is not degenerated (the model's own cut: positive from grade III)
NEGATIVE_CLASSES: dict[str, int] = {"disc_degeneration": 2}


class FeedbackLocked(InvalidChange):
    """The study was marked read: its feedback no longer changes (HTTP 409)."""


def scale_of(f: Finding) -> tuple[str, ...]:
    """The answers a reader can give for finding `f`: the model's classes, normal first."""
    known = SCALES.get(f.code)
    probs = (f.details or {}).get("grade_probabilities") or {}
    if known and (not probs or set(probs) <= set(known)):
        return known
    if probs:
        return tuple(str(k) for k in probs)
    return known or BINARY


def finding_key(f: Finding) -> str:
    """The finding's identifier within the study's AI SR: its code, ``@level`` for a per-level finding."""
    return f"{f.code}@{f.level}" if f.level else f.code


def negative_answers(code: str, scale: tuple[str, ...]) -> tuple[str, ...]:
    """The answers on `scale` that say "no finding" for `code` (the first one, or more: Pfirrmann I and II)."""
    n = NEGATIVE_CLASSES.get(code, 1) if scale == SCALES.get(code) else 1
    return scale[:n]


def is_positive_answer(code: str, scale: tuple[str, ...], answer: str) -> bool:
    return answer not in negative_answers(code, scale)


def ai_answer(f: Finding, scale: tuple[str, ...]) -> str:
    """The model's answer on `scale`: its grade when it has one on the scale, else normal when negative and
    the most probable positive class when positive."""
    negatives = negative_answers(f.code, scale)
    if f.grade and f.grade in scale and (f.grade in negatives) != bool(f.positive):
        return f.grade
    if not f.positive:
        return scale[0]
    probs = (f.details or {}).get("grade_probabilities") or {}
    positive = [(float(p), g) for g, p in probs.items() if g in scale and g not in negatives and p is not None]
    if positive:
        return max(positive)[1]
    return scale[1] if len(scale) == 2 else scale[-1]


@dataclass(frozen=True)
class Answer:
    """What a reader says about one finding."""

    agree: bool
    answer: str | None = None  # required when disagreeing: the reader's own answer on the scale
    comment: str | None = None


def answerable(session: Session, study_id: int) -> tuple[Study, Job | None, list[Finding], str | None]:
    """The study, its current job, the findings a reader can answer and the AI SR's SOP Instance UID."""
    study = session.get(Study, study_id)
    if study is None:
        raise EntryNotFound(f"study {study_id} not found")
    entry = session.scalars(select(WorklistEntry).where(WorklistEntry.study_id == study_id)).first()
    job = session.get(Job, entry.job_id) if entry is not None and entry.job_id is not None else None
    if job is None:
        job = session.scalars(
            select(Job).where(Job.study_id == study_id, Job.state == "done").order_by(Job.id.desc())
        ).first()
    if job is None:
        return study, None, [], None
    findings = list(
        session.scalars(
            select(Finding).where(Finding.job_id == job.id, Finding.evaluated.is_(True)).order_by(Finding.id)
        )
    )
    findings = [f for f in findings if f.code != "superres"]
    sr = session.scalars(
        select(ResultObject.sop_instance_uid).where(ResultObject.job_id == job.id, ResultObject.kind == "sr")
    ).first()
    return study, job, findings, sr


def is_locked(session: Session, study_id: int) -> bool:
    entry = session.scalars(select(WorklistEntry).where(WorklistEntry.study_id == study_id)).first()
    return entry is not None and entry.status == "read"


def as_dict(fb: FindingFeedback) -> dict[str, Any]:
    return {
        "id": fb.id,
        "study_id": fb.study_id,
        "finding_id": fb.finding_id,
        "finding_key": fb.finding_key,
        "sr_sop_instance_uid": fb.sr_sop_instance_uid,
        "model": {"name": fb.model_name, "version": fb.model_version, "weights_sha256": fb.weights_sha256},
        "scale": list(fb.scale),
        "ai_answer": fb.ai_answer,
        "ai_positive": fb.ai_positive,
        "agree": fb.agree,
        "answer": fb.answer,
        "answer_positive": fb.answer_positive,
        "comment": fb.comment,
        "source": fb.source,
        "created_by": fb.created_by,
        "created_at": fb.created_at.isoformat(),
        "updated_at": fb.updated_at.isoformat(),
    }


def _summary(fb: FindingFeedback | None) -> str | None:
    if fb is None:
        return None
    return ("agree" if fb.agree else "disagree") + f": {fb.answer}"


def record(
    session: Session,
    *,
    study_id: int,
    actor: str,
    answer: Answer,
    now: dt.datetime,
    finding_id: int | None = None,
    key: str | None = None,
    source: str = "web",
) -> FindingFeedback:
    """Records (or changes) `actor`'s answer to one finding of the study's current job, named by
    its row id or its key. Raises `EntryNotFound`, `InvalidChange` (bad answer) or `FeedbackLocked`."""
    if source not in SOURCES:
        raise InvalidChange(f"unknown source {source!r}")
    study, job, findings, sr_uid = answerable(session, study_id)
    match = [f for f in findings if (finding_id is not None and f.id == finding_id) or (key and finding_key(f) == key)]
    if not match:
        what = f"finding {finding_id}" if finding_id is not None else f"finding {key!r}"
        raise EntryNotFound(f"{what} is not an evaluated AI finding of study {study_id}")
    f = match[0]
    scale = scale_of(f)
    ai = ai_answer(f, scale)
    comment = (answer.comment or "").strip() or None
    if comment is not None and len(comment) > MAX_COMMENT:
        raise InvalidChange(f"comment: at most {MAX_COMMENT} characters")
    if answer.agree:
        if answer.answer not in (None, "", ai):
            raise InvalidChange(f"an agreement takes the model's answer {ai!r}, not {answer.answer!r}")
        given = ai
    else:
        if not answer.answer:
            raise InvalidChange(f"a disagreement needs your answer, one of: {', '.join(scale)}")
        if answer.answer not in scale:
            raise InvalidChange(f"answer {answer.answer!r} is not on the model's scale: {', '.join(scale)}")
        if answer.answer == ai:
            raise InvalidChange(f"{ai!r} is the model's own answer: that is an agreement")
        given = answer.answer
    if is_locked(session, study_id):
        raise FeedbackLocked(f"study {study_id} was marked read: its feedback is locked")
    fkey = finding_key(f)
    fb = session.scalars(
        select(FindingFeedback).where(
            FindingFeedback.study_id == study_id,
            FindingFeedback.finding_key == fkey,
            FindingFeedback.created_by == actor,
        )
    ).first()
    old = _summary(fb)
    if fb is None:
        fb = FindingFeedback(study_id=study_id, finding_key=fkey, created_by=actor, created_at=now)
        session.add(fb)
    fb.job_id = job.id if job else None
    fb.finding_id = f.id
    fb.sr_sop_instance_uid = sr_uid
    fb.code = f.code
    fb.level = f.level
    fb.model_name = f.model_name
    fb.model_version = f.model_version
    fb.weights_sha256 = f.weights_sha256
    fb.scale = list(scale)
    fb.ai_answer = ai
    fb.ai_positive = bool(f.positive)
    fb.ai_probability = f.probability
    fb.agree = answer.agree
    fb.answer = given
    fb.answer_positive = is_positive_answer(f.code, scale, given)
    fb.comment = comment
    fb.source = source
    fb.updated_at = now
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="feedback.record",
        entity_type="finding_feedback",
        entity_id=fb.id,
        old=old,
        new=_summary(fb),
        reason=comment,
        details={
            "study_id": study_id,
            "finding_key": fkey,
            "model": f.model_name,
            "version": f.model_version,
            "sr": sr_uid,
            "source": source,
        },
    )
    log.info(
        "feedback %s on study %s finding %s (%s %s): %s",
        fb.id,
        study.study_uid,
        fkey,
        f.model_name,
        f.model_version,
        "agree" if fb.agree else "disagree",
    )
    return fb


def study_feedback(session: Session, study_id: int, *, user: str) -> dict[str, Any]:
    """The answerable findings of a study, each with its scale, the model's answer, `user`'s own
    answer (if any) and how many others answered; plus whether the study is locked."""
    _study, job, findings, sr_uid = answerable(session, study_id)
    rows = session.scalars(select(FindingFeedback).where(FindingFeedback.study_id == study_id)).all()
    mine = {r.finding_key: r for r in rows if r.created_by == user}
    others: dict[str, int] = {}
    for r in rows:
        if r.created_by != user:
            others[r.finding_key] = others.get(r.finding_key, 0) + 1
    items = []
    for f in findings:
        scale = scale_of(f)
        key = finding_key(f)
        own = mine.get(key)
        items.append(
            {
                "finding_id": f.id,
                "finding_key": key,
                "code": f.code,
                "name": finding_name(f.code, f.label, f.model_name),
                "level": f.level,
                "model": {"name": f.model_name, "version": f.model_version, "weights_sha256": f.weights_sha256},
                "shadow": bool(getattr(f, "shadow", False)),
                "scale": list(scale),
                "ai_answer": ai_answer(f, scale),
                "ai_positive": bool(f.positive),
                "probability": f.probability,
                "mine": as_dict(own) if own is not None else None,
                "others": others.get(key, 0),
            }
        )
    return {
        "study_id": study_id,
        "job_id": job.id if job else None,
        "sr_sop_instance_uid": sr_uid,
        "locked": is_locked(session, study_id),
        "items": items,
    }
