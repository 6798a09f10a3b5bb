"""Synthetic MR phantoms of the knee, shoulder and lumbar spine with exact labels.

``generate(anatomy, seed, *, spec=None, **overrides) -> Phantom``; ``write_dicom_series``
and ``write_study`` write them as DICOM MR series. The difficulty is fixed in ``SPEC``
(see SPEC.md). Overrides force labels (e.g. ``acl="complete"``,
``stenosis={"L4-L5": "severe"}``, ``cuff="partial"``) or nuisances by name (``snr``,
``n_slices``, ``matrix``, ``fov``, ``slice_thickness``, ``sequence``, ``orientation``,
``motion_px``, ``bias``, ...; ``snr=None`` gives a noise-free volume). Forcing a label
never changes the anatomy or the nuisances drawn from the same seed.
"""

from __future__ import annotations

from models.phantoms.common import ANATOMIES, Phantom
from models.phantoms.errors import PhantomError
from models.phantoms.spec import GENERATOR_VERSION, SPEC, SPEC_VERSION, Spec

__all__ = [
    "ANATOMIES",
    "GENERATOR_VERSION",
    "SPEC",
    "SPEC_VERSION",
    "Phantom",
    "PhantomError",
    "Spec",
    "generate",
    "write_dicom_series",
    "write_localizer",
    "write_study",
]


def generate(anatomy: str, seed: int, *, spec: Spec | None = None, **overrides) -> Phantom:
    """One phantom of ``anatomy`` ("knee", "shoulder", "lumbar_spine"), reproducible from ``seed``."""
    spec = SPEC if spec is None else spec
    if anatomy == "knee":
        from models.phantoms.knee import generate_knee

        return generate_knee(seed, spec.knee, overrides)
    if anatomy == "shoulder":
        from models.phantoms.shoulder import generate_shoulder

        return generate_shoulder(seed, spec.shoulder, overrides)
    if anatomy == "lumbar_spine":
        from models.phantoms.spine import generate_spine

        return generate_spine(seed, spec.lumbar_spine, overrides)
    raise PhantomError(f"unknown anatomy {anatomy!r}; expected one of {', '.join(ANATOMIES)}")


def write_dicom_series(phantom, out_dir, **kwargs):
    from models.phantoms.dicom import write_dicom_series as _w

    return _w(phantom, out_dir, **kwargs)


def write_localizer(anatomy, out_dir, seed, **kwargs):
    from models.phantoms.dicom import write_localizer as _w

    return _w(anatomy, out_dir, seed, **kwargs)


def write_study(anatomy, out_dir, seed, **labels):
    from models.phantoms.dicom import write_study as _w

    return _w(anatomy, out_dir, seed, **labels)
