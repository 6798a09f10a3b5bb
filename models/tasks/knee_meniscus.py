"""``knee.meniscus``: sagittal knee -> P(meniscal tear), and which meniscus (medial / lateral).

One head with the classes none / medial / lateral: P(tear) = 1 - P(none). A mirrored knee
(flip along the slice axis) is a valid knee of the other side with the same labels (medial
stays medial), so slice flips are a label-preserving augmentation and the network's side
classes must be told by anatomy alone (the fibula is lateral, the medial meniscus is C-shaped
with a larger posterior horn).

Which meniscus a positive finding names is decided where a radiologist decides it: from where
the tear lies. With a known laterality (ImageLaterality / Laterality R or L) and a located
finding (the saliency peak), the side is the half of the knee that holds the peak: the medial
compartment of a right knee lies towards the patient's left (+x in DICOM patient
coordinates), that of a left knee towards the patient's right, split at the centre of the
sagittal stack (sagittal knee stacks are prescribed about the intercondylar notch). Without a
laterality or a location the more probable side class of the network is reported.

Input: two channels on the sagittal network grid. Channel 0 is the sagittal series; channel
1 is the coronal fluid-sensitive series (role ``cor_fluid``) of the same frame of reference
resampled onto the same grid through the patient coordinates (anti-aliased along each of
its axes first), or zeros when there is none. Training shows the coronal to a third of the
phantoms (`models.labels.KneeMeniscusLabels`), so the model reads both and works without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from models.tasks.base import Head, HeadResult, InputSpec, NetConfig, TaskSpec, attention_confined
from models.transforms import Frame, make_native_frame, robust_scale
from models.types import Finding, Volume

SIDES = ("medial", "lateral")
CORONAL_ROLE = "cor_fluid"
ROI_OFFSET_MM = (0.0, 5.0, 15.0)  # region-of-interest centre from the field-of-view centre (canonical axes)


def offset_frame(frame: Frame, offset_mm: Sequence[float]) -> Frame:
    """The same grid moved by ``offset_mm`` along the canonical axes (through-plane, rows, columns)."""
    ox, oy, oz = (float(o + off / sp) for o, off, sp in zip(frame.origin, offset_mm, frame.canonical_spacing))
    return replace(frame, origin=(ox, oy, oz))


def grid_world_points(volume: Volume, frame: Frame) -> np.ndarray:
    """Patient coordinates (D, H, W, 3) of the network-grid voxel centres of ``frame`` over ``volume``."""
    affine = volume.affine()
    cs = frame.canonical_shape
    world = np.zeros(tuple(frame.out_shape) + (3,), dtype=np.float64) + affine[:3, 3]
    for t in range(3):
        c = frame.origin[t] + np.arange(frame.out_shape[t], dtype=np.float64) * frame.step[t]
        if frame.flips[t]:
            c = cs[t] - 1 - c
        shape = [1, 1, 1, 3]
        shape[t] = frame.out_shape[t]
        world = world + (c[:, None] * affine[:3, frame.perm[t]][None, :]).reshape(shape)
    return world


def resample_onto_grid(other: Volume, volume: Volume, frame: Frame) -> np.ndarray:
    """``other`` (same frame of reference) sampled at the grid voxels of ``frame`` over ``volume``; 0 outside it."""
    from scipy import ndimage

    world = grid_world_points(volume, frame)
    a_other = other.affine()
    inv = np.linalg.inv(a_other)
    idx = np.einsum("ij,dhwj->idhw", inv[:3, :3], world) + inv[:3, 3][:, None, None, None]
    # anti-aliasing: blur each axis of `other` to the grid's spacing along that axis
    grid_dirs = np.stack(
        [volume.affine()[:3, frame.perm[t]] / np.linalg.norm(volume.affine()[:3, frame.perm[t]]) for t in range(3)]
    )
    sigmas = []
    for a in range(3):
        d = a_other[:3, a] / np.linalg.norm(a_other[:3, a])
        g = float(np.max(np.abs(grid_dirs @ d) * np.asarray(frame.grid_spacing)))
        s = float(other.spacing[a])
        sigmas.append(np.sqrt(max(g * g - s * s, 0.0)) / 2.355 / s)
    src = np.asarray(other.array, np.float32)
    # only the part of `other` the grid touches (plus the blur's reach) is filtered
    lo = np.floor(idx.reshape(3, -1).min(axis=1) - 3 * np.asarray(sigmas) - 2).astype(int)
    hi = np.ceil(idx.reshape(3, -1).max(axis=1) + 3 * np.asarray(sigmas) + 3).astype(int)
    lo = np.clip(lo, 0, np.asarray(src.shape))
    hi = np.clip(hi, 0, np.asarray(src.shape))
    if np.any(hi <= lo):
        return np.zeros(frame.out_shape, np.float32)
    src = src[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    idx = idx - lo[:, None, None, None]
    if max(sigmas) > 0.3:
        src = ndimage.gaussian_filter(src, sigma=[x if x > 0.3 else 0.0 for x in sigmas], mode="nearest")
    out = ndimage.map_coordinates(src, idx.reshape(3, -1), order=1, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(frame.out_shape).astype(np.float32)


def located_side(peak_mm: Sequence[float] | None, volume: Volume | None) -> str | None:
    """ "medial" / "lateral" from a finding's patient position and the knee's laterality, or None when
    either is unknown: the medial compartment of a right knee lies towards +x (patient left) of the
    centre of the sagittal stack, that of a left knee towards -x."""
    if peak_mm is None or volume is None or volume.laterality not in ("R", "L"):
        return None
    centre = volume.affine() @ np.array([(n - 1) / 2.0 for n in volume.shape] + [1.0])
    towards_left = float(peak_mm[0]) - float(centre[0]) > 0
    return "medial" if towards_left == (volume.laterality == "R") else "lateral"


class KneeMeniscus(TaskSpec):
    name = "knee.meniscus"
    anatomy = "knee"
    kind = "binary"
    version = "1.0.0"
    description = "Meniscal tear"
    finding_code = "meniscal_tear"
    site = "meniscus"
    # both menisci lie within about +-30 mm of the centre of a sagittal knee field of view
    # (through-plane), 4 - 15 mm below it (rows) and 4 - 24 mm behind it (columns; the horns
    # reach 25 mm further). Tear lines are about one native pixel thick and often show on one
    # or two slices only, so the grid samples native voxels (no interpolation between pixels
    # or slices, which would halve the line's contrast): per axis the integer step nearest
    # (3.4, 0.8, 0.8) mm, 28 x 60 x 144 voxels about the field-of-view centre moved
    # ROI_OFFSET_MM (down, back); at 3.5 x 0.75 mm that is 98 x 45 x 108 mm.
    input = InputSpec(
        roles=("sag_fluid", "sag_pd"),
        plane="sagittal",
        shape=(28, 60, 144),
        roi_mm=None,
        native_mm=(3.4, 0.8, 0.8),
        min_slices=12,
        slice_spacing_mm=(1.0, 7.0),
        pixel_spacing_mm=(0.15, 1.6),
        fov_mm=(90.0, 260.0),
        flip_slices_ok=True,
        extra_roles=(CORONAL_ROLE,),
        channels=2,
    )
    heads = (Head("meniscus", ("none", "medial", "lateral"), negative=("none",)),)
    net = NetConfig(channels=(16, 24, 48), dropout=0.25, aux_weight=1.0)
    channels_last = True
    flip_tta = True  # the tear line is one or two voxels wide: the mirrored view steadies both P(tear) and its location
    # a tear line is a few dozen voxels of the grid: the features that see it are first learnt on
    # patches around tears and at the same places in other knees (training.pretrain_patches)
    patch_pretrain_steps = 8000

    def network_input(self, volume: Volume, extras: Mapping[str, Volume] | None = None):
        """(2, D, H, W): the sagittal series and the coronal one on the same grid (zeros without one)."""
        spec = self.input
        assert spec.native_mm is not None, "the meniscus input samples native voxels"
        frame = make_native_frame(volume, spec.shape, spec.native_mm, spec.plane, ROI_OFFSET_MM)
        img = robust_scale(frame.to_grid(volume.array))[None]
        cor = (extras or {}).get(CORONAL_ROLE)
        second = np.zeros_like(img)
        same_frame = cor is not None and (
            not cor.frame_of_reference_uid
            or not volume.frame_of_reference_uid
            or cor.frame_of_reference_uid == volume.frame_of_reference_uid
        )
        if same_frame and cor is not None:
            grid = resample_onto_grid(cor, volume, frame)
            if float(np.abs(grid).max()) > 0:
                second = robust_scale(grid)[None]
        return np.concatenate([img, second], axis=0).astype(np.float32), frame

    def head_saliency(self, head_index: int, cam: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """Grad-CAM confined to the head's attention (`attention_confined`): a tear line is a few voxels
        of the 1/4-resolution feature map, and the lesion-evidence map trained on the tear mask
        finds it where Grad-CAM's channel weighting also lights the rest of the meniscus."""
        return attention_confined(cam, evidence)

    def positive_class(self, result: HeadResult, volume: Volume | None = None) -> str:
        side = located_side(result.peak_mm, volume)
        return side if side is not None else super().positive_class(result, volume)

    def findings(
        self, results: Sequence[HeadResult], *, threshold: float, volume: Volume | None = None
    ) -> list[Finding]:
        out = super().findings(results, threshold=threshold, volume=volume)
        for f, r in zip(out, results):
            if f.positive and f.grade in SIDES:
                f.site = f"{f.grade} meniscus"
                if located_side(r.peak_mm, volume) is not None:
                    # the side is a location, not a class the network scored: report P(tear) alone
                    f.grade_probabilities = None
        return out

    def finding_label(self, head: Head, grade: str | None, positive: bool) -> str:
        if not positive:
            return "No meniscal tear"
        return {"medial": "Medial meniscal tear", "lateral": "Lateral meniscal tear"}.get(grade or "", "Meniscal tear")


TASK = KneeMeniscus()
