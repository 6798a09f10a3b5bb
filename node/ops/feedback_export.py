"""``msknode export feedback``: the studies radiologists answered, as a labelled set `msknode train` reads.

For one model, every study with a radiologist's answer (``finding_feedback``, the latest answer per
finding) becomes one case of the ``dicomcsv:`` layout (docs/models.md): the series the model read
(the job's input series of the model's first role present) copied below ``OUT``, and a row of
``labels.csv`` keyed by its SeriesInstanceUID with one column per head of the model (``acl``,
``meniscus``, ``cuff``, ``L1-L2`` …), holding the radiologist's answer on the model's scale.

With ``holdout`` > 0 the studies are split, by a hash of the StudyInstanceUID (stable when more
studies are added later), into ``OUT/train`` and ``OUT/holdout``, each a ``dicomcsv:`` folder:
``msknode train … --data dicomcsv:OUT/train`` and ``msknode evaluate … --data dicomcsv:OUT/holdout``
compare the old and the new weights on studies neither was trained on.

De-identification (``deidentify=True``) applies the Basic Application Level Confidentiality Profile
of DICOM PS3.15 (Annex E, table E.1-1, the 2026c edition) with the ``dicom-anonymizer`` package:
names, identifiers, dates and free text removed or replaced, UIDs replaced consistently across the
export (so a series stays one series), private attributes removed; Patient Identity Removed is set
to ``YES`` and De-identification Method (Code Sequence: DCM 113100) say so. Pixel data are not
examined (burned-in text: MR series rarely carry any; PS3.15 leaves it to the exporter to check).
Without ``deidentify`` the files are copied unchanged (for use inside the hospital).

``OUT/export.json`` records what was exported: the model, the answers' model versions, counts,
the profile, the split; never a patient name or ID. Nothing is written for a study whose series
files are missing (it is counted as skipped, with the reason).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.database import Database
from node.db.schema import FindingFeedback, Instance, Job, JobInput, Series, Study
from node.errors import NodeError
from node.settings import Settings

log = logging.getLogger(__name__)

PROFILE = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (dicom-anonymizer, dicomfields_2026c)"
#: at most this many studies per export (a limit on the work one command does)
MAX_STUDIES = 100_000


class ExportError(NodeError):
    """The export cannot be made (unknown model, output folder not empty, nothing to export)."""


@dataclass
class ExportCase:
    study_uid: str
    series_uid: str
    files: list[Path]
    labels: dict[str, str]  # head name -> the radiologist's answer
    versions: set[str] = field(default_factory=set)  # model versions the answers were given on


def _heads(model: str) -> dict[str, tuple[str, ...]]:
    from models.tasks import TASKS

    if model not in TASKS:
        raise ExportError(f"unknown model {model!r}; models with labels: {', '.join(sorted(TASKS))}")
    return {h.name: tuple(h.classes) for h in TASKS[model].heads}


def _head_of(heads: dict[str, tuple[str, ...]], fb: FindingFeedback) -> str | None:
    """The head a feedback row answers: the level for per-level heads, else the model's one head."""
    if fb.level and fb.level in heads:
        return fb.level
    if len(heads) == 1:
        return next(iter(heads))
    return None


def _input_series(session: Session, job: Job, model: str) -> Series | None:
    """The series ``model`` read in ``job``: the input it used (``used_by``), else its first role present."""
    from models.tasks import TASKS

    rows = session.execute(
        select(JobInput, Series).join(Series, Series.id == JobInput.series_id).where(JobInput.job_id == job.id)
    ).all()
    for ji, se in rows:
        if ji.used_by and model in ji.used_by and ji.role in TASKS[model].input.roles:
            return se
    by_role = {ji.role: se for ji, se in rows}
    for role in TASKS[model].input.roles:
        if role in by_role:
            return by_role[role]
    return None


def collect(session: Session, settings: Settings, model: str) -> tuple[list[ExportCase], dict[str, int]]:
    """The cases of ``model`` with a radiologist's answer, and the skipped studies by reason."""
    heads = _heads(model)
    rows = session.scalars(
        select(FindingFeedback)
        .where(FindingFeedback.model_name == model)
        .order_by(FindingFeedback.study_id, FindingFeedback.updated_at, FindingFeedback.id)
    ).all()
    by_study: dict[int, list[FindingFeedback]] = defaultdict(list)
    for fb in rows:
        by_study[fb.study_id].append(fb)
    if len(by_study) > MAX_STUDIES:
        raise ExportError(f"{len(by_study)} studies answered; at most {MAX_STUDIES} per export")
    cases: list[ExportCase] = []
    skipped: dict[str, int] = defaultdict(int)
    for study_id, answers in by_study.items():
        labels: dict[str, str] = {}
        versions: set[str] = set()
        for fb in answers:  # oldest first: the latest answer per head wins
            head = _head_of(heads, fb)
            if head is None or fb.answer not in heads[head]:
                skipped["answer not on the model's scale"] += 1
                continue
            labels[head] = fb.answer
            versions.add(fb.model_version)
        if not labels:
            continue
        study = session.get(Study, study_id)
        job_ids = {fb.job_id for fb in answers if fb.job_id is not None}
        job = session.get(Job, max(job_ids)) if job_ids else None
        if study is None or job is None:
            skipped["no job for the study"] += 1
            continue
        series = _input_series(session, job, model)
        if series is None:
            skipped["no input series of the model"] += 1
            continue
        paths = session.scalars(
            select(Instance.path).where(Instance.series_id == series.id).order_by(Instance.instance_number, Instance.id)
        ).all()
        files = [p if p.is_absolute() else settings.store_dir / p for p in (Path(x) for x in paths)]
        if not files or not all(f.is_file() for f in files):
            skipped["series files missing (purged?)"] += 1
            continue
        cases.append(ExportCase(study.study_uid, series.series_uid, files, labels, versions))
    return cases, dict(skipped)


