"""Read models of the web: the worklist, a study, jobs, outbox, audit — as JSON-ready dicts.

Pages render exactly what the JSON API returns, so every page has an API behind it.
Times: DICOM StudyDate/StudyTime are shown as the modality sent them (local time of the
scanner, no offset known); the node's own timestamps are converted to the site's time
zone (``settings.site_timezone``) and carry it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from node.db.schema import Finding, Instance, Job, JobInput, OutboxItem, ResultObject, Series, Study
from node.jobs.listing import dispatch_by_job, dispatch_json, jobs_json
from worklists.entries import ordered, waiting_since
from worklists.tables import AuditEvent, WorklistEntry
from worklists.targets import due_state, effective_targets
from worklists.triage import TriagePolicy, age, display_finding

ANATOMIES = ("knee", "shoulder", "lumbar_spine")
DEMO_NOTICE = "Demo weights trained on synthetic phantoms only. Not for diagnostic use."


def node_time(value: dt.datetime | None, tz: ZoneInfo) -> str | None:
    """A node timestamp in the site's time zone, ISO 8601 with its offset."""
    if value is None:
        return None
    return value.astimezone(tz).isoformat(timespec="seconds")


def display_time(value: dt.datetime | str | None, tz: ZoneInfo, *, seconds: bool = False) -> str:
    """The one way a page writes a node timestamp: the site's zone, 24-hour, ``YYYY-MM-DD HH:MM[:SS]``.

    Takes a datetime or an ISO 8601 string with its offset (what the API returns); a value without
    an offset is UTC (the node stores UTC). Pages that refresh themselves get this text from the
    server too (``X-Rendered-At``), so no time is ever formatted in the browser's zone.
    """
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        when = value
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def dicom_datetime(date: str | None, time: str | None) -> str | None:
    """StudyDate/StudyTime as sent: ``YYYY-MM-DD HH:MM:SS`` without an offset (raw text if malformed)."""
    if not date:
        return None
    d = date.strip()
    if len(d) == 8 and d.isdigit():
        out = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    else:
        out = d
    t = (time or "").strip().split(".")[0]
    if t and t.isdigit() and len(t) in (2, 4, 6):
        parts = [t[i : i + 2] for i in range(0, len(t), 2)]
        out += " " + ":".join(parts + ["00"] * (3 - len(parts)))
    elif t:
        out += " " + t
    return out


def patient_name(raw: str | None) -> str | None:
    if not raw:
        return None
    parts = str(raw).split("=")[0].split("^")
    family, given = (parts + ["", ""])[:2]
    return f"{family}, {given}".strip(", ") or None


def finding_dict(f: Finding) -> dict:
    """A finding for the pages and the API; ``display`` is its one wording (`worklists.triage.display_finding`)."""
    details = f.details or {}
    out = {
        "id": f.id,
        "model": f.model_name,
        "model_version": f.model_version,
        "weights_sha256": f.weights_sha256,
        "code": f.code,
        "label": f.label,
        "evaluated": bool(f.evaluated),
        "qc_reason": f.qc_reason,
        "qc_message": f.qc_message,
        "probability": f.probability,
        "uncertainty": f.uncertainty,
        "positive": f.positive,
        "grade": f.grade,
        "grade_probabilities": details.get("grade_probabilities"),
        "level": f.level,
        "site": f.site,
        "laterality": f.laterality,
        "series_uid": f.series_uid,
        "demo_weights": bool(details.get("demo_weights", True)),
        "display": display_finding(f).as_dict(),
        # the model ran in shadow (a silent trial, node.jobs.deployments): shown, labelled, never sent or triaged
        "shadow": bool(getattr(f, "shadow", False)),
    }
    return label_shadow(out)


def label_shadow(d: dict) -> dict:
    """Marks a shadow model's finding in its one wording (``display``): "SHADOW · " before the text."""
    if d.get("shadow"):
        disp = dict(d["display"])
        for key in ("text", "short"):
            if disp.get(key):
                disp[key] = f"SHADOW · {disp[key]}"
        d["display"] = disp
    return d


def hide_model_messages(d: dict) -> dict:
    """Drops the QC gate's own messages (``qc_message``) from a worklist item or a study, for a reader.

    The gate's message may name what its pixel classifier saw ("coronal", "shoulder"), which can
    contradict the series' headers; a reader gets the reason code in words (``display.qc_text``),
    the message stays on the admin's view.
    """
    for key in ("findings", "superres_checks"):
        for f in d.get(key) or []:
            f["qc_message"] = None
    return d


