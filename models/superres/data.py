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
