"""The Comprehensive 3D SR (TID 1500 Measurement Report) written for every job.

Content (one measurement group per statement, so nothing is implied by silence):

- root: the "not for diagnostic use" notice (TEXT) when demo weights were used;
- per finding of an evaluated model: finding type, finding site with laterality (and
  vertebral level for stenosis), presence Present/Absent, grade (Severity or tear
  extent), QC outcome, probability with its standard deviation (uncertainty), the
  algorithm (name, version, weights hash, threshold), the series the model used and
  its source images, the SEG segment of its heatmap (TID 1411) and the SC overlay;
- per intervertebral disc graded (``disc_degeneration`` / ``disc_herniation`` findings of one
  level): one group, finding type "Intervertebral disc structure", finding sites the disc and
  its level, degeneration Present/Absent with the coded Pfirrmann grade, herniation
  Present/Absent, each probability under its own name (`codes.PROBABILITY_DEGENERATION`,
  `codes.PROBABILITY_HERNIATION`) with its standard deviation, the Pfirrmann grade split as text;
  its region (TID 1411) the herniation's evidence segment, else the disc's segment in the level
  SEG of ``lumbar_spine.levels`` when that model segmented it;
- per model whose input the QC gate refused: presence "Not Evaluated", QC refused
  and the coded reason plus its reader-facing sentence (`worklists.triage.qc_sentence`);
- nothing about super-resolution: the SR is written before it runs (`node.jobs.runner`: findings first),
  and each super-resolved series describes itself (`node.results.superres_series`: DERIVED image type,
  derivation description with its data-consistency check, source image references); the check of every
  series, passed or not, is also in the job's findings rows (code ``superres``) and model versions;
- the triage priority and score with its reasons;
- predecessors (a re-opened study) in the Predecessor Documents Sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.sr import (
    CodedConcept,
    FindingSite,
    ImageContentItem,
    Measurement,
    MeasurementProperties,
    MeasurementsAndQualitativeEvaluations,
    MeasurementStatisticalProperties,
    NumContentItem,
    QualitativeEvaluation,
    ReferencedSegment,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    UIDRefContentItem,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom import Dataset

from models.types import Finding, ModelInfo, ModelOutput, PipelineOutput
from node.results import codes
from node.results.equipment import MANUFACTURER, contributing_equipment, node_software_versions, sr_algorithm
from node.results.objects import ResultRef
from node.results.sanitize import clean_text, copy_character_set
from node.results.sources import SourceSeries
from node.results.uids import UidFactory
from worklists.triage import level_key, qc_sentence

SR_SERIES_NUMBER = 9901
SR_DESCRIPTION = "AI findings SR - not for diagnostic use"
SR_DESCRIPTION_CLINICAL = "AI findings SR"


@dataclass
class SegRef:
    dataset: Dataset  # the SEG
    segment_number: int
    series: SourceSeries


def _text(value: str, name: CodedConcept = codes.COMMENT) -> TextContentItem:
    return TextContentItem(
        name=name, value=clean_text(value, "UT")[:1024] or "-", relationship_type=RelationshipTypeValues.CONTAINS
    )


def _source_images(series_list: Sequence[SourceSeries]) -> list[SourceImageForMeasurementGroup]:
    items = []
    for s in series_list:
        for sl in s.slices:
            items.append(
                SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=sl.sop_class_uid,
                    referenced_sop_instance_uid=sl.sop_instance_uid,
                    referenced_frame_numbers=[sl.frame_number] if sl.frame_number is not None else None,
                )
            )
    return items


def _probability(f: Finding, name: CodedConcept = codes.PROBABILITY) -> list[Measurement]:
    if f.probability is None:
        return []
    props = None
    if f.uncertainty is not None:
        props = MeasurementProperties(
            measurement_statistical_properties=MeasurementStatisticalProperties(
                values=[
                    NumContentItem(
                        name=codes.STANDARD_DEVIATION,
                        value=float(f.uncertainty),
                        unit=codes.NO_UNITS,
                        relationship_type=RelationshipTypeValues.HAS_PROPERTIES,
                    )
                ],
                description="Standard deviation of the probability (model uncertainty)",
            )
        )
    return [Measurement(name=name, value=float(f.probability), unit=codes.NO_UNITS, properties=props)]


def _sites(f: Finding, laterality: str | None) -> list[FindingSite]:
    base, modifier = codes.site_codes(f.code, f.site)
    lat = codes.LATERALITY.get(laterality or "")
    sites = [FindingSite(anatomic_location=base, laterality=lat, topographical_modifier=modifier)]
    if f.level:
        sites.append(FindingSite(anatomic_location=codes.level_code(f.level)))
    return sites


def _extend(group: Any, items: Sequence[Any]) -> None:
    """Appends content items to a measurement group's container."""
    if items:
        group[0].ContentSequence.extend(items)


