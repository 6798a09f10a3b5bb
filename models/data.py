"""Data specs for training and evaluation.

- ``synthetic:N:SEED`` — N fresh phantoms of the task's anatomy, seeds SEED … SEED+N-1
  (exact labels, lesion masks and lesion centres; models.phantoms).
- ``mrnet:PATH[:SPLIT]`` — the MRNet layout: ``PATH/SPLIT/{sagittal,coronal,axial}/NNNN.npy``
  (uint8 stacks, slices first) and ``PATH/SPLIT-{acl,meniscus,abnormal}.csv`` (``NNNN,0|1``
  without header). SPLIT defaults to ``train``. The stacks carry no geometry; the task's
  ``mrnet_spacing_mm`` (`models.labels`) is assumed.
- ``dicomcsv:PATH`` — a folder of DICOM series (any layout below PATH) and
  ``PATH/labels.csv`` keyed by ``SeriesInstanceUID`` with one column per head (e.g. ``acl``
  with intact/partial/complete or 0/1). Series without a row are ignored; a row without
  its series is an error.
- ``images:PATH`` — one folder per series (PNG/JPEG slices, a NIfTI or a MATLAB .mat volume, with a
  ``series.json`` sidecar for spacing and orientation) and ``PATH/labels.csv`` (a ``series`` column and
  the label columns of ``dicomcsv:``); see `models.images`.
- ``realdir:PATH`` — real series without labels: a folder whose subfolders are series (DICOM
  files, or image stacks / arrays with a ``series.json`` sidecar; see `models.realdir`).
  For evaluation only: QC acceptance, the distribution of outputs and, on series the
  sidecar marks ``normal``, the false-positive rate.
- ``spinevol:PATH`` — a folder of segmented spine volumes (``.npz`` with ``I`` and ``GT`` and a
  ``volumes.csv``, like the real corpus' ``lumbar_spine/segmented_volumes``): ``lumbar_spine.levels``
  trains and evaluates on it (`models.levels.data`).
- ``spider:PATH`` — a folder in the layout of the SPIDER mid-sagittal corpus (``midsagittal_images/``,
  ``radiological_gradings.csv``, ``overview.csv``, ``disc_crops/``): ``lumbar_spine.discs`` trains and
  evaluates on it (`models.discs.spider`).
- ``realdata:PATH`` — the labelled development corpus of real MRI (`models.realdata`;
  ``realdata:auto`` finds it beside the checkout). Only ``qc.anatomy`` trains and evaluates on it
  (`models.qc_training`, `models.qc_evaluation`).

`open_cases(spec, task)` yields `Case` objects (a `Volume` + a `Target`, labelled by the task's
`models.labels` mapping); `load_items` turns them into network-grid arrays (cached on disk for phantoms).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataSpecError
from models.labels import Target, labels_for
from models.tasks.base import TaskSpec
from models.transforms import PLANES
from models.types import Volume

MRNET_LABELS = ("acl", "meniscus", "abnormal")
MRNET_PLANES = ("sagittal", "coronal", "axial")


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "synthetic" | "mrnet" | "dicomcsv" | "realdir" | "realdata" | "spinevol"
    n: int = 0
    seed: int = 0
    path: Path | None = None
    split: str = "train"

    def __str__(self) -> str:
        if self.kind == "synthetic":
            return f"synthetic:{self.n}:{self.seed}"
        if self.kind == "mrnet":
            return f"mrnet:{self.path}:{self.split}"
        return f"{self.kind}:{self.path}"

    def required_path(self) -> Path:
        """PATH of a spec that reads files (every kind but synthetic)."""
        if self.path is None:
            raise DataSpecError(f"data spec {self}: missing PATH")
        return self.path


@dataclass
class Case:
    key: str  # seed, MRNet exam id or SeriesInstanceUID
    volume: Volume
    target: Target
    extras: dict[str, Volume] = field(default_factory=dict)  # extra-role volumes (e.g. cor_fluid)


def parse_spec(text: str) -> DataSpec:
    """Parse ``synthetic:N:SEED``, ``mrnet:PATH[:SPLIT]``, ``dicomcsv:PATH``, ``realdir:PATH`` or ``realdata:PATH``."""
    if not isinstance(text, str) or ":" not in text:
        raise DataSpecError(
            f"data spec {text!r}: expected synthetic:N:SEED, mrnet:PATH[:SPLIT], dicomcsv:PATH or realdir:PATH"
        )
    kind, rest = text.split(":", 1)
    if kind == "synthetic":
        parts = rest.split(":")
        if len(parts) != 2:
            raise DataSpecError(f"data spec {text!r}: expected synthetic:N:SEED")
        try:
            n, seed = int(parts[0]), int(parts[1])
        except ValueError:
            raise DataSpecError(f"data spec {text!r}: N and SEED must be integers") from None
        if n < 1 or seed < 0:
            raise DataSpecError(f"data spec {text!r}: N must be >= 1 and SEED >= 0")
        return DataSpec("synthetic", n=n, seed=seed)
    if kind == "spinevol":
        if not rest:
            raise DataSpecError(f"data spec {text!r}: missing PATH")
        return DataSpec("spinevol", path=Path(rest))
    if kind == "spider":
        if not rest:
            raise DataSpecError(f"data spec {text!r}: missing PATH")
        return DataSpec("spider", path=Path(rest))
    if kind == "mrnet":
        path, split = rest, "train"
        head, sep, tail = rest.rpartition(":")
        if sep and head and tail and "/" not in tail and "\\" not in tail:
            path, split = head, tail
        if not path:
            raise DataSpecError(f"data spec {text!r}: missing PATH")
        return DataSpec("mrnet", path=Path(path), split=split)
    if kind in ("dicomcsv", "realdir", "realdata", "images"):
        if not rest:
            raise DataSpecError(f"data spec {text!r}: missing PATH")
        return DataSpec(kind, path=Path(rest))
    raise DataSpecError(
        f"unknown data spec kind {kind!r}; expected synthetic, mrnet, dicomcsv, images, realdir, realdata, spider "
        "or spinevol"
    )


# --- synthetic ---------------------------------------------------------------------------


def phantom_case(task: TaskSpec, seed: int, **overrides: Any) -> tuple[Case, Any]:
    from models.phantoms import generate

    labels = labels_for(task)
    ph = generate(task.anatomy, int(seed), **{**labels.phantom_overrides_for(int(seed)), **overrides})
    case = Case(
        key=str(seed), volume=ph.volume, target=labels.target_from_phantom(ph), extras=labels.phantom_extras(ph, seed)
    )
    return case, ph


def _grid_item(task: TaskSpec, case: Case) -> dict[str, Any]:
    img, frame = task.network_input(case.volume, case.extras)
    item: dict[str, Any] = {"image": img.astype(np.float16), "allowed": case.target.allowed, "key": case.key}
    if case.target.lesion is not None:
        item["lesion"] = np.stack([frame.to_grid(m) for m in case.target.lesion]).astype(np.float16)
    return item


def _synthetic_worker(args) -> dict[str, Any]:
    task_name, seed, cache_dir = args
    import torch

    torch.set_num_threads(1)
    from models.tasks import TASKS

    task = TASKS[task_name]
    path = None
    if cache_dir:
        path = Path(cache_dir) / f"{seed}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return {k: (z[k] if k != "key" else str(z[k])) for k in z.files}
            except (OSError, ValueError):
                pass
    case, _ = phantom_case(task, seed)
    item = _grid_item(task, case)
    if path is not None:
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **item)
        os.replace(tmp, path)
    return item


def cache_dir_for(task: TaskSpec, root: Path | None) -> Path | None:
    """Cache folder keyed by the task's preprocessing and the phantom spec version."""
    if root is None:
        return None
    import models.phantoms as phantoms

    labels = labels_for(task)
    key = json.dumps(
        {
            "task": task.name,
            "shape": task.input.shape,
            "roi": task.input.roi_mm,
            "native": task.input.native_mm,
            "plane": task.input.plane,
            "phantoms": phantoms.SPEC_VERSION,
            "generator": getattr(phantoms, "GENERATOR_VERSION", None),
            "overrides": sorted(labels.phantom_overrides().items()),
            "sequences": list(labels.phantom_sequences),
            "v": 1,
        },
        sort_keys=True,
        default=str,
    )
    d = Path(root) / task.name / hashlib.sha256(key.encode()).hexdigest()[:12]
    d.mkdir(parents=True, exist_ok=True)
    return d


