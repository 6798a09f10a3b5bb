"""Response models of the JSON API (``/api``): what OpenAPI (``/openapi.json``) documents.

The read models (`node.web.queries`, `node.jobs.listing`) build plain dicts; these models name
their keys and types. They accept keys they do not name (``extra="allow"``), so a key added to a
read model is never dropped from an answer before it is documented here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from node.jobs.listing import DispatchOut, JobOut


class Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- auth ------------------------------------------------------------------------------------


class MeOut(Out):
    username: str
    role: str
    expires_at: float
    csrf_token: str | None = Field(description="for the X-CSRF-Token header (cookie sessions only)")


# ---- worklist --------------------------------------------------------------------------------


class OverrideOut(Out):
    priority: str
    reason: str | None


class GradeShareOut(Out):
    grade: str
    probability: float
    text: str = Field(description='the probability as the pages write it, e.g. "71 %"')


class FindingDisplayOut(Out):
    """How every page writes the finding (`worklists.triage.display_finding`)."""

    name: str = Field(description='the finding without its grade, e.g. "ACL tear"')
    level: str | None
    evaluated: bool
    probability: float | None = Field(description="the headline: P(finding, any grade), e.g. P(tear) = 1 - P(intact)")
    probability_text: str | None = Field(description='the headline as written, e.g. "98 %", ">99 %"')
    grade: str | None = Field(description="the grade the model reports (its most probable positive grade)")
    grades: list[GradeShareOut] = Field(description="the positive grades, most probable first (the grade split)")
    short: str = Field(description='e.g. "ACL tear 98 %"')
    text: str = Field(description='e.g. "ACL tear 98 % (complete 71 %, partial 27 %)", or why it was not evaluated')
    qc_reason: str | None
    qc_text: str | None = Field(description="the QC reason code in words (not evaluated only)")


class FindingOut(Out):
    id: int
    model: str
    model_version: str
    weights_sha256: str
    code: str
    label: str
    evaluated: bool
    qc_reason: str | None
    qc_message: str | None = Field(description="the QC gate's own message (admins only; null for a reader)")
    probability: float | None
    uncertainty: float | None
    positive: bool | None
    grade: str | None
    grade_probabilities: dict[str, Any] | None
    level: str | None
    site: str | None
    laterality: str | None
    series_uid: str | None
    demo_weights: bool
    display: FindingDisplayOut


class EntryStateOut(Out):
    priority: str = Field(description="in force now (after ageing)")
    assigned_priority: str
    ai_priority: str
    override: OverrideOut | None
    ageing: str | None
    score: float | int | None
    reasons: list[Any]
    needs_review: bool
    status: str
    assigned_to: str | None
    read_by: str | None
    read_at: str | None


class WorklistJobOut(Out):
    id: int
    state: str
    finished_at: str | None


class WorklistItemOut(EntryStateOut):
    position: int
    entry_id: int
    study_id: int
    study_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_description: str | None
    study_datetime_as_sent: str | None
    received_at: str | None
    waiting_minutes: int
    due_at: str | None = Field(default=None, description="reading target reached at (unread studies)")
    target_minutes: float | None = Field(default=None, description="the reading target of its priority")
    overdue: bool = Field(default=False, description="unread and past its reading target")
    anatomy: str | None
    job: WorklistJobOut | None
    dispatch: DispatchOut
    findings: list[FindingOut]
    qc_flags: list[str]


class PendingStudyOut(Out):
    study_id: int
    job_id: int
    anatomy: str
    state: str
    attempts: int
    patient_name: str | None
    patient_id: str | None
    study_datetime_as_sent: str | None
    received_at: str | None
    error: str | None


class WorklistOut(Out):
    timezone: str
    policy_version: str | int | None
    entries: list[WorklistItemOut]
    in_progress: list[PendingStudyOut] = Field(description="studies with a job in progress and no entry yet")


class NextStudyOut(Out):
    entry_id: int
    study_id: int
    priority: str


class PriorityOut(Out):
    entry_id: int
    priority: str
    ai_priority: str
    override: str | None


class AssignOut(Out):
    entry_id: int
    assigned_to: str | None


class ReadOut(Out):
    entry_id: int
    status: str
    read_by: str | None


# ---- a study ---------------------------------------------------------------------------------


class RoutingFactOut(Out):
    value: str | None
    source: str
    detail: str


class RoutingDecisionOut(Out):
    routed: bool
    pipeline: str | None
    role: str | None
    rule: str | None
    pending: bool


class RoutingSignalOut(Out):
    name: str
    value: str | None
    source: str
    used: bool


class RoutingOut(Out):
    """Why a series was routed (or not)."""

    recorded: bool
    decision: RoutingDecisionOut
    facts: dict[str, RoutingFactOut] = Field(description="plane, contrast and anatomy")
    flags: list[str | None]
    signals: list[RoutingSignalOut]


class StudySeriesOut(Out):
    id: int
    series_uid: str
    number: int | None
    description: str | None
    modality: str | None
    body_part: str | None
    laterality: str | None
    instances: int
    state: str
    role: str | None
    used_by: list[str]
    own_object: bool
    pipeline: str | None
    routing: RoutingOut


class ResultGroupOut(Out):
    kind: str
    series_uid: str
    objects: int
    result_ids: list[int]
    dispatch: dict[str, int] = Field(description="objects by outbox state")


class ModelUsedOut(Out):
    model: str
    version: str | None
    weights_sha256: str | None
    demo_weights: bool


class EntryOut(EntryStateOut):
    entry_id: int
    job_id: int | None


class AuditEventOut(Out):
    id: int
    at: str | None
    actor: str
    action: str
    entity_type: str | None
    entity_id: str | None
    old: str | None
    new: str | None
    reason: str | None
    details: dict[str, Any] | list[Any] | None


class StudyOut(Out):
    study_id: int
    study_uid: str
    patient_name: str | None
    patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    study_description: str | None
    study_datetime_as_sent: str | None
    received_at: str | None
    timezone: str
    entry: EntryOut | None
    job: JobOut | None = Field(description="the job whose findings are shown")
    jobs: list[JobOut]
    findings: list[FindingOut]
    superres_checks: list[dict[str, Any]]
    models: list[ModelUsedOut]
    demo_weights: bool
    notice: str
    series: list[StudySeriesOut]
    results: list[ResultGroupOut]
    history: list[AuditEventOut]


class ViewerSeriesOut(Out):
    id: int
    description: str | None
    number: int | None
    role: str | None


class ViewerSelectedOut(Out):
    id: int
    series_uid: str
    description: str | None
    slices: int
    rows: int
    cols: int


class ViewerOut(Out):
    study_id: int
    series: list[ViewerSeriesOut]
    selected: ViewerSelectedOut
    overlays: list[dict[str, Any]] = Field(description="SEG results on the selected series, with their segments")
    overlay_slices: list[int]
    start_slice: int
    superres: dict[str, Any] | None = Field(description="the super-resolved series of the selected one, if any")
    unmatched_segs: list[dict[str, Any]]


# ---- admin -----------------------------------------------------------------------------------


class JobsOut(Out):
    jobs: list[JobOut]


class JobRetriedOut(Out):
    id: int
    state: str


class OutboxRetriedOut(Out):
    id: int
    state: str | None
    previous_state: str | None


class OutboxResultOut(Out):
    id: int
    job_id: int
    kind: str
    sop_instance_uid: str
    series_uid: str


class OutboxItemOut(Out):
    id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: str | None
    last_error: str | None
    last_status: int | None
    created_at: str | None
    sent_at: str | None
    result: OutboxResultOut


class OutboxOut(Out):
    items: list[OutboxItemOut]


class RoutingFileOut(Out):
    path: str
    exists: bool
    text: str
    rules: list[dict[str, Any]]
    error: str | None


class RoutingConfigOut(Out):
    routing: RoutingFileOut
    destinations: list[dict[str, Any]] = Field(description="result destinations, secrets masked")


class SeriesRoutingOut(Out):
    id: int
    series_uid: str
    study_id: int
    study_uid: str
    study_description: str | None
    number: int | None
    description: str | None
    protocol_name: str | None
    modality: str | None
    body_part: str | None
    laterality: str | None
    manufacturer: str | None
    calling_ae: str | None
    instances: int
    state: str
    own_object: bool
    received_at: str | None
    completed_at: str | None
    routing: RoutingOut


class UnroutedOut(Out):
    series: list[SeriesRoutingOut]
    total: int
    next_before_id: int | None = Field(description="pass as before_id for the next page")


class RuleDraftOut(Out):
    name: str
    pipeline: str | None
    role: str | None
    anatomy: str | None
    plane: str | None
    contrast: list[str]
    description: str | None


class RulesFileStatusOut(Out):
    path: str
    shipped_default: bool
    writable: bool
    fact_keys: list[str]


class SeriesRuleDraftOut(Out):
    series: SeriesRoutingOut
    draft: RuleDraftOut
    rules_file: RulesFileStatusOut


class RuleAddedOut(Out):
    rule: RuleDraftOut
    path: str
    sha256: str
    rules: int = Field(description="rules in the file now")
    block: str = Field(description="the TOML block inserted")
    series_uid: str
    rerouted: dict[str, Any] | None


class ModelsOut(Out):
    registry: list[dict[str, Any]] = Field(description="the model cards")
    registry_error: str | None
    seen_in_findings: list[dict[str, Any]]


class AuditOut(Out):
    events: list[AuditEventOut]


class UserOut(Out):
    username: str
    role: str
    active: bool
    created_at: str


class UsersOut(Out):
    users: list[UserOut]


class PolicyOut(Out):
    version: str | int | None
    source: str | None
    default_priority: str
    priorities: list[str]
    review: dict[str, Any]
    ageing: list[dict[str, Any]]
    rules: list[dict[str, Any]]
