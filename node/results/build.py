"""`build_results` (every object of one job) and `save` (atomic write under results_dir).

A job writes its objects in two stages: `build_findings` (the SR, the SEG(s) and the overlays: what a
reader needs, published as soon as the models found it) and `build_superres` (the super-resolved
series, written after super-resolution). The SR describes the findings only, so it never waits for
super-resolution; each super-resolved series says what it is itself (derivation description with its
data-consistency check, source image references). `build_results` is both stages at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from models.types import PipelineOutput
from node.errors import ResultsError
from node.results.objects import ResultFile, ResultRef
from node.results.sc import OverlayItem, build_overlays
from node.results.seg import SegItem, build_levels_seg, build_seg
from node.results.sources import SourceSeries, load_sources
from node.results.sr import SegRef, build_sr
from node.results.superres_series import build_superres_series
from node.results.uids import UidFactory, model_versions_key

log = logging.getLogger(__name__)


@contextmanager
def _building(what: str):
    """Turns a writer's refusal (highdicom validates every argument) into one clear `ResultsError`."""
    try:
        yield
    except ResultsError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise ResultsError(f"cannot build {what}: {type(e).__name__}: {e}") from e


def _uid_factory(output: PipelineOutput, settings: Any, job_fingerprint: str, *, superres: bool) -> UidFactory:
    """UIDs from the job's inputs and the versions of the models each object depends on: the findings
    objects on the classifiers and the level segmentation (so they are the same whether or not
    super-resolution has run yet), the super-resolved series also on the super-resolution model."""
    models = [(m.model.name, m.model.version, m.model.weights_sha256) for m in output.outputs]
    if superres:
        models += [(s.model.name, s.model.version, s.model.weights_sha256) for s in output.superres]
    models += [(lv.model.name, lv.model.version, lv.model.weights_sha256) for lv in getattr(output, "levels", [])]
    return UidFactory(
        root=settings.uid_root, job_fingerprint=job_fingerprint, model_versions=model_versions_key(models)
    )


def _result(kind: str, ds: Dataset, description: str = "") -> ResultFile:
    return ResultFile(
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        dataset=ds,
        study_uid=str(ds.StudyInstanceUID),
        description=description,
    )


def _level_outputs(output: PipelineOutput) -> list[Any]:
    """The level segmentations that make a SEG: accepted, with at least one named structure."""
    return [
        lv
        for lv in getattr(output, "levels", [])
        if lv.qc.accepted and lv.labels is not None and bool(np.any(np.asarray(lv.labels) > 0))
    ]


def _needed_series(output: PipelineOutput, *, superres: bool) -> list[str]:
    """The input series whose instances an object refers to: those some model used (not e.g. a localizer)."""
    needed: list[str] = []
    for mo in output.outputs:
        for uid in (output.used_series or {}).get(mo.model.name) or ([mo.series_uid] if mo.series_uid else []):
            needed.append(uid)
    if superres:
        needed += [s.source.series_uid for s in output.superres if s.source.series_uid]
    needed += [lv.series_uid for lv in _level_outputs(output)]
    return list(dict.fromkeys(needed))


def _load(
    source_files: dict[str, list[Path]], wanted: Sequence[str], cache: dict[str, SourceSeries] | None
) -> dict[str, SourceSeries]:
    """The source series ``wanted`` (the first given one when none is), read once: ``cache`` (series UID ->
    `SourceSeries`, filled here) lets the second stage reuse what the first one read."""
    if not source_files:
        raise ResultsError("no source series given")
    selected = [uid for uid in wanted if uid in source_files] or [next(iter(source_files))]
    cache = {} if cache is None else cache
    missing = [uid for uid in selected if uid not in cache]
    if missing:
        cache.update(load_sources({uid: [Path(p) for p in source_files[uid]] for uid in missing}))
    sources = {uid: cache[uid] for uid in selected}
    studies = {str(s.first.StudyInstanceUID) for s in sources.values()}
    if len(studies) != 1:
        raise ResultsError(f"source series belong to {len(studies)} studies; results go into one study")
    return sources


def build_results(
    *,
    output: PipelineOutput,
    source_files: dict[str, list[Path]],
    triage: Any | None,
    predecessors: Sequence[ResultRef],
    settings: Any,
    job_fingerprint: str,
) -> list[ResultFile]:
    """Every result object of one job: `build_findings` (SEG(s), SC overlays, the SR) and `build_superres`
    (the super-resolved series of ``output.superres``); the SR is the last object.

    ``source_files`` maps each input series UID to its stored files. Raises
    `ResultsError` with a clear message when the inputs cannot make valid objects.
    """
    cache: dict[str, SourceSeries] = {}
    findings = build_findings(
        output=output,
        source_files=source_files,
        triage=triage,
        predecessors=predecessors,
        settings=settings,
        job_fingerprint=job_fingerprint,
        sources_cache=cache,
    )
    derived = build_superres(
        output=output,
        source_files=source_files,
        settings=settings,
        job_fingerprint=job_fingerprint,
        sources_cache=cache,
    )
    return findings[:-1] + derived + findings[-1:]  # the SR last, as always