def _holdout_side(cases: list[ExportCase], fraction: float) -> set[str]:
    """Study UIDs of the held-out side: the last ``ceil(fraction * n)`` by a hash of the study UID."""
    if fraction <= 0 or len(cases) < 2:
        return set()
    ranked = sorted(cases, key=lambda c: hashlib.sha256(c.study_uid.encode()).hexdigest())
    k = min(len(cases) - 1, max(1, math.ceil(fraction * len(cases))))
    return {c.study_uid for c in ranked[-k:]}


def basic_profile_rules() -> dict[Any, Any]:
    """The actions of the PS3.15 basic profile (table E.1-1, 2026c), built once per export."""
    from dicomanonymizer.simpledicomanonymizer import initialize_actions

    return dict(initialize_actions("dicomfields_2026c"))


#: the library's dummy date (year 1) is not a valid DA/DT for dciodvfy; the profile's "D" (a dummy value consistent
#: with the VR) is kept with a valid dummy instead
_DUMMY_DATES = {"DA": ("00010101", "19000101"), "DT": ("00010101", "19000101")}


def _valid_dummy_dates(_ds: Any, elem: Any) -> None:
    swap = _DUMMY_DATES.get(elem.VR)
    if swap and isinstance(elem.value, str) and elem.value.startswith(swap[0]):
        elem.value = swap[1] + elem.value[len(swap[0]) :]


def _deidentify(ds: Any, rules: dict[Any, Any]) -> None:
    from dicomanonymizer import anonymize_dataset
    from pydicom.dataset import Dataset

    anonymize_dataset(ds, delete_private_tags=True, base_rules_gen=lambda: rules)
    ds.walk(_valid_dummy_dates)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 Basic Profile (dicom-anonymizer)"
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _write_case(case: ExportCase, folder: Path, *, rules: dict[Any, Any] | None) -> str:
    """Copies (or de-identifies) the case's files into ``folder``; returns the SeriesInstanceUID written."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=False)
    series_uid = case.series_uid
    for k, src in enumerate(case.files):
        dst = folder / f"{k:04d}.dcm"
        if rules is None:
            shutil.copyfile(src, dst)
            continue
        ds = pydicom.dcmread(src)
        _deidentify(ds, rules)
        series_uid = str(ds.SeriesInstanceUID)
        ds.save_as(dst, enforce_file_format=True)
    return series_uid


def export_feedback(
    db: Database,
    settings: Settings,
    *,
    model: str,
    out: Path,
    deidentify: bool = False,
    holdout: float = 0.0,
) -> dict[str, Any]:
    """Writes the labelled set of ``model`` below ``out`` (see the module docstring); returns the manifest."""
    out = Path(out)
    if not 0.0 <= holdout < 1.0:
        raise ExportError(f"--holdout {holdout}: a fraction of the studies, 0 <= f < 1")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new folder")
    heads = _heads(model)
    with db.session() as s:
        cases, skipped = collect(s, settings, model)
    if not cases:
        raise ExportError(
            f"no study with a radiologist's answer to {model}"
            + (f" that could be exported (skipped: {json.dumps(skipped)})" if skipped else "")
        )
    held = _holdout_side(cases, holdout)
    sides = {
        "train": [c for c in cases if c.study_uid not in held],
        "holdout": [c for c in cases if c.study_uid in held],
    }
    if not held:
        sides = {"": cases}
    out.mkdir(parents=True, exist_ok=True)
    rules = basic_profile_rules() if deidentify else None
    counts: dict[str, Any] = {}
    for side, side_cases in sides.items():
        root = out / side if side else out
        rows = []
        for n, case in enumerate(side_cases, start=1):
            uid = _write_case(case, root / f"case{n:05d}", rules=rules)
            rows.append({"SeriesInstanceUID": uid, **case.labels})
            log.info("export %s: series %s -> %s (%s)", model, case.series_uid, uid, side or "all")
        with open(root / "labels.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["SeriesInstanceUID", *heads], restval="")
            w.writeheader()
            w.writerows(rows)
        label_counts: dict[str, dict[str, int]] = {}
        for case in side_cases:
            for h, v in case.labels.items():
                label_counts.setdefault(h, {}).setdefault(v, 0)
                label_counts[h][v] += 1
        counts[side or "all"] = {"studies": len(side_cases), "labels": label_counts}
    manifest = {
        "model": model,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "studies": len(cases),
        "sides": counts,
        "data_specs": {side or "all": f"dicomcsv:{(out / side) if side else out}" for side in sides},
        "answered_model_versions": sorted({v for c in cases for v in c.versions}),
        "skipped": skipped,
        "deidentified": deidentify,
        "deidentification_profile": PROFILE if deidentify else None,
        "holdout_fraction": holdout,
        "holdout_rule": "the last ceil(f * n) studies by sha256 of the StudyInstanceUID" if held else None,
        "source": "radiologists' answers recorded on the node (finding_feedback), the latest answer per finding",
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for side in sides:
        if side:
            (out / side / "export.json").write_text(
                json.dumps({**manifest, "side": side, "studies": counts[side]["studies"]}, indent=2) + "\n"
            )
    return manifest
