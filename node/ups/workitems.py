"""UPS workitems: the state machine, their attributes, subscriptions and the events owed to subscribers.

Every AI job is one Unified Procedure Step (PS3.4 CC; IHE AIW-I, the node as Task Manager and
Task Performer of its own tasks). `sync` follows the jobs table, the record of the work:

    job created (routed study)          → SCHEDULED, Input Information = the job's input series
    job claimed by a worker (running)   → IN PROGRESS (the node's own Transaction UID)
    job done                            → COMPLETED, Output Information = its SR/SEG/... objects
    job failed, dead or superseded      → CANCELED with the reason

A job that goes from queued to done between two rounds still passes through every state, in
order. Priority: the study's worklist priority (STAT → HIGH, URGENT → MEDIUM, ROUTINE → LOW), LOW
until triage has spoken; an admin's reprioritisation changes it (`follow_worklist_priority`).

Every change of state or priority queues one UPS State Report (N-EVENT-REPORT, event type 1) per
subscriber (`ups_events`, delivered in order by `node.ups.events`). The UPS attributes are stored
as DICOM JSON; the Transaction UID is kept apart and never returned to a peer.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from sqlalchemy import and_, case, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from node.db.schema import (
    Instance,
    Job,
    JobInput,
    ResultObject,
    Series,
    Study,
    UpsEvent,
    UpsSubscription,
    UpsWorkitem,
)
from node.settings import Settings
from node.ups.errors import UpsRefused
from worklists.tables import WorklistEntry

log = logging.getLogger(__name__)

# SOP classes (PS3.4 CC.3.1) and the well-known subscription instances (PS3.4 CC.3.1.1)
UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
UPS_SOP_CLASSES = (UPS_PUSH, UPS_WATCH, UPS_PULL, UPS_EVENT, UPS_QUERY)
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
GLOBAL_SUBSCRIPTION_LOCKED = "1.2.840.10008.5.1.4.34.5.1"

SCHEDULED, IN_PROGRESS, CANCELED, COMPLETED = "SCHEDULED", "IN PROGRESS", "CANCELED", "COMPLETED"
FINAL_STATES = (CANCELED, COMPLETED)
PRIORITIES = ("HIGH", "MEDIUM", "LOW")
#: the worklist's priorities (worklists.tables.PRIORITIES) as UPS priorities
PRIORITY_OF_WORKLIST = {"STAT": "HIGH", "URGENT": "MEDIUM", "ROUTINE": "LOW"}
DEFAULT_PRIORITY = "LOW"  # triage has not spoken yet: ROUTINE

# N-EVENT-REPORT event types (PS3.4 CC.2.4.2)
STATE_REPORT, CANCEL_REQUESTED, PROGRESS_REPORT, SCP_STATUS_CHANGE, ASSIGNED = 1, 2, 3, 4, 5

#: the job's steps (`node.jobs.runner`) as the Procedure Step Progress (%) of its workitem
STEP_PROGRESS = {
    "load_context": 5,
    "setup": 10,
    "load": 20,
    "inference": 50,
    "triage": 80,
    "results": 90,
    "publish": 92,
    # the findings are published (on their way to the PACS): super-resolution and its derived series follow
    "published: superres": 94,
    "published: superres_results": 98,
}

#: jobs created (or finished) longer ago than this get no workitem (a node that starts using UPS
#: does not announce its whole history)
BACKFILL = dt.timedelta(days=1)
MAX_REASON = 1024  # Reason For Cancellation is LT
SCHEDULED_WORKITEM_SCHEME = "99MSKNODE"
PIPELINE_MEANINGS = {
    "knee": "Knee MRI AI analysis",
    "shoulder": "Shoulder MRI AI analysis",
    "lumbar_spine": "Lumbar spine MRI AI analysis",
}


# ---- DICOM JSON <-> Dataset ----------------------------------------------------------------------


def to_json(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict(bulk_data_threshold=1 << 30)


def from_json(data: dict[str, Any]) -> Dataset:
    return Dataset.from_json(data)


def _dt(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning[:64]
    return c


def _referenced_instances(
    study_uid: str, series_uid: str, refs: Iterable[tuple[str, str]], retrieve_ae: str
) -> Dataset:
    """One item of the Referenced Instances and Access macro (PS3.3 Table 10-3b)."""
    item = Dataset()
    item.TypeOfInstances = "DICOM"
    item.StudyInstanceUID = study_uid
    item.SeriesInstanceUID = series_uid
    sops = []
    for sop_class, sop_instance in refs:
        r = Dataset()
        r.ReferencedSOPClassUID = sop_class
        r.ReferencedSOPInstanceUID = sop_instance
        sops.append(r)
    item.ReferencedSOPSequence = DicomSequence(sops)
    retrieval = Dataset()
    retrieval.RetrieveAETitle = retrieve_ae
    item.DICOMRetrievalSequence = DicomSequence([retrieval])
    return item


def workitem_uid(settings: Settings, job: Job, generation: int = 0) -> str:
    """The same job (and generation) always gets the same UID: two housekeeping workers cannot
    create two workitems for one job (the second insert violates the unique UID)."""
    return str(
        generate_uid(
            prefix=settings.uid_root if settings.uid_root.endswith(".") else settings.uid_root + ".",
            entropy_srcs=["ups", str(job.id), job.input_fingerprint or "", str(generation)],
        )
    )


# ---- building the workitem of a job ------------------------------------------------------------------


def job_dataset(session: Session, settings: Settings, job: Job, uid: str, priority: str, now: dt.datetime) -> Dataset:
    """The UPS attributes (PS3.4 Table CC.2.5-3) of a job's workitem, SCHEDULED."""
    study = session.get(Study, job.study_id)
    ds = Dataset()
    ds.SpecificCharacterSet = (study.specific_character_set if study else None) or "ISO_IR 192"
    ds.SOPClassUID = UPS_PUSH
    ds.SOPInstanceUID = uid
    # Unified Procedure Step Scheduled Procedure Information
    ds.ScheduledProcedureStepPriority = priority
    ds.ScheduledProcedureStepModificationDateTime = _dt(now)
    ds.ProcedureStepLabel = f"msknode {job.pipeline} AI"
    ds.WorklistLabel = settings.ae_title
    ds.ScheduledProcessingParametersSequence = DicomSequence([])
    station = _code(settings.ae_title, SCHEDULED_WORKITEM_SCHEME, f"msknode AI node {settings.ae_title}")
    ds.ScheduledStationNameCodeSequence = DicomSequence([station])
    ds.ScheduledStationClassCodeSequence = DicomSequence([])
    ds.ScheduledStationGeographicLocationCodeSequence = DicomSequence([])
    ds.ScheduledHumanPerformersSequence = DicomSequence([])
    ds.ScheduledProcedureStepStartDateTime = _dt(job.created_at or now)
    ds.ScheduledWorkitemCodeSequence = DicomSequence(
        [_code(job.pipeline, SCHEDULED_WORKITEM_SCHEME, PIPELINE_MEANINGS.get(job.pipeline, f"{job.pipeline} AI"))]
    )
    ds.CommentsOnTheScheduledProcedureStep = "AI analysis by msknode; not for diagnostic use"
    ds.InputReadinessState = "READY"
    inputs = []
    rows = session.execute(
        select(Series.series_uid, Instance.sop_class_uid, Instance.sop_instance_uid)
        .join(JobInput, JobInput.series_id == Series.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(JobInput.job_id == job.id)
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    ).all()
    by_series: dict[str, list[tuple[str, str]]] = {}
    for series_uid, sop_class, sop_instance in rows:
        by_series.setdefault(series_uid, []).append((sop_class, sop_instance))
    study_uid = study.study_uid if study else ""
    for series_uid, refs in by_series.items():
        inputs.append(_referenced_instances(study_uid, series_uid, refs, settings.ae_title))
    ds.InputInformationSequence = DicomSequence(inputs)
    ds.StudyInstanceUID = study_uid
    # Unified Procedure Step Relationship
    ds.PatientName = (study.patient_name if study else None) or ""
    ds.PatientID = (study.patient_id if study else None) or ""
    ds.IssuerOfPatientID = ""
    ds.OtherPatientIDsSequence = DicomSequence([])
    ds.PatientBirthDate = (study.patient_birth_date if study else None) or ""
    ds.PatientSex = (study.patient_sex if study else None) or ""
    ds.AdmissionID = ""
    ds.IssuerOfAdmissionIDSequence = DicomSequence([])
    ds.AdmittingDiagnosesDescription = ""
    ds.AdmittingDiagnosesCodeSequence = DicomSequence([])
    request = Dataset()
    request.StudyInstanceUID = study_uid
    request.AccessionNumber = (study.accession_number if study else None) or ""
    request.IssuerOfAccessionNumberSequence = DicomSequence([])
    request.PlacerOrderNumberImagingServiceRequest = ""
    request.OrderPlacerIdentifierSequence = DicomSequence([])
    request.FillerOrderNumberImagingServiceRequest = ""
    request.OrderFillerIdentifierSequence = DicomSequence([])
    request.RequestedProcedureID = ""
    request.RequestedProcedureDescription = ""
    request.RequestedProcedureCodeSequence = DicomSequence([])
    ds.ReferencedRequestSequence = DicomSequence([request])
    # Unified Procedure Step Progress Information
    ds.ProcedureStepState = SCHEDULED
    ds.ProcedureStepProgressInformationSequence = DicomSequence([])
    # Unified Procedure Step Performed Procedure Information
    ds.UnifiedProcedureStepPerformedProcedureSequence = DicomSequence([])
    return ds


# ---- events ----------------------------------------------------------------------------------------


def subscribers(session: Session, uid: str) -> list[str]:
    """The AE titles subscribed to this workitem, or to every workitem."""
    rows = session.scalars(
        select(UpsSubscription.ae_title).where(
            or_(UpsSubscription.workitem_uid.is_(None), UpsSubscription.workitem_uid == uid)
        )
    ).all()
    return sorted(set(rows))


def state_report(ds: Dataset) -> Dataset:
    """The Event Information of a UPS State Report (PS3.4 Table CC.2.4-1), with the priority.

    The Scheduled Procedure Step Priority is sent with every state report (also when only the
    priority changed), so a watcher sees a reprioritisation without another N-GET."""
    info = Dataset()
    info.ProcedureStepState = ds.ProcedureStepState
    info.InputReadinessState = ds.get("InputReadinessState", "READY")
    info.ScheduledProcedureStepPriority = ds.get("ScheduledProcedureStepPriority", "MEDIUM")
    if ds.ProcedureStepState == CANCELED:
        progress = ds.get("ProcedureStepProgressInformationSequence") or []
        if progress:
            item = progress[0]
            if "ReasonForCancellation" in item:
                info.ReasonForCancellation = item.ReasonForCancellation
            if "ProcedureStepDiscontinuationReasonCodeSequence" in item:
                info.ProcedureStepDiscontinuationReasonCodeSequence = (
                    item.ProcedureStepDiscontinuationReasonCodeSequence
                )
    return info


def queue_event(
    session: Session,
    uid: str,
    info: Dataset,
    now: dt.datetime,
    *,
    event_type: int = STATE_REPORT,
    only: Sequence[str] | None = None,
) -> int:
    """One pending event per subscriber (or per AE in `only`), in the caller's transaction."""
    targets = list(only) if only is not None else subscribers(session, uid)
    data = to_json(info)
    for ae in targets:
        session.add(
            UpsEvent(
                ae_title=ae,
                workitem_uid=uid,
                event_type=event_type,
                info=data,
                state="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(targets)


# ---- the state machine --------------------------------------------------------------------------------


def _claim_row(session: Session, w: UpsWorkitem, new_state: str, now: dt.datetime) -> bool:
    """Moves the row from its state to `new_state` only if no one else did first (several workers, the
    listener and the web app change workitems)."""
    res = session.execute(
        update(UpsWorkitem)
        .where(UpsWorkitem.id == w.id, UpsWorkitem.state == w.state)
        .values(state=new_state, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(res, "rowcount", 1) != 1:
        session.expire(w)
        return False
    return True


def _save(session: Session, w: UpsWorkitem, ds: Dataset, now: dt.datetime) -> None:
    if "TransactionUID" in ds:
        del ds.TransactionUID
    w.dataset = to_json(ds)
    w.state = ds.ProcedureStepState
    w.priority = ds.ScheduledProcedureStepPriority
    w.updated_at = now


def _performed(ds: Dataset) -> Dataset:
    seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence")
    if not seq:
        item = Dataset()
        item.ActualHumanPerformersSequence = DicomSequence([])
        item.PerformedStationNameCodeSequence = DicomSequence(list(ds.get("ScheduledStationNameCodeSequence", [])))
        item.PerformedStationClassCodeSequence = DicomSequence([])
        item.PerformedStationGeographicLocationCodeSequence = DicomSequence([])
        item.PerformedProcedureStepDescription = str(ds.get("ProcedureStepLabel", ""))[:64]
        item.PerformedWorkitemCodeSequence = DicomSequence(list(ds.get("ScheduledWorkitemCodeSequence", [])))
        item.PerformedProcessingParametersSequence = DicomSequence([])
        item.OutputInformationSequence = DicomSequence([])
        ds.UnifiedProcedureStepPerformedProcedureSequence = DicomSequence([item])
        seq = ds.UnifiedProcedureStepPerformedProcedureSequence
    return seq[0]


def change_state(
    session: Session,
    w: UpsWorkitem,
    new_state: str,
    now: dt.datetime,
    *,
    transaction_uid: str | None = None,
    outputs: Sequence[Dataset] = (),
    reason: str | None = None,
) -> bool:
    """One transition of the UPS state machine (PS3.4 Table CC.1.1-2); queues the state report.

    Returns False if another process changed the workitem first (nothing done). The caller checks
    that the transition is allowed (`dimse`/`rest` for peers; `sync` for the node's own jobs)."""
    ds = from_json(w.dataset)
    if not _claim_row(session, w, new_state, now):
        return False
    ds.ProcedureStepState = new_state
    if new_state == IN_PROGRESS:
        w.transaction_uid = transaction_uid or str(generate_uid())
        _performed(ds).PerformedProcedureStepStartDateTime = _dt(now)
        progress = Dataset()
        progress.ProcedureStepProgress = 0
        ds.ProcedureStepProgressInformationSequence = DicomSequence([progress])
    elif new_state == COMPLETED:
        item = _performed(ds)
        if "PerformedProcedureStepStartDateTime" not in item:
            item.PerformedProcedureStepStartDateTime = _dt(now)
        item.PerformedProcedureStepEndDateTime = _dt(now)
        if outputs:
            item.OutputInformationSequence = DicomSequence(list(outputs))
        progress = Dataset()
        progress.ProcedureStepProgress = 100
        ds.ProcedureStepProgressInformationSequence = DicomSequence([progress])
    elif new_state == CANCELED:
        progress = Dataset()
        progress.ProcedureStepCancellationDateTime = _dt(now)
        progress.ReasonForCancellation = (reason or "canceled")[:MAX_REASON]
        ds.ProcedureStepProgressInformationSequence = DicomSequence([progress])
        seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence")
        if seq:
            seq[0].PerformedProcedureStepEndDateTime = _dt(now)
    _save(session, w, ds, now)
    n = queue_event(session, w.sop_instance_uid, state_report(ds), now)
    log.info("UPS %s: %s (job %s; %d subscriber(s) to notify)", w.sop_instance_uid, new_state, w.job_id, n)
    return True


def set_priority(session: Session, w: UpsWorkitem, priority: str, now: dt.datetime, *, notify: bool = True) -> bool:
    """Changes the Scheduled Procedure Step Priority and notifies subscribers (False: unchanged).

    ``notify=False``: the next state report carries it (triage's priority as the job completes)."""
    if priority not in PRIORITIES:
        raise UpsRefused(0x0106, f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    if w.priority == priority:
        return False
    ds = from_json(w.dataset)
    ds.ScheduledProcedureStepPriority = priority
    ds.ScheduledProcedureStepModificationDateTime = _dt(now)
    _save(session, w, ds, now)
    n = queue_event(session, w.sop_instance_uid, state_report(ds), now) if notify else 0
    log.info("UPS %s: priority %s (%d subscriber(s) to notify)", w.sop_instance_uid, priority, n)
    return True


def report_progress(session: Session, w: UpsWorkitem, step: str, now: dt.datetime) -> bool:
    """The running job's step as the workitem's progress, and a UPS Progress Report (event type 3)
    to subscribers when it changed (PS3.4 Table CC.2.4-1). False: unchanged."""
    ds = from_json(w.dataset)
    seq = ds.get("ProcedureStepProgressInformationSequence") or []
    item = seq[0] if seq else Dataset()
    description = f"AI job step: {step}"[:64]
    if item.get("ProcedureStepProgressDescription") == description:
        return False
    item.ProcedureStepProgress = STEP_PROGRESS.get(step, int(item.get("ProcedureStepProgress", 0) or 0))
    item.ProcedureStepProgressDescription = description
    ds.ProcedureStepProgressInformationSequence = DicomSequence([item])
    _save(session, w, ds, now)
    info = Dataset()
    info.ProcedureStepProgressInformationSequence = DicomSequence([item])
    queue_event(session, w.sop_instance_uid, info, now, event_type=PROGRESS_REPORT)
    return True


# ---- following the jobs table ---------------------------------------------------------------------------


def _study_priority(session: Session, study_id: int) -> str | None:
    p = session.scalar(select(WorklistEntry.priority).where(WorklistEntry.study_id == study_id))
    return PRIORITY_OF_WORKLIST.get(p) if p else None


def create_for_job(
    session: Session, settings: Settings, job: Job, now: dt.datetime, *, replaces: UpsWorkitem | None = None
) -> UpsWorkitem:
    """The job's workitem, SCHEDULED (and the state report to global subscribers)."""
    generation = 0
    if replaces is not None:
        generation = len(session.scalars(select(UpsWorkitem.id).where(UpsWorkitem.job_id == job.id)).all())
    uid = workitem_uid(settings, job, generation)
    priority = _study_priority(session, job.study_id) or DEFAULT_PRIORITY
    ds = job_dataset(session, settings, job, uid, priority, now)
    if replaces is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = UPS_PUSH
        ref.ReferencedSOPInstanceUID = replaces.sop_instance_uid
        ds.ReplacedProcedureStepSequence = DicomSequence([ref])
    w = UpsWorkitem(
        sop_instance_uid=uid,
        job_id=job.id,
        study_uid=ds.StudyInstanceUID or None,
        state=SCHEDULED,
        priority=priority,
        dataset=to_json(ds),
        created_at=now,
        updated_at=now,
    )
    session.add(w)
    session.flush()
    n = queue_event(session, uid, state_report(ds), now)
    log.info("UPS %s: SCHEDULED for job %s (%s; %d subscriber(s) to notify)", uid, job.id, priority, n)
    return w


def output_references(session: Session, settings: Settings, job: Job) -> list[Dataset]:
    """The job's result objects (SR, SEG, ...) as Output Information items, one per series."""
    study_uid = session.scalar(select(Study.study_uid).where(Study.id == job.study_id)) or ""
    by_series: dict[str, list[tuple[str, str]]] = {}
    for ro in session.scalars(select(ResultObject).where(ResultObject.job_id == job.id).order_by(ResultObject.id)):
        by_series.setdefault(ro.series_uid, []).append((ro.sop_class_uid, ro.sop_instance_uid))
    return [_referenced_instances(study_uid, s, refs, settings.ae_title) for s, refs in by_series.items()]


def advance(session: Session, settings: Settings, w: UpsWorkitem, job: Job, now: dt.datetime) -> int:
    """Brings a non-final workitem to its job's state, through every state in between; returns the
    number of transitions."""
    steps = 0
    started = job.state == "processing" or job.attempts > 0 or job.state == "done"
    if job.state == "superseded" and w.state == SCHEDULED:
        return int(
            change_state(session, w, CANCELED, now, reason=f"superseded by a newer job of the study (job {job.id})")
        )
    if w.state == SCHEDULED and job.state in ("failed", "dead") and not started:
        # refused before any attempt ran (not a path the job table takes today): canceled from SCHEDULED
        reason = f"the AI job failed ({job.state}): {job.error or 'no reason recorded'}"
        return int(change_state(session, w, CANCELED, now, reason=reason))
    if w.state == SCHEDULED and started:
        steps += change_state(session, w, IN_PROGRESS, now)
    if w.state != IN_PROGRESS:
        return steps
    if job.state == "done":
        priority = _study_priority(session, job.study_id)
        if priority and priority != w.priority:
            set_priority(session, w, priority, now, notify=False)  # announced with COMPLETED
        steps += change_state(session, w, COMPLETED, now, outputs=output_references(session, settings, job))
    elif job.state in ("failed", "dead"):
        reason = f"the AI job failed ({job.state}): {job.error or 'no reason recorded'}"
        steps += change_state(session, w, CANCELED, now, reason=reason)
    elif job.state == "superseded":
        steps += change_state(
            session, w, CANCELED, now, reason=f"superseded by a newer job of the study (job {job.id})"
        )
    return steps


ACTIVE_JOB_STATES = ("pending", "queued", "processing")


def _create_once(
    session: Session, settings: Settings, job: Job, now: dt.datetime, *, replaces: UpsWorkitem | None = None
) -> int:
    """`create_for_job` in a savepoint: when another worker's round created the same workitem first (same
    UID, see `workitem_uid`), the unique constraint refuses this one and the round goes on without it.
    Returns 1 when this round created it."""
    try:
        with session.begin_nested():
            create_for_job(session, settings, job, now, replaces=replaces)
    except IntegrityError:
        log.debug("UPS workitem of job %s already created by another worker", job.id)
        return 0
    return 1


def sync(session: Session, settings: Settings, now: dt.datetime, *, limit: int = 500) -> int:
    """One round: workitems for new jobs, every non-final workitem brought to its job's state, priorities
    following the worklist. Returns the number of changes.

    Each question is one query that returns only the rows needing a change, so an idle round reads
    no workitem and no job."""
    changes = 0
    since = now - BACKFILL
    # jobs without a workitem: new, or finished recently (a node that just started using UPS)
    for job in session.scalars(
        select(Job)
        .outerjoin(UpsWorkitem, UpsWorkitem.job_id == Job.id)
        .where(
            UpsWorkitem.id.is_(None),
            Job.state != "superseded",
            or_(Job.state.in_(ACTIVE_JOB_STATES), Job.created_at >= since, Job.finished_at >= since),
        )
        .order_by(Job.id)
        .limit(limit)
    ).all():
        changes += _create_once(session, settings, job, now)
    # canceled workitems of jobs an admin retried (no newer workitem yet): a new one replaces each
    newer = aliased(UpsWorkitem)
    for w, job in session.execute(
        select(UpsWorkitem, Job)
        .join(Job, Job.id == UpsWorkitem.job_id)
        .where(
            UpsWorkitem.state == CANCELED,
            Job.state.in_(ACTIVE_JOB_STATES),
            ~exists().where(newer.job_id == UpsWorkitem.job_id, newer.id > UpsWorkitem.id),
        )
        .order_by(UpsWorkitem.id)
        .limit(limit)
    ).all():
        changes += _create_once(session, settings, job, now, replaces=w)
    # open workitems whose job moved on
    started = or_(Job.state.notin_(("pending", "queued")), Job.attempts > 0)
    ended = Job.state.in_(("done", "failed", "dead", "superseded"))
    for w, job in session.execute(
        select(UpsWorkitem, Job)
        .join(Job, Job.id == UpsWorkitem.job_id)
        .where(
            or_(
                and_(UpsWorkitem.state == SCHEDULED, started),
                and_(UpsWorkitem.state == IN_PROGRESS, ended),
            )
        )
        .order_by(UpsWorkitem.id)
        .limit(limit)
    ).all():
        changes += advance(session, settings, w, job, now)
    # running jobs: their step as progress
    for w, step in session.execute(
        select(UpsWorkitem, Job.step)
        .join(Job, Job.id == UpsWorkitem.job_id)
        .where(UpsWorkitem.state == IN_PROGRESS, Job.state == "processing", Job.step.is_not(None))
        .order_by(UpsWorkitem.id)
        .limit(limit)
    ).all():
        changes += report_progress(session, w, str(step), now)
    changes += follow_worklist_priority(session, now, since=since)
    return changes


def _ups_priority_of(column: Any) -> Any:
    """The worklist priority column as a UPS priority, in SQL."""
    return case(
        *((column == wl, ups) for wl, ups in PRIORITY_OF_WORKLIST.items()),
        else_=DEFAULT_PRIORITY,
    )


def follow_worklist_priority(
    session: Session, now: dt.datetime, *, study_id: int | None = None, since: dt.datetime | None = None
) -> int:
    """Sets each workitem's priority from its study's worklist entry (an admin's override or triage).

    Only workitems whose priority differs are read."""
    q = (
        select(UpsWorkitem, WorklistEntry.priority)
        .join(Job, Job.id == UpsWorkitem.job_id)
        .join(WorklistEntry, WorklistEntry.study_id == Job.study_id)
        .where(UpsWorkitem.priority != _ups_priority_of(WorklistEntry.priority))
    )
    if study_id is not None:
        q = q.where(Job.study_id == study_id)
    if since is not None:
        q = q.where(WorklistEntry.updated_at >= since)
    changes = 0
    for w, wl_priority in session.execute(q).all():
        priority = PRIORITY_OF_WORKLIST.get(wl_priority)
        if priority and priority != w.priority:
            changes += set_priority(session, w, priority, now)
    return changes


# ---- reading ------------------------------------------------------------------------------------------


def get(session: Session, uid: str) -> UpsWorkitem:
    w = session.scalar(select(UpsWorkitem).where(UpsWorkitem.sop_instance_uid == uid))
    if w is None:
        raise UpsRefused(0xC307, f"no workitem {uid}", http_status=404)
    return w


def dataset_of(w: UpsWorkitem) -> Dataset:
    """The workitem's attributes as a peer sees them (never the Transaction UID)."""
    ds = from_json(w.dataset)
    if "TransactionUID" in ds:
        del ds.TransactionUID
    return ds