def _series_items(series_uids: Sequence[str]) -> list[UIDRefContentItem]:
    return [
        UIDRefContentItem(name=codes.SERIES_UID, value=uid, relationship_type=RelationshipTypeValues.CONTAINS)
        for uid in series_uids
    ]


def _finding_group(
    *,
    mo: ModelOutput,
    f: Finding,
    index: int,
    uids: UidFactory,
    used: list[SourceSeries],
    laterality: str | None,
    seg: SegRef | None,
    sc: Dataset | None,
) -> Any:
    concept = codes.finding_code(f.code, f.label)
    tracking = TrackingIdentifier(
        uid=uids.uid("sr-tracking", mo.model.name, f.code, f.level or "", index),
        identifier=clean_text(f"{mo.model.name} {f.code} {f.level or ''}".strip(), "UT")[:64],
    )
    evaluations = [
        QualitativeEvaluation(name=concept, value=codes.PRESENT if f.positive else codes.ABSENT),
        QualitativeEvaluation(name=codes.QC_GATE, value=codes.QC_ACCEPTED),
    ]
    if f.grade:
        name, value = codes.grade_concept(f.grade, f.code)
        evaluations.append(QualitativeEvaluation(name=name, value=value))
    common: dict[str, Any] = dict(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=sr_algorithm(mo.model, f.threshold),
        finding_sites=_sites(f, laterality),
        measurements=_probability(f) or None,
        qualitative_evaluations=evaluations,
    )
    extra: list[Any] = [_text(f.label)] if f.label else []
    return _group(common, extra=extra, used=used, seg=seg, scs=[sc] if sc is not None else [])