def _findings_by_job(session: Session, job_ids: list[int]) -> dict[int, list[Finding]]:
    out: dict[int, list[Finding]] = defaultdict(list)
    if job_ids:
        for f in session.scalars(select(Finding).where(Finding.job_id.in_(job_ids)).order_by(Finding.id)):
            out[f.job_id].append(f)
    return out


def worklist(
    session: Session,
    *,
    policy: TriagePolicy,
    tz: ZoneInfo,
    now: dt.datetime,
    anatomy: str | None = None,
    priority: str | None = None,
    status: str | None = None,
    limit: int = 500,
) -> list[dict]:
    rows = ordered(session, policy=policy, now=now, anatomy=anatomy, priority=priority, status=status, limit=limit)
    job_ids = [r.job.id for r in rows if r.job is not None]
    findings = _findings_by_job(session, job_ids)
    dispatch = dispatch_by_job(session, job_ids)
    targets = effective_targets(session, policy)
    out = []
    for position, r in enumerate(rows, start=1):
        e, st, job = r.entry, r.study, r.job
        due = due_state(r.effective_priority, r.waiting_since, now, targets, e.status == "read")
        fs = findings.get(job.id, []) if job else []
        d = dispatch.get(job.id) if job else None
        out.append(
            {
                "position": position,
                "entry_id": e.id,
                "study_id": st.id,
                "study_uid": st.study_uid,
                **_entry_state(e, priority=r.effective_priority, ageing=r.ageing_reason, tz=tz),
                "patient_name": patient_name(st.patient_name),
                "patient_id": st.patient_id,
                "accession_number": st.accession_number,
                "study_description": st.study_description,
                "study_datetime_as_sent": dicom_datetime(st.study_date, st.study_time),
                "received_at": node_time(r.waiting_since, tz),
                "waiting_minutes": int((now - r.waiting_since).total_seconds() // 60),
                "due_at": node_time(due["due_at"], tz),
                "target_minutes": due["target_minutes"],
                "overdue": due["overdue"],
                "anatomy": job.pipeline if job else None,
                "job": {"id": job.id, "state": job.state, "finished_at": node_time(job.finished_at, tz)}
                if job
                else None,
                "dispatch": dispatch_json(d),
                "findings": [finding_dict(f) for f in fs if f.code not in policy.informational_codes],
                "qc_flags": list(
                    dict.fromkeys(
                        display_finding(f).text
                        for f in fs
                        if not f.evaluated and f.code not in policy.informational_codes
                    )
                ),
            }
        )
    return out


def pending_studies(session: Session, *, tz: ZoneInfo) -> list[dict]:
    """Studies with a job still in progress and no worklist entry yet (shown below the worklist)."""
    has_entry = select(WorklistEntry.study_id)
    rows = session.execute(
        select(Job, Study)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state.in_(("pending", "queued", "processing", "failed", "dead")))
        .where(Job.study_id.not_in(has_entry))
        .order_by(Job.created_at)
    ).all()
    return [
        {
            "study_id": st.id,
            "job_id": job.id,
            "anatomy": job.pipeline,
            "state": job.state,
            "attempts": job.attempts,
            "patient_name": patient_name(st.patient_name),
            "patient_id": st.patient_id,
            "study_datetime_as_sent": dicom_datetime(st.study_date, st.study_time),
            "received_at": node_time(st.last_received_at, tz),
            "error": job.error,
        }
        for job, st in rows
    ]


def _entry_dict(e: WorklistEntry, st: Study, policy: TriagePolicy, tz: ZoneInfo, now: dt.datetime) -> dict:
    since = waiting_since(st)
    aged = age(e.priority, waiting_since=since, now=now, policy=policy) if e.status != "read" else None
    return {
        "entry_id": e.id,
        **_entry_state(e, priority=aged.priority if aged else e.priority, ageing=aged.reason if aged else None, tz=tz),
        "job_id": e.job_id,
    }


def _entry_state(e: WorklistEntry, *, priority: str, ageing: str | None, tz: ZoneInfo) -> dict:
    """A worklist entry's priorities (``priority``: effective, after ageing), triage and reading state."""
    return {
        "priority": priority,
        "assigned_priority": e.priority,
        "ai_priority": e.ai_priority,
        "override": {"priority": e.override_priority, "reason": e.override_reason} if e.override_priority else None,
        "ageing": ageing,
        "score": e.score,
        "reasons": list(e.reasons or []),
        "needs_review": bool(e.needs_review),
        "status": e.status,
        "assigned_to": e.assigned_to,
        "read_by": e.read_by,
        "read_at": node_time(e.read_at, tz),
    }


