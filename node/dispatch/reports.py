"""What an HL7 or FHIR destination is told about one finished job: the study, the findings, the models.

The HL7 (`node.dispatch.hl7`) and FHIR (`node.dispatch.fhir`) destinations get one outbox item per job,
hung on the job's SR (`node.jobs.runner.store_products`); `load_report` reads that job back from the
database by the SR's SOP Instance UID. Findings carry the same codes as the SR (`node.results.codes`).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import select

from node.db.database import Database
from node.db.schema import Finding, Job, ResultObject, Study
from node.dispatch.senders import Claimed, Outcome
from node.results import codes
from node.settings import Settings

M = TypeVar("M")

SUPERRES_CODE = "superres"  # the informational findings row of a super-resolved series

#: the sentence every HL7 and FHIR report carries (as the SR carries its notice)
NOT_FOR_DIAGNOSTIC_USE = (
    "Not for diagnostic use: findings computed by msknode AI models, to be confirmed by a radiologist."
)


@dataclass(frozen=True)
class ReportFinding:
    """One ``findings`` row as the reports need it."""

    code: str
    label: str
    model_name: str
    model_version: str
    weights_sha256: str
    evaluated: bool
    qc_reason: str | None = None
    probability: float | None = None
    uncertainty: float | None = None
    positive: bool | None = None
    grade: str | None = None
    level: str | None = None
    site: str | None = None
    laterality: str | None = None
    series_uid: str | None = None

    @property
    def concept(self) -> codes.CodedConcept:
        """The finding's code, the same as the SR's finding type (its model's finding when not evaluated)."""
        if self.evaluated:
            return codes.finding_code(self.code, self.label)
        return codes.finding_for_model(self.model_name)

    @property
    def value(self) -> codes.CodedConcept:
        """Present, Absent or Not Evaluated, as in the SR's qualitative evaluation."""
        if not self.evaluated:
            return codes.NOT_EVALUATED
        return codes.PRESENT if self.positive else codes.ABSENT

    def sentence(self) -> str:
        """The finding in words, with its model (for the HL7 NTE and the FHIR note)."""
        from worklists.triage import qc_sentence

        model = f"Model {self.model_name} {self.model_version} (weights SHA-256 {self.weights_sha256})"
        if not self.evaluated:
            return f"{model}: not evaluated: {qc_sentence(self.qc_reason).rstrip('.')}."
        parts = [f"{model}: {self.label or self.code}: {'present' if self.positive else 'absent'}"]
        if self.probability is not None:
            p = f"probability {self.probability:.2f}"
            if self.uncertainty is not None:
                p += f" (SD {self.uncertainty:.2f})"
            parts.append(p)
        if self.grade:
            parts.append(f"grade {self.grade.replace('_', ' ')}")
        where = ", ".join(x for x in (self.laterality, self.level, self.site) if x)
        if where:
            parts.append(f"site {where}")
        return "; ".join(parts) + "."


@dataclass(frozen=True)
class StudyReport:
    """One finished job of one study, ready to be written as ORU^R01 or a FHIR bundle."""

    job_id: int
    pipeline: str
    corrects_earlier: bool  # the job supersedes an earlier one: its report corrects the earlier report
    finished_at: dt.datetime
    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None  # DICOM PN (family^given^middle^prefix^suffix)
    patient_birth_date: str | None
    patient_sex: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None
    sr_sop_instance_uid: str
    sr_series_uid: str
    findings: tuple[ReportFinding, ...]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def redact(self, text: str) -> str:
        """``text`` (a receiver's error message) without this report's patient ID and name parts: what a
        receiver answers goes to the outbox's error column and the log, which never carry them."""
        secrets = [self.patient_id or ""]
        secrets += [p for p in re.split(r"[\^=]", self.patient_name or "") if len(p.strip()) >= 2]
        for s in sorted({x.strip() for x in secrets if x and x.strip()}, key=len, reverse=True):
            text = re.sub(rf"(?<!\w){re.escape(s)}(?!\w)", "***", text, flags=re.IGNORECASE)
        return text

    @property
    def study_datetime(self) -> str | None:
        """YYYYMMDD[HHMMSS] of the study, as HL7 DTM (None without a study date)."""
        if not self.study_date:
            return None
        t = "".join(ch for ch in (self.study_time or "").split(".")[0] if ch.isdigit())[:6]
        return self.study_date + t


_DATABASES: dict[str, Database] = {}
_DB_LOCK = threading.Lock()
_MAX_DATABASES = 4  # a process sends for one database; tests use many: the oldest engines are disposed


def _database(settings: Settings) -> Database:
    with _DB_LOCK:
        db = _DATABASES.pop(settings.database_url, None)
        if db is None:
            db = Database(settings.database_url, migrate=False)
        _DATABASES[settings.database_url] = db  # most recently used last
        while len(_DATABASES) > _MAX_DATABASES:
            _DATABASES.pop(next(iter(_DATABASES))).dispose()
        return db


def load_report(settings: Settings, sr_sop_instance_uid: str) -> StudyReport | None:
    """The job whose SR has this SOP Instance UID, with its study and findings (None: no such SR)."""
    with _database(settings).session() as s:
        row = s.execute(
            select(ResultObject, Job, Study)
            .join(Job, Job.id == ResultObject.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(ResultObject.sop_instance_uid == sr_sop_instance_uid)
        ).first()
        if row is None:
            return None
        ro, job, study = row
        findings = tuple(
            ReportFinding(
                code=f.code,
                label=f.label,
                model_name=f.model_name,
                model_version=f.model_version,
                weights_sha256=f.weights_sha256,
                evaluated=bool(f.evaluated),
                qc_reason=f.qc_reason,
                probability=f.probability,
                uncertainty=f.uncertainty,
                positive=f.positive,
                grade=f.grade,
                level=f.level,
                site=f.site,
                laterality=f.laterality,
                series_uid=f.series_uid,
            )
            for f in s.scalars(select(Finding).where(Finding.job_id == job.id).order_by(Finding.id))
            # super-resolution rows are not findings of the patient (they are in the SR, not in the report)
            if f.code != SUPERRES_CODE
        )
        return StudyReport(
            job_id=job.id,
            pipeline=job.pipeline,
            corrects_earlier=job.supersedes_job_id is not None,
            finished_at=job.finished_at or ro.created_at,
            study_uid=study.study_uid,
            accession_number=study.accession_number,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
            patient_birth_date=study.patient_birth_date,
            patient_sex=study.patient_sex,
            study_date=study.study_date,
            study_time=study.study_time,
            study_description=study.study_description,
            sr_sop_instance_uid=ro.sop_instance_uid,
            sr_series_uid=ro.series_uid,
            findings=findings,
            models=dict(job.model_versions or {}),
        )


def report_message(
    settings: Settings, item: Claimed, build: Callable[[StudyReport], M], invalid: str
) -> tuple[StudyReport, M] | Outcome:
    """The report of ``item``'s SR and the message ``build`` makes of it; or the permanent failure when no
    job has that SR or the message cannot be built (a retry would build the same one), ``invalid`` naming
    what is wrong (its text is redacted of the patient's identity)."""
    report = load_report(settings, item.sop_instance_uid)
    if report is None:
        return Outcome.permanent_failure(f"no job has the SR {item.sop_instance_uid}: nothing to report")
    try:
        return report, build(report)
    except Exception as e:  # our own message is invalid: a retry builds the same one
        return Outcome.permanent_failure(report.redact(f"{invalid}: {type(e).__name__}: {e}")[:500])
