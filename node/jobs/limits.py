"""The largest series a job reads: memory stays bounded whatever a scanner sends.

A job holds each input series in memory several times over (the stored pixels, the float
volume, the super-resolved volume and the result objects made from it), so the worker's peak
memory grows with the voxel count of its largest series. ``MSKNODE_MAX_SERIES_VOXELS`` is the
largest series (rows x columns x frames, summed over its instances, read from the headers alone)
a job loads; the default keeps the worker under 3 GB (docs/benchmarks.md, "Memory").

A larger series is never loaded: the models that would have read it are reported "not evaluated"
with the reason ``series_too_large`` (the SR, the worklist and the findings say so, like any QC
refusal), and the rest of the study is evaluated as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REASON = "series_too_large"


def series_voxels(paths: Iterable[Path]) -> int:
    """Rows x columns x frames summed over the files, from their headers (no pixel data read)."""
    from pydicom import dcmread

    total = 0
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        total += int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * max(frames, 1)
    return total


def oversized(inputs: Iterable[Any], max_voxels: int) -> dict[str, str]:
    """Role -> why its series is not loaded, for the input series (`node.jobs.runner.InputSeries`) over the limit.

    Only series a job would load count (a role, not the localizer)."""
    refused: dict[str, str] = {}
    for inp in inputs:
        if not inp.role or inp.role == "localizer" or inp.role in refused or not inp.paths:
            continue
        n = series_voxels(inp.paths)
        if n > max_voxels:
            refused[inp.role] = (
                f"series {inp.series_uid} has {n} voxels ({len(inp.paths)} instances); this node reads series of "
                f"at most {max_voxels} voxels (MSKNODE_MAX_SERIES_VOXELS)"
            )
            log.warning("series %s not loaded: %s voxels > MSKNODE_MAX_SERIES_VOXELS %s", inp.series_uid, n, max_voxels)
    return refused


def mark_refused(output: Any, pipeline: str, refused: Mapping[str, str]) -> Any:
    """The `PipelineOutput` with each model whose input role was refused reported as ``series_too_large``.

    The pipeline saw those roles as missing (``missing_series``); a model that had another of its
    roles to read ran on it and is left as it is."""
    if not refused:
        return output
    from models.pipelines import PIPELINES
    from models.types import QCResult

    spec = PIPELINES[pipeline]
    outputs = []
    for mo in output.outputs:
        roles = spec.model_roles.get(mo.model.name, ())
        hit = [r for r in roles if r in refused]
        if not mo.qc.accepted and mo.qc.reason == "missing_series" and hit:
            mo = replace(mo, qc=QCResult(False, REASON, refused[hit[0]]))
        outputs.append(mo)
    return replace(output, outputs=outputs)