def study_detail(
    session: Session, study_id: int, *, policy: TriagePolicy, tz: ZoneInfo, now: dt.datetime
) -> dict | None:
    st = session.get(Study, study_id)
    if st is None:
        return None
    entry = session.scalars(select(WorklistEntry).where(WorklistEntry.study_id == study_id)).first()
    jobs = session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id.desc())).all()
    current = None
    if entry is not None and entry.job_id is not None:
        current = next((j for j in jobs if j.id == entry.job_id), None)
    if current is None:
        current = next((j for j in jobs if j.state == "done"), jobs[0] if jobs else None)
    findings = _findings_by_job(session, [current.id]).get(current.id, []) if current else []

    series_rows = session.scalars(
        select(Series).where(Series.study_id == study_id).order_by(Series.series_number, Series.id)
    ).all()
    inputs = {}
    if current is not None:
        for ji in session.scalars(select(JobInput).where(JobInput.job_id == current.id)):
            inputs[ji.series_id] = {"role": ji.role, "used_by": ji.used_by or []}
    series = [
        {
            "id": se.id,
            "series_uid": se.series_uid,
            "number": se.series_number,
            "description": se.series_description,
            "modality": se.modality,
            "body_part": se.body_part,
            "laterality": se.laterality,
            "instances": se.instances,
            "state": se.state,
            "role": (inputs.get(se.id) or {}).get("role") or se.role,
            "used_by": (inputs.get(se.id) or {}).get("used_by", []),
            "own_object": bool(se.own_object),
            "pipeline": se.pipeline,
            "routing": routing_explanation(se),
        }
        for se in series_rows
    ]

    results = []
    if current is not None:
        objs = session.scalars(
            select(ResultObject).where(ResultObject.job_id == current.id).order_by(ResultObject.id)
        ).all()
        items = defaultdict(list)
        for ob in session.scalars(
            select(OutboxItem).where(OutboxItem.result_object_id.in_([o.id for o in objs] or [-1]))
        ):
            items[ob.result_object_id].append(ob)
        grouped: dict[tuple[str, str], dict] = {}
        for o in objs:
            g = grouped.setdefault(
                (o.kind, o.series_uid),
                {
                    "kind": o.kind,
                    "series_uid": o.series_uid,
                    "objects": 0,
                    "result_ids": [],
                    "dispatch": defaultdict(int),
                },
            )
            g["objects"] += 1
            g["result_ids"].append(o.id)
            for ob in items[o.id]:
                g["dispatch"][ob.state] += 1
        for g in grouped.values():
            g["dispatch"] = dict(g["dispatch"])
            results.append(g)

    models: dict[str, dict[str, Any]] = {}
    for f in findings:
        models.setdefault(
            f.model_name,
            {
                "model": f.model_name,
                "version": f.model_version,
                "weights_sha256": f.weights_sha256,
                "demo_weights": bool((f.details or {}).get("demo_weights", True)),
            },
        )
    for name, info in ((current.model_versions or {}) if current else {}).items():
        if name not in models and isinstance(info, dict):
            models[name] = {
                "model": name,
                "version": info.get("version"),
                "weights_sha256": info.get("weights_sha256"),
                "demo_weights": bool(info.get("demo_weights", True)),
            }

    history = []
    if entry is not None:
        for a in session.scalars(
            select(AuditEvent)
            .where(AuditEvent.entity_type == "worklist_entry", AuditEvent.entity_id == str(entry.id))
            .order_by(AuditEvent.id.desc())
            .limit(50)
        ):
            history.append(audit_dict(a, tz))

    jobs_out = jobs_json(session, jobs, tz=tz)
    return {
        "study_id": st.id,
        "study_uid": st.study_uid,
        "patient_name": patient_name(st.patient_name),
        "patient_id": st.patient_id,
        "patient_birth_date": st.patient_birth_date,
        "patient_sex": st.patient_sex,
        "accession_number": st.accession_number,
        "study_description": st.study_description,
        "study_datetime_as_sent": dicom_datetime(st.study_date, st.study_time),
        "received_at": node_time(st.last_received_at, tz),
        "timezone": str(tz),
        "entry": _entry_dict(entry, st, policy, tz, now) if entry else None,
        "job": next(d for d in jobs_out if d["id"] == current.id) if current else None,
        "jobs": jobs_out,
        "findings": [finding_dict(f) for f in findings if f.code not in policy.informational_codes],
        "superres_checks": [
            {
                **finding_dict(f),
                **{
                    k: (f.details or {}).get(k)
                    for k in ("consistency_error", "consistency_tolerance", "consistency_passed")
                },
            }
            for f in findings
            if f.code == "superres"
        ],
        "models": list(models.values()),
        "demo_weights": any(m["demo_weights"] for m in models.values()) or not models,
        "notice": DEMO_NOTICE,
        "series": series,
        "results": results,
        "history": history,
    }


