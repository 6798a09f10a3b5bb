"""The radiologist's assessment of the AI findings as a DICOM SR (TID 1500), referencing the AI SR.

One document per study and reader, written once the study is marked read (the answers are
locked then): the reader is the person observer; each answer is a measurement group with the
finding key as its tracking identifier, the same finding-type, presence and grade codes the AI
SR uses (so the two can be compared finding by finding), whether the reader agreed with the
model and what the model said, and the comment. The AI SR is in the evidence (Current Requested
Procedure Evidence Sequence). Why an SR and not a Key Object Selection: docs/monitoring.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import highdicom as hd
from highdicom.sr import FindingSite, MeasurementsAndQualitativeEvaluations, QualitativeEvaluation, TrackingIdentifier
from pydicom import Dataset

from node.results import codes
from node.results.equipment import MANUFACTURER
from node.results.sanitize import clean_text, copy_character_set
from node.results.sr import _extend, _text
from node.results.uids import UidFactory

ANSWERS_SERIES_NUMBER = 9902
ANSWERS_DESCRIPTION = "Radiologist assessment of AI findings"
PERSON = codes.dcm("121006", "Person")
SIDES = {"medial": codes.MEDIAL, "lateral": codes.LATERAL}


def answers_key(answers: Sequence[Any]) -> str:
    """A digest of what the reader said: the same answers give the same SR UIDs, changed ones new UIDs."""
    text = "\x1e".join(
        f"{a.finding_key}\x1f{a.agree}\x1f{a.answer}\x1f{a.comment or ''}"
        for a in sorted(answers, key=lambda a: a.finding_key)
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _group(a: Any, index: int, uids: UidFactory) -> MeasurementsAndQualitativeEvaluations:
    concept = codes.finding_code(a.code)
    evaluations = [QualitativeEvaluation(name=concept, value=codes.PRESENT if a.answer_positive else codes.ABSENT)]
    sites: list[FindingSite] = []
    if a.level:
        sites.append(FindingSite(anatomic_location=codes.level_code(a.level)))
    if a.answer in SIDES:
        sites.append(FindingSite(anatomic_location=codes.MENISCUS, topographical_modifier=SIDES[a.answer]))
    elif a.answer_positive:
        name, value = codes.grade_concept(a.answer, a.code)
        evaluations.append(QualitativeEvaluation(name=name, value=value))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids.uid("answers-tracking", a.finding_key, index),
            identifier=clean_text(a.finding_key, "UT")[:64],
        ),
        finding_type=concept,
        finding_sites=sites or None,
        qualitative_evaluations=evaluations,
    )
    said = "agrees with" if a.agree else "disagrees with"
    ai = str(a.ai_answer).replace("_", " ")
    items = [_text(clean_text(f"Reader {said} the AI result ({a.model_name} {a.model_version}: {ai})", "UT")[:1024])]
    if a.comment:
        items.append(_text(clean_text(a.comment, "UT")[:1024]))
    _extend(group, items)
    return group


def build_answers_sr(
    *, ai_sr: Dataset, answers: Sequence[Any], reader: str, uid_root: str, institution_name: str | None = None
) -> hd.sr.Comprehensive3DSR:
    """The reader's answers (`finding_feedback` rows of one study and user) as a Comprehensive 3D SR."""
    if not answers:
        raise ValueError("no answers to report")
    uids = UidFactory(uid_root, str(ai_sr.SOPInstanceUID), f"answers:{reader}:{answers_key(answers)}")
    observer = hd.sr.ObserverContext(
        observer_type=PERSON,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            # the user name as the family name (one component, marked with a caret)
            name=(clean_text(reader, "PN").replace("^", " ")[:60] or "reader") + "^",
            login_name=clean_text(reader, "LO")[:64] or None,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=[_group(a, i, uids) for i, a in enumerate(answers)],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ai_sr],
        content=report,
        series_instance_uid=uids.series("answers"),
        series_number=ANSWERS_SERIES_NUMBER,
        sop_instance_uid=uids.instance("answers"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        institution_name=institution_name,
        coding_schemes=codes.coding_schemes(),
        series_description=ANSWERS_DESCRIPTION,
        specific_character_set=None,
    )
    copy_character_set(sr, ai_sr)
    said = [reader] + [a.comment or "" for a in answers]
    if any(not t.isascii() for t in said) and sr.get("SpecificCharacterSet") not in ("ISO_IR 192",):
        sr.SpecificCharacterSet = "ISO_IR 192"  # a comment in any language: UTF-8
    return sr
