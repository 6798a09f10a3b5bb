"""FRACTIONAL (probability) segmentations of the saliency heatmaps of positive findings.

One SEG per source series; one coded segment per finding at or above its reporting
threshold; frames reference the source images (Source Image Sequence per frame and
Referenced Series Sequence, written by highdicom). The label-map SEG variant is not
used (older validators reject it).

`build_levels_seg`: the BINARY SEG of the level segmentation (``lumbar_spine.levels``): one segment
per vertebral body (L1 ... L5 vertebra codes) and per disc (intervertebral disc structure, its level
as the anatomic region) found in the series.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
import numpy as np

from models.types import Finding, ModelInfo
from node.errors import ResultsError
from node.results import codes
from node.results.equipment import (
    MANUFACTURER,
    MANUFACTURER_MODEL,
    contributing_equipment,
    node_software_versions,
    seg_algorithm,
)
from node.results.sanitize import clean_text, copy_character_set
from node.results.sources import SourceSeries
from node.results.uids import UidFactory

SEG_SERIES_NUMBER = 9801


@dataclass
class SegItem:
    finding: Finding
    model: ModelInfo
    laterality: str | None


def heatmap_for(series: SourceSeries, heatmap: np.ndarray) -> np.ndarray:
    """The heatmap validated against the source geometry: (slices, rows, cols) float32 in [0, 1]."""
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    expected = (len(series.slices), rows, cols)
    h = np.asarray(heatmap, dtype=np.float32)
    if h.shape != expected:
        raise ResultsError(
            f"series {series.series_uid}: heatmap shape {h.shape} does not match the source volume {expected}"
        )
    if not np.all(np.isfinite(h)):
        raise ResultsError(f"series {series.series_uid}: heatmap contains NaN or infinite values")
    return np.clip(h, 0.0, 1.0)


def segment_label(item: SegItem) -> str:
    f = item.finding
    text = f.label or f.code
    if f.level:
        text = f"{text} {f.level}"
    return clean_text(f"{text} ({item.model.name})", "LO")


def in_source_order(series: SourceSeries, frames: np.ndarray) -> tuple[np.ndarray, list]:
    """Frames in slice order -> (the frames in the order of the source images, those source images): a
    multi-frame source (one object) gets its own frame order back; single-frame sources are the slices."""
    if series.is_multiframe:
        if len(series.datasets) != 1:
            raise ResultsError(f"series {series.series_uid}: more than one multi-frame source object")
        by_frame = np.zeros_like(frames)
        for k, sl in enumerate(series.slices):
            by_frame[(sl.frame_number or 1) - 1] = frames[k]
        return by_frame, series.datasets
    return frames, [sl.dataset for sl in series.slices]


def build_seg(
    *,
    series: SourceSeries,
    items: list[SegItem],
    uids: UidFactory,
    index: int,
    institution_name: str | None = None,
) -> tuple[hd.seg.Segmentation, dict[int, int]]:
    """Returns the SEG and a map ``id(finding) -> segment number``."""
    if not items:
        raise ResultsError("a SEG needs at least one finding with a heatmap")
    n = len(series.slices)
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    frames = np.zeros((n, rows, cols, len(items)), dtype=np.float32)
    descriptions = []
    numbers: dict[int, int] = {}
    for s, item in enumerate(items, start=1):
        heat = heatmap_for(series, item.finding.heatmap)  # type: ignore[arg-type]
        frames[..., s - 1] = heat
        numbers[id(item.finding)] = s
        site, _modifier = codes.site_codes(item.finding.code, item.finding.site)
        finding_concept = codes.finding_code(item.finding.code, item.finding.label)
        desc = hd.seg.SegmentDescription(
            segment_number=s,
            segment_label=segment_label(item),
            segmented_property_category=codes.SEG_CATEGORY,
            segmented_property_type=finding_concept,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=seg_algorithm(item.model),
            tracking_uid=uids.uid("seg-tracking", index, s),
            tracking_id=clean_text(f"{item.model.name} {item.finding.code} {item.finding.level or ''}".strip(), "LO"),
            anatomic_regions=[site],
        )
        if item.laterality in codes.LATERALITY:
            # a copy: the coded concepts in `codes` are shared and must not change
            region = copy.deepcopy(desc.AnatomicRegionSequence[0])
            region.AnatomicRegionModifierSequence = [copy.deepcopy(codes.LATERALITY[item.laterality])]
            desc.AnatomicRegionSequence = [region]
        descriptions.append(desc)

    frames, source_images = in_source_order(series, frames)

    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series("seg", index),
        series_number=SEG_SERIES_NUMBER + index,
        sop_instance_uid=uids.instance("seg", index),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL,
        software_versions=node_software_versions(),
        device_serial_number=MANUFACTURER,
        content_label="AI_SALIENCY",
        content_description="AI saliency heatmaps. Not for diagnostic use.",
        content_creator_name=None,
        series_description="AI saliency SEG - not for diagnostic use",
        omit_empty_frames=True,
        contributing_equipment=contributing_equipment([i.model for i in items]),
        coding_schemes=codes.coding_schemes(),
        institution_name=institution_name,
        specific_character_set=None,
    )
    copy_character_set(seg, series.first)
    return seg, numbers


# --- the level SEG (lumbar_spine.levels) ----------------------------------------------------------------

LEVELS_SEG_SERIES_NUMBER = 9851


def levels_labels_for(series: SourceSeries, labels: np.ndarray, n_structures: int) -> np.ndarray:
    """The level label volume validated against the source geometry: (slices, rows, cols) integers in
    0..n_structures."""
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    expected = (len(series.slices), rows, cols)
    lab = np.asarray(labels)
    if lab.shape != expected:
        raise ResultsError(
            f"series {series.series_uid}: level label shape {lab.shape} does not match the source volume {expected}"
        )
    if lab.dtype.kind not in "iu" or (lab.size and (int(lab.min()) < 0 or int(lab.max()) > n_structures)):
        raise ResultsError(f"series {series.series_uid}: level labels outside 0..{n_structures}")
    return lab


def level_segment_codes(structure: str) -> tuple[hd.sr.CodedConcept, list[hd.sr.CodedConcept]]:
    """(segmented property type, anatomic regions) of a vertebral body ("L1") or a disc ("L1-L2")."""
    if structure in codes.VERTEBRA:
        return codes.VERTEBRA[structure], [codes.LUMBAR_SPINE]
    if "-" in structure:
        return codes.INTERVERTEBRAL_DISC, [codes.level_code(structure)]
    raise ResultsError(f"unknown spine structure {structure!r}")


def build_levels_seg(
    *,
    series: SourceSeries,
    labels: np.ndarray,
    structures: tuple[str, ...],
    model: ModelInfo,
    uids: UidFactory,
    institution_name: str | None = None,
) -> tuple[hd.seg.Segmentation, dict[str, int]]:
    """One BINARY SEG of the named vertebral bodies and discs (one segment per structure present in ``labels``,
    value ``i + 1`` = ``structures[i]``). Returns the SEG and structure -> segment number."""
    lab = levels_labels_for(series, labels, len(structures))
    present = [i for i in range(1, len(structures) + 1) if bool(np.any(lab == i))]
    if not present:
        raise ResultsError(f"series {series.series_uid}: no vertebra or disc segmented; no level SEG")
    seg_map = np.zeros(lab.shape, np.uint8)
    descriptions = []
    numbers: dict[str, int] = {}
    for s, value in enumerate(present, start=1):
        name = structures[value - 1]
        seg_map[lab == value] = s
        numbers[name] = s
        prop, regions = level_segment_codes(name)
        text = f"{name} vertebral body" if "-" not in name else f"{name} intervertebral disc"
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=s,
                segment_label=clean_text(text, "LO"),
                segmented_property_category=codes.SEG_ANATOMY_CATEGORY,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=model.name,
                    family=codes.AI_FAMILY,
                    version=model.version,
                    source=MANUFACTURER,
                    parameters={"weights_sha256": model.weights_sha256},
                ),
                tracking_uid=uids.uid("levels-seg-tracking", s, name),
                tracking_id=clean_text(f"{model.name} {name}", "LO"),
                anatomic_regions=regions,
            )
        )
    seg_map, source_images = in_source_order(series, seg_map)
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=seg_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series("levels-seg"),
        series_number=LEVELS_SEG_SERIES_NUMBER,
        sop_instance_uid=uids.instance("levels-seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL,
        software_versions=node_software_versions(),
        device_serial_number=MANUFACTURER,
        content_label="AI_LEVELS",
        content_description="AI vertebral bodies and discs, named. Not for diagnostic use.",
        content_creator_name=None,
        series_description="AI spine levels SEG - not for diagnostic use",
        omit_empty_frames=True,
        contributing_equipment=contributing_equipment([model]),
        coding_schemes=codes.coding_schemes(),
        institution_name=institution_name,
        specific_character_set=None,
    )
    copy_character_set(seg, series.first)
    return seg, numbers
