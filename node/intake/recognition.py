"""Series recognition from what the scanner measured: plane, contrast, flags and coded anatomy.

Descriptions are free text set by sites and vendors; many name neither plane nor contrast
(Philips ``T2W_TSE``, GE ``FSE-XL``, a site-renamed Siemens protocol, an anonymiser's
``ANONYMIZED SERIES``). This module decides from the header values the scanner wrote:

- **plane** from ImageOrientationPatient: the slice normal (row x column cosines) is compared
  with the three patient axes; the nearest names the plane when it lies within
  `PLANE_TOLERANCE_DEG` (45 degrees: a shoulder coronal-oblique tilted 20-45 degrees is
  coronal, an oblique sagittal knee is sagittal). A normal more than 45 degrees from every
  axis (double oblique) is ``oblique``; within `PLANE_TIE_DEG` of a tie between two planes
  the text may pick one of the two (it confirms geometry, it never overrides it). Per
  series, instances are grouped by orientation and the majority plane wins; several planes
  each holding at least `MULTI_PLANE_MIN_SHARE` of the instances make a multi-plane
  localizer (``multi``, flag ``localizer``). The text names the plane only when no
  instance has an orientation.
- **contrast** from the acquisition parameters (classes in `CONTRASTS`): the sequence
  family (spin echo, inversion recovery, gradient echo, echo planar), then the weighting
  from TR/TE (and TI for inversion recovery), then fat suppression. Parameters decide
  when they are present; the text fills what they leave open (a weighting when TR/TE are
  missing; fat suppression when no header states it either way) and is the whole answer
  only when no parameter was recorded.
- **flags** (`FLAGS`): localizer, calibration, derived (maps, phase, secondary captures),
  mpr, projection, Dixon components, post-contrast. Header flags and text flags add up:
  any one of them keeps a series from being model input under the shipped rules.
- **coded anatomy**: AnatomicRegionSequence codes (SNOMED CT, `ANATOMY_CODES`) and the
  names of regions msknode has no pipeline for (`OTHER_ANATOMY_TEXT`: cervical and
  thoracic spine, head, hip, elbow, ankle, wrist …), so that a cervical spine is named as
  such and never routed to the lumbar spine. The routing rules decide the rest of the
  anatomy (`node.intake.routing`).

Every decision returns its signals (`Signal`: name, value, source, used), so an admin can
see why, and fix it with a rule.

Header fields read (`Acquisition`; bounded: text 64 characters, at most 16 values each):

| field | tag | why |
|---|---|---|
| ImageOrientationPatient | (0020,0037) | the plane (per instance, from the index) |
| PlaneOrientationSequence > ImageOrientationPatient | (0020,9116) in (5200,9229)/(5200,9230) | the plane of an enhanced (multi-frame) object, which has no top-level orientation |
| ImageType | (0008,0008) | DERIVED\\SECONDARY, LOCALIZER, MPR, PROJECTION, maps (ADC, T2MAP …), phase/real/imaginary, Dixon WATER/FAT/IN_PHASE/OPP_PHASE (Philips W/F/IP/OP) |
| FrameType | (0008,9007) in MRImageFrameTypeSequence (0018,9226) | ImageType of an enhanced object's frames |
| ScanningSequence | (0018,0020) | sequence family: SE, IR, GR, EP, RM |
| SequenceVariant | (0018,0021) | SK/SP/MP/SS…: recorded, spoiled vs steady state in the detail |
| ScanOptions | (0018,0022) | FS (fat saturation; GE writes FS too), IR, SAT bands (not fat suppression), vendor tokens (SPAIR, SPIR, WE, FAT_SAT) |
| MRAcquisitionType | (0018,0023) | 2D/3D: a 3D variable-flip-angle FSE has shorter TRs for PD |
| SequenceName | (0018,0024) | Siemens: *tse, *tir (TIRM = STIR), *fl (FLASH), *de3d (DESS), *spc (SPACE), *me2d (MEDIC) |
| PulseSequenceName | (0018,9005) | enhanced MR and Philips (T1TFE, TSE …) |
| EchoPulseSequence | (0018,9008) | enhanced MR: SPIN / GRADIENT / BOTH when ScanningSequence is absent |
| AcquisitionContrast | (0008,9209) | enhanced MR: T1, PROTON_DENSITY, T2, STIR … as the scanner states it |
| RepetitionTime, EchoTime, InversionTime | (0018,0080), (0018,0081), (0018,0082) | the weighting; STIR vs FLAIR vs T1-FLAIR from TI |
| FlipAngle, EchoTrainLength | (0018,1314), (0018,0091) | recorded; a flip angle below 90 with GR confirms gradient echo |
| MRTimingAndRelatedParametersSequence, MREchoSequence, MRModifierSequence | (0018,9112), (0018,9114), (0018,9115) | TR, flip angle, echo train, EffectiveEchoTime, InversionRecovery/InversionTimes of an enhanced object |
| InversionRecovery | (0018,9009) | enhanced MR: inversion recovery YES/NO |
| SpectrallySelectedSuppression | (0018,9025) | enhanced MR: FAT (fat suppression) or NONE (an explicit no) |
| SpectrallySelectedExcitation | (0018,9026) | enhanced MR: WATER (water excitation = fat suppressed) |
| MagneticFieldStrength | (0018,0087) | recorded with the STIR TI window |
| ContrastBolusAgent | (0018,0010) | post-contrast (values such as NONE, NO, N/A are ignored) |
| AnatomicRegionSequence | (0008,2218) (also in FrameAnatomySequence (0020,9071)) | coded anatomy (SNOMED CT) |
| GE (0019,xx9C) Pulse Sequence Name, creator GEMS_ACQU_01 | (0019,109C) | GE names the sequence here (fse-xl, frfse, fgre, 3-plane, calibration scans) while SequenceName is often empty |
| GE (0019,xx9E) Internal Pulse Sequence Name, creator GEMS_ACQU_01 | (0019,109E) | the same for GE's product sequence family (FSE, GRE …) |
| Philips (2001,xx20) Scanning Technique Description MR, creator Philips Imaging DD 001 | (2001,1020) | Philips names the technique here (TSE, SE, FFE, IR, TFE) while SequenceName is empty |
| Philips (2005,xx11) image type, creator Philips MR Imaging DD 001 | (2005,1011) | M/P/R/I and the Dixon components W/F/IP/OP of classic Philips images |
| Philips (2005,xx0F) private sequence, creator Philips MR Imaging DD 005 | (2005,140F) | classic Philips images carry the enhanced-MR attributes above (PulseSequenceName, AcquisitionContrast, SpectrallySelectedSuppression, EchoPulseSequence …) in this item; read only where the top level leaves them empty |

Private fields are found through their private creator (the block number varies between
objects), never by a fixed tag alone. Siemens' CSA headers are binary and are not read:
Siemens writes what is needed in the standard fields.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

# ---- vocabulary ------------------------------------------------------------------------------
PLANES = ("sagittal", "coronal", "axial")
#: what the plane decision can be (``unknown``: nothing said it)
PLANE_VALUES = PLANES + ("oblique", "multi", "unknown")
CONTRASTS = ("t1", "t1_fs", "pd", "pd_fs", "t2", "t2_fs", "stir", "gre", "dess", "other", "unknown")
FLAGS = (
    "localizer",
    "calibration",
    "derived",
    "mpr",
    "projection",
    "post_contrast",
    "dixon",
    "dixon_water",
    "dixon_fat",
    "dixon_in_phase",
    "dixon_opposed_phase",
)

#: a slice normal within this angle of a patient axis names that plane
PLANE_TOLERANCE_DEG = 45.0
#: the two nearest planes closer than this: the geometry alone does not choose
PLANE_TIE_DEG = 5.0
#: several planes each with at least this share of the instances: a multi-plane localizer
MULTI_PLANE_MIN_SHARE = 0.1
#: orientation cosines closer than this are one orientation group
ORIENTATION_GROUP_TOLERANCE = 1e-3

# spin-echo weighting (ms). T1: short TR and short TE; PD: long TR, short TE; T2: long TR, long TE.
T1_MAX_TR_2D = 1200.0
T1_MAX_TR_3D = 800.0  # 3D variable-flip-angle FSE (SPACE, CUBE, VISTA) runs PD at TR ~ 1000-1600
T1_MAX_TE = 40.0
T2_MIN_TE = 60.0
# inversion recovery (ms): STIR nulls fat (TI ~ 100 at 0.3 T to ~ 230 at 3 T)
STIR_TI = (80.0, 300.0)
T1_FLAIR_TI = (600.0, 1300.0)
FLAIR_MIN_TI = 1500.0

MAX_TEXT = 64
MAX_VALUES = 16

TAGS = {
    "ImageOrientationPatient": "(0020,0037)",
    "ImageType": "(0008,0008)",
    "FrameType": "(0008,9007)",
    "ScanningSequence": "(0018,0020)",
    "SequenceVariant": "(0018,0021)",
    "ScanOptions": "(0018,0022)",
    "MRAcquisitionType": "(0018,0023)",
    "SequenceName": "(0018,0024)",
    "PulseSequenceName": "(0018,9005)",
    "EchoPulseSequence": "(0018,9008)",
    "AcquisitionContrast": "(0008,9209)",
    "RepetitionTime": "(0018,0080)",
    "EchoTime": "(0018,0081)",
    "InversionTime": "(0018,0082)",
    "FlipAngle": "(0018,1314)",
    "EchoTrainLength": "(0018,0091)",
    "MagneticFieldStrength": "(0018,0087)",
    "InversionRecovery": "(0018,9009)",
    "SpectrallySelectedSuppression": "(0018,9025)",
    "SpectrallySelectedExcitation": "(0018,9026)",
    "ContrastBolusAgent": "(0018,0010)",
    "AnatomicRegionSequence": "(0008,2218)",
    "BodyPartExamined": "(0018,0015)",
    "Laterality": "(0020,0060)/(0020,0062)",
    "SeriesDescription": "(0008,103E)",
    "ProtocolName": "(0018,1030)",
    "StudyDescription": "(0008,1030)",
    "GE PulseSequenceName": "(0019,xx9C) GEMS_ACQU_01",
    "GE InternalPulseSequenceName": "(0019,xx9E) GEMS_ACQU_01",
    "Philips ScanningTechnique": "(2001,xx20) Philips Imaging DD 001",
    "Philips ImageType": "(2005,xx11) Philips MR Imaging DD 001",
}


def tag_source(*names: str) -> str:
    """``Name (gggg,eeee)`` for each header name, joined (the ``source`` of a signal)."""
    return ", ".join(f"{n} {TAGS[n]}" if n in TAGS else n for n in names)


def normalize_text(value: str | None) -> str:
    """A header value as patterns see it: underscores as spaces, runs of blanks collapsed."""
    if not value:
        return ""
    return " ".join(str(value).replace("_", " ").replace("^", " ").split())


# ---- results -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signal:
    """One thing looked at: what it says (``value``), where it came from, whether it decided."""

    name: str
    value: str
    source: str
    used: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "source": self.source, "used": self.used}


@dataclass(frozen=True)
class Decision:
    """A decided value (None: undecided), the kind of evidence that decided it, and how."""

    value: str | None
    source: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "detail": self.detail}


@dataclass(frozen=True)
class Recognition:
    """Plane, contrast and flags of one series, with every signal looked at."""

    plane: Decision
    contrast: Decision
    flags: tuple[str, ...]
    signals: tuple[Signal, ...]


# ---- the acquisition parameters of a series -------------------------------------------------------
@dataclass(frozen=True)
class Acquisition:
    """The acquisition parameters of one instance (the first of its series), as the index keeps them.

    Text is bounded to `MAX_TEXT` characters and `MAX_VALUES` values; numbers are floats.
    ``origins`` names where a value came from when it was not the standard top-level field
    (a functional group, a vendor's private field).
    """

    image_type: tuple[str, ...] = ()
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    mr_acquisition_type: str | None = None
    sequence_name: str | None = None
    pulse_sequence_name: str | None = None
    echo_pulse_sequence: str | None = None
    acquisition_contrast: str | None = None
    repetition_time: float | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    flip_angle: float | None = None
    echo_train_length: float | None = None
    magnetic_field_strength: float | None = None
    inversion_recovery: str | None = None
    spectrally_selected_suppression: str | None = None
    spectrally_selected_excitation: str | None = None
    contrast_bolus_agent: str | None = None
    anatomic_region: tuple[tuple[str, str, str], ...] = ()  # (scheme, code, meaning)
    orientation: str | None = None  # from the functional groups, when the top level has none
    ge_pulse_sequence: str | None = None
    ge_internal_pulse_sequence: str | None = None
    philips_scanning_technique: str | None = None
    philips_image_type: str | None = None
    origins: tuple[tuple[str, str], ...] = ()

    def is_empty(self) -> bool:
        return not self.to_json()

    def origin(self, key: str, default: str) -> str:
        return dict(self.origins).get(key, default)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or v == () or v == "":
                continue
            if f.name == "origins":
                out[f.name] = dict(v)
            elif f.name == "anatomic_region":
                out[f.name] = [list(c) for c in v]
            elif isinstance(v, tuple):
                out[f.name] = list(v)
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Acquisition:
        """Tolerant of unknown keys and wrong types (an older or hand-written row): those are dropped."""
        if not isinstance(data, Mapping):
            return cls()
        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = data.get(f.name)
            if v is None:
                continue
            if f.name == "origins":
                if isinstance(v, Mapping):
                    kw[f.name] = tuple((_bounded(k), _bounded(x)) for k, x in list(v.items())[: MAX_VALUES * 2])
            elif f.name == "anatomic_region":
                if isinstance(v, (list, tuple)):
                    codes = []
                    for c in v[:4]:
                        if isinstance(c, (list, tuple)) and len(c) == 3:
                            codes.append(tuple(_bounded(x) or "" for x in c))
                    kw[f.name] = tuple(codes)
            elif f.type in ("tuple[str, ...]",):
                kw[f.name] = _tokens(v)
            elif f.type == "float | None":
                kw[f.name] = _number(v)
            else:
                kw[f.name] = _bounded(v)
        return cls(**kw)


def _bounded(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("ascii", errors="replace")
    s = str(v).replace("\x00", "").strip()
    return s[:MAX_TEXT] if s else None


def _tokens(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, bytes):
        v = v.decode("ascii", errors="replace")
    if isinstance(v, str):
        v = v.split("\\")
    try:
        items = list(v)[:MAX_VALUES]
    except TypeError:
        items = [v]
    out = []
    for x in items:
        s = _bounded(x)
        if s:
            out.append(s.upper())
    return tuple(out)


def _number(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = next(iter(v)) if len(v) else None
            if v is None:
                return None
        if isinstance(v, bytes):
            v = v.decode("ascii", errors="replace").strip("\x00 ")
        x = float(v)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return x if math.isfinite(x) else None


# ---- reading a dataset ----------------------------------------------------------------------------
_GE_ACQ = (0x0019, "GEMS_ACQU_01")
_PHILIPS_IMAGING = (0x2001, "PHILIPS IMAGING DD 001")
_PHILIPS_MR = (0x2005, "PHILIPS MR IMAGING DD 001")
_PHILIPS_MR5 = (0x2005, "PHILIPS MR IMAGING DD 005")
_PRIVATE_GROUPS = frozenset({0x0019, 0x2001, 0x2005})
#: the standard enhanced-MR attributes looked for in functional groups and the Philips private item
_ENHANCED_TEXT = {
    "pulse_sequence_name": "PulseSequenceName",
    "echo_pulse_sequence": "EchoPulseSequence",
    "acquisition_contrast": "AcquisitionContrast",
    "inversion_recovery": "InversionRecovery",
    "spectrally_selected_suppression": "SpectrallySelectedSuppression",
    "spectrally_selected_excitation": "SpectrallySelectedExcitation",
}


@functools.cache
def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)


def _value(ds, keyword: str | int) -> Any:
    """The value of an element (None when absent or undecodable); looks the tag up without converting others."""
    try:
        tag = keyword if isinstance(keyword, int) else _tag(keyword)
        elements = getattr(ds, "_dict", None)
        if elements is not None and tag not in elements:
            return None
        return ds[tag].value
    except Exception:  # an undecodable value is no reason to fail: it is simply not a signal
        return None


def _item(ds, keyword: str):
    seq = _value(ds, keyword)
    try:
        return seq[0] if seq else None
    except Exception:
        return None


def _private_creators(ds) -> dict[tuple[int, str], int]:
    """(group, creator upper-case) -> block number, for the groups read here."""
    found: dict[tuple[int, str], int] = {}
    try:
        tags = [
            int(t)
            for t in getattr(ds, "_dict", {})
            if (int(t) >> 16) in _PRIVATE_GROUPS and 0x10 <= (int(t) & 0xFFFF) <= 0xFF
        ]
    except Exception:
        return found
    for tag in tags:
        name = _bounded(_value(ds, tag))
        if name:
            found.setdefault((tag >> 16, name.upper()), tag & 0xFF)
    return found


def _private(ds, creators: Mapping[tuple[int, str], int], which: tuple[int, str], offset: int) -> Any:
    block = creators.get(which)
    if block is None:
        return None
    return _value(ds, (which[0] << 16) | (block << 8) | offset)


def _codes(seq: Any) -> tuple[tuple[str, str, str], ...]:
    out = []
    try:
        for item in list(seq or [])[:4]:
            scheme = _bounded(getattr(item, "CodingSchemeDesignator", None)) or ""
            code = _bounded(getattr(item, "CodeValue", None)) or ""
            meaning = _bounded(getattr(item, "CodeMeaning", None)) or ""
            if code or meaning:
                out.append((scheme, code, meaning))
    except Exception:
        return tuple(out)
    return tuple(out)


def _orientation_text(v: Any) -> str | None:
    try:
        values = [float(x) for x in list(v)]
    except Exception:
        return None
    if len(values) != 6 or not all(math.isfinite(x) for x in values):
        return None
    return "\\".join(f"{x:.6g}" for x in values)


def acquisition_from_dataset(ds) -> Acquisition:
    """The acquisition parameters of one dataset (header only; never fails on odd values)."""
    kw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    kw["image_type"] = _tokens(_value(ds, "ImageType"))
    kw["scanning_sequence"] = _tokens(_value(ds, "ScanningSequence"))
    kw["sequence_variant"] = _tokens(_value(ds, "SequenceVariant"))
    kw["scan_options"] = _tokens(_value(ds, "ScanOptions"))
    for key, keyword in (
        ("mr_acquisition_type", "MRAcquisitionType"),
        ("sequence_name", "SequenceName"),
        ("contrast_bolus_agent", "ContrastBolusAgent"),
    ):
        kw[key] = _bounded(_value(ds, keyword))
    for key, keyword in (
        ("repetition_time", "RepetitionTime"),
        ("echo_time", "EchoTime"),
        ("inversion_time", "InversionTime"),
        ("flip_angle", "FlipAngle"),
        ("echo_train_length", "EchoTrainLength"),
        ("magnetic_field_strength", "MagneticFieldStrength"),
    ):
        kw[key] = _number(_value(ds, keyword))
    for key, keyword in _ENHANCED_TEXT.items():
        kw[key] = _bounded(_value(ds, keyword))
    kw["anatomic_region"] = _codes(_value(ds, "AnatomicRegionSequence"))

    # enhanced (multi-frame) objects: the functional groups (shared first, then the first frame)
    groups = [
        g
        for g in (_item(ds, "SharedFunctionalGroupsSequence"), _item(ds, "PerFrameFunctionalGroupsSequence"))
        if g is not None
    ]
    for name, g in zip(("shared functional groups", "first frame's functional groups"), groups):

        def fill(key: str, value: Any, what: str, name: str = name) -> None:
            if value is not None and value != () and kw.get(key) in (None, ()):
                kw[key] = value
                origins[key] = f"{what} in the {name}"

        timing = _item(g, "MRTimingAndRelatedParametersSequence")
        if timing is not None:
            fill(
                "repetition_time",
                _number(_value(timing, "RepetitionTime")),
                "MRTimingAndRelatedParametersSequence (0018,9112)",
            )
            fill("flip_angle", _number(_value(timing, "FlipAngle")), "MRTimingAndRelatedParametersSequence (0018,9112)")
            fill(
                "echo_train_length",
                _number(_value(timing, "EchoTrainLength")),
                "MRTimingAndRelatedParametersSequence (0018,9112)",
            )
        echo = _item(g, "MREchoSequence")
        if echo is not None:
            fill(
                "echo_time",
                _number(_value(echo, "EffectiveEchoTime")),
                "EffectiveEchoTime in MREchoSequence (0018,9114)",
            )
        modifier = _item(g, "MRModifierSequence")
        if modifier is not None:
            fill(
                "inversion_recovery", _bounded(_value(modifier, "InversionRecovery")), "MRModifierSequence (0018,9115)"
            )
            fill(
                "inversion_time",
                _number(_value(modifier, "InversionTimes")),
                "InversionTimes in MRModifierSequence (0018,9115)",
            )
        frame_type = _item(g, "MRImageFrameTypeSequence")
        if frame_type is not None:
            fill(
                "image_type",
                _tokens(_value(frame_type, "FrameType")),
                "FrameType in MRImageFrameTypeSequence (0018,9226)",
            )
        plane = _item(g, "PlaneOrientationSequence")
        if plane is not None:
            fill(
                "orientation",
                _orientation_text(_value(plane, "ImageOrientationPatient")),
                "PlaneOrientationSequence (0020,9116)",
            )
        anatomy = _item(g, "FrameAnatomySequence")
        if anatomy is not None:
            fill(
                "anatomic_region", _codes(_value(anatomy, "AnatomicRegionSequence")), "FrameAnatomySequence (0020,9071)"
            )

    # vendors' private fields
    creators = _private_creators(ds)
    if creators:
        kw["ge_pulse_sequence"] = _bounded(_private(ds, creators, _GE_ACQ, 0x9C))
        kw["ge_internal_pulse_sequence"] = _bounded(_private(ds, creators, _GE_ACQ, 0x9E))
        kw["philips_scanning_technique"] = _bounded(_private(ds, creators, _PHILIPS_IMAGING, 0x20))
        kw["philips_image_type"] = _bounded(_private(ds, creators, _PHILIPS_MR, 0x11))
        seq = _private(ds, creators, _PHILIPS_MR5, 0x0F)
        try:
            item = seq[0] if seq and not isinstance(seq, (bytes, str)) else None
        except Exception:
            item = None
        if item is not None:
            for key, keyword in _ENHANCED_TEXT.items():
                value = _bounded(_value(item, keyword))
                if value and not kw.get(key):
                    kw[key] = value
                    origins[key] = f"{keyword} in the Philips private item (2005,xx0F) Philips MR Imaging DD 005"
    kw["origins"] = tuple(sorted(origins.items()))
    return Acquisition(**kw)


# ---- plane -------------------------------------------------------------------------------------------
def parse_orientation(value: Any) -> tuple[float, ...] | None:
    """Six direction cosines from "a\\b\\c\\d\\e\\f" (or a sequence); None when not six finite numbers."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.replace(",", "\\").split("\\")
    else:
        try:
            parts = list(value)
        except TypeError:
            return None
    try:
        cos = tuple(float(str(p).strip(" '\"[]")) for p in parts)
    except ValueError:
        return None
    if len(cos) != 6 or not all(math.isfinite(c) for c in cos):
        return None
    return cos


def slice_normal(cosines: Sequence[float]) -> tuple[float, float, float] | None:
    row, col = cosines[:3], cosines[3:]
    n = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    length = math.sqrt(sum(c * c for c in n))
    if length < 0.5:  # not two (nearly) orthogonal unit vectors
        return None
    return (n[0] / length, n[1] / length, n[2] / length)


@dataclass(frozen=True)
class PlaneOfOrientation:
    plane: str  # sagittal / coronal / axial, or oblique beyond the tolerance
    angle: float  # degrees between the slice normal and the nearest axis
    nearest: tuple[str, str]  # the two nearest planes, nearest first
    margin: float  # degrees between the nearest and the second nearest

    @property
    def tie(self) -> bool:
        return self.margin < PLANE_TIE_DEG


def plane_of_orientation(cosines: Sequence[float]) -> PlaneOfOrientation | None:
    """The plane of one ImageOrientationPatient: nearest patient axis to the slice normal.

    Sagittal: normal along x (left-right); coronal: along y (anterior-posterior); axial:
    along z (head-foot). None for a degenerate orientation.
    """
    n = slice_normal(cosines)
    if n is None:
        return None
    angles = sorted((math.degrees(math.acos(min(1.0, abs(c)))), plane) for c, plane in zip(n, PLANES))
    (a1, p1), (a2, p2) = angles[0], angles[1]
    plane = p1 if a1 <= PLANE_TOLERANCE_DEG else "oblique"
    return PlaneOfOrientation(plane, round(a1, 1), (p1, p2), round(a2 - a1, 1))


def decide_plane(
    orientations: Iterable[tuple[Any, int]],
    *,
    text_planes: Sequence[str] = (),
    text_source: str = "",
) -> tuple[Decision, list[Signal]]:
    """The series' plane from its instances' orientations (``(orientation, instance count)`` pairs).

    Geometry decides; ``text_planes`` (the planes the description names) decide only when no
    instance has an orientation, or pick between two planes the geometry cannot tell apart.
    """
    signals: list[Signal] = []
    groups: list[tuple[tuple[float, ...], int]] = []
    missing = 0
    for value, count in orientations:
        count = max(int(count or 0), 0)
        cos = parse_orientation(value)
        if cos is None:
            missing += count
            continue
        for i, (key, n) in enumerate(groups):
            if max(abs(a - b) for a, b in zip(cos, key)) <= ORIENTATION_GROUP_TOLERANCE:
                groups[i] = (key, n + count)
                break
        else:
            groups.append((cos, count))
    text_value = ", ".join(text_planes) if text_planes else "no plane named"
    iop_source = tag_source("ImageOrientationPatient")
    if not groups:
        if len(set(text_planes)) == 1:
            signals.append(Signal("plane", text_planes[0], text_source, True))
            return Decision(
                text_planes[0], "text", f"no ImageOrientationPatient; the {text_source or 'text'} names it"
            ), signals
        if text_planes:
            signals.append(Signal("plane", text_value, text_source, False))
            return Decision(None, "none", "no ImageOrientationPatient; the text names several planes"), signals
        signals.append(Signal("plane", "no orientation, no plane in the text", iop_source, False))
        return Decision(None, "none", "no ImageOrientationPatient and no plane in the text"), signals

    total = sum(n for _, n in groups) or 1
    by_plane: dict[str, int] = {}
    detail_of: dict[str, tuple[int, PlaneOfOrientation]] = {}  # plane -> its largest group
    for cos, n in groups:
        p = plane_of_orientation(cos)
        name = p.plane if p is not None else "degenerate"
        by_plane[name] = by_plane.get(name, 0) + n
        if p is not None and (name not in detail_of or n > detail_of[name][0]):
            detail_of[name] = (n, p)
        signals.append(
            Signal(
                "orientation",
                (
                    "degenerate"
                    if p is None
                    else f"{p.plane}{f' (nearest {p.nearest[0]})' if p.plane == 'oblique' else ''}, "
                    f"normal {p.angle:g} deg from the {p.nearest[0]} axis"
                )
                + f"; {n} instance(s)",
                iop_source,
                False,
            )
        )
    ranked = sorted(by_plane.items(), key=lambda kv: -kv[1])
    strong = [p for p, n in ranked if p in PLANES and n >= max(1, MULTI_PLANE_MIN_SHARE * total)]
    if len(strong) > 1:
        signals = [Signal(s.name, s.value, s.source, True) for s in signals]
        detail = ", ".join(f"{p} {n}" for p, n in ranked)
        if text_planes:
            signals.append(Signal("plane", text_value, text_source, False))
        return Decision(
            "multi",
            "ImageOrientationPatient",
            f"{len(strong)} planes in one series ({detail} instances): a multi-plane localizer",
        ), signals
    plane, count = ranked[0]
    signals = [Signal(s.name, s.value, s.source, s.value.startswith(plane) or plane == "degenerate") for s in signals]
    share = f"{count} of {total} instances" if len(groups) > 1 or missing else f"{total} instance(s)"
    if missing:
        share += f"; {missing} without orientation"
    if plane == "degenerate":
        return Decision(None, "none", "ImageOrientationPatient is degenerate"), signals
    p = detail_of[plane][1]
    if plane == "oblique" or p.tie:
        candidates = p.nearest
        chosen = [t for t in text_planes if t in candidates]
        if len(set(chosen)) == 1:
            signals.append(Signal("plane", text_value, text_source, True))
            how = "beyond the tolerance" if plane == "oblique" else "between two planes"
            return Decision(
                chosen[0],
                "ImageOrientationPatient + text",
                f"normal {p.angle:g} deg from the {p.nearest[0]} axis, {how} ({candidates[0]}/{candidates[1]}); "
                f"the {text_source or 'text'} names {chosen[0]} ({share})",
            ), signals
        if plane == "oblique":
            if text_planes:
                signals.append(Signal("plane", text_value, text_source, False))
            return Decision(
                "oblique",
                "ImageOrientationPatient",
                f"double oblique: normal {p.angle:g} deg from the nearest axis ({p.nearest[0]}), "
                f"beyond the {PLANE_TOLERANCE_DEG:g} deg tolerance ({share})",
            ), signals
    oblique = f"oblique, normal {p.angle:g} deg from the {plane} axis" if p.angle >= 1.0 else "orthogonal"
    if text_planes:
        agrees = plane in text_planes
        signals.append(Signal("plane", text_value + ("" if agrees else " (the geometry decides)"), text_source, False))
    return Decision(
        plane, "ImageOrientationPatient", f"{oblique} (tolerance {PLANE_TOLERANCE_DEG:g} deg; {share})"
    ), signals


# ---- text patterns -----------------------------------------------------------------------------------
#: the text patterns recognition reads; a rules file's [patterns] of the same names replace these
DEFAULT_TEXT_PATTERNS: Mapping[str, str] = {
    "localizer": r"\b(loc|locs|locali[sz]er\w*|locator|3 ?-? ?pl(ane)?\w*|tri ?-?pilot|scout|survey|smart ?survey|pilot|scanogram)\b",
    "calibration": r"\b(cal|calib\w*|asset ?cal\w*|pure ?cal\w*|coil ?survey|sense ?ref\w*|ref ?scan|refscan|b1 ?map\w*|shim\w*)\b",
    "post_contrast": r"\+ ?c\b|\bc ?\+|\bpost\b|\bgad\w*|\bgd\b|\+ ?gd|\bcontrast\b|\bce\b",
    "derived": r"\b(maps?|mapping|t2 ?map\w*|t1 ?rho|dwi|dti|adc|diff\w*|trace|mpr|mip|sub|subtraction|perf\w*|cartigram|moco)\b",
    "dixon": r"\b(m?dixon|ideal|flex)\b",
    "dixon_water": r"\b(w|wat|water)\b",
    "dixon_fat": r"\b(f|fat)$|\bfat ?(only|image)\b",
    "dixon_in_phase": r"\b(ip|in ?phase|inphase)\b",
    "dixon_opposed_phase": r"\b(op|opp|out ?phase|outphase|opposed ?phase)\b",
    "sag": r"\bsag\w*",
    "cor": r"\bcor(o|onal)?\b",
    "ax": r"\b(ax|axial|axi|tra|trans|transverse|transversal)\b",
    "fat_sat": r"\b(fs|fat ?sat\w*|fatsat\w*|fat ?sup\w*|fsat|spair|spir|chess|we|water|(pd|t2|t1)fs|fs3d)\b|\b(m?dixon|ideal|flex)\b.*\b(w|wat|water)\b",
    "stir": r"\b(stir|tirm|tir|ir ?fse)\b",
    "pd": r"\b(s?pdw?i?|pd ?fse|pd ?tse|proton ?density|int|intermediate)\b",
    "t2": r"\b(s?t2w?i?|t2 ?frfse|frfse)\b",
    "t1": r"\b(s?t1w?i?|t1 ?fse|t1 ?tse|t1 ?se)\b",
    "gre": r"\b(gre|fgre|spgr|mpgr|flash|fl3d|medic|merge|ffe|fe|swi|hemo|t2 ?star)\b|\bt2 ?\*",
    "fse3d": r"\b(cube|space|vista|mvox|3d ?fse|3d ?tse)\b",
    "dess": r"\b(dess|de ?3d)\b",
}
_TEXT_FLAGS = ("localizer", "calibration", "post_contrast", "derived", "dixon")
_TEXT_PLANES = (("sag", "sagittal"), ("cor", "coronal"), ("ax", "axial"))


@dataclass(frozen=True)
class TextPatterns:
    """Compiled text patterns (case-insensitive, on `normalize_text` values)."""

    patterns: Mapping[str, re.Pattern]

    @classmethod
    def build(cls, overrides: Mapping[str, str] | None = None) -> TextPatterns:
        merged = dict(DEFAULT_TEXT_PATTERNS)
        for k, v in (overrides or {}).items():
            if k in merged:
                merged[k] = v
        return cls({k: re.compile(v, re.IGNORECASE) for k, v in merged.items()})

    def matches(self, text: str) -> frozenset[str]:
        text = normalize_text(text)
        if not text:
            return frozenset()
        return frozenset(k for k, p in self.patterns.items() if p.search(text))


def text_planes(matched: frozenset[str]) -> list[str]:
    return [plane for key, plane in _TEXT_PLANES if key in matched]


def text_contrast(matched: frozenset[str]) -> tuple[str | None, str]:
    """The contrast a description names (None: none named) and how it was read."""
    if "dess" in matched:
        return "dess", "names DESS"
    if "gre" in matched:
        return "gre", "names a gradient echo"
    if "stir" in matched:
        return "stir", "names STIR/TIRM"
    weighting = next((w for w in ("t1", "pd", "t2") if w in matched), None)
    how = f"names {weighting.upper()}" if weighting else ""
    if weighting is None and "fse3d" in matched:
        weighting, how = "pd", "names a 3D FSE (read as PD)"
    fs = "fat_sat" in matched
    if weighting is None:
        if fs:
            return "pd_fs", "names fat suppression without a weighting (read as fluid-sensitive PD)"
        return None, "names no contrast"
    return (weighting + "_fs", how + " with fat suppression") if fs else (weighting, how)


# ---- contrast and flags from the parameters ---------------------------------------------------------
_FAT_SAT_OPTIONS = frozenset(
    {"FS", "FSS", "SFS", "FAT_SAT", "FATSAT", "SPAIR", "SPIR", "WE", "WATER_EXCITATION", "CHESS"}
)
_NO_AGENT = frozenset({"", "NONE", "NO", "N/A", "NA", "0", "-", "NIL", "NOT USED", "NONE USED"})
_MAP_TOKENS = frozenset(
    {
        "ADC",
        "EADC",
        "TRACEW",
        "TRACE",
        "FA",
        "DIFFUSION",
        "T1MAP",
        "T2MAP",
        "T1_MAP",
        "T2_MAP",
        "T2STAR_MAP",
        "T2*MAP",
        "R2STAR",
        "R2*",
        "MAP",
        "CALC",
        "CALCULATED",
        "SUB",
        "SUBTRACT",
        "SUBTRACTION",
        "PERFUSION",
        "TTP",
        "MTT",
        "CBF",
        "CBV",
        "MOCO",
        "EXP",
        "COLLAPSE",
        "T1RHO",
        "T1_RHO",
        "MOSAIC",
    }
)
_NON_MAGNITUDE = frozenset({"P", "PHASE", "R", "REAL", "I", "IMAGINARY", "PHASE MAP"})
_MPR_TOKENS = frozenset(
    {"MPR", "CSA MPR", "CSAMPR", "REFORMATTED", "RESAMPLED", "CSA RESAMPLED", "CSARESAMPLED", "CSAPARALLEL", "CURVED"}
)
_PROJECTION_TOKENS = frozenset({"PROJECTION IMAGE", "PROJECTION", "MIP", "MINIP", "MNIP", "CSA MIP", "VOLUME RENDER"})
_LOCALIZER_TOKENS = frozenset({"LOCALIZER", "SCOUT", "SURVEY"})
_DIXON_TOKENS = {
    "dixon_water": frozenset({"WATER", "W"}),
    "dixon_fat": frozenset({"FAT", "F"}),
    "dixon_in_phase": frozenset({"IN_PHASE", "INPHASE", "IN PHASE", "IP"}),
    "dixon_opposed_phase": frozenset({"OPP_PHASE", "OUT_PHASE", "OUTPHASE", "OUT PHASE", "OPPOSED_PHASE", "OP"}),
}
_SEQ_DESS = re.compile(r"de3d|\bdess|\*de", re.IGNORECASE)
_SEQ_IR = re.compile(r"\*tir|\btir|stir|fse-?ir|\bir\b|ir-?tse|tirm|spcir|\*ir", re.IGNORECASE)
_SEQ_GRE = re.compile(
    r"\*fl|\*tfl|\*me[23]d|\*swi|\*fi|fgre|\bgre|spgr|mpgr|ffe|tfe|flash|medic|merge|fiesta|vibe|lava|thrive|\bfe\b|\bgr\b",
    re.IGNORECASE,
)
_SEQ_SE = re.compile(
    r"\*tse|\*se|\*spc|\*h2d|\*haste|tse|fse|frfse|\bse\b|space|cube|vista|ssfse|haste|grase|\*tseR", re.IGNORECASE
)
_SEQ_EPI = re.compile(r"\*ep|\bepi|ep2d|\bdwi|diff", re.IGNORECASE)
_SEQ_LOCALIZER = re.compile(r"3-?plane|3pl|localizer|scout|survey", re.IGNORECASE)
_SEQ_CALIBRATION = re.compile(
    r"\bcal\b|calib|3dcal|asset ?cal|purecal|senseref|coil ?survey|refscan|\bprescan", re.IGNORECASE
)


def _sequence_names(acq: Acquisition) -> list[tuple[str, str]]:
    """(value, source) of every sequence name the header carries."""
    names = [
        (acq.sequence_name, tag_source("SequenceName")),
        (acq.pulse_sequence_name, acq.origin("pulse_sequence_name", tag_source("PulseSequenceName"))),
        (acq.ge_pulse_sequence, tag_source("GE PulseSequenceName")),
        (acq.ge_internal_pulse_sequence, tag_source("GE InternalPulseSequenceName")),
        (acq.philips_scanning_technique, tag_source("Philips ScanningTechnique")),
    ]
    return [(v, s) for v, s in names if v]


def header_flags(acq: Acquisition, manufacturer: str | None = None) -> tuple[list[str], list[Signal]]:
    """Flags the header states (ImageType tokens, sequence names, contrast agent)."""
    flags: list[str] = []
    signals: list[Signal] = []
    tokens = set(acq.image_type)
    it_source = acq.origin("image_type", tag_source("ImageType"))
    it_value = "\\".join(acq.image_type)

    def add(flag: str, value: str, source: str) -> None:
        if flag not in flags:
            flags.append(flag)
        signals.append(Signal(flag, value, source, True))

    if tokens & _LOCALIZER_TOKENS:
        add("localizer", it_value, it_source)
    derived = sorted(tokens & _MAP_TOKENS)
    if len(acq.image_type) >= 2 and acq.image_type[0] == "DERIVED" and acq.image_type[1] == "SECONDARY":
        derived.insert(0, "DERIVED\\SECONDARY")
    non_magnitude = sorted(t for t in acq.image_type[2:] if t in _NON_MAGNITUDE)
    if derived or non_magnitude:
        add("derived", it_value + f" ({', '.join(derived + non_magnitude)})", it_source)
    if acq.philips_image_type and acq.philips_image_type.upper() in {"P", "R", "I", "PHASE", "REAL", "IMAGINARY"}:
        add("derived", f"{acq.philips_image_type} (not a magnitude image)", tag_source("Philips ImageType"))
    if tokens & _MPR_TOKENS:
        add("mpr", it_value, it_source)
    if tokens & _PROJECTION_TOKENS:
        add("projection", it_value, it_source)
    # Dixon: Siemens DIXON + WATER/FAT/IN_PHASE/OPP_PHASE; GE WATER/FAT/IN PHASE/OUT PHASE; Philips W/F/IP/OP
    # the short Philips tokens (W, F, IP, OP) count only from Philips or next to a DIXON token
    short_ok = "PHILIPS" in (manufacturer or "").upper() or "DIXON" in tokens
    if "DIXON" in tokens:
        add("dixon", it_value, it_source)
    for flag, words in _DIXON_TOKENS.items():
        if any(t in words and (len(t) > 2 or short_ok) for t in acq.image_type[2:]):
            add("dixon", it_value, it_source)
            add(flag, it_value, it_source)
    if acq.philips_image_type:
        pit = acq.philips_image_type.upper()
        for flag, words in _DIXON_TOKENS.items():
            if pit in words:
                add("dixon", pit, tag_source("Philips ImageType"))
                add(flag, pit, tag_source("Philips ImageType"))
    for value, source in _sequence_names(acq):
        if _SEQ_LOCALIZER.search(value):
            add("localizer", value, source)
        if _SEQ_CALIBRATION.search(value):
            add("calibration", value, source)
    agent = (acq.contrast_bolus_agent or "").strip().upper()
    if agent and agent not in _NO_AGENT:
        add("post_contrast", acq.contrast_bolus_agent or "", tag_source("ContrastBolusAgent"))
    return flags, signals


def _family(acq: Acquisition) -> tuple[str | None, str, str]:
    """(family, value, source): se / ir / gre / dess / epi / None."""
    ss = set(acq.scanning_sequence)
    names = _sequence_names(acq)
    for value, source in names:
        if _SEQ_DESS.search(value):
            return "dess", value, source
    if ss:
        value = "\\".join(acq.scanning_sequence)
        source = tag_source("ScanningSequence")
        if "EP" in ss:
            return "epi", value, source
        if "GR" in ss:  # GR\\IR is an inversion-prepared gradient echo (MPRAGE): a gradient echo
            return "gre", value, source
        if "IR" in ss or "IR" in acq.scan_options:
            return "ir", value, source
        if "SE" in ss:
            return "se", value, source
    inversion = (acq.inversion_recovery or "").upper() == "YES"
    for value, source in names:
        if _SEQ_EPI.search(value):
            return "epi", value, source
        if _SEQ_IR.search(value) or inversion:
            return "ir", value, source
        if _SEQ_GRE.search(value):
            return "gre", value, source
        if _SEQ_SE.search(value):
            return "se", value, source
    eps = (acq.echo_pulse_sequence or "").upper()
    if eps:
        source = acq.origin("echo_pulse_sequence", tag_source("EchoPulseSequence"))
        if inversion:
            return "ir", eps + " + InversionRecovery YES", source
        if eps == "GRADIENT":
            return "gre", eps, source
        if eps == "SPIN":
            return "se", eps, source
    return None, "", ""


def _fat_suppression(acq: Acquisition, flags: Sequence[str]) -> tuple[bool | None, str, str]:
    """(True: suppressed / False: explicitly not / None: the header does not say, value, source)."""
    options = [o for o in acq.scan_options if o in _FAT_SAT_OPTIONS or o.startswith("FS_")]
    if options:
        return True, "\\".join(acq.scan_options), tag_source("ScanOptions")
    sss = (acq.spectrally_selected_suppression or "").upper()
    sse = (acq.spectrally_selected_excitation or "").upper()
    if sss in ("FAT", "FAT_AND_WATER"):
        return True, sss, acq.origin("spectrally_selected_suppression", tag_source("SpectrallySelectedSuppression"))
    if sse == "WATER":
        return True, sse, acq.origin("spectrally_selected_excitation", tag_source("SpectrallySelectedExcitation"))
    if "dixon_water" in flags:
        return True, "Dixon water image", acq.origin("image_type", tag_source("ImageType"))
    if sss == "NONE" and sse in ("", "NONE"):
        return False, sss, acq.origin("spectrally_selected_suppression", tag_source("SpectrallySelectedSuppression"))
    return None, "\\".join(acq.scan_options) or "not stated", tag_source("ScanOptions")


def _ms(x: float | None) -> str:
    return "?" if x is None else f"{x:g} ms"


def decide_contrast(
    acq: Acquisition,
    *,
    text_matched: frozenset[str] = frozenset(),
    text_source: str = "",
    flags: Sequence[str] = (),
) -> tuple[Decision, list[Signal]]:
    """Contrast class from the acquisition parameters; the text fills only what they leave open."""
    signals: list[Signal] = []
    t_contrast, t_how = text_contrast(text_matched)
    family, fam_value, fam_source = _family(acq)
    tr, te, ti = acq.repetition_time, acq.echo_time, acq.inversion_time
    timing_source = tag_source(
        *[n for n, v in (("RepetitionTime", tr), ("EchoTime", te), ("InversionTime", ti)) if v is not None]
    )
    if tr is not None or te is not None or ti is not None:
        timing = ", ".join(f"{k} {_ms(v)}" for k, v in (("TR", tr), ("TE", te), ("TI", ti)) if v is not None)
    else:
        timing = ""
    fs, fs_value, fs_source = _fat_suppression(acq, flags)

    def text_signal(used: bool, note: str = "") -> None:
        if text_source:
            signals.append(Signal("contrast (text)", f"{t_contrast or 'none'}: {t_how}{note}", text_source, used))

    def finish(
        value: str, detail: str, *, fs_used: bool, text_used: bool = False, text_note: str = ""
    ) -> tuple[Decision, list[Signal]]:
        if family is not None:
            signals.insert(0, Signal("sequence family", f"{family} ({fam_value})", fam_source, True))
        if timing:
            signals.append(Signal("timing", timing, timing_source, True))
        if fs is not None or fs_value != "not stated":
            signals.append(
                Signal(
                    "fat suppression",
                    {True: "yes", False: "no", None: "not stated"}[fs] + f" ({fs_value})",
                    fs_source,
                    fs_used,
                )
            )
        text_signal(text_used, text_note)
        source = "acquisition parameters + text" if text_used else "acquisition parameters"
        return Decision(value, source, detail), signals

    if acq.acquisition_contrast and family is None:
        # an enhanced object that states its contrast but not its sequence
        ac = acq.acquisition_contrast.upper()
        mapping = {"T1": "t1", "PROTON_DENSITY": "pd", "T2": "t2", "STIR": "stir", "T2_STAR": "gre"}
        if ac in mapping:
            value = mapping[ac]
            src = acq.origin("acquisition_contrast", tag_source("AcquisitionContrast"))
            signals.append(Signal("acquisition contrast", ac, src, True))
            if value in ("t1", "pd", "t2") and fs:
                value += "_fs"
            return finish(value, f"AcquisitionContrast {ac}" + ("; fat suppressed" if fs else ""), fs_used=bool(fs))

    if family == "dess":
        return finish("dess", f"double-echo steady state ({fam_value})", fs_used=False)
    if family == "epi":
        return finish(
            "other", f"echo planar ({fam_value}): diffusion/functional, not an anatomical contrast", fs_used=False
        )
    if family == "gre":
        if "dess" in text_matched:
            return finish("dess", f"gradient echo ({fam_value}); the text names DESS", fs_used=False, text_used=True)
        gre_weighting = ""
        if te is not None:
            gre_weighting = (
                "; T2*-weighted (TE >= 10 ms)"
                if te >= 10
                else ("; T1-weighted (short TR/TE)" if tr is not None and tr < 100 else "")
            )
        if "IR" in acq.scanning_sequence:
            gre_weighting += "; inversion-prepared"
        return finish(
            "gre", f"gradient echo ({fam_value}{', ' + timing if timing else ''}{gre_weighting})", fs_used=False
        )
    if family == "ir":
        if ti is None:
            if (acq.acquisition_contrast or "").upper() == "STIR":
                return finish("stir", f"inversion recovery ({fam_value}); AcquisitionContrast STIR", fs_used=False)
            if "stir" in text_matched:
                return finish(
                    "stir",
                    f"inversion recovery ({fam_value}), no TI; the text names STIR",
                    fs_used=False,
                    text_used=True,
                )
            return finish("other", f"inversion recovery ({fam_value}) without an InversionTime", fs_used=False)
        field_t = f" at {acq.magnetic_field_strength:g} T" if acq.magnetic_field_strength else ""
        if STIR_TI[0] <= ti <= STIR_TI[1]:
            return finish(
                "stir",
                f"inversion recovery, TI {ti:g} ms{field_t} nulls fat (STIR window {STIR_TI[0]:g}-{STIR_TI[1]:g} ms)",
                fs_used=False,
            )
        if ti >= FLAIR_MIN_TI:
            return finish("other", f"inversion recovery, TI {ti:g} ms nulls fluid (FLAIR)", fs_used=False)
        if T1_FLAIR_TI[0] <= ti <= T1_FLAIR_TI[1] and te is not None and te < T1_MAX_TE:
            value = "t1_fs" if fs else "t1"
            return finish(
                value, f"inversion recovery, TI {ti:g} ms, TE {te:g} ms: T1-weighted (T1-FLAIR)", fs_used=bool(fs)
            )
        return finish("other", f"inversion recovery, TI {ti:g} ms: neither STIR nor FLAIR", fs_used=False)
    if family == "se":
        three_d = (acq.mr_acquisition_type or "").upper() == "3D"
        t1_max_tr = T1_MAX_TR_3D if three_d else T1_MAX_TR_2D
        weighting: str | None = None
        why = ""
        if tr is not None and te is not None:
            if te >= T2_MIN_TE:
                if tr >= t1_max_tr:
                    weighting, why = "t2", f"long TR ({tr:g} ms), long TE ({te:g} ms >= {T2_MIN_TE:g})"
                else:
                    weighting, why = None, f"short TR ({tr:g} ms) with long TE ({te:g} ms): mixed weighting"
            elif tr < t1_max_tr and te < T1_MAX_TE:
                weighting, why = (
                    "t1",
                    f"short TR ({tr:g} ms < {t1_max_tr:g}{' for 3D' if three_d else ''}), short TE ({te:g} ms)",
                )
            elif tr >= t1_max_tr:
                weighting, why = "pd", f"long TR ({tr:g} ms), short TE ({te:g} ms < {T2_MIN_TE:g}): PD/intermediate"
            else:
                weighting, why = None, f"TR {tr:g} ms, TE {te:g} ms: between T1 and PD"
        stated = {"T1": "t1", "PROTON_DENSITY": "pd", "T2": "t2"}.get((acq.acquisition_contrast or "").upper())
        if weighting is None and tr is None and te is None and stated:
            weighting = stated
            why = f"AcquisitionContrast {acq.acquisition_contrast} ({acq.origin('acquisition_contrast', tag_source('AcquisitionContrast'))})"
        if weighting is None:
            # the parameters give the family only: the text names the weighting
            t_weight = t_contrast if t_contrast in ("t1", "t1_fs", "pd", "pd_fs", "t2", "t2_fs") else None
            if t_weight is None:
                if t_contrast in ("stir", "gre", "dess"):
                    text_signal(False, " (the parameters say spin echo)")
                else:
                    text_signal(False)
                if family is not None:
                    signals.insert(0, Signal("sequence family", f"{family} ({fam_value})", fam_source, True))
                if timing:
                    signals.append(Signal("timing", timing + (f" ({why})" if why else ""), timing_source, False))
                return Decision(
                    "other" if why else None,
                    "acquisition parameters" if why else "none",
                    f"spin echo ({fam_value}); {why or 'no TR/TE'}; the text names no weighting",
                ), signals
            base = t_weight.removesuffix("_fs")
            use_fs = fs if fs is not None else t_weight.endswith("_fs")
            value = base + ("_fs" if use_fs else "")
            return finish(
                value,
                f"spin echo ({fam_value}); {why or 'no TR/TE'}: the weighting from the text ({t_how})"
                + ("; fat suppression from the header" if fs else ""),
                fs_used=bool(fs),
                text_used=True,
            )
        # parameters decide the weighting; fat suppression from the header, else from the text
        if fs is True:
            return finish(
                weighting + "_fs",
                f"spin echo ({fam_value}): {why}; fat suppressed ({fs_value})",
                fs_used=True,
                text_note="" if t_contrast in (None, weighting + "_fs") else " (the parameters decide)",
            )
        if fs is False:
            return finish(
                weighting,
                f"spin echo ({fam_value}): {why}; no fat suppression ({fs_value})",
                fs_used=True,
                text_note="" if t_contrast in (None, weighting) else " (the parameters decide)",
            )
        if "fat_sat" in text_matched:
            return finish(
                weighting + "_fs",
                f"spin echo ({fam_value}): {why}; fat suppression from the text (the header does not state it)",
                fs_used=False,
                text_used=True,
            )
        return finish(
            weighting,
            f"spin echo ({fam_value}): {why}; no fat suppression stated",
            fs_used=False,
            text_note="" if t_contrast in (None, weighting) else " (the parameters decide)",
        )

    # no sequence family in the header: the text decides (fat suppression from the header if it says so)
    if timing:
        signals.append(Signal("timing", timing + " (no sequence family: not decisive)", timing_source, False))
    if t_contrast is None:
        text_signal(False)
        return Decision(None, "none", "no sequence family in the header and no contrast in the text"), signals
    value = t_contrast
    if fs is True and value in ("t1", "pd", "t2"):
        value += "_fs"
        signals.append(Signal("fat suppression", f"yes ({fs_value})", fs_source, True))
    text_signal(True)
    return Decision(value, "text", f"the {text_source or 'text'} {t_how}"), signals


# ---- recognition of one series ------------------------------------------------------------------------
def recognize(
    *,
    orientations: Iterable[tuple[Any, int]],
    acquisition: Acquisition,
    text: str | None,
    text_source: str,
    patterns: TextPatterns,
    manufacturer: str | None = None,
) -> Recognition:
    """Plane, contrast and flags of one series from its orientations, parameters and description."""
    orientations = list(orientations)
    if not any(parse_orientation(v) is not None for v, _ in orientations) and acquisition.orientation:
        orientations.append((acquisition.orientation, 1))
    matched = patterns.matches(text or "")
    signals: list[Signal] = []
    flags, flag_signals = header_flags(acquisition, manufacturer)
    signals.extend(flag_signals)
    plane, plane_signals = decide_plane(orientations, text_planes=text_planes(matched), text_source=text_source)
    signals.extend(plane_signals)
    if plane.value == "multi" and "localizer" not in flags:
        flags.append("localizer")
        signals.append(Signal("localizer", "several planes in one series", tag_source("ImageOrientationPatient"), True))
    for flag in _TEXT_FLAGS:
        if flag in matched:
            if flag == "dixon":
                parts = [
                    f for f in ("dixon_water", "dixon_fat", "dixon_in_phase", "dixon_opposed_phase") if f in matched
                ]
                for f in ["dixon", *parts[:1]]:
                    if f not in flags:
                        flags.append(f)
                signals.append(Signal("dixon", ", ".join(["dixon", *parts[:1]]), text_source, True))
                continue
            fresh = flag not in flags
            if fresh:
                flags.append(flag)
            signals.append(Signal(flag, "named in the text", text_source, fresh))
    contrast, contrast_signals = decide_contrast(
        acquisition, text_matched=matched, text_source=text_source, flags=flags
    )
    signals.extend(contrast_signals)
    ordered = tuple(f for f in FLAGS if f in flags)
    return Recognition(plane, contrast, ordered, tuple(signals))


# ---- coded anatomy ------------------------------------------------------------------------------------
#: SNOMED CT codes (DICOM CID 4031 and the joints) -> anatomy; "spine"/"whole_body" name no one region
ANATOMY_CODES: Mapping[str, str] = {
    "72696002": "knee",
    "49076000": "knee",
    "16982005": "shoulder",
    "91775009": "shoulder",
    "122496007": "lumbar_spine",
    "122494005": "cervical_spine",
    "122495006": "thoracic_spine",
    "421060004": "spine",
    "38266002": "whole_body",
    "69536005": "head",
    "12738006": "head",
    "45048000": "neck",
    "29836001": "hip",
    "24136001": "hip",
    "12921003": "pelvis",
    "127949000": "elbow",
    "16953009": "elbow",
    "344001": "ankle",
    "70258002": "ankle",
    "74670003": "wrist",
    "85562004": "hand",
    "56459004": "foot",
    "51185008": "chest",
    "818981001": "abdomen",
    "113345001": "abdomen",
    "54735007": "sacrum",
}
#: coded regions that name no single anatomy (like BodyPartExamined SPINE)
GENERIC_CODED = frozenset({"spine", "whole_body"})
_SNOMED_SCHEMES = frozenset({"SCT", "SRT", "SNM3", "SNOMED", "99SDM", ""})

#: regions msknode has no pipeline for, recognised by name so they are never taken for one
OTHER_ANATOMY_TEXT: Mapping[str, str] = {
    "cervical_spine": r"\b(c ?-? ?spine|cspine|cervical\w*|hws|c[1-7] ?-? ?(c[2-7]|t1)|neck)\b",
    "thoracic_spine": r"\b(t ?-? ?spine|tspine|thoracic ?spine|bws|dorsal ?spine|thoracic)\b",
    "head": r"\b(head|brain|skull|cerebr\w*|iac|orbits?|pituitary|sella)\b",
    "hip": r"\b(hips?|pelvis|pelvic|sacroiliac|si ?joints?)\b",
    "elbow": r"\b(elbows?)\b",
    "ankle": r"\b(ankles?|foot|feet|calcane\w*|achilles|forefoot|toes?)\b",
    "wrist": r"\b(wrists?|hands?|fingers?|thumb|carpal)\b",
    "chest": r"\b(chest|thorax|breasts?|cardiac|heart)\b",
    "abdomen": r"\b(abdomen|abdominal|liver|pancrea\w*|kidneys?|renal|prostate)\b",
}
_OTHER_COMPILED = {k: re.compile(v, re.IGNORECASE) for k, v in OTHER_ANATOMY_TEXT.items()}


def anatomy_of_codes(codes: Sequence[tuple[str, str, str]]) -> tuple[str | None, str]:
    """The anatomy an AnatomicRegionSequence names (None: no known code) and the code read."""
    for scheme, code, meaning in codes:
        if scheme.upper() in _SNOMED_SCHEMES and code in ANATOMY_CODES:
            return ANATOMY_CODES[code], f"{scheme}:{code} {meaning}".strip()
    return None, "; ".join(f"{s}:{c} {m}".strip() for s, c, m in codes)


def other_anatomy_of_text(value: str | None) -> list[str]:
    """The regions without a pipeline a text names."""
    text = normalize_text(value)
    if not text:
        return []
    return [k for k, p in _OTHER_COMPILED.items() if p.search(text)]