def build_findings(
    *,
    output: PipelineOutput,
    source_files: dict[str, list[Path]],
    triage: Any | None,
    predecessors: Sequence[ResultRef],
    settings: Any,
    job_fingerprint: str,
    sources_cache: dict[str, SourceSeries] | None = None,
) -> list[ResultFile]:
    """The findings objects of one job: SEG(s) (saliency; the named vertebrae and discs of the level
    segmentation), SC overlays, and the SR (last). Super-resolution (``output.superres``) is not
    described in them: its series are `build_superres`'s. ``sources_cache``: see `_load`."""
    if not job_fingerprint:
        raise ResultsError("a job fingerprint is required (it makes the result UIDs)")
    sources = _load(source_files, _needed_series(output, superres=False), sources_cache)
    uids = _uid_factory(output, settings, job_fingerprint, superres=False)
    institution = getattr(settings, "institution_name", None) or None
    # positive findings with a (non-empty) heatmap, grouped by the series the heatmap is in
    seg_groups: dict[str, list[SegItem]] = {}
    for mo in output.outputs:
        if not mo.qc.accepted:
            continue
        for f in mo.findings:
            if not f.positive or f.heatmap is None:
                continue
            if mo.series_uid not in sources:
                raise ResultsError(f"{mo.model.name}: its series {mo.series_uid} is not among the source files")
            if float(np.max(f.heatmap)) <= 0.0:
                log.info("%s %s: empty heatmap, no segment", mo.model.name, f.code)
                continue
            series = sources[mo.series_uid]
            seg_groups.setdefault(mo.series_uid, []).append(SegItem(f, mo.model, series.laterality))

    results: list[ResultFile] = []
    seg_refs: dict[int, SegRef] = {}
    sc_refs: dict[int, Dataset] = {}
    extra_evidence: list[Dataset] = []
    sc_count = 0
    for index, (series_uid, items) in enumerate(seg_groups.items()):
        series = sources[series_uid]
        with _building(f"the SEG of series {series_uid}"):
            seg, numbers = build_seg(series=series, items=items, uids=uids, index=index, institution_name=institution)
        results.append(_result("seg", seg, f"saliency SEG of series {series_uid}"))
        extra_evidence.append(seg)
        for it in items:
            seg_refs[id(it.finding)] = SegRef(seg, numbers[id(it.finding)], series)
        with _building(f"the overlays of series {series_uid}"):
            overlays = build_overlays(
                series=series,
                items=[OverlayItem(it.finding, it.model) for it in items],
                uids=uids,
                index=0,
                first_instance=sc_count,
                institution_name=institution,
            )
        sc_count += len(overlays)
        for it, sc in zip(items, overlays):
            sc_refs[id(it.finding)] = sc
            results.append(_result("sc", sc, f"overlay of {it.model.name} {it.finding.code}"))
            extra_evidence.append(sc)

    disc_segments: dict[str, SegRef] = {}  # "L4-L5" -> its disc segment in the level SEG (the SR's disc groups)
    for lv in _level_outputs(output):
        if lv.series_uid not in sources:
            raise ResultsError(f"{lv.model.name}: its series {lv.series_uid} is not among the source files")
        with _building(f"the level SEG of series {lv.series_uid}"):
            level_seg, level_numbers = build_levels_seg(
                series=sources[lv.series_uid],
                labels=lv.labels,
                structures=lv.structures,
                model=lv.model,
                uids=uids,
                institution_name=institution,
            )
        results.append(_result("seg", level_seg, f"vertebra and disc SEG of series {lv.series_uid}"))
        extra_evidence.append(level_seg)
        for name, number in level_numbers.items():
            if "-" in name:  # a disc ("L4-L5"); a vertebral body is "L4"
                disc_segments.setdefault(name, SegRef(level_seg, number, sources[lv.series_uid]))

    with _building("the SR"):
        sr = build_sr(
            output=output,
            sources=sources,
            seg_refs=seg_refs,
            sc_refs=sc_refs,
            disc_segments=disc_segments,
            triage=triage,
            predecessors=predecessors,
            uids=uids,
            evidence_extra=extra_evidence,
            institution_name=institution,
        )
    results.append(_result("sr", sr, "TID 1500 measurement report"))
    return results


def build_superres(
    *,
    output: PipelineOutput,
    source_files: dict[str, list[Path]],
    settings: Any,
    job_fingerprint: str,
    sources_cache: dict[str, SourceSeries] | None = None,
) -> list[ResultFile]:
    """The super-resolved series of ``output.superres`` (one MR instance per slice), for each one that passed
    its QC gate and data-consistency check; nothing for the others (their check is in the job's findings
    rows and model versions). ``sources_cache``: see `_load`."""
    if not job_fingerprint:
        raise ResultsError("a job fingerprint is required (it makes the result UIDs)")
    wanted = [s for s in output.superres if s.qc.accepted and s.consistency_passed]
    if not wanted:
        return []
    sources = _load(source_files, [s.source.series_uid for s in wanted if s.source.series_uid], sources_cache)
    uids = _uid_factory(output, settings, job_fingerprint, superres=True)
    institution = getattr(settings, "institution_name", None) or None
    results: list[ResultFile] = []
    for written, sr_out in enumerate(wanted):
        src_uid = sr_out.source.series_uid
        if src_uid not in sources:
            raise ResultsError(f"{sr_out.model.name}: its source series {src_uid} is not among the source files")
        with _building(f"the super-resolved series of {src_uid}"):
            datasets = build_superres_series(
                output=sr_out, series=sources[src_uid], uids=uids, index=written, institution_name=institution
            )
        for ds in datasets:
            results.append(_result("superres", ds, f"super-resolved {src_uid}"))
    return results


def result_path(result: ResultFile, settings: Any) -> Path:
    return Path(settings.results_dir) / result.study_uid / result.series_uid / f"{result.sop_instance_uid}.dcm"


def save(result: ResultFile, settings: Any) -> Path:
    """Writes the object as a DICOM file (atomic: temporary file, fsync, rename) and returns its path."""
    path = result_path(result, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            result.dataset.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
