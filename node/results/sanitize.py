"""Making values copied from a source header valid before they enter our objects.

Real sources carry invalid values: a Patient's Sex of ``"Male"`` or ``"X"``, NUL
bytes padding strings (also inside code sequences), strings longer than their VR
allows, malformed dates, unknown Specific Character Set terms. Everything msknode
copies from a source goes through `sanitize_dataset` first, so our objects are valid
and nothing crashes; values that cannot be repaired are removed (Type 2 attributes
become empty), never passed through broken.

The source files on disk are never changed: this works on in-memory headers.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydicom import Dataset
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_has_tag, dictionary_is_retired
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

log = logging.getLogger(__name__)

# Maximum value length per VR (PS3.5 table 6.2-1); PN is per component group.
MAX_LENGTH = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}
TEXT_VRS = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}  # affected by Specific Character Set
STRING_VRS = TEXT_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
_CS_RE = re.compile(r"^[A-Z0-9_ ]*$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_AS_RE = re.compile(r"^\d{3}[DWMY]$")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
# Unprintable characters that are never allowed in DICOM strings (ESC is kept: ISO 2022).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")


def _clean_text(s: str, vr: str) -> str:
    s = _CONTROL_RE.sub("", s.replace("\x00", ""))
    if vr in ("LT", "ST", "UT"):
        return s.rstrip()
    # no line breaks in single-line VRs; backslash is the value delimiter (handled by caller)
    s = s.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    return s.strip()


def _truncate(s: str, vr: str) -> str:
    limit = MAX_LENGTH.get(vr)
    if limit is not None and len(s) > limit:
        return s[:limit].rstrip()
    return s


def _fix_pn(value: Any) -> str:
    text = str(value) if not isinstance(value, str) else value
    text = _clean_text(text, "PN")
    if not any(ch.isalnum() for ch in text):
        return ""  # placeholders such as "----" or "^^" name nobody
    groups = text.split("=")[:3]
    fixed = []
    for g in groups:
        comps = g.split("^")[:5]
        g = "^".join(c.strip() for c in comps)
        fixed.append(g[:64].rstrip("^ ") if len(g) > 64 else g.rstrip("^"))
    return "=".join(fixed).rstrip("=")


def _fix_one(value: Any, vr: str) -> Any:
    """One value of a multi-valued string element; None means 'drop this value'."""
    if vr == "PN":
        return _fix_pn(value)
    if vr in ("DS", "IS"):
        s = _clean_text(str(value), vr)
        if s == "":
            return None
        try:
            num = float(s)
        except ValueError:
            return None
        if vr == "IS":
            if num != int(num) or abs(num) >= 2**31:
                return None
            return str(int(num))
        if len(s) > 16:
            s = f"{num:.10g}"
            if len(s) > 16:
                s = f"{num:.6g}"
        return s
    s = _clean_text(str(value), vr)
    if vr == "CS":
        s = s.upper()
        if not _CS_RE.match(s):
            s = re.sub(r"[^A-Z0-9_ ]", "_", s)
    elif vr == "UI":
        s = s.strip().rstrip(".")
        return s if _UID_RE.match(s) and len(s) <= 64 else None
    elif vr == "DA":
        s = s.replace(".", "").replace("-", "")
        return s if _DA_RE.match(s) else None
    elif vr == "TM":
        s = s.replace(":", "")
        return s if _TM_RE.match(s) else None
    elif vr == "DT":
        return s if _DT_RE.match(s) else None
    elif vr == "AS":
        return s if _AS_RE.match(s) else None
    elif vr == "AE":
        s = s.replace("\\", "")
    return _truncate(s, vr)


def _fix_element(elem: DataElement) -> bool:
    """Repairs one string element in place; returns False when it must be removed."""
    vr = elem.VR
    value = elem.value
    if value is None or value == "":
        return True
    if isinstance(value, (bytes, bytearray)):
        return False  # undecodable raw value in a string VR
    if isinstance(value, (list, tuple, MultiValue)):
        vals = [_fix_one(v, vr) for v in value]
        vals = [v for v in vals if v is not None]
        if vr in ("UT", "LT", "ST"):
            vals = vals[:1]
        elem.value = vals if len(vals) > 1 else (vals[0] if vals else "")
        return True
    if isinstance(value, PersonName):
        value = str(value)
    if vr in ("LT", "ST", "UT"):
        elem.value = _truncate(_clean_text(str(value), vr), vr)
        return True
    fixed = _fix_one(value, vr)
    elem.value = "" if fixed is None else fixed
    return True


def _walk(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.tag.is_private:
            continue
        if dictionary_is_retired(elem.tag) if dictionary_has_tag(elem.tag) else False:
            del ds[elem.tag]  # retired attributes are not copied into new objects
            continue
        if elem.VR == "SQ":
            items = elem.value or []
            for item in items:
                _walk(item)
            continue
        if elem.VR in STRING_VRS:
            if not _fix_element(elem):
                del ds[elem.tag]
                continue
            if elem.value == "" and elem.keyword in _REMOVE_WHEN_EMPTY:
                del ds[elem.tag]


# Type 1/1C attributes of what we copy: an empty value is worse than none.
_REMOVE_WHEN_EMPTY = {
    "Laterality",
    "ImageLaterality",
    "BodyPartExamined",
    "FrameOfReferenceUID",
    "SpecificCharacterSet",
}


def safe_character_set(ds: Dataset) -> list[str] | str | None:
    """The source's Specific Character Set if pydicom knows every term, else ISO_IR 192 (UTF-8)."""
    raw = ds.get("SpecificCharacterSet")
    if raw in (None, ""):
        return None
    terms = list(raw) if isinstance(raw, (list, tuple, MultiValue)) else [raw]
    terms = [str(t).replace("\x00", "").strip().upper().replace("ISO-IR", "ISO_IR") for t in terms]
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            convert_encodings(terms)
    except Exception:
        return "ISO_IR 192"
    return terms if len(terms) > 1 else terms[0]