def _group(
    common: dict[str, Any], *, extra: list[Any], used: list[SourceSeries], seg: SegRef | None, scs: list[Dataset]
) -> Any:
    """A TID 1501 group (TID 1411 when it references a SEG segment) with text, series and SC items appended."""
    group: VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    if seg is not None:
        ref = ReferencedSegment(
            sop_class_uid=str(seg.dataset.SOPClassUID),
            sop_instance_uid=str(seg.dataset.SOPInstanceUID),
            segment_number=seg.segment_number,
            source_images=[
                SourceImageForSegmentation(
                    referenced_sop_class_uid=sl.sop_class_uid,
                    referenced_sop_instance_uid=sl.sop_instance_uid,
                    referenced_frame_numbers=[sl.frame_number] if sl.frame_number is not None else None,
                )
                for sl in seg.series.slices
            ],
        )
        group = VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common)
    else:
        group = MeasurementsAndQualitativeEvaluations(source_images=_source_images(used) or None, **common)
    extra = extra + list(_series_items([s.series_uid for s in used]))
    for sc in scs:
        extra.append(
            ImageContentItem(
                name=codes.ILLUSTRATION,
                referenced_sop_class_uid=str(sc.SOPClassUID),
                referenced_sop_instance_uid=str(sc.SOPInstanceUID),
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    _extend(group, extra)
    return group


DISC_CODES = ("disc_degeneration", "disc_herniation")
ROMAN = {"1": "I", "2": "II", "3": "III", "4": "IV", "5": "V"}


def _disc_group(
    *,
    mo: ModelOutput,
    level: str,
    findings: dict[str, Finding],
    uids: UidFactory,
    used: list[SourceSeries],
    seg_refs: dict[int, SegRef],
    sc_refs: dict[int, Dataset],
    disc_segment: SegRef | None = None,
) -> Any:
    """One group per intervertebral disc: degeneration with its Pfirrmann grade, herniation, both probabilities."""
    degeneration = findings.get("disc_degeneration")
    herniation = findings.get("disc_herniation")
    evaluations = []
    measurements: list[Measurement] = []
    texts: list[Any] = []
    if degeneration is not None:
        deg_concept = codes.finding_code("disc_degeneration")
        evaluations.append(
            QualitativeEvaluation(name=deg_concept, value=codes.PRESENT if degeneration.positive else codes.ABSENT)
        )
        if degeneration.grade:
            name, value = codes.grade_concept(degeneration.grade, "disc_degeneration")
            evaluations.append(QualitativeEvaluation(name=name, value=value))
        measurements += _probability(degeneration, codes.PROBABILITY_DEGENERATION)
        split = degeneration.grade_probabilities or {}
        if split:
            words = ", ".join(f"{ROMAN.get(g, g)} {float(p):.2f}" for g, p in sorted(split.items()) if p is not None)
            texts.append(_text(f"Pfirrmann grade probabilities at {level}: {words}"))
    if herniation is not None:
        hern_concept = codes.finding_code("disc_herniation")
        evaluations.append(
            QualitativeEvaluation(name=hern_concept, value=codes.PRESENT if herniation.positive else codes.ABSENT)
        )
        measurements += _probability(herniation, codes.PROBABILITY_HERNIATION)
        if herniation.threshold is not None:
            texts.append(_text(f"Herniation reported present at probability >= {herniation.threshold:.2f}"))
    evaluations.append(QualitativeEvaluation(name=codes.QC_GATE, value=codes.QC_ACCEPTED))
    tracking = TrackingIdentifier(
        uid=uids.uid("sr-tracking", mo.model.name, "disc", level),
        identifier=clean_text(f"{mo.model.name} disc {level}", "UT")[:64],
    )
    common: dict[str, Any] = dict(
        tracking_identifier=tracking,
        finding_type=codes.INTERVERTEBRAL_DISC,
        # the threshold of the group's one Present/Absent call made at a threshold (degeneration is the grade itself)
        algorithm_id=sr_algorithm(mo.model, herniation.threshold if herniation is not None else None),
        finding_sites=[
            FindingSite(anatomic_location=codes.INTERVERTEBRAL_DISC),
            FindingSite(anatomic_location=codes.level_code(level)),
        ],
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    parts = [f for f in (herniation, degeneration) if f is not None]
    # the region of the group: a finding's evidence segment, else the disc itself in the level SEG
    seg = next((seg_refs[id(f)] for f in parts if id(f) in seg_refs), None) or disc_segment
    scs = [sc_refs[id(f)] for f in parts if id(f) in sc_refs]
    return _group(common, extra=texts, used=used, seg=seg, scs=scs)


# models that report one finding set per structure they locate (a disc not found is left out): no
# finding at all means nothing was located, which is "not evaluated", never "absent"
LOCATING_MODELS = frozenset({"lumbar_spine.discs"})


def _nothing_located_group(*, mo: ModelOutput, uids: UidFactory, used: list[SourceSeries]) -> Any:
    concept = codes.finding_for_model(mo.model.name)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids.uid("sr-tracking", mo.model.name, "nothing-located"),
            identifier=clean_text(f"{mo.model.name} nothing located", "LO"),
        ),
        finding_type=concept,
        algorithm_id=sr_algorithm(mo.model),
        qualitative_evaluations=[
            QualitativeEvaluation(name=concept, value=codes.NOT_EVALUATED),
            QualitativeEvaluation(name=codes.QC_GATE, value=codes.QC_ACCEPTED),
        ],
        source_images=_source_images(used) or None,
    )
    _extend(
        group,
        [_text("Not evaluated: the model located no intervertebral disc in the series.")]
        + _series_items([u.series_uid for u in used]),
    )
    return group


def _not_evaluated_group(*, mo: ModelOutput, uids: UidFactory, used: list[SourceSeries], used_uids: list[str]) -> Any:
    concept = codes.finding_for_model(mo.model.name)
    tracking = TrackingIdentifier(
        uid=uids.uid("sr-tracking", mo.model.name, "not-evaluated"),
        identifier=clean_text(f"{mo.model.name} not evaluated", "LO"),
    )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=sr_algorithm(mo.model),
        qualitative_evaluations=[
            QualitativeEvaluation(name=concept, value=codes.NOT_EVALUATED),
            QualitativeEvaluation(name=codes.QC_GATE, value=codes.QC_REFUSED),
            QualitativeEvaluation(name=codes.QC_REASON, value=codes.qc_reason_code(mo.qc.reason)),
        ],
        source_images=_source_images(used) or None,
    )
    # the reader-facing sentence of the coded reason: the gate's own message may name a plane or anatomy that
    # contradicts the series headers, so it stays in the node's log and admin views
    _extend(group, [_text(f"Not evaluated: {qc_sentence(mo.qc.reason)}")] + _series_items(used_uids))
    return group


