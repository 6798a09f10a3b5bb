"""The node's tables: the instance index, completeness timers, jobs, workers, results and the outbox.

The database stores columns, never Datasets. States are plain strings checked by
the code that writes them (see the ``*_STATES`` tuples).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from node.db.database import Base, UTCDateTime, utcnow

SERIES_STATES = ("receiving", "complete", "queued", "processing", "done", "failed", "unrouted")
JOB_STATES = ("pending", "queued", "processing", "done", "failed", "dead", "superseded")
OUTBOX_STATES = ("pending", "sending", "sent", "dead")
DEPLOYMENT_STATES = ("shadow", "active", "retired")

UID = String(64)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    specific_character_set: Mapped[str | None] = mapped_column(String(128))
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # completeness: the study is settled once every routed series is complete and
    # nothing arrived before this deadline (a timer in the database)
    study_quiet_deadline: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    protocol_name: Mapped[str | None] = mapped_column(String(64))
    laterality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    # a count the series announces (Images in Acquisition, frames), if any
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    own_object: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    pipeline: Mapped[str | None] = mapped_column(String(32))
    role: Mapped[str | None] = mapped_column(String(32))
    routing_rule: Mapped[str | None] = mapped_column(String(128))
    # the acquisition parameters of its first instance (node.intake.recognition.Acquisition.to_json)
    acquisition: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # what routing recognised (node.intake.recognition): plane, contrast class, anatomy, and why
    # (node.intake.routing.Explanation.to_json), recorded each time the series is routed
    plane: Mapped[str | None] = mapped_column(String(16))
    contrast: Mapped[str | None] = mapped_column(String(16))
    anatomy: Mapped[str | None] = mapped_column(String(32))
    routing_explanation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # the series is complete at this time unless another instance arrives (a timer in the database);
    # NULL while an association that delivers to it is still open
    quiet_deadline: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    open_associations: Mapped[int] = mapped_column(Integer, default=0)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    completed_reason: Mapped[str | None] = mapped_column(String(32))
    # the instance count when the series was found complete: more instances later re-open it
    completed_instances: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_position: Mapped[str | None] = mapped_column(String(128))
    image_orientation: Mapped[str | None] = mapped_column(String(256))
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    # indexed: an association's end counts its instances, and purging associations nulls this column
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id", ondelete="SET NULL"), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Association(Base):
    """One DICOM association accepted by a listener process."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    listener: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(16))  # released, aborted, lost
    instances: Mapped[int] = mapped_column(Integer, default=0)


class AssociationSeries(Base):
    """Which series an (open) association has delivered to: completeness waits for release."""

    __tablename__ = "association_series"

    association_id: Mapped[int] = mapped_column(ForeignKey("associations.id", ondelete="CASCADE"), primary_key=True)
    # indexed on its own too: an association's end asks which other open associations deliver to each series
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), primary_key=True, index=True)


class Quarantine(Base):
    """An object the listener refused, kept for inspection."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(String(512))


class Job(Base):
    """One unit of work: a study and anatomy (pipeline). The database, not the broker, is its record."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_lease", "state", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    pipeline: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # a hash of the input SOP Instance UIDs (+ pipeline): same inputs -> same result UIDs
    input_fingerprint: Mapped[str | None] = mapped_column(String(64))
    supersedes_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    enqueue_pending: Mapped[bool] = mapped_column(Boolean, default=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    step: Mapped[str | None] = mapped_column(String(32))  # the step the running attempt is in (progress)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model_versions: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship()
    inputs: Mapped[list[JobInput]] = relationship(back_populates="job", cascade="all, delete-orphan")


class JobInput(Base):
    __tablename__ = "job_inputs"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str | None] = mapped_column(String(32))
    # which model took this series as its input (filled by the pipeline)
    used_by: Mapped[list[str] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="inputs")
    series: Mapped[Series] = relationship()