def synthetic_items(
    task: TaskSpec, n: int, seed: int, *, workers: int = 1, cache_root: Path | None = None, log=None
) -> list[dict[str, Any]]:
    """Network-grid items of N phantoms (seeds SEED…SEED+N-1), generated in ``workers`` processes."""
    cache = cache_dir_for(task, cache_root)
    jobs = [(task.name, s, str(cache) if cache else None) for s in range(seed, seed + n)]
    items: list[dict[str, Any]] = []
    if workers > 1 and n > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, item in enumerate(pool.imap(_synthetic_worker, jobs, chunksize=4)):
                items.append(item)
                if log and (i + 1) % 100 == 0:
                    log(f"phantoms: {i + 1}/{n}")
    else:
        for i, job in enumerate(jobs):
            items.append(_synthetic_worker(job))
            if log and (i + 1) % 100 == 0:
                log(f"phantoms: {i + 1}/{n}")
    return items


# --- MRNet ---------------------------------------------------------------------------------


def _read_mrnet_labels(root: Path, split: str) -> dict[str, dict[str, str]]:
    labels: dict[str, dict[str, str]] = {}
    found = False
    for name in MRNET_LABELS:
        path = root / f"{split}-{name}.csv"
        if not path.is_file():
            continue
        found = True
        with open(path, newline="") as fh:
            for row in csv.reader(fh):
                if not row or not row[0].strip():
                    continue
                if len(row) < 2:
                    raise DataSpecError(f"{path}: expected 'case,label' rows, got {row!r}")
                case = row[0].strip()
                if not case.isdigit():  # a header line
                    continue
                labels.setdefault(case.zfill(4), {})[name] = row[1].strip()
    if not found:
        raise DataSpecError(f"no {split}-{{acl,meniscus,abnormal}}.csv under {root}")
    return labels