def outbox(session: Session, *, tz: ZoneInfo, state: str | None = None, limit: int = 200) -> list[dict]:
    q = (
        select(OutboxItem, ResultObject)
        .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
        .order_by((OutboxItem.state == "dead").desc(), OutboxItem.id.desc())
        .limit(limit)
    )
    if state:
        q = q.where(OutboxItem.state == state)
    return [
        {
            "id": ob.id,
            "destination": ob.destination,
            "state": ob.state,
            "attempts": ob.attempts,
            "next_attempt_at": node_time(ob.next_attempt_at, tz),
            "last_error": ob.last_error,
            "last_status": ob.last_status,
            "created_at": node_time(ob.created_at, tz),
            "sent_at": node_time(ob.sent_at, tz),
            "result": {
                "id": ro.id,
                "job_id": ro.job_id,
                "kind": ro.kind,
                "sop_instance_uid": ro.sop_instance_uid,
                "series_uid": ro.series_uid,
            },
        }
        for ob, ro in session.execute(q).all()
    ]


def audit_dict(a: AuditEvent, tz: ZoneInfo) -> dict:
    return {
        "id": a.id,
        "at": node_time(a.at, tz),
        "actor": a.actor,
        "action": a.action,
        "entity_type": a.entity_type,
        "entity_id": a.entity_id,
        "old": a.old_value,
        "new": a.new_value,
        "reason": a.reason,
        "details": a.details,
    }


def audit_log(
    session: Session,
    *,
    tz: ZoneInfo,
    limit: int = 200,
    before_id: int | None = None,
    actor: str | None = None,
    action: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
) -> list[dict]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before_id:
        q = q.where(AuditEvent.id < before_id)
    if actor:
        q = q.where(AuditEvent.actor == actor)
    if action:
        q = q.where(AuditEvent.action.startswith(action))
    if entity_type:
        q = q.where(AuditEvent.entity_type == entity_type)
    if entity_id:
        q = q.where(AuditEvent.entity_id == entity_id)
    return [audit_dict(a, tz) for a in session.scalars(q)]


# ---- routing: why a series went where it went --------------------------------------------------

NOT_RECORDED = "not recorded"
_FACTS = ("plane", "contrast", "anatomy")
_TEXT_MAX = 200
_SIGNALS_MAX = 200


def _text(value: object) -> str | None:
    if value is None:
        return None
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= _TEXT_MAX else s[: _TEXT_MAX - 1] + "…"