def _triage_group(triage: Any, uids: UidFactory) -> Any:
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uids.uid("sr-tracking", "triage"), identifier="AI triage"),
        finding_type=codes.TRIAGE,
        algorithm_id=hd.sr.AlgorithmIdentification(name="msknode.triage", version=node_software_versions()),
        measurements=[Measurement(name=codes.TRIAGE_SCORE, value=float(triage.score), unit=codes.NO_UNITS)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=codes.PRIORITY, value=codes.priority_code(triage.priority))
        ],
    )
    texts = [_text(str(r)) for r in (triage.reasons or [])]
    if getattr(triage, "needs_review", False):
        texts.append(_text("Flagged for human review (quality gate or uncertain result)."))
    _extend(group, texts)
    return group


def build_sr(
    *,
    output: PipelineOutput,
    sources: dict[str, SourceSeries],
    seg_refs: dict[int, SegRef],
    sc_refs: dict[int, Dataset],
    triage: Any | None,
    predecessors: Sequence[ResultRef],
    uids: UidFactory,
    evidence_extra: Sequence[Dataset],
    institution_name: str | None = None,
    disc_segments: dict[str, SegRef] | None = None,
) -> hd.sr.Comprehensive3DSR:
    ordered_sources = list(sources.values())
    groups: list[Any] = []
    models: list[ModelInfo] = []
    demo = False
    for mo in output.outputs:
        models.append(mo.model)
        demo = demo or mo.model.demo_weights
        used_uids = list(output.used_series.get(mo.model.name) or ([mo.series_uid] if mo.series_uid else []))
        used = [sources[u] for u in used_uids if u in sources]
        laterality = next((s.laterality for s in used if s.laterality), None)
        if not mo.qc.accepted:
            groups.append(_not_evaluated_group(mo=mo, uids=uids, used=used, used_uids=used_uids))
            continue
        if not mo.findings and mo.model.name in LOCATING_MODELS:
            # a model that reports per located structure and located none has not evaluated anything
            groups.append(_nothing_located_group(mo=mo, uids=uids, used=used))
            continue
        if not mo.findings:
            # an accepted input with no finding object is reported as evaluated and absent
            f = Finding(
                code=codes.MODEL_FINDING.get(mo.model.name, mo.model.name),
                label="",
                probability=None,
                uncertainty=None,
                positive=False,
            )
            groups.append(
                _finding_group(mo=mo, f=f, index=0, uids=uids, used=used, laterality=laterality, seg=None, sc=None)
            )
            continue
        discs: dict[str, dict[str, Finding]] = {}
        for f in mo.findings:
            if f.code in DISC_CODES and f.level:
                discs.setdefault(f.level, {})[f.code] = f
        for level, parts in discs.items():
            groups.append(
                _disc_group(
                    mo=mo,
                    level=level,
                    findings=parts,
                    uids=uids,
                    used=used,
                    seg_refs=seg_refs,
                    sc_refs=sc_refs,
                    disc_segment=(disc_segments or {}).get(level_key(level) or ""),
                )
            )
        for i, f in enumerate(mo.findings):
            if f.code in DISC_CODES and f.level:
                continue
            groups.append(
                _finding_group(
                    mo=mo,
                    f=f,
                    index=i,
                    uids=uids,
                    used=used,
                    laterality=laterality,
                    seg=seg_refs.get(id(f)),
                    sc=sc_refs.get(id(f)),
                )
            )
    if triage is not None:
        groups.append(_triage_group(triage, uids))
    if not groups:
        raise ValueError("nothing to report")

    observer = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.uid("device", output.pipeline),
            name=clean_text(f"msknode {output.pipeline}", "LO"),
            manufacturer_name=MANUFACTURER,
            model_name=clean_text(", ".join(sorted({m.name for m in models})), "LO") or None,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    if demo:
        notice = next((m.notice for m in models if m.demo_weights), None) or "Not for diagnostic use."
        report[0].ContentSequence.insert(len(report[0].ContentSequence) - 1, _text(notice))

    evidence: list[Dataset] = []
    for s in ordered_sources:
        evidence.extend(s.evidence)
    evidence.extend(evidence_extra)
    previous = []
    for p in predecessors:
        d = Dataset()
        d.StudyInstanceUID = p.study_uid
        d.SeriesInstanceUID = p.series_uid
        d.SOPClassUID = p.sop_class_uid
        d.SOPInstanceUID = p.sop_instance_uid
        previous.append(d)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series("sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.instance("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        institution_name=institution_name,
        previous_versions=previous or None,
        contributing_equipment=contributing_equipment(models),
        coding_schemes=codes.coding_schemes(),
        series_description=SR_DESCRIPTION if demo else SR_DESCRIPTION_CLINICAL,
        specific_character_set=None,
    )
    copy_character_set(sr, evidence[0])
    return sr
