"""Super-resolution data: noise-free truth volumes (phantoms, real MR) and the cases made from them
by the fixed degradation model; the phantom seeds reserved for training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from models.degradation import DegradationModel
from models.errors import SuperResError

TRAIN_SEED = 7_000_000  # phantom seeds TRAIN_SEED + i are training data; never evaluate on them
TRAIN_ANATOMIES = ("knee", "knee", "knee", "shoulder", "lumbar_spine")


@dataclass
class SRCase:
    """One evaluation case: the high-resolution truth and the low-resolution input made from it."""

    name: str
    truth: np.ndarray  # (f*n, H, W) (in-plane mode: (f*n, g*H, g*W))
    lr: np.ndarray  # (n, H, W)


def lr_snr_range(anatomy: str, slice_factor: int = 2) -> tuple[float, float]:
    """SNR of the thick-slice input: the phantom spec's SNR range times the slice factor
    (signal per voxel grows with the slice thickness, noise does not)."""
    from models.phantoms import SPEC

    lo, hi = SPEC.for_anatomy(anatomy).acquisition.snr
    return lo * slice_factor, hi * slice_factor


def phantom_truth(anatomy: str, seed: int, **overrides: Any) -> np.ndarray:
    """Noise-free phantom volume (same anatomy and nuisances as the seed's noisy one)."""
    from models.phantoms import generate

    return np.asarray(generate(anatomy, seed, snr=None, **overrides).volume.array, dtype=np.float32)


def phantom_case(
    anatomy: str, seed: int, *, slice_factor: int = 2, inplane_factor: int = 1, slice_sigma_frac: float = 0.15
) -> SRCase:
    """Truth = noise-free phantom; input = S (and K) of it plus Rician noise at an SNR drawn
    log-uniformly from `lr_snr_range` with a generator seeded by (seed, anatomy)."""
    truth = phantom_truth(anatomy, seed)
    rng = np.random.default_rng([int(seed), 7919, len(anatomy)])
    lo, hi = lr_snr_range(anatomy, slice_factor)
    snr = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    deg = DegradationModel(slice_factor, inplane_factor, slice_sigma_frac, snr=snr)
    truth = deg.crop_to_multiple(truth)
    return SRCase(name=f"{anatomy}:{seed}", truth=truth, lr=deg.degrade(truth, rng))


def volume_case(
    name: str,
    truth: np.ndarray,
    *,
    snr: float | None,
    seed: int = 0,
    slice_factor: int = 2,
    inplane_factor: int = 1,
    slice_sigma_frac: float = 0.15,
) -> SRCase:
    """A case from any volume used as truth (e.g. real MR), degraded by the fixed model."""
    deg = DegradationModel(slice_factor, inplane_factor, slice_sigma_frac, snr=snr)
    truth = deg.crop_to_multiple(np.asarray(truth, dtype=np.float32))
    return SRCase(name=name, truth=truth, lr=deg.degrade(truth, np.random.default_rng(seed)))


def training_volumes(
    n_phantoms: int, *, seed: int = TRAIN_SEED, anatomies=TRAIN_ANATOMIES, thin_share: float = 0.5, log=None
) -> list[np.ndarray]:
    """Noise-free training truth: phantoms with seeds ``seed + i`` (anatomies in turn); a share
    ``thin_share`` of them re-acquired with 1.5-2 mm slices and no gap (finer through-plane truth)."""
    rng = np.random.default_rng(seed)
    vols: list[np.ndarray] = []
    for i in range(n_phantoms):
        anatomy = anatomies[i % len(anatomies)]
        over: dict[str, Any] = {}
        if rng.uniform() < thin_share:
            over = {"slice_thickness": float(rng.uniform(1.5, 2.0)), "slice_gap_fraction": 0.0}
        vols.append(phantom_truth(anatomy, seed + i, **over))
        if log is not None and (i + 1) % 20 == 0:
            log({"phantoms": i + 1})
    return vols


def real_mr_cases(snr: float | None) -> list[SRCase]:
    """Real MR never used in training: the MNI152 T1 template shipped inside nilearn (sagittal
    slices) and the Enhanced MR multi-frame file of pydicom-data (emri_small.dcm)."""
    import nibabel
    import nilearn
    import pydicom
    from pydicom.data import get_testdata_file

    cases = []
    data_dir = Path(nilearn.__file__).parent / "datasets" / "data"
    for path in sorted(data_dir.glob("mni_icbm152_t1_*.nii*")):
        image = cast(nibabel.Nifti1Image, nibabel.load(str(path)))  # a .nii / .nii.gz file
        arr = np.asarray(image.get_fdata(), dtype=np.float32)  # (x, y, z): x = sagittal slices
        cases.append(volume_case(f"mni152:{path.name}", arr, snr=snr, seed=1))
    emri = get_testdata_file("emri_small.dcm")
    if emri:
        arr = pydicom.dcmread(emri).pixel_array.astype(np.float32)
        cases.append(volume_case("pydicom-data:emri_small.dcm", arr, snr=snr, seed=2))
    return cases


def check_fresh(n: int, seed: int) -> None:
    if n < 1 or seed < 0:
        raise SuperResError("N must be >= 1 and SEED >= 0")
    if seed < TRAIN_SEED + 10_000 and seed + n > TRAIN_SEED:
        raise SuperResError(
            f"seeds {seed}..{seed + n - 1} overlap the training seeds {TRAIN_SEED}..{TRAIN_SEED + 9_999}"
        )


def parse_synthetic(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "synthetic":
        raise SuperResError(f"data spec {spec!r}: expected synthetic:N:SEED")
    try:
        return int(parts[1]), int(parts[2])
    except ValueError as exc:
        raise SuperResError(f"data spec {spec!r}: N and SEED must be integers") from exc


# --------------------------------------------------------------------------------------
# real MR as training truth (no labels needed: the thick-slice acquisition is simulated from it)

#: the real sources usable as volumes, grouped by family (the unit of the leave-one-source-out folds)
REAL_FAMILIES: dict[str, tuple[str, ...]] = {
    "knee": ("knee_stacks", "siemens_knee"),
    "shoulder": ("shoulder_stacks",),
    "lumbar": ("lumbar_volumes",),
    "brain": ("mni152", "pydicom_mr"),
    "other": ("elbow_stacks", "hip_stacks"),
}
MIN_TRUTH_SLICES = 8  # fewer slices (journal figure panels, single images) are not a volume


@dataclass
class RealTruth:
    key: str
    family: str
    array: np.ndarray  # (slices, rows, cols); uint8 when the source is 8-bit (memory), else float32


def family_of(source: str) -> str:
    for fam, sources in REAL_FAMILIES.items():
        if source in sources:
            return fam
    raise SuperResError(f"real source {source!r} is not usable as a super-resolution volume")


def resolve_families(names) -> list[str]:
    """Family names (knee, shoulder, lumbar, brain, other) or source names -> family names."""
    out: list[str] = []
    for name in names:
        fam = name if name in REAL_FAMILIES else family_of(name)
        if fam not in out:
            out.append(fam)
    return out


def real_truth_volumes(root: Path | str | None, *, exclude=(), log=None) -> list[RealTruth]:
    """Real volumes of the corpus (`models.realdata.catalogue`) as super-resolution truth.

    - teaching stacks (knee, shoulder, elbow, hip): the burned-in overlays masked as the QC gate does
      (`models.qc.preprocess.mask_overlay`); their native 3.5 mm slice axis is the truth's slice axis;
    - the Siemens knee DICOM and pydicom-data's ``emri_small`` as acquired;
    - the lumbar volumes: their sagittal axis was resampled from thicker slices (runs of equal slice-to-slice
      differences), so the volume is reformatted with the native anterior-posterior axis as slice axis;
    - MNI152 (1 mm) in its three planes, every slice.
    Series with fewer than `MIN_TRUTH_SLICES` slices and the families in ``exclude`` are left out."""
    from models.qc.preprocess import mask_overlay
    from models.realdata import catalogue, mni_slices

    skip = set(resolve_families(exclude))
    sources = [s for fam, srcs in REAL_FAMILIES.items() if fam not in skip for s in srcs]
    out: list[RealTruth] = []
    for s in catalogue(root, sources):
        fam = family_of(s.source)
        if s.kind == "nifti":
            arr = mni_slices(s.plane, step=1)
        else:
            arr = np.asarray(s.volume().array, dtype=np.float32)
            if s.kind == "stack":
                arr = mask_overlay(arr)
            elif s.kind == "npz":
                arr = np.ascontiguousarray(arr.transpose(2, 1, 0))  # slices along the native A-P axis
        if arr.ndim != 3 or arr.shape[0] < MIN_TRUTH_SLICES:
            continue
        if arr.min() >= 0 and arr.max() <= 255 and np.array_equal(arr, np.round(arr)):
            arr = arr.astype(np.uint8)
        out.append(RealTruth(s.key, fam, np.ascontiguousarray(arr)))
        if log is not None:
            log({"real_volume": s.key, "family": fam, "shape": list(arr.shape)})
    return out