def _encodable(ds: Dataset, encodings: list[str]) -> bool:
    for elem in ds.iterall():
        if elem.VR in TEXT_VRS and isinstance(elem.value, (str, PersonName)) and elem.value:
            try:
                if elem.VR == "PN":
                    PersonName(str(elem.value)).encode(encodings)
                else:
                    encode_string(str(elem.value), encodings)
            except Exception:
                return False
    return True


def sanitize_dataset(ds: Dataset) -> Dataset:
    """Repairs every (non-private) string value of a source header in place and returns it.

    The Specific Character Set is kept when it is valid and can encode every value,
    otherwise the values (already decoded) are re-declared as ISO_IR 192 (UTF-8).
    """
    charset = safe_character_set(ds)
    try:
        ds.decode()  # decode with the source's own character set before anything changes
    except Exception:  # pragma: no cover - pydicom falls back with a warning for unknown sets
        log.warning("character set decoding failed for %s", ds.get("SOPInstanceUID", "?"))
    _walk(ds)
    for kw in ("PatientWeight", "PatientSize"):
        try:
            if kw in ds and ds[kw].value not in (None, "") and float(ds[kw].value) <= 0:
                del ds[kw]  # a zero weight or size means "unknown"
        except (TypeError, ValueError):
            del ds[kw]
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    if "PatientSex" in ds or "PatientName" in ds:
        ds.PatientSex = _SEX.get(sex, "")
    if charset is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        if not _encodable(ds, ["ascii"]):
            ds.SpecificCharacterSet = "ISO_IR 192"
    else:
        ds.SpecificCharacterSet = charset
        encodings = convert_encodings(list(charset) if isinstance(charset, list) else [charset])
        if not _encodable(ds, encodings):
            ds.SpecificCharacterSet = "ISO_IR 192"
    # Type 2 attributes of the patient/study modules our objects must carry
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        if kw not in ds:
            setattr(ds, kw, "" if kw != "PatientName" else None)
    return ds


def clean_text(value: Any, vr: str = "LO") -> str:
    """A free-text value (e.g. a description we copy into our own attribute), valid for ``vr``."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = " ".join(str(v) for v in value)
    s = _clean_text(str(value), vr).replace("\\", "/")
    return _truncate(s, vr)


def copy_character_set(target: Dataset, source: Dataset) -> None:
    """Gives ``target`` the (sanitised) Specific Character Set of ``source``.

    Applied after highdicom built the object: its own check rejects valid values such
    as an empty first value (``\\ISO 2022 IR 87``) or ``ISO 2022 IR 149``. Values are
    kept as text until the file is written, so they are encoded with this set.
    """
    charset = source.get("SpecificCharacterSet")
    if charset in (None, ""):
        if "SpecificCharacterSet" in target:
            del target.SpecificCharacterSet
    else:
        target.SpecificCharacterSet = charset
