"""The phantom difficulty spec: fixed before training, documented in SPEC.md.

Change these numbers only together with SPEC.md and a retraining of every model that
learned from them (the model cards quote ``SPEC_VERSION``). Ranges are (low, high) and
drawn uniformly unless the field says log-uniform. Every nuisance is drawn from the seed
independently of the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPEC_VERSION = "1"
# Revision of the generator's rendering (anatomy shapes, masks). Bumped whenever the same
# (anatomy, seed, overrides) would give a different volume or mask: caches key on both.
GENERATOR_VERSION = "1.5"

Range = tuple[float, float]


@dataclass(frozen=True)
class AcquisitionSpec:
    sequence: str  # default contrast of the main series
    snr: Range  # log-uniform; mean foreground signal / Rician noise sigma
    slice_thickness_mm: Range
    slice_gap_fraction: Range  # gap as a share of the thickness
    coverage_mm: Range  # through-plane coverage, gives the number of slices
    n_slices: tuple[int, int]  # clip of the number of slices
    fov_mm: Range  # square in-plane field of view
    matrix: int  # default reconstructed matrix (rows = cols); 384 on request
    acq_fraction_pe: Range  # acquired share of phase-encode k-space (truncation ringing)
    acq_fraction_ro: Range
    taper: Range  # k-space filter width (0 = hard truncation)
    inplane_rotation_deg: float  # +- about the slice normal
    tilt_deg: float  # +- about the two in-plane axes
    shift_mm: tuple[float, float, float]  # +- (through-plane, row, column) offset of the anatomy
    anatomy_scale: Range  # isotropic size factor
    anatomy_aspect: float  # +- extra per-axis size factor
    bias: Range  # std of the log coil-bias coefficients
    motion_prob: float  # share of series with motion ghosting
    motion_px: Range  # ghost displacement amplitude (pixels)
    contrast_jitter: float  # std of the log per-tissue signal factor
    gain: Range  # log-uniform scanner intensity scale
    sub_slices: int = 3  # sub-slices integrated per slice (partial volume)


@dataclass(frozen=True)
class KneeSpec:
    acquisition: AcquisitionSpec
    acl_probs: dict[str, float]  # intact / partial / complete
    acl_tear_position: Range  # tear centre as a fraction of the ligament length from the femur
    acl_partial_gap_mm: Range
    acl_partial_fraction: Range  # share of the cross-section interrupted
    acl_complete_gap_mm: Range
    acl_stump_droop_deg: Range  # distal stump angle change of complete tears
    acl_lesion_contrast: Range  # gap signal as a share of joint fluid
    acl_mimic_prob: float  # intraligamentous (mucoid) signal without discontinuity, any label
    acl_mimic_contrast: Range
    meniscus_tear_prob: float
    meniscus_medial_share: float
    meniscus_tear_length_mm: Range  # along the circumference
    meniscus_tear_width_mm: Range  # thickness of the bright line
    meniscus_lesion_contrast: Range
    meniscus_mimic_prob: float  # intrasubstance (grade 2) signal not reaching a surface, any label
    meniscus_mimic_contrast: Range
    effusion_mm: Range  # suprapatellar effusion thickness
    baker_cyst_prob: float
    flexion_deg: Range = (0.0, 12.0)  # knee flexion (tibia rotated about the condyles)


@dataclass(frozen=True)
class ShoulderSpec:
    acquisition: AcquisitionSpec
    cuff_probs: dict[str, float]  # none / partial / full_thickness
    partial_depth_fraction: Range  # share of the tendon thickness
    partial_side_probs: dict[str, float]  # articular / bursal / intrasubstance
    partial_length_mm: Range  # along the tendon
    partial_width_mm: Range  # antero-posterior
    full_width_mm: Range
    full_retraction_small_share: float  # share of full-thickness tears with retraction <= 5 mm
    full_retraction_mm: Range  # larger retractions
    lesion_contrast: Range
    tendinosis_prob: float  # intermediate tendon signal, any label
    tendinosis_contrast: Range
    bursal_fluid_mm: Range


@dataclass(frozen=True)
class SpineSpec:
    acquisition: AcquisitionSpec
    grade_probs: dict[str, float]  # per level, independent
    narrowing: dict[str, Range]  # canal AP narrowing share per grade
    disc_share: Range  # share of the narrowing from the disc bulge (rest: ligamentum flavum)
    disc_degeneration_prob: float  # dark nucleus, per level, any grade
    canal_ap_mm: Range  # dural sac AP diameter


@dataclass(frozen=True)
class Spec:
    version: str = SPEC_VERSION
    knee: KneeSpec = field(
        default_factory=lambda: KneeSpec(
            acquisition=AcquisitionSpec(
                sequence="PD_FS",
                snr=(10.0, 40.0),
                slice_thickness_mm=(3.0, 4.0),
                slice_gap_fraction=(0.0, 0.15),
                coverage_mm=(95.0, 125.0),
                n_slices=(24, 40),
                fov_mm=(130.0, 170.0),
                matrix=192,
                acq_fraction_pe=(0.55, 0.9),
                acq_fraction_ro=(0.75, 1.0),
                taper=(0.0, 0.3),
                inplane_rotation_deg=8.0,
                tilt_deg=6.0,
                shift_mm=(5.0, 8.0, 8.0),
                anatomy_scale=(0.88, 1.12),
                anatomy_aspect=0.05,
                bias=(0.0, 0.35),
                motion_prob=0.3,
                motion_px=(0.5, 3.0),
                contrast_jitter=0.10,
                gain=(300.0, 3000.0),
            ),
            acl_probs={"intact": 0.5, "partial": 0.25, "complete": 0.25},
            acl_tear_position=(0.25, 0.75),
            acl_partial_gap_mm=(2.0, 5.0),
            acl_partial_fraction=(0.35, 0.7),
            acl_complete_gap_mm=(4.0, 12.0),
            acl_stump_droop_deg=(0.0, 20.0),
            acl_lesion_contrast=(0.45, 1.0),
            acl_mimic_prob=0.3,
            acl_mimic_contrast=(0.15, 0.35),
            meniscus_tear_prob=0.5,
            meniscus_medial_share=0.6,
            meniscus_tear_length_mm=(4.0, 14.0),
            meniscus_tear_width_mm=(0.7, 1.5),
            meniscus_lesion_contrast=(0.5, 1.0),
            meniscus_mimic_prob=0.3,
            meniscus_mimic_contrast=(0.2, 0.45),
            effusion_mm=(0.5, 8.0),
            baker_cyst_prob=0.15,
        )
    )
    shoulder: ShoulderSpec = field(
        default_factory=lambda: ShoulderSpec(
            acquisition=AcquisitionSpec(
                sequence="T2_FS",
                snr=(8.0, 30.0),
                slice_thickness_mm=(3.0, 4.0),
                slice_gap_fraction=(0.0, 0.15),
                coverage_mm=(70.0, 95.0),
                n_slices=(20, 30),
                fov_mm=(140.0, 180.0),
                matrix=192,
                acq_fraction_pe=(0.55, 0.9),
                acq_fraction_ro=(0.75, 1.0),
                taper=(0.0, 0.3),
                inplane_rotation_deg=8.0,
                tilt_deg=6.0,
                shift_mm=(5.0, 8.0, 8.0),
                anatomy_scale=(0.88, 1.12),
                anatomy_aspect=0.05,
                bias=(0.05, 0.45),
                motion_prob=0.3,
                motion_px=(0.5, 3.0),
                contrast_jitter=0.10,
                gain=(300.0, 3000.0),
            ),
            cuff_probs={"none": 1 / 3, "partial": 1 / 3, "full_thickness": 1 / 3},
            partial_depth_fraction=(0.3, 0.7),
            partial_side_probs={"articular": 0.6, "bursal": 0.3, "intrasubstance": 0.1},
            partial_length_mm=(4.0, 10.0),
            partial_width_mm=(5.0, 14.0),
            full_width_mm=(6.0, 22.0),
            full_retraction_small_share=0.4,
            full_retraction_mm=(5.0, 28.0),
            lesion_contrast=(0.5, 1.0),
            tendinosis_prob=0.35,
            tendinosis_contrast=(0.2, 0.4),
            bursal_fluid_mm=(0.3, 3.0),
        )
    )
    lumbar_spine: SpineSpec = field(
        default_factory=lambda: SpineSpec(
            acquisition=AcquisitionSpec(
                sequence="T2",
                snr=(10.0, 35.0),
                slice_thickness_mm=(3.0, 4.0),
                slice_gap_fraction=(0.0, 0.2),
                coverage_mm=(50.0, 62.0),
                n_slices=(13, 19),
                fov_mm=(260.0, 320.0),
                matrix=256,
                acq_fraction_pe=(0.6, 0.9),
                acq_fraction_ro=(0.75, 1.0),
                taper=(0.0, 0.3),
                inplane_rotation_deg=6.0,
                tilt_deg=5.0,
                shift_mm=(4.0, 12.0, 10.0),
                anatomy_scale=(0.9, 1.1),
                anatomy_aspect=0.05,
                bias=(0.05, 0.45),
                motion_prob=0.3,
                motion_px=(0.5, 3.0),
                contrast_jitter=0.10,
                gain=(300.0, 3000.0),
            ),
            grade_probs={"normal": 0.34, "mild": 0.22, "moderate": 0.22, "severe": 0.22},
            narrowing={"normal": (0.0, 0.15), "mild": (0.25, 0.45), "moderate": (0.5, 0.68), "severe": (0.72, 0.9)},
            disc_share=(0.3, 0.8),
            disc_degeneration_prob=0.35,
            canal_ap_mm=(13.0, 18.0),
        )
    )

    def for_anatomy(self, anatomy: str):
        return getattr(self, anatomy)


SPEC = Spec()
