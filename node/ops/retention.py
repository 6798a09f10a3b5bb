"""Retention: stored instances are purged ``retention_days`` after their results were delivered.

A study's instances (files and ``instances`` rows) are purged when all of these hold:

- for every pipeline that processed it, the latest job (superseded ones aside) is
  ``done``, wrote at least one result object, and every outbox item of those objects
  is ``sent`` (acknowledged by its destination) — at least one item, so results that
  were never delivered anywhere keep their source;
- no series of the study is still receiving, waiting, being processed or failed
  (routed localizers, never a model input, stay ``complete`` and do not hold it);
- the last acknowledgement is ``retention_days`` old.

Study and series rows stay (with ``studies.purged_at``) for the worklist and audit.
Files are first moved aside, the rows deleted and committed, then the files removed;
a file whose instance was received again meanwhile is put back.

The same pass deletes what the listener keeps about refused objects and connections:

- quarantine rows and their files (only files inside ``<data_dir>/quarantine``) whose object
  arrived ``quarantine_retention_days`` ago or earlier;
- association rows that ended ``association_retention_days`` ago or earlier (open ones stay).

`purge` is what ``msknode purge`` and the periodic loop call.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from node.db.database import Database, execute_dml, utcnow
from node.db.schema import Association, Instance, Job, OutboxItem, Quarantine, ResultObject, Series, Study
from node.intake.routing import LOCALIZER_ROLE
from node.settings import Settings

log = logging.getLogger(__name__)

#: series states that mean "not finished with": such a study is never purged
HOLDING_SERIES_STATES = ("receiving", "complete", "queued", "processing", "failed")


@dataclass(frozen=True)
class PurgeCandidate:
    study_id: int
    study_uid: str
    delivered_at: dt.datetime
    purge_after: dt.datetime


@dataclass
class PurgedStudy:
    study_uid: str
    delivered_at: dt.datetime
    instances: int
    bytes: int

    def as_dict(self) -> dict:
        return {
            "study_uid": self.study_uid,
            "delivered_at": self.delivered_at.isoformat(),
            "instances": self.instances,
            "bytes": self.bytes,
        }


@dataclass
class PurgeReport:
    dry_run: bool
    retention_days: float
    studies: list[PurgedStudy] = field(default_factory=list)
    quarantined: int = 0  # quarantine rows (with their files) deleted
    associations: int = 0  # association rows deleted

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.studies)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.studies)

    def as_dict(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "retention_days": self.retention_days,
            "studies": [s.as_dict() for s in self.studies],
            "quarantined": self.quarantined,
            "associations": self.associations,
            "instances": self.instances,
            "bytes": self.bytes,
        }


def delivered_at(session: Session, study_id: int) -> dt.datetime | None:
    """When the study's results were acknowledged by every destination, or None if they are not (yet).

    None also when anything of the study is unprocessed, in work, failed or undelivered.
    """
    holding = session.scalar(
        select(func.count())
        .select_from(Series)
        .where(
            Series.study_id == study_id,
            Series.state.in_(HOLDING_SERIES_STATES),
            or_(Series.state != "complete", func.coalesce(Series.role, "") != LOCALIZER_ROLE),
        )
    )
    if holding:
        return None
    jobs = session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id.desc())).all()
    latest: dict[str, Job] = {}
    for job in jobs:
        if job.state != "superseded":
            latest.setdefault(job.pipeline, job)
    if not latest:
        return None  # never processed
    acknowledged: list[dt.datetime] = []
    for job in latest.values():
        if job.state != "done":
            return None
        items = session.execute(
            select(OutboxItem.state, OutboxItem.sent_at)
            .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
            .where(ResultObject.job_id == job.id)
        ).all()
        objects = session.scalar(select(func.count()).select_from(ResultObject).where(ResultObject.job_id == job.id))
        if not objects or not items:
            return None
        # every result object has at least one destination, and every item was acknowledged
        covered = session.scalar(
            select(func.count(func.distinct(OutboxItem.result_object_id)))
            .join(ResultObject, ResultObject.id == OutboxItem.result_object_id)
            .where(ResultObject.job_id == job.id)
        )
        if covered != objects or any(state != "sent" or sent_at is None for state, sent_at in items):
            return None
        acknowledged.append(max(sent_at for _, sent_at in items if sent_at is not None))  # none is (checked above)
    return max(acknowledged)


def candidates(session: Session, settings: Settings, now: dt.datetime) -> list[PurgeCandidate]:
    """Studies whose instances may be purged at ``now``."""
    keep = dt.timedelta(days=settings.retention_days)
    study_rows = session.execute(
        select(Study.id, Study.study_uid)
        .where(Study.purged_at.is_(None), Study.id.in_(select(Job.study_id).where(Job.state == "done")))
        .order_by(Study.id)
    ).all()
    out = []
    for study_id, study_uid in study_rows:
        at = delivered_at(session, study_id)
        if at is not None and at + keep <= now:
            out.append(PurgeCandidate(study_id, study_uid, at, at + keep))
    return out


def purge(
    db: Database,
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    dry_run: bool = False,
    limit: int | None = None,
) -> PurgeReport:
    """Purges every study that is due (one transaction per study); returns what was (or would be) purged."""
    now = now or utcnow()
    report = PurgeReport(dry_run=dry_run, retention_days=settings.retention_days)
    with db.session() as s:
        due = candidates(s, settings, now)
    for cand in due[:limit] if limit else due:
        done = _purge_study(db, settings, cand, now, dry_run=dry_run)
        if done is not None:
            report.studies.append(done)
    if report.studies and not dry_run:
        log.info("retention: purged %d instance(s) of %d stud(ies)", report.instances, len(report.studies))
    report.quarantined = purge_quarantine(db, settings, now=now, dry_run=dry_run, limit=limit)
    report.associations = purge_associations(db, settings, now=now, dry_run=dry_run)
    return report


def purge_quarantine(
    db: Database, settings: Settings, *, now: dt.datetime, dry_run: bool = False, limit: int | None = None
) -> int:
    """Deletes quarantine rows (and their files) older than ``quarantine_retention_days``; returns how many."""
    cutoff = now - dt.timedelta(days=settings.quarantine_retention_days)
    old = Quarantine.received_at <= cutoff
    if dry_run:
        with db.session() as s:
            n = int(s.scalar(select(func.count()).select_from(Quarantine).where(old)) or 0)
        return n if limit is None else min(n, limit)
    n = 0
    while limit is None or n < limit:
        batch = 500 if limit is None else min(500, limit - n)
        with db.session() as s:
            rows = s.execute(
                select(Quarantine.id, Quarantine.path, Quarantine.sop_instance_uid)
                .where(old)
                .order_by(Quarantine.id)
                .limit(batch)
            ).all()
            if not rows:
                break
            s.execute(delete(Quarantine).where(Quarantine.id.in_([r.id for r in rows])))
        # committed: the rows are gone, now their files
        for r in rows:
            if not r.path:
                continue
            path = Path(r.path)
            if not path.is_absolute():
                path = settings.quarantine_dir / path
            if not _inside(path, settings.quarantine_dir):
                log.warning("retention: quarantined %s is outside the quarantine; file left alone", r.sop_instance_uid)
                continue
            path.unlink(missing_ok=True)
            _remove_empty_parents(path.parent, settings.quarantine_dir)
        n += len(rows)
    if n:
        log.info(
            "retention: deleted %d quarantined object(s) older than %g days", n, settings.quarantine_retention_days
        )
    return n


def purge_associations(db: Database, settings: Settings, *, now: dt.datetime, dry_run: bool = False) -> int:
    """Deletes association rows that ended more than ``association_retention_days`` ago; returns how many."""
    cutoff = now - dt.timedelta(days=settings.association_retention_days)
    old = Association.ended_at.is_not(None) & (Association.ended_at <= cutoff)
    with db.session() as s:
        if dry_run:
            return int(s.scalar(select(func.count()).select_from(Association).where(old)) or 0)
        n = execute_dml(s, delete(Association).where(old)).rowcount or 0
    if n:
        log.info("retention: deleted %d association row(s) older than %g days", n, settings.association_retention_days)
    return n


def _resolve(settings: Settings, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else settings.store_dir / p


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _purge_study(
    db: Database, settings: Settings, cand: PurgeCandidate, now: dt.datetime, *, dry_run: bool
) -> PurgedStudy | None:
    trash = settings.tmp_dir / f"purge-{cand.study_id}-{os.getpid()}"
    moved: list[tuple[str, Path, Path]] = []  # (sop uid, original, aside)
    try:
        with db.session() as s:
            # re-checked inside the transaction that deletes: a series may have arrived since
            at = delivered_at(s, cand.study_id)
            if at is None or at + dt.timedelta(days=settings.retention_days) > now:
                return None
            rows = s.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.path, Instance.size)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == cand.study_id)
            ).all()
            total = sum(r.size or 0 for r in rows)
            if dry_run:
                s.rollback()
                return PurgedStudy(cand.study_uid, at, len(rows), total)
            claimed = execute_dml(
                s, update(Study).where(Study.id == cand.study_id, Study.purged_at.is_(None)).values(purged_at=now)
            )
            if claimed.rowcount != 1:
                return None
            trash.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(rows):
                src = _resolve(settings, r.path)
                if not _inside(src, settings.store_dir):
                    log.warning("retention: %s is outside the store; row removed, file left alone", r.sop_instance_uid)
                    continue
                aside = trash / f"{i}.dcm"
                try:
                    os.replace(src, aside)
                except FileNotFoundError:
                    continue
                moved.append((r.sop_instance_uid, src, aside))
            ids = [r.id for r in rows]
            for chunk in range(0, len(ids), 500):
                s.execute(delete(Instance).where(Instance.id.in_(ids[chunk : chunk + 500])))
    except BaseException:
        for _, src, aside in moved:  # the transaction rolled back: everything goes back
            if not src.exists():
                os.replace(aside, src)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    # committed: remove the files, unless the instance was received again meanwhile
    back = _received_again(db, [m[0] for m in moved])
    for sop_uid, src, aside in moved:
        if sop_uid in back and not src.exists():
            os.replace(aside, src)
        else:
            aside.unlink(missing_ok=True)
            _remove_empty_parents(src.parent, settings.store_dir)
    shutil.rmtree(trash, ignore_errors=True)
    log.info(
        "retention: study %s purged (%d instances, %d bytes; results acknowledged %s)",
        cand.study_uid,
        len(rows),
        total,
        at.isoformat(),
    )
    return PurgedStudy(cand.study_uid, at, len(rows), total)


def _received_again(db: Database, sop_uids: list[str]) -> set[str]:
    """Which of these SOP Instance UIDs have an instance row again (a resend during the purge)."""
    found: set[str] = set()
    with db.session() as s:
        for i in range(0, len(sop_uids), 500):
            chunk = sop_uids[i : i + 500]
            found.update(s.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))).all())
    return found


def _remove_empty_parents(directory: Path, root: Path) -> None:
    root = root.resolve()
    d = directory.resolve()
    while d != root and _inside(d, root):
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent
