"""The result objects of `node.results`: `ResultFile` (one `build_results` made) and `ResultRef` (one of an
earlier job, which a new SR lists as predecessor) — the types `build_results` returns and takes besides models' output."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

# The triage outcome written into the SR: `worklists.triage.TriageSummary` (priority, score,
# reasons, needs_review). `build_results` accepts any object with those attributes.
from worklists.triage import TriageSummary

__all__ = ["RESULT_KINDS", "RESULT_SOP_CLASSES", "ResultFile", "ResultRef", "TriageSummary"]

RESULT_KINDS = ("sr", "seg", "superres", "sc")
#: the SOP class of each kind of result object (what the node sends as SCU; docs/conformance.md)
RESULT_SOP_CLASSES: dict[str, str] = {
    "sr": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage (TID 1500)
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "superres": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage (a super-resolved series)
    "sc": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage (overlays)
}


@dataclass
class ResultFile:
    """One DICOM object we created; `save` writes it, orchestration records it."""

    kind: str  # one of RESULT_KINDS
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    dataset: Dataset
    study_uid: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in RESULT_KINDS:
            raise ValueError(f"unknown result kind {self.kind!r}")


@dataclass(frozen=True)
class ResultRef:
    """A result object of an earlier job of the same study (a re-opened study lists it as predecessor)."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    kind: str = "sr"
