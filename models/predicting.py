"""What every checkpoint-backed model does the same way around its own inference.

``model_info``: the `ModelInfo` of a verified checkpoint (name, version, weights hash, kind, anatomy and
whether the weights are demo weights, from the checkpoint's metadata). ``gated_predict``: QC gate (unless
the caller already ran it) -> the model's own analysis -> the task's findings, as a `ModelOutput` with its
timings; a series the gate refuses gets no findings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from models.types import NOT_FOR_DIAGNOSTIC_USE, ModelInfo, ModelOutput, QCResult, Volume


def model_info(task: Any, sha256: str, meta: dict[str, Any], *, demo_weights: bool) -> ModelInfo:
    """The identity of ``task``'s weights; ``demo_weights`` is the default when the metadata does not say."""
    return ModelInfo(
        name=task.name,
        version=str(meta.get("version", task.version)),
        weights_sha256=sha256,
        task=task.kind,
        anatomy=task.anatomy,
        demo_weights=bool(meta.get("demo_weights", demo_weights)),
        notice=NOT_FOR_DIAGNOSTIC_USE,
    )


def gated_predict(
    model: Any, volume: Volume, qc: QCResult | None, analyse: Callable[[dict[str, float]], list[Any]]
) -> ModelOutput:
    """QC gate + ``analyse(timings)`` + ``model.task.findings`` -> ModelOutput (no findings when QC refuses
    the series). ``model`` has ``gate``, ``task``, ``threshold`` and ``info``."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if qc is None:
        if model.gate is not None:
            t0 = time.perf_counter()
            qc = model.gate.check(volume, model.task)
            timings["qc_s"] = time.perf_counter() - t0
        else:
            qc = QCResult(True, metrics={})
    if not qc.accepted:
        timings["total_s"] = time.perf_counter() - t_start
        return ModelOutput(model=model.info, series_uid=volume.series_uid, qc=qc, findings=[], timings=timings)
    results = analyse(timings)
    findings = model.task.findings(results, threshold=model.threshold, volume=volume)
    timings["total_s"] = time.perf_counter() - t_start
    return ModelOutput(model=model.info, series_uid=volume.series_uid, qc=qc, findings=findings, timings=timings)
