"""The demo's studies (phantoms from `models.phantoms`) and what the shipped models should make of them.

Each `DemoCase` is one whole phantom study (3-plane localizer + the anatomy's usual series,
`models.phantoms.write_study`). `expectations` derives, from the model registry, which result
objects must come back into the PACS and which worklist priority the study must get: a model
without shipped weights cannot find anything, so its study is only expected to get an SR that
says "not evaluated" (and the expectations tighten by themselves as weights land).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import EndToEndError

SUPERRES_MODEL = "superres"


@dataclass(frozen=True)
class DemoCase:
    key: str  # short name, also the folder of its DICOM files
    title: str  # what the table shows
    anatomy: str  # phantom anatomy = pipeline name
    seed: int
    labels: Mapping[str, Any]  # phantom label/nuisance overrides
    positive_model: str | None  # the model that must report the planted finding (None: a normal study)
    finding_code: str | None  # its finding code in the findings table
    urgent: bool  # the default triage policy makes this finding URGENT

    def describe_labels(self) -> str:
        parts = []
        for k, v in self.labels.items():
            if k == "snr":
                continue
            if isinstance(v, Mapping):
                v = ",".join(f"{lv}:{g}" for lv, g in v.items() if g != "normal") or "normal"
            parts.append(f"{k}={v}")
        return ", ".join(parts) or "normal"


# Seeds are chosen so that the planted lesion is clear (the demo shows the pipeline, not a hard case).
DEMO_CASES: tuple[DemoCase, ...] = (
    DemoCase(
        "knee-acl",
        "Knee, complete ACL tear",
        "knee",
        3,
        {"acl": "complete", "meniscus_tear": False, "snr": 30.0},
        "knee.acl",
        "acl_tear",
        True,
    ),
    DemoCase(
        "shoulder-cuff",
        "Shoulder, full-thickness cuff tear",
        "shoulder",
        5,
        {"cuff": "full_thickness", "snr": 25.0},
        "shoulder.rotator_cuff",
        "rotator_cuff_tear",
        True,
    ),
    DemoCase(
        "spine-stenosis",
        "Lumbar spine, severe stenosis L4-L5",
        "lumbar_spine",
        7,
        {
            "stenosis": {"L1-L2": "normal", "L2-L3": "normal", "L3-L4": "normal", "L4-L5": "severe", "L5-S1": "normal"},
            "snr": 30.0,
        },
        "lumbar_spine.stenosis",
        "spinal_stenosis",
        True,
    ),
    DemoCase(
        "knee-normal",
        "Knee, normal",
        "knee",
        11,
        {"acl": "intact", "meniscus_tear": False, "snr": 30.0},
        None,
        None,
        False,
    ),
)


@dataclass(frozen=True)
class Expectation:
    """What must arrive in the PACS for one study, and the worklist priority it must get."""

    min_counts: dict[str, int]  # kind -> at least this many objects (sr, seg, sc, superres)
    absent: tuple[str, ...]  # kinds that must not be there (e.g. no SEG for a normal study)
    priority: str | None  # URGENT / ROUTINE, or None when it cannot be predicted
    notes: tuple[str, ...] = ()  # e.g. "shoulder.rotator_cuff has no shipped weights: SR only"


def shipped_models(weights_dir: Path | None) -> set[str]:
    """Names of the models whose weights the registry has (site folder first, then the repository's)."""
    from models.registry import ENTRIES, Registry

    reg = Registry(weights_dir)
    return {name for name in ENTRIES if reg.has_weights(name)}


def pipeline_models(anatomy: str) -> tuple[str, ...]:
    """Every model a pipeline can run, shipped or not (`models.pipelines.CANDIDATES`)."""
    from models.pipelines import CANDIDATES

    return tuple(CANDIDATES.get(anatomy, ()))


def pipeline_has_superres(anatomy: str) -> bool:
    """Whether the pipeline runs super-resolution (it ships and has input roles; True for an unknown pipeline)."""
    from models.pipelines import PIPELINES

    spec = PIPELINES.get(anatomy)
    if spec is None:
        return True
    return bool(spec.superres) and bool(spec.superres_roles)


def expectations(case: DemoCase, shipped: set[str]) -> Expectation:
    models = pipeline_models(case.anatomy)
    min_counts = {"sr": 1}
    absent: list[str] = []
    notes: list[str] = []
    if SUPERRES_MODEL in shipped and pipeline_has_superres(case.anatomy):
        min_counts["superres"] = 1
    elif SUPERRES_MODEL not in shipped:
        notes.append("super-resolution has no shipped weights: no super-resolved series expected")
    else:
        notes.append("super-resolution does not run in this pipeline yet (no task code for its input roles)")
    evaluated = [m for m in models if m in shipped]
    for m in models:
        if m not in shipped:
            notes.append(f"{m} has no shipped weights: its SR entry says not evaluated")
    priority: str | None
    if case.positive_model is None:
        # a normal study: nothing positive from any shipped model
        absent += ["seg", "sc"]
        priority = "ROUTINE"
    elif case.positive_model in shipped and case.positive_model in models:
        min_counts["seg"] = 1
        min_counts["sc"] = 1
        priority = "URGENT" if case.urgent else "ROUTINE"
    else:
        priority = None if evaluated else "ROUTINE"
    return Expectation(min_counts=min_counts, absent=tuple(absent), priority=priority, notes=tuple(notes))


# ---- phantom DICOM files -------------------------------------------------------------------


@dataclass
class CaseFiles:
    """The DICOM files of one generated case and the UIDs the node will see."""

    case: DemoCase
    folder: Path
    study_uid: str
    files: list[Path]
    sop_instance_uids: list[str] = field(default_factory=list)
    series: dict[str, str] = field(default_factory=dict)  # role -> Series Instance UID


def _manifest_key(case: DemoCase, extra: Mapping[str, Any]) -> dict[str, Any]:
    from models.phantoms import GENERATOR_VERSION, SPEC_VERSION

    return {
        "anatomy": case.anatomy,
        "seed": case.seed,
        "labels": json.loads(json.dumps(dict(case.labels))),
        "extra": json.loads(json.dumps(dict(extra))),
        "spec": SPEC_VERSION,
        "generator": GENERATOR_VERSION,
    }


def generate_case(case: DemoCase, cache_dir: Path, *, study_uid: str | None = None, **extra: Any) -> CaseFiles:
    """Writes (or reuses from ``cache_dir``) the study's DICOM files; ``extra`` are more phantom overrides."""
    import shutil

    from pydicom import dcmread

    from models.phantoms import write_study

    folder = Path(cache_dir) / case.key
    manifest_path = folder / "manifest.json"
    key = _manifest_key(case, {**extra, "study_uid": study_uid})
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            manifest = {}
        if manifest.get("key") == key and all((folder / f).is_file() for f in manifest.get("files", [])):
            return CaseFiles(
                case,
                folder,
                manifest["study_uid"],
                [folder / f for f in manifest["files"]],
                manifest["sop_instance_uids"],
                manifest["series"],
            )
    if folder.exists():
        shutil.rmtree(folder)
    labels = dict(case.labels)
    labels.update(extra)
    if study_uid:
        labels["study_uid"] = study_uid
    try:
        by_role = write_study(case.anatomy, folder, case.seed, **labels)
    except Exception as e:  # a phantom that cannot be written is a broken installation, say which
        raise EndToEndError(f"cannot write the {case.key} phantom study: {type(e).__name__}: {e}") from e
    files: list[Path] = []
    uids: list[str] = []
    series: dict[str, str] = {}
    study = None
    for role, paths in by_role.items():
        for p in paths:
            ds = dcmread(p, stop_before_pixels=True)
            files.append(p)
            uids.append(str(ds.SOPInstanceUID))
            series[role] = str(ds.SeriesInstanceUID)
            study = str(ds.StudyInstanceUID)
    if study is None:
        raise EndToEndError(f"the {case.key} phantom study has no files")
    manifest_path.write_text(
        json.dumps(
            {
                "key": key,
                "study_uid": study,
                "files": [str(p.relative_to(folder)) for p in files],
                "sop_instance_uids": uids,
                "series": series,
            },
            indent=1,
        )
    )
    return CaseFiles(case, folder, study, files, uids, series)


def cases_by_key(keys: Iterable[str] | None) -> tuple[DemoCase, ...]:
    if not keys:
        return DEMO_CASES
    known = {c.key: c for c in DEMO_CASES}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise EndToEndError(f"unknown demo case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(known[k] for k in keys)