def mrnet_volume(array: np.ndarray, plane: str, spacing: tuple[float, float, float], key: str) -> Volume:
    """An MRNet stack as a Volume in the canonical orientation of its plane (assumed spacing)."""
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != 3:
        raise DataSpecError(f"MRNet case {key}: expected a 3-D stack, got shape {arr.shape}")
    row, col = PLANES[plane]
    normal = np.cross(row, col)
    positions = np.array([k * spacing[0] * normal for k in range(arr.shape[0])], dtype=float)
    return Volume(
        array=arr,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        positions=positions,
        row_cosine=row,
        col_cosine=col,
        series_uid=f"mrnet-{key}-{plane}",
        sop_instance_uids=tuple(f"mrnet-{key}-{k}" for k in range(arr.shape[0])),
        frame_numbers=(None,) * arr.shape[0],
        modality="MR",
        attributes={"source": "mrnet"},
    )


def mrnet_cases(task: TaskSpec, root: Path, split: str) -> Iterator[Case]:
    root = Path(root)
    if not root.is_dir():
        raise DataSpecError(f"MRNet folder {root} does not exist")
    labels = _read_mrnet_labels(root, split)
    mapping = labels_for(task)
    plane = mapping.mrnet_plane
    stack_dir = root / split / plane
    if not stack_dir.is_dir():
        raise DataSpecError(f"MRNet folder {stack_dir} does not exist")
    for key in sorted(labels):
        path = stack_dir / f"{key}.npy"
        if not path.is_file():
            raise DataSpecError(f"MRNet labels list case {key} but {path} is missing")
        arr = np.load(path, allow_pickle=False)
        vol = mrnet_volume(arr, plane, mapping.mrnet_spacing_mm, key)
        yield Case(key=key, volume=vol, target=mapping.target_from_row(labels[key]))


# --- DICOM folder + labels.csv ------------------------------------------------------------------


def dicomcsv_cases(task: TaskSpec, root: Path) -> Iterator[Case]:
    from models.io import group_folder, load_series

    root = Path(root)
    labels_path = root / "labels.csv"
    if not labels_path.is_file():
        raise DataSpecError(f"{labels_path} not found (a labels.csv keyed by SeriesInstanceUID is required)")
    with open(labels_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "SeriesInstanceUID" not in reader.fieldnames:
            raise DataSpecError(f"{labels_path}: needs a SeriesInstanceUID column")
        heads = [h.name for h in task.heads]
        if not any(h in reader.fieldnames for h in heads):
            raise DataSpecError(f"{labels_path}: no label column for {task.name} (expected one of {', '.join(heads)})")
        rows = {r["SeriesInstanceUID"].strip(): r for r in reader if r.get("SeriesInstanceUID", "").strip()}
    groups = group_folder(root)
    missing = sorted(set(rows) - set(groups))
    if missing:
        raise DataSpecError(f"{labels_path}: {len(missing)} labelled series not found under {root}, e.g. {missing[0]}")
    mapping = labels_for(task)
    for uid in sorted(rows):
        try:
            target = mapping.target_from_row(rows[uid])
        except ValueError as e:
            raise DataSpecError(f"{labels_path}, series {uid}: {e}") from None
        yield Case(key=uid, volume=load_series(groups[uid]), target=target)


def open_cases(spec: DataSpec | str, task: TaskSpec) -> Iterator[Case]:
    """Cases of a data spec (phantoms are generated here, one at a time)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "synthetic":
        for s in range(spec.seed, spec.seed + spec.n):
            yield phantom_case(task, s)[0]
    elif spec.kind == "mrnet":
        yield from mrnet_cases(task, spec.required_path(), spec.split)
    elif spec.kind == "images":
        from models.images import images_cases

        yield from images_cases(task, spec.required_path())
    elif spec.kind == "spider":
        raise DataSpecError(f"{spec}: SPIDER-layout folders serve lumbar_spine.discs only (models.discs)")
    elif spec.kind == "realdir":
        raise DataSpecError(f"{spec}: real series without labels serve evaluation only (no training targets)")
    elif spec.kind == "realdata":
        raise DataSpecError(f"{spec}: the real corpus is labelled by anatomy only; qc.anatomy alone uses it")
    else:
        yield from dicomcsv_cases(task, spec.required_path())


def load_items(
    spec: DataSpec | str, task: TaskSpec, *, workers: int = 1, cache_root: Path | None = None, log=None
) -> list[dict[str, Any]]:
    """Network-grid training items of a data spec."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "synthetic":
        return synthetic_items(task, spec.n, spec.seed, workers=workers, cache_root=cache_root, log=log)
    items = [_grid_item(task, c) for c in open_cases(spec, task)]
    if not items:
        raise DataSpecError(f"{spec}: no cases")
    return items
