"""Secondary-capture overlays: the heatmap burned over the key slice, for viewers without SEG.

The renderer gets pixel arrays and our own label text only — never a header — so no
patient name, ID or date can reach the pixels. The label "AI — not for diagnostic use"
is burned in where demo weights are used; Burned In Annotation is ``NO`` (nothing in
the pixels identifies the patient), the image is marked DERIVED with a Source Image
Sequence pointing to the source slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from models.types import Finding, ModelInfo
from node.results import codes
from node.results.equipment import MANUFACTURER, contributing_equipment
from node.results.sanitize import clean_text, copy_character_set
from node.results.seg import heatmap_for
from node.results.sources import SourceSeries
from node.results.uids import UidFactory

SC_SERIES_NUMBER = 9601
NOTICE_LABEL = "AI \u2014 not for diagnostic use"
AI_LABEL = "AI overlay"
MIN_SIDE = 256
_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf",
)


@dataclass
class OverlayItem:
    finding: Finding
    model: ModelInfo


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for p in _FONT_CANDIDATES:
        if Path(p).exists():
            return ImageFont.truetype(p, size)
    return ImageFont.load_default(size=size)


def key_slice(finding: Finding, heat: np.ndarray) -> int:
    """The slice of the peak evidence: the model's location, else the slice with most saliency."""
    if finding.location is not None and 0 <= int(finding.location[0]) < heat.shape[0]:
        return int(finding.location[0])
    return int(np.argmax(heat.reshape(heat.shape[0], -1).sum(axis=1)))


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)


def _colormap(h: np.ndarray) -> np.ndarray:
    r = np.clip(1.5 - np.abs(4 * h - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
    return np.stack([r, g, b], axis=-1) * 255.0


def render_overlay(image: np.ndarray, heat: np.ndarray, lines: list[str]) -> tuple[np.ndarray, int]:
    """RGB uint8 overlay (upscaled to at least MIN_SIDE) and the integer upscale factor.

    Only ``image`` (pixel values), ``heat`` ([0, 1]) and ``lines`` (our label text)
    are drawn.
    """
    rows, cols = image.shape
    factor = max(1, math.ceil(MIN_SIDE / max(1, min(rows, cols))))
    size = (cols * factor, rows * factor)
    gray = Image.fromarray(_window(image.astype(np.float32))).resize(size, Image.Resampling.BILINEAR)
    hmap = np.asarray(
        Image.fromarray(np.clip(heat, 0, 1).astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    base = np.repeat(np.asarray(gray, dtype=np.float32)[..., None], 3, axis=-1)
    alpha = (np.clip((hmap - 0.2) / 0.6, 0, 1) * 0.6)[..., None]
    rgb = base * (1 - alpha) + _colormap(hmap) * alpha
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    base_size = max(10, min(size) // 18)
    y: float = 4
    for i, text in enumerate(lines):
        fsize = base_size
        font = _font(fsize)
        while fsize > 8 and draw.textlength(text, font=font) > size[0] - 12:  # every line fits the width
            fsize -= 1
            font = _font(fsize)
        while len(text) > 4 and draw.textlength(text, font=font) > size[0] - 12:
            text = text[:-2].rstrip() + "\u2026"
        box = draw.textbbox((6, y), text, font=font)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        draw.text((6, y), text, font=font, fill=(255, 255, 0) if i == 0 else (255, 255, 255))
        y = box[3] + 6
    return np.asarray(img, dtype=np.uint8).copy(), factor


def overlay_lines(item: OverlayItem) -> list[str]:
    """Our label text only: notice, finding, probability, model."""
    f = item.finding
    lines = [NOTICE_LABEL if item.model.demo_weights else AI_LABEL]
    text = f.label or f.code.replace("_", " ")
    if f.level:
        text += f" {f.level}"
    if f.grade and f.grade.lower() not in text.lower():
        text += f" ({f.grade.replace('_', ' ')})"
    lines.append(text)
    if f.probability is not None:
        p = f"p = {f.probability:.2f}"
        if f.uncertainty is not None:
            p += f" \u00b1 {f.uncertainty:.2f}"
        lines.append(p)
    lines.append(f"{item.model.name} {item.model.version}")
    return lines


def _orientation_letters(v: tuple[float, float, float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    parts = sorted(((abs(c), letters[i][0] if c > 0 else letters[i][1]) for i, c in enumerate(v)), reverse=True)
    # highdicom accepts one letter per axis: the dominant direction
    return parts[0][1]


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        try:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError):
            return ("L", "P")
    row = tuple(float(x) for x in iop[:3])
    col = tuple(float(x) for x in iop[3:])
    return (_orientation_letters(row), _orientation_letters(col))  # type: ignore[arg-type]


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing")
    if ps is None:
        try:
            ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            return None
    return (float(ps[0]), float(ps[1]))


def build_overlays(
    *,
    series: SourceSeries,
    items: list[OverlayItem],
    uids: UidFactory,
    index: int,
    first_instance: int = 0,
    institution_name: str | None = None,
) -> list[hd.sc.SCImage]:
    """One SC image per finding, in its own series per source series (``index``)."""
    out = []
    for n, item in enumerate(items):
        heat = heatmap_for(series, item.finding.heatmap)  # type: ignore[arg-type]
        k = key_slice(item.finding, heat)
        sl = series.slices[k]
        rgb, factor = render_overlay(series.read_pixels(k), heat[k], overlay_lines(item))
        ps = _pixel_spacing(sl.dataset)
        spacing = (ps[0] / factor, ps[1] / factor) if ps else None
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=sl.dataset,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.series("sc", index),
            series_number=SC_SERIES_NUMBER + index,
            sop_instance_uid=uids.instance("sc", index, first_instance + n),
            instance_number=first_instance + n + 1,
            manufacturer=MANUFACTURER,
            pixel_spacing=spacing,  # type: ignore[arg-type]  # highdicom annotates tuple[int, int]; it takes millimetres
            laterality=series.laterality if series.laterality in ("R", "L") else None,
            patient_orientation=patient_orientation(sl.dataset),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing_equipment([item.model]),
            institution_name=institution_name,
            series_description="AI overlay - not for diagnostic use",
            specific_character_set=None,
        )
        sc.copy_patient_and_study_information(sl.dataset)  # all of the study, as the SR and SEG have it
        copy_character_set(sc, sl.dataset)
        body_part = sl.dataset.get("BodyPartExamined")
        if body_part:
            sc.BodyPartExamined = body_part
        lat = series.series_laterality(body_part)
        if lat is None and "Laterality" in sc:
            del sc.Laterality  # an unpaired body part has no laterality
        elif lat is not None and "Laterality" not in sc:
            sc.Laterality = lat  # General Series, Type 2C
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = "NO"
        sc.RecognizableVisualFeatures = "NO"
        sc.DerivationDescription = clean_text(
            f"Saliency heatmap of {item.model.name} {item.model.version} for "
            f"{item.finding.label or item.finding.code} burned over the source slice "
            f"(upscaled x{factor}). {item.model.notice if item.model.demo_weights else ''}",
            "ST",
        )
        src = Dataset()
        src.ReferencedSOPClassUID = sl.sop_class_uid
        src.ReferencedSOPInstanceUID = sl.sop_instance_uid
        if sl.frame_number is not None:
            src.ReferencedFrameNumber = sl.frame_number
        src.PurposeOfReferenceCodeSequence = [codes.SOURCE_IMAGE_FOR_PROCESSING]
        sc.SourceImageSequence = [src]
        out.append(sc)
    return out