class Finding(Base):
    """One model output for a job: a finding (or a 'not evaluated' with the QC reason)."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(UID)
    code: Mapped[str] = mapped_column(String(64))  # e.g. acl_tear, meniscal_tear, stenosis
    label: Mapped[str] = mapped_column(String(128))
    evaluated: Mapped[bool] = mapped_column(Boolean, default=True)
    qc_reason: Mapped[str | None] = mapped_column(String(64))
    qc_message: Mapped[str | None] = mapped_column(Text)
    probability: Mapped[float | None] = mapped_column(Float)
    uncertainty: Mapped[float | None] = mapped_column(Float)
    positive: Mapped[bool | None] = mapped_column(Boolean)
    grade: Mapped[str | None] = mapped_column(String(32))
    level: Mapped[str | None] = mapped_column(String(16))
    site: Mapped[str | None] = mapped_column(String(64))
    laterality: Mapped[str | None] = mapped_column(String(16))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # the model ran in shadow (silent trial): stored and shown, but no priority, nothing sent
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")


class ResultObject(Base):
    """A DICOM object msknode wrote for a job (SR, SEG, super-resolved MR, SC overlay)."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr, seg, superres, sc
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxItem(Base):
    """One result object to one destination; forgotten only once the destination acknowledged it."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("result_object_id", "destination", name="uq_outbox_object_destination"),
        Index("ix_outbox_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_object_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    result_object: Mapped[ResultObject] = relationship()


class ModelDeployment(Base):
    """A model version at this site, per pipeline: shadow (silent trial) or active; one version selected.

    Written only through `node.jobs.deployments` (every change audited).
    """

    __tablename__ = "model_deployments"
    __table_args__ = (UniqueConstraint("pipeline", "model_name", "version", name="uq_deployment_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    # the folder of a registered site version (model.pt, .sha256, card.json); NULL: the registry's own weights
    weights_dir: Mapped[str | None] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16), default="shadow")  # DEPLOYMENT_STATES
    selected: Mapped[bool] = mapped_column(Boolean, default=False)  # the version the pipeline runs
    real_data_validated: Mapped[bool] = mapped_column(Boolean, default=False)  # from its card
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)


class WorkerRecord(Base):
    """A worker process, seen alive by its periodic heartbeat (for health and the admin page)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid
    hostname: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str] | None] = mapped_column(JSON)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class FindingFeedback(Base):
    """A radiologist's answer to one AI finding (or to a model's negative result): agree or disagree,
    and the radiologist's own answer on the model's scale.

    One row per user and finding reference. The reference is the AI SR (SOP Instance UID) and
    the finding's identifier in it (``finding_key``: the finding code, ``@level`` for a
    per-level finding, e.g. ``spinal_stenosis@L4-L5``), so it survives a re-processing of the
    study; ``finding_id`` points at the row the node showed. Editable by its author until the
    study is marked read; every write is audited. Read by ``node.monitor`` (dashboard) and by the
    feedback export (the labelled set for retraining).
    """

    __tablename__ = "finding_feedback"
    __table_args__ = (UniqueConstraint("study_id", "finding_key", "created_by", name="uq_feedback_finding_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    finding_id: Mapped[int | None] = mapped_column(ForeignKey("findings.id", ondelete="SET NULL"))
    # the AI SR the finding was reported in (NULL when the job wrote no SR)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    finding_key: Mapped[str] = mapped_column(String(96))
    code: Mapped[str] = mapped_column(String(64))
    level: Mapped[str | None] = mapped_column(String(16))
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    # the scale both answers are on (the model's classes, normal first) and the two answers
    scale: Mapped[list[str]] = mapped_column(JSON)
    ai_answer: Mapped[str] = mapped_column(String(32))
    ai_positive: Mapped[bool] = mapped_column(Boolean)
    ai_probability: Mapped[float | None] = mapped_column(Float)
    agree: Mapped[bool] = mapped_column(Boolean)
    answer: Mapped[str] = mapped_column(String(32))  # the radiologist's answer (= ai_answer when agreeing)
    answer_positive: Mapped[bool] = mapped_column(Boolean)
    comment: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16), default="web")  # web (study page) or api
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


UPS_STATES = ("SCHEDULED", "IN PROGRESS", "CANCELED", "COMPLETED")
UPS_EVENT_STATES = ("pending", "sent", "dead")


class UpsWorkitem(Base):
    """A Unified Procedure Step (PS3.4 CC): the AI task of one job as hospital systems see it (node.ups)."""

    __tablename__ = "ups_workitems"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # the job it follows; NULL for a workitem a peer created by N-CREATE
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    state: Mapped[str] = mapped_column(String(16), default="SCHEDULED", index=True)
    priority: Mapped[str] = mapped_column(String(8), default="MEDIUM")
    # set when the workitem is claimed (IN PROGRESS); never returned to a peer
    transaction_uid: Mapped[str | None] = mapped_column(UID)
    # the UPS attributes as DICOM JSON (PS3.18 F.2), without the Transaction UID
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class UpsSubscription(Base):
    """A peer AE subscribed to one workitem's events, or to all (``workitem_uid`` NULL: global)."""

    __tablename__ = "ups_subscriptions"
    __table_args__ = (UniqueConstraint("ae_title", "workitem_uid", name="uq_ups_subscription"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    workitem_uid: Mapped[str | None] = mapped_column(UID)
    deletion_lock: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class UpsEvent(Base):
    """One N-EVENT-REPORT owed to one subscriber, delivered in id order per AE (an outbox of events)."""

    __tablename__ = "ups_events"
    __table_args__ = (Index("ix_ups_events_state_ae", "state", "ae_title"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    workitem_uid: Mapped[str] = mapped_column(UID)
    event_type: Mapped[int] = mapped_column(Integer)
    # the Event Information as DICOM JSON
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