def routing_explanation(se: Series) -> dict:
    """Why a series was routed (or not): the decision, plane / contrast / anatomy with their source, flags, signals.

    The decision comes from the series' columns (what is in force); the facts and signals from
    the explanation recorded when it was routed (``series.routing_explanation``: decision,
    plane, contrast, anatomy as {value, source, detail}, flags, signals as {name, value,
    source, used}). What was not recorded says so (``recorded`` False, source "not recorded").
    """
    raw = getattr(se, "routing_explanation", None)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    expl = raw if isinstance(raw, dict) else {}
    recorded_decision = expl.get("decision") if isinstance(expl.get("decision"), dict) else {}
    decision: dict[str, Any]
    if se.state == "receiving":
        decision = {"routed": False, "pipeline": None, "role": None, "rule": None, "pending": True}
    elif se.routing_rule is not None or not recorded_decision:
        decision = {
            "routed": se.pipeline is not None,
            "pipeline": se.pipeline,
            "role": se.role,
            "rule": se.routing_rule,
            "pending": False,
        }
    else:
        decision = {
            "routed": bool(recorded_decision.get("routed")),
            "pipeline": _text(recorded_decision.get("pipeline")),
            "role": _text(recorded_decision.get("role")),
            "rule": _text(recorded_decision.get("rule")),
            "pending": False,
        }
    facts = {}
    for name in _FACTS:
        fact = expl.get(name) if isinstance(expl.get(name), dict) else None
        column = getattr(se, name, None)
        if fact is not None:
            facts[name] = {
                "value": _text(fact.get("value")),
                "source": _text(fact.get("source")) or NOT_RECORDED,
                "detail": _text(fact.get("detail")) or "",
            }
        elif column is not None:
            facts[name] = {"value": _text(column), "source": "index column", "detail": ""}
        else:
            facts[name] = {"value": None, "source": NOT_RECORDED, "detail": ""}
    flags = (
        [_text(f) for f in expl.get("flags") or [] if f is not None][:50] if isinstance(expl.get("flags"), list) else []
    )
    signals = []
    raw_signals = expl.get("signals")
    for sig in (raw_signals if isinstance(raw_signals, list) else [])[:_SIGNALS_MAX]:
        if isinstance(sig, dict):
            signals.append(
                {
                    "name": _text(sig.get("name")) or "?",
                    "value": _text(sig.get("value")),
                    "source": _text(sig.get("source")) or "",
                    "used": bool(sig.get("used")),
                }
            )
    return {"recorded": bool(expl), "decision": decision, "facts": facts, "flags": flags, "signals": signals}


def series_routing_dict(se: Series, st: Study, tz: ZoneInfo) -> dict:
    """A series with its headers and routing explanation, for the admin (no patient name or ID)."""
    return {
        "id": se.id,
        "series_uid": se.series_uid,
        "study_id": st.id,
        "study_uid": st.study_uid,
        "study_description": st.study_description,
        "number": se.series_number,
        "description": se.series_description,
        "protocol_name": se.protocol_name,
        "modality": se.modality,
        "body_part": se.body_part,
        "laterality": se.laterality,
        "manufacturer": se.manufacturer,
        "calling_ae": se.calling_ae,
        "instances": se.instances,
        "state": se.state,
        "own_object": bool(se.own_object),
        "received_at": node_time(se.first_received_at, tz),
        "completed_at": node_time(se.completed_at, tz),
        "routing": routing_explanation(se),
    }


def series_routing(session: Session, series_id: int, *, tz: ZoneInfo) -> dict | None:
    row = session.execute(
        select(Series, Study).join(Study, Study.id == Series.study_id).where(Series.id == series_id)
    ).first()
    return series_routing_dict(row[0], row[1], tz) if row else None


def unrouted_series(session: Session, *, tz: ZoneInfo, limit: int = 50, before_id: int | None = None) -> dict:
    """Recent ``unrouted`` series, newest first, ``limit`` per page (``before_id`` pages back).

    Objects msknode created are left out: no rule routes them.
    """
    from node.intake.routing import UNROUTED_OWN

    where = [
        Series.state == "unrouted",
        Series.own_object.is_(False),
        or_(Series.routing_rule.is_(None), Series.routing_rule != UNROUTED_OWN),
    ]
    q = select(Series, Study).join(Study, Study.id == Series.study_id).where(*where).order_by(Series.id.desc())
    if before_id:
        q = q.where(Series.id < before_id)
    rows = session.execute(q.limit(limit + 1)).all()
    total = session.scalar(select(func.count()).select_from(Series).where(*where))
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "series": [series_routing_dict(se, st, tz) for se, st in rows],
        "total": total,
        "next_before_id": rows[-1][0].id if more and rows else None,
    }


def series_paths(session: Session, study_id: int, series_id: int) -> list[str] | None:
    se = session.get(Series, series_id)
    if se is None or se.study_id != study_id:
        return None
    return [
        i.path for i in session.scalars(select(Instance).where(Instance.series_id == series_id).order_by(Instance.id))
    ]


def result_paths(
    session: Session, study_id: int, *, kind: str, series_uid: str | None = None, result_id: int | None = None
) -> list[str]:
    q = (
        select(ResultObject)
        .join(Job, Job.id == ResultObject.job_id)
        .where(Job.study_id == study_id, ResultObject.kind == kind)
    )
    if series_uid:
        q = q.where(ResultObject.series_uid == series_uid)
    if result_id:
        q = q.where(ResultObject.id == result_id)
    return [r.path for r in session.scalars(q.order_by(ResultObject.id))]
