"""Radiologists' answers to the PACS: one TID 1500 SR per read study and reader (`node.results.answers_sr`).

With ``MSKNODE_FEEDBACK_SR`` on, the housekeeping worker looks every half minute for studies
marked read (their answers are locked then) in the last `LOOKBACK_DAYS` whose readers answered
AI findings reported in an AI SR, writes the reader's SR next to the AI results, and puts it
in the outbox for every DICOM destination (HL7 and FHIR destinations get reports of jobs, not
this). The SR's UIDs follow from the AI SR, the reader and the answers, so a second round finds
it already written; a study read again with changed answers gets a new SR.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import pydicom
from sqlalchemy import select

from node.db.database import Database
from node.db.schema import FindingFeedback, OutboxItem, ResultObject, Study
from node.settings import REPORT_DESTINATION_TYPES, Settings

log = logging.getLogger(__name__)

LOOKBACK_DAYS = 7
KIND = "answers"


def _write(ds: pydicom.Dataset, path: Path) -> None:
    """Atomic: a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def send_answers(db: Database, settings: Settings, *, now: dt.datetime) -> list[str]:
    """Writes and queues the SRs of answers not yet sent; returns their SOP Instance UIDs."""
    from node.results.answers_sr import build_answers_sr
    from worklists.tables import WorklistEntry

    written: list[str] = []
    destinations = [d.key for d in settings.destinations if d.type not in REPORT_DESTINATION_TYPES]
    with db.session() as s:
        rows = s.execute(
            select(FindingFeedback, Study.study_uid)
            .join(WorklistEntry, WorklistEntry.study_id == FindingFeedback.study_id)
            .join(Study, Study.id == FindingFeedback.study_id)
            .where(WorklistEntry.status == "read", WorklistEntry.read_at >= now - dt.timedelta(days=LOOKBACK_DAYS))
            .where(FindingFeedback.sr_sop_instance_uid.is_not(None))
        ).all()
        groups: dict[tuple[int, str, str], list[FindingFeedback]] = defaultdict(list)
        study_uids: dict[int, str] = {}
        for fb, study_uid in rows:
            groups[(fb.study_id, fb.created_by, fb.sr_sop_instance_uid or "")].append(fb)
            study_uids[fb.study_id] = study_uid
        for (study_id, reader, ai_uid), answers in groups.items():
            ai = s.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == ai_uid))
            if ai is None or not Path(ai.path).is_file():
                log.warning(
                    "study %s: AI SR %s is not on disk; the reader's answers are not sent", study_uids[study_id], ai_uid
                )
                continue
            sr = build_answers_sr(
                ai_sr=pydicom.dcmread(ai.path),
                answers=sorted(answers, key=lambda a: a.finding_key),
                reader=reader,
                uid_root=settings.uid_root,
                institution_name=settings.institution_name,
            )
            uid = str(sr.SOPInstanceUID)
            if s.scalar(select(ResultObject.id).where(ResultObject.sop_instance_uid == uid)) is not None:
                continue
            path = Path(settings.results_dir) / study_uids[study_id] / str(sr.SeriesInstanceUID) / f"{uid}.dcm"
            _write(sr, path)
            ro = ResultObject(
                job_id=ai.job_id,
                kind=KIND,
                sop_class_uid=str(sr.SOPClassUID),
                sop_instance_uid=uid,
                series_uid=str(sr.SeriesInstanceUID),
                path=str(path),
                created_at=now,
            )
            s.add(ro)
            s.flush()
            for dest in destinations:
                s.add(OutboxItem(result_object_id=ro.id, destination=dest, state="pending", next_attempt_at=now))
            written.append(uid)
            log.info(
                "study %s: answers SR %s of %d findings (AI SR %s) queued for %d destinations",
                study_uids[study_id],
                uid,
                len(answers),
                ai_uid,
                len(destinations),
            )
    return written
