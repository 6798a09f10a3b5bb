"""What the node did with a study, and whether its results really are in the PACS and valid.

- `NodeReader` reads msknode's database read-only (no write lock, so polling never slows
  the node down): the study's current job, its timings, result objects, outbox states,
  findings and worklist entry (`NodeView`).
- `check_in_pacs` compares a finished study with its `Expectation`: every result object
  msknode wrote is in Orthanc, the kinds that must be there are, those that must not are
  not, and each object — as the PACS returns it — passes ``dciodvfy`` with no error.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.schema import Finding, Instance, Job, OutboxItem, ResultObject, Series, Study
from node.demo.cases import Expectation
from node.demo.pacs import OrthancPacs, Reception

TERMINAL_FAILED = ("failed", "dead")
KIND_NAMES = {"sr": "SR", "seg": "SEG", "sc": "SC overlay", "superres": "super-resolved series"}


@dataclass(frozen=True)
class ResultRow:
    kind: str
    sop_instance_uid: str
    series_uid: str
    outbox_states: tuple[str, ...]
    sent_at: dt.datetime | None
    last_error: str | None


@dataclass
class NodeView:
    """The node's state for one study (its newest job that is not superseded)."""

    study_uid: str
    received_instances: int = 0
    last_instance_at: dt.datetime | None = None
    job_id: int | None = None
    job_state: str | None = None
    job_error: str | None = None
    attempts: int = 0
    timings: dict = field(default_factory=dict)
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    results: list[ResultRow] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    priority: str | None = None
    needs_review: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def failed(self) -> str | None:
        """Why the study cannot complete any more (job failed/dead, an outbox item dead), or None."""
        if self.job_state in TERMINAL_FAILED:
            return f"job {self.job_id} is {self.job_state}: {self.job_error or 'no error recorded'}"
        dead = [r for r in self.results if "dead" in r.outbox_states]
        if dead:
            r = dead[0]
            return f"{KIND_NAMES.get(r.kind, r.kind)} {r.sop_instance_uid} could not be delivered: {r.last_error}"
        return None

    @property
    def delivered(self) -> bool:
        """The job is done and every result object was acknowledged by every destination."""
        return (
            self.job_state == "done"
            and bool(self.results)
            and all(r.outbox_states and set(r.outbox_states) == {"sent"} for r in self.results)
        )

    def counts(self) -> Counter:
        return Counter(r.kind for r in self.results)

    def positive_findings(self) -> list[dict]:
        return [f for f in self.findings if f["positive"] and f["code"] != "superres"]


class NodeReader:
    """Read-only access to msknode's SQLite database (plain deferred transactions, no BEGIN IMMEDIATE)."""

    def __init__(self, database_path: Path):
        uri = f"sqlite:///file:{Path(database_path).resolve()}?mode=ro&uri=true"
        self.engine = create_engine(uri, connect_args={"timeout": 30, "check_same_thread": False})
        self.sessions = sessionmaker(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    def view(self, study_uid: str) -> NodeView:
        with self.sessions() as s:
            return _view(s, study_uid)

    def own_objects_received(self) -> int:
        """Series msknode received that it had made itself (a routing loop if > 0)."""
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Series).where(Series.own_object.is_(True))) or 0)

    def jobs_of(self, study_uid: str) -> list[Job]:
        with self.sessions() as s:
            return list(s.scalars(select(Job).join(Study).where(Study.study_uid == study_uid).order_by(Job.id)))


def _view(s: Session, study_uid: str) -> NodeView:
    from worklists.tables import WorklistEntry

    view = NodeView(study_uid)
    study = s.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return view
    n, last = s.execute(
        select(func.count(Instance.id), func.max(Instance.received_at))
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study.id, Series.own_object.is_(False))
    ).one()
    view.received_instances = int(n or 0)
    view.last_instance_at = _utc(last)
    job = s.scalar(
        select(Job).where(Job.study_id == study.id, Job.state != "superseded").order_by(Job.id.desc()).limit(1)
    )
    if job is None:
        return view
    view.job_id, view.job_state, view.job_error, view.attempts = job.id, job.state, job.error, job.attempts
    view.timings = dict(job.timings or {})
    view.created_at, view.started_at, view.finished_at = (
        _utc(job.created_at),
        _utc(job.started_at),
        _utc(job.finished_at),
    )
    rows = s.execute(
        select(ResultObject, OutboxItem.state, OutboxItem.sent_at, OutboxItem.last_error)
        .outerjoin(OutboxItem, OutboxItem.result_object_id == ResultObject.id)
        .where(ResultObject.job_id == job.id)
        .order_by(ResultObject.id)
    ).all()
    by_uid: dict[str, dict] = {}
    for ro, state, sent_at, last_error in rows:
        d = by_uid.setdefault(ro.sop_instance_uid, {"ro": ro, "states": [], "sent": [], "error": None})
        if state is not None:
            d["states"].append(state)
        if sent_at is not None:
            d["sent"].append(_utc(sent_at))
        if last_error:
            d["error"] = last_error
    for uid, d in by_uid.items():
        ro = d["ro"]
        view.results.append(
            ResultRow(
                ro.kind, uid, ro.series_uid, tuple(d["states"]), max(d["sent"]) if d["sent"] else None, d["error"]
            )
        )
    for f in s.scalars(select(Finding).where(Finding.job_id == job.id).order_by(Finding.id)):
        view.findings.append(
            {
                "model": f.model_name,
                "model_version": f.model_version,
                "code": f.code,
                "label": f.label,
                "evaluated": bool(f.evaluated),
                "qc_reason": f.qc_reason,
                "probability": f.probability,
                "uncertainty": f.uncertainty,
                "positive": bool(f.positive),
                "grade": f.grade,
                "level": f.level,
            }
        )
    entry = s.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
    if entry is not None:
        view.priority = entry.override_priority or entry.priority
        view.needs_review = bool(entry.needs_review)
        view.reasons = list(entry.reasons or [])
    return view


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# ---- dciodvfy ---------------------------------------------------------------------------------


def dciodvfy(path: Path, *, timeout: float = 120.0) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' ``dciodvfy`` reports for one file."""
    try:
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise RuntimeError("dciodvfy (Debian package dicom3tools) is not installed") from None
    lines = (proc.stdout + proc.stderr).decode("utf-8", errors="replace").splitlines()
    return ([ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")])


@dataclass
class PacsCheck:
    problems: list[str] = field(default_factory=list)
    validated: int = 0
    warnings: int = 0


def check_in_pacs(
    view: NodeView,
    expectation: Expectation,
    pacs: OrthancPacs,
    *,
    validate: bool = True,
    scratch: Path | None = None,
) -> PacsCheck:
    """Every result of ``view`` is in the PACS, the expected kinds are there, and each passes dciodvfy."""
    check = PacsCheck()
    counts = view.counts()
    for kind, n in expectation.min_counts.items():
        if counts.get(kind, 0) < n:
            check.problems.append(f"no {KIND_NAMES.get(kind, kind)} was produced (expected at least {n})")
    for kind in expectation.absent:
        if counts.get(kind, 0):
            check.problems.append(f"{counts[kind]} unexpected {KIND_NAMES.get(kind, kind)} object(s)")
    if expectation.priority is not None and view.priority != expectation.priority:
        check.problems.append(f"worklist priority {view.priority or 'none'} (expected {expectation.priority})")
    in_pacs = pacs.study_instance_uids(view.study_uid)
    missing = [r for r in view.results if r.sop_instance_uid not in in_pacs]
    for r in missing:
        check.problems.append(f"{KIND_NAMES.get(r.kind, r.kind)} {r.sop_instance_uid} is not in the PACS")
    if not validate:
        return check
    with tempfile.TemporaryDirectory(prefix="msknode-dciodvfy-", dir=scratch) as tmp:
        for r in view.results:
            if r in missing:
                continue
            oid = pacs.lookup(r.sop_instance_uid, "Instance")
            if oid is None:
                check.problems.append(f"{KIND_NAMES.get(r.kind, r.kind)} {r.sop_instance_uid} is not in the PACS")
                continue
            path = Path(tmp) / f"{r.sop_instance_uid}.dcm"
            path.write_bytes(pacs.instance_file(oid))
            errors, warnings = dciodvfy(path)
            check.validated += 1
            check.warnings += len(warnings)
            if errors:
                check.problems.append(
                    f"{KIND_NAMES.get(r.kind, r.kind)} {r.sop_instance_uid} fails dciodvfy: "
                    + "; ".join(errors[:3])
                    + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
                )
            path.unlink()
    return check


# ---- timing -------------------------------------------------------------------------------------


def last_reception(receptions: dict[str, Reception], uids: Iterable[str]) -> dt.datetime | None:
    times = [receptions[u].at for u in uids if u in receptions]
    return max(times) if times else None


def pacs_to_results_seconds(
    receptions: dict[str, Reception], source_uids: Sequence[str], result_uids: Sequence[str]
) -> float | None:
    """Seconds from the last source instance stored in the PACS to the last result object stored there."""
    src = last_reception(receptions, source_uids)
    res = last_reception(receptions, result_uids)
    if src is None or res is None or len([u for u in result_uids if u in receptions]) < len(result_uids):
        return None
    return (res - src).total_seconds()
