"""Result objects written back into the PACS study (highdicom only).

- `build_results(...)` -> list of `ResultFile`: Comprehensive 3D SR (TID 1500, always),
  FRACTIONAL SEG of the heatmaps of positive findings, the super-resolved MR series,
  secondary-capture overlays; every UID deterministic (`node.results.uids`).
- `save(result, settings)` -> Path: atomic write under ``settings.results_dir``.
- Errors: `node.errors.ResultsError` (bad input the writers cannot make valid).

Coded concepts are listed in ``node/results/CODES.md``.
"""

from node.errors import ResultsError
from node.results.build import build_results, result_path, save
from node.results.objects import RESULT_KINDS, ResultFile, ResultRef, TriageSummary

__all__ = [
    "RESULT_KINDS",
    "ResultFile",
    "ResultRef",
    "ResultsError",
    "TriageSummary",
    "build_results",
    "result_path",
    "save",
]
