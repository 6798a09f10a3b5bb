"""Header parsing and validation of a received instance (no database, no network).

- `read_header` parses only the header of the received dataset bytes (stops before the
  pixel data; honours Specific Character Set) into an `InstanceHeader`;
- `validate` checks it against the C-STORE request;
- `read_series_headers` reads the headers of a folder of files (``msknode routing explain``).

Both raise `IngestError` with the DICOM status to return (the constants below, PS3.4 B.2.3).
The database rows come next (`node.receive.index`), written by `node.receive.writer`.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.config import logger as pydicom_logger
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.filereader import ENCODED_VR, data_element_generator, read_dataset
from pydicom.misc import warn_and_log
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

from node.errors import IngestError
from node.intake.recognition import acquisition_from_dataset
from node.receive.storage import is_valid_uid

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (the peer retries later)
SOP_MISMATCH = 0xA900  # Error: data set does not match SOP class (or the request's instance)
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (unparseable data set)
MISSING_UID = 0xC001  # Error: cannot understand (a required UID is missing)
MALFORMED_UID = 0xC002  # Error: cannot understand (a UID is malformed)

DEFLATED_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

# demographics of the study row a resend may correct (audited by field name, never by value)
DEMOGRAPHIC_FIELDS = (
    "patient_name",
    "patient_id",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "study_date",
    "study_time",
    "study_description",
    "referring_physician",
    "specific_character_set",
)


class _Deferred:
    """A field whose value may be given as a `functools.partial`, called on first read (then kept).

    For what only the first instance of a series needs (its acquisition parameters, read for the
    series row): computed per instance it cost ~4 % of the listener's Python time."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_deferred_" + name

    def __get__(self, obj, owner=None):
        if obj is None:  # (the dataclass's default)
            return None
        value = obj.__dict__.get(self.slot)
        if isinstance(value, functools.partial):
            value = value()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj, value) -> None:  # (only through the frozen dataclass's __init__)
        obj.__dict__[self.slot] = value


@dataclass(frozen=True)
class InstanceHeader:
    """What the index needs from one instance. Text fields: None = absent, '' = present but empty."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    laterality: str | None = None
    series_number: int | None = None
    manufacturer: str | None = None
    instance_number: int | None = None
    image_position: str | None = None
    image_orientation: str | None = None
    number_of_frames: int | None = None
    expected_instances: int | None = None
    contributing_manufacturers: tuple[str, ...] = ()
    demographics: dict[str, str | None] = field(default_factory=dict)
    # the acquisition parameters routing recognises the series by (node.intake.recognition.Acquisition.to_json);
    # read from the header on first use
    acquisition: dict[str, Any] | None = _Deferred()  # type: ignore[assignment]

    def is_own_object(self, uid_root: str) -> bool:
        """Objects msknode made: our UID root, or our name as (contributing) manufacturer."""
        if self.sop_instance_uid.startswith(uid_root) or self.series_uid.startswith(uid_root):
            return True
        names = [self.manufacturer or "", *self.contributing_manufacturers]
        return any(n.strip().lower() == "msknode" for n in names)


# ---- header parsing ------------------------------------------------------------------------


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= 0x7FE00000


#: the elements before the pixel data are read into memory up to this size (a larger header is refused)
MAX_HEADER_BYTES = 64 * 1024 * 1024
_CHUNK = 1024 * 1024
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1", EXPLICIT_VR_BIG_ENDIAN, "1.2.840.10008.1.2.1.99"}
)


class _HeaderTooLarge(Exception):
    pass


class _InflatesTooLarge(Exception):
    pass


class _Seekable:
    """The data set in a seekable file (or bytes) from its current position: what pydicom reads the
    header from (at most `limit` bytes from the start) and what the tail check skips through."""

    def __init__(self, fp: BinaryIO, limit: int | None):
        self._fp = fp
        self._start = fp.tell()
        self.size = fp.seek(0, 2) - self._start
        fp.seek(self._start)
        self.limit = limit

    def tell(self) -> int:
        return self._fp.tell() - self._start

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: self._start, 1: self._fp.tell(), 2: self._start + self.size}[whence]
        return self._fp.seek(base + pos) - self._start

    def read(self, n: int = -1) -> bytes:
        pos = self.tell()
        if n is None or n < 0:
            n = self.size - pos
        if self.limit is not None and min(pos + n, self.size) > self.limit:
            raise _HeaderTooLarge()
        return self._fp.read(n)

    def skip(self, n: int) -> bool:
        """Moves `n` bytes on; False (and at the end) if the data set ends before."""
        pos = self.tell() + n
        if pos > self.size:
            self._fp.seek(self._start + self.size)
            return False
        self._fp.seek(self._start + pos)
        return True


class _Inflater:
    """A deflated data set (PS3.5 A.5) inflated as it is read, never more than `max_bytes` in all.

    While `limit` is set (the header) everything inflated so far is kept, up to `limit` bytes,
    so that pydicom may seek back; then (`limit` None) only what was not yet read is kept:
    the tail check skips through the rest in 1 MB steps."""

    def __init__(self, raw: BinaryIO, *, max_bytes: int, limit: int | None):
        self._raw = raw
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._base = 0  # offset of _buf[0] in the inflated data
        self._pos = 0
        self._done = False
        self.max_bytes = max_bytes
        self.limit = limit
        self.size: int | None = None  # known once all is inflated

    @property
    def total(self) -> int:
        return self._base + len(self._buf)

    def _fill(self, upto: int) -> None:
        """Inflates until `upto` bytes are available (or the data ends)."""
        while self.total < upto and not self._done:
            if self.limit is not None and self.total > self.limit:
                raise _HeaderTooLarge()
            src = self._z.unconsumed_tail
            if not src:
                src = self._raw.read(64 * 1024)
                if not src or self._z.eof:
                    self._done = True
                    self.size = self.total
                    break
            out = self._z.decompress(src, min(_CHUNK, max(upto - self.total, 64 * 1024)))
            if self.total + len(out) > self.max_bytes:
                raise _InflatesTooLarge()
            self._buf += out
            if self._z.eof:
                self._done = True
                self.size = self.total

    def _trim(self) -> None:
        if self.limit is None and self._pos - self._base > _CHUNK:
            del self._buf[: self._pos - self._base]
            self._base = self._pos

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence == 2:
            self._fill(self.max_bytes + 1)
            pos += self.total
        if pos < self._base:
            raise OSError("cannot seek back in a deflated data set")
        self._pos = pos
        return pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = (self.limit if self.limit is not None else self.max_bytes) - self._pos + 1
        self._fill(self._pos + n)
        start = self._pos - self._base
        out = bytes(self._buf[start : start + n])
        self._pos += len(out)
        self._trim()
        return out

    def skip(self, n: int) -> bool:
        target = self._pos + n
        while self._pos < target:
            self._fill(min(target, self._pos + _CHUNK))
            step = min(target, self.total) - self._pos
            if step <= 0:
                return False
            self._pos += step
            self._trim()
        return True


def read_header(
    data: bytes | bytearray | memoryview | BinaryIO, transfer_syntax_uid: str, *, max_bytes: int | None = None
) -> InstanceHeader:
    """Parses the header of a received data set (no pixel decoding) and checks the rest is complete.

    `data`: the data set's bytes (a bytearray or memoryview is read in place, never copied
    whole), or a seekable file positioned at its start. `max_bytes`: the largest data set
    accepted once inflated (deflated transfer syntaxes are inflated as they are read, never
    more than that). Raises `IngestError`: 0xA700 when the data set inflates to
    more than `max_bytes` (or its header is over `MAX_HEADER_BYTES`), 0xA900 when the pixel
    data contradicts the header (`check_pixel_data`), 0xC000 cannot understand (truncated,
    unparseable), 0xC001 missing UID, 0xC002 malformed UID.
    """
    try:
        ds, pixels = _parse(data, str(transfer_syntax_uid), max_bytes=max_bytes)
        uids = {k: _text(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    except IngestError:
        raise
    except _InflatesTooLarge:
        assert max_bytes is not None
        raise IngestError(
            OUT_OF_RESOURCES, f"the data set would inflate to more than {max_bytes // 2**20} MB"
        ) from None
    except _HeaderTooLarge:
        raise IngestError(
            OUT_OF_RESOURCES, f"the elements before the pixel data exceed {MAX_HEADER_BYTES // 2**20} MB"
        ) from None
    except Exception as e:  # pydicom raises many types for broken input
        raise IngestError(CANNOT_UNDERSTAND, f"cannot parse the data set: {type(e).__name__}") from None
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise IngestError(MISSING_UID, f"missing {', '.join(missing)}")
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        raise IngestError(MALFORMED_UID, f"malformed {', '.join(bad)}")
    if pixels is not None:
        check_pixel_data(ds, str(transfer_syntax_uid), pixels)
    try:
        return _header_from(ds, uids)
    except Exception as e:
        raise IngestError(CANNOT_UNDERSTAND, f"cannot read the header: {type(e).__name__}") from None


def _parse(
    data: bytes | bytearray | memoryview | BinaryIO, ts: str, *, max_bytes: int | None
) -> tuple[Dataset, PixelDataShape | None]:
    """The header (up to the pixel data) and what the rest held of the pixel data element.

    Bytes in memory (not deflated) are walked by `_read_buffer`, which gives what pydicom's
    `read_dataset` gives for a fraction of its cost per element; a file, a deflated data set
    and any data set `_read_buffer` leaves to pydicom are read by pydicom (`_parse_file`)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        with memoryview(data) as given:
            if given.c_contiguous:
                with given.cast("B") as view:  # (released on return: the caller may reuse its buffer)
                    if ts in DEFLATED_TRANSFER_SYNTAXES:  # (inflated as read, from the buffer itself)
                        return _parse_file(cast(BinaryIO, _MemoryFile(view)), ts, max_bytes=max_bytes)
                    return _parse_buffer(data, view, ts)
    return _parse_pydicom(data, ts, max_bytes=max_bytes)


def _parse_pydicom(
    data: bytes | bytearray | memoryview | BinaryIO, ts: str, *, max_bytes: int | None
) -> tuple[Dataset, PixelDataShape | None]:
    """`_parse` by pydicom alone (bytes are read through a ``BytesIO``, which copies a bytearray)."""
    raw: BinaryIO = BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return _parse_file(raw, ts, max_bytes=max_bytes)


def _parse_file(raw: BinaryIO, ts: str, *, max_bytes: int | None) -> tuple[Dataset, PixelDataShape | None]:
    """`_parse` of a data set in a file positioned at its start: pydicom reads the header."""
    fp: _Seekable | _Inflater
    if ts in DEFLATED_TRANSFER_SYNTAXES:
        fp = _Inflater(raw, max_bytes=max_bytes or 2**62, limit=MAX_HEADER_BYTES)
        fp._fill(8)
        short = fp.total < 8
    else:
        fp = _Seekable(raw, MAX_HEADER_BYTES)
        short = fp.size < 8
    implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
    little = ts != EXPLICIT_VR_BIG_ENDIAN
    if short:
        raise IngestError(CANNOT_UNDERSTAND, "the data set is empty or too short")
    ds = read_dataset(cast(BinaryIO, fp), implicit, little, stop_when=_stop_at_pixels)
    if len(ds) == 0:
        raise IngestError(CANNOT_UNDERSTAND, "no data elements")
    if any(_cut_short(element) for element in ds._dict.values()):
        raise IngestError(CANNOT_UNDERSTAND, "the data set is truncated")
    fp.limit = None  # the header is read: the rest is only skipped through
    return ds, _check_tail(fp, implicit=implicit, little=little)


class _MemoryFile:
    """A read-only file over a buffer that shares it (``BytesIO`` copies a bytearray); it reads,
    seeks and tells as ``BytesIO`` does."""

    def __init__(self, view: memoryview):
        self._view = view
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            if pos < 0:
                raise ValueError(f"negative seek value {pos}")
        else:
            pos = max(0, pos + (self._pos if whence == 1 else len(self._view)))
        self._pos = pos
        return pos

    def read(self, n: int | None = -1) -> bytes:
        start = self._pos
        out = bytes(self._view[start:] if n is None or n < 0 else self._view[start : start + n])
        self._pos = start + len(out)
        return out


class _PydicomReads(Exception):
    """The data set holds something `_read_buffer` leaves to pydicom's own reading of it all."""


_HEADS = {little: struct.Struct(("<" if little else ">") + "HH2sH") for little in (True, False)}
_IMPLICIT_HEADS = {little: struct.Struct(("<" if little else ">") + "HHL") for little in (True, False)}
_LENGTHS = {little: struct.Struct(("<" if little else ">") + "L") for little in (True, False)}
#: the VRs pydicom reads in explicit VR (ENCODED_VR): their name and whether a 4-byte length follows
_EXPLICIT_VRS = {
    code: (code.decode(default_encoding), code.decode(default_encoding) in EXPLICIT_VR_LENGTH_32)
    for code in ENCODED_VR
    if len(code) == 2
}
_CHARSET_TAG = 0x00080005
_EMPTY_VALUES: dict[bool, dict[str | None, Any]] = {}


def _empty_values() -> dict[str | None, Any]:
    """The value of a raw element of length 0 by VR: pydicom's `empty_value_for_VR` (raw), which
    depends on the VR and on `config.use_none_as_empty_text_VR_value` alone (b"" or None)."""
    setting = bool(pydicom_config.use_none_as_empty_text_VR_value)
    values = _EMPTY_VALUES.get(setting)
    if values is None:
        names: list[str | None] = [None, *(name for name, _ in _EXPLICIT_VRS.values())]
        values = _EMPTY_VALUES.setdefault(setting, {name: empty_value_for_VR(name, raw=True) for name in names})
    return values


def _parse_buffer(
    data: bytes | bytearray | memoryview, view: memoryview, ts: str
) -> tuple[Dataset, PixelDataShape | None]:
    """`_parse` of a data set in memory, not deflated (`view`: its bytes)."""
    implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
    little = ts != EXPLICIT_VR_BIG_ENDIAN
    if len(view) < 8:
        raise IngestError(CANNOT_UNDERSTAND, "the data set is empty or too short")
    fp = _Seekable(cast(BinaryIO, _MemoryFile(view)), MAX_HEADER_BYTES)
    try:
        elements, stop, truncated = _read_buffer(data, view, fp, implicit, little)
    except _PydicomReads:
        return _parse_file(cast(BinaryIO, _MemoryFile(view)), ts, max_bytes=None)
    ds = Dataset(elements, parent_encoding=default_encoding)  # (what `read_dataset` makes of them)
    encoding: str | MutableSequence[str] = default_encoding
    if _CHARSET_TAG in elements:
        charset = convert_raw_data_element(cast(RawDataElement, elements[BaseTag(_CHARSET_TAG)])).value
        encoding = convert_encodings(cast("str | MutableSequence[str] | None", charset))
    ds.set_original_encoding(implicit, little, encoding)
    if len(ds) == 0:
        raise IngestError(CANNOT_UNDERSTAND, "no data elements")
    if truncated:
        raise IngestError(CANNOT_UNDERSTAND, "the data set is truncated")
    fp.limit = None  # the header is read: the rest is only skipped through
    fp.seek(stop)  # (where pydicom's reading would have left it)
    return ds, _check_tail(fp, implicit=implicit, little=little)


def _read_buffer(
    data: bytes | bytearray | memoryview, view: memoryview, fp: _Seekable, implicit: bool, little: bool
) -> tuple[dict[BaseTag, RawDataElement | DataElement], int, bool]:
    """The top-level elements before the pixel data, as pydicom's `read_dataset` reads them with
    `_stop_at_pixels` through `fp` (a `_Seekable` of `view`); where it stops (at the element
    pydicom's `stop_when` rewinds to, after an item delimitation item, or at the end); whether a
    value is cut short by the end of the data.

    The element headers are unpacked straight from the buffer: pydicom's generator pays a few
    file calls and a `stop_when` call per element, most of the header's reading time. What is
    rare is read by pydicom's generator itself, from where it starts, so that the result stays
    pydicom's own: an undefined-length element (a sequence, or a value up to its delimiter),
    after which this walk goes on; everything from an explicit VR pydicom does not know (or a
    switch to implicit VR) or a 4-byte length cut short. A first element whose VR encoding is not
    the transfer syntax's, or pydicom's debugging output, raise `_PydicomReads` (before anything
    is read: pydicom then reads it all). Raises `_HeaderTooLarge` where a `_Seekable` of
    `MAX_HEADER_BYTES` would.
    """
    if pydicom_config.debugging:
        raise _PydicomReads()
    size = len(view)
    # `_Seekable.read` refuses a read ending past MAX_HEADER_BYTES when the data set is larger:
    # a read ending past `bound` is either that or the end of the data
    large = size > MAX_HEADER_BYTES
    bound = MAX_HEADER_BYTES if large else size
    found_implicit = not (0x40 < view[4] < 0x5B and 0x40 < view[5] < 0x5B)  # (pydicom's `_is_implicit_vr`)
    if found_implicit != implicit:
        raise _PydicomReads()
    buf: bytes | memoryview = data if type(data) is bytes else view  # (a bytes slice is one copy, not two)
    copy = type(data) is not bytes
    head = (_IMPLICIT_HEADS if implicit else _HEADS)[little].unpack_from
    long_length = _LENGTHS[little].unpack_from
    explicit_vrs = _EXPLICIT_VRS
    raw_element = tuple.__new__  # (RawDataElement's own __new__ is a Python function)
    empty_values = _empty_values()
    tag_objects = _TAG_OBJECTS
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    encoding: str | MutableSequence[str] = default_encoding
    vr: str | None = None
    pos = 0
    while True:
        value_tell = pos + 8
        if value_tell > bound:
            if large:
                raise _HeaderTooLarge()
            return elements, size, False
        if implicit:
            group, elem, length = head(buf, pos)
        else:
            group, elem, code, length = head(buf, pos)
            known = explicit_vrs.get(code)
            if known is None:
                return _read_rest(fp, pos, implicit, little, encoding, elements)
            vr, long = known
            if long:
                value_tell += 4
                if value_tell > bound:
                    return _read_rest(fp, pos, implicit, little, encoding, elements)
                (length,) = long_length(buf, pos + 8)
        tag = group << 16 | elem
        if tag >= 0x7FE00000:
            return elements, value_tell if tag == 0xFFFEE00D else pos, False
        if length == 0xFFFFFFFF:
            fp.seek(pos)
            if _pydicom_reads(fp, implicit, little, encoding, elements, one=True):
                return elements, fp.tell(), False
            pos = fp.tell()
            continue
        end = value_tell + length
        if length:
            if end > bound and large:
                raise _HeaderTooLarge()
            value: Any = bytes(buf[value_tell:end]) if copy else buf[value_tell:end]
        else:
            value = empty_values[vr]
        if tag == _CHARSET_TAG:  # (the encoding the generator hands on to sequences)
            encoding = convert_encodings(convert_string(cast(bytes, value) or b"", little))
        key = tag_objects.get(tag)
        if key is None:
            key = BaseTag(tag)
        elements[key] = raw_element(RawDataElement, (key, vr, length, value, value_tell, implicit, little, True, False))
        if end > size:
            return elements, size, True
        pos = end


def _pydicom_reads(
    fp: _Seekable,
    implicit: bool,
    little: bool,
    encoding: str | MutableSequence[str],
    elements: dict[BaseTag, RawDataElement | DataElement],
    *,
    one: bool,
) -> bool:
    """pydicom's generator reads from the position of `fp` into `elements`, as within `read_dataset`:
    one element (`one`) or all the rest. True when reading is over: the rest is read, or pydicom
    met what ends `read_dataset` (an EOFError or NotImplementedError: like it, nothing is kept)."""
    try:
        for element in data_element_generator(cast(BinaryIO, fp), implicit, little, _stop_at_pixels, None, encoding):
            elements[element.tag] = element
            if one:
                return False
    except EOFError as details:
        if pydicom_config.settings.reading_validation_mode == pydicom_config.RAISE:
            raise
        warn_and_log(f"{details} in file {getattr(fp, 'name', '<no filename>')}", UserWarning)
        elements.clear()
    except NotImplementedError as details:
        pydicom_logger.error(details)
        elements.clear()
    return True


def _read_rest(
    fp: _Seekable,
    pos: int,
    implicit: bool,
    little: bool,
    encoding: str | MutableSequence[str],
    elements: dict[BaseTag, RawDataElement | DataElement],
) -> tuple[dict[BaseTag, RawDataElement | DataElement], int, bool]:
    """`_read_buffer`'s answer when pydicom's generator reads everything from `pos` on."""
    fp.seek(pos)
    _pydicom_reads(fp, implicit, little, encoding, elements, one=False)
    return elements, fp.tell(), any(_cut_short(element) for element in elements.values())


def _cut_short(element: RawDataElement | DataElement) -> bool:
    """A value cut short by the end of the data."""
    length, value = getattr(element, "length", None), getattr(element, "value", None)
    return length is not None and length != 0xFFFFFFFF and isinstance(value, bytes) and len(value) < length


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


@dataclass(frozen=True)
class PixelDataShape:
    """What the tail check saw of (7FE0,0010): its length (native) or its items (encapsulated)."""

    length: int | None  # None: undefined length (encapsulated)
    items: int = 0  # encapsulated: items including the basic offset table


def _check_tail(fp: _Seekable | _Inflater, *, implicit: bool, little: bool) -> PixelDataShape | None:
    """Checks that the elements after the header (pixel data ...) are complete, without keeping them.

    Walks element headers and lengths only: a truncated data set is refused here instead of
    being stored. An undefined-length element other than encapsulated pixel data ends the check.
    Returns what it saw of the pixel data element (None if there is none).
    """
    e = "<" if little else ">"
    pixels: PixelDataShape | None = None

    def truncated() -> IngestError:
        return IngestError(CANNOT_UNDERSTAND, "the data set is truncated")

    while True:
        head = fp.read(8)
        if not head:
            return pixels
        if len(head) < 8:
            raise truncated()
        group, element = struct.unpack_from(e + "HH", head)
        if implicit:
            (length,) = struct.unpack_from(e + "L", head, 4)
        elif head[4:6] in _LONG_VRS:
            more = fp.read(4)
            if len(more) < 4:
                raise truncated()
            (length,) = struct.unpack(e + "L", more)
        else:
            (length,) = struct.unpack_from(e + "H", head, 6)
        is_pixels = (group, element) == (0x7FE0, 0x0010)
        if length != 0xFFFFFFFF:
            if is_pixels:
                pixels = PixelDataShape(length)
            if not fp.skip(length):
                raise truncated()
            continue
        if not is_pixels:
            return pixels
        items = 0
        while True:  # encapsulated pixel data: items of defined length, then a sequence delimiter
            item = fp.read(8)
            if len(item) < 8:
                raise truncated()
            tag = struct.unpack_from(e + "HH", item)
            (length,) = struct.unpack_from(e + "L", item, 4)
            if tag == _SEQUENCE_END:
                break
            if tag != _ITEM or length == 0xFFFFFFFF:
                raise IngestError(CANNOT_UNDERSTAND, "malformed encapsulated pixel data")
            items += 1
            if not fp.skip(length):
                raise truncated()
        pixels = PixelDataShape(None, items)


def check_pixel_data(ds: Dataset, transfer_syntax_uid: str, pixels: PixelDataShape) -> None:
    """The pixel data must be what the header says (else 0xA900, data set does not match the SOP class).

    Native transfer syntaxes: a defined length of Rows x Columns x Samples per Pixel x Number of
    Frames x Bits Allocated / 8 bytes (Bits Allocated 1: packed bits, rounded up to a byte), plus
    one pad byte when that is odd. Encapsulated: a basic offset table item and at least one fragment.
    """

    def mismatch(reason: str) -> IngestError:
        return IngestError(SOP_MISMATCH, f"pixel data does not match the header: {reason}")

    native = transfer_syntax_uid in NATIVE_TRANSFER_SYNTAXES
    if pixels.length is None:
        if native:
            raise mismatch("encapsulated pixel data in a native transfer syntax")
        if pixels.items < 2:
            raise mismatch(f"{max(pixels.items - 1, 0)} fragments (a basic offset table and at least one expected)")
        return
    if not native:
        raise mismatch("native pixel data in an encapsulated transfer syntax")
    values = {k: _int(ds, k) for k in ("Rows", "Columns", "BitsAllocated")}
    absent = [k for k, v in values.items() if v is None]
    if absent:
        raise mismatch(f"no {', '.join(absent)}")
    rows, columns, bits = (int(values[k] or 0) for k in ("Rows", "Columns", "BitsAllocated"))
    samples = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    if min(rows, columns, bits, samples, frames) < 1 or (bits != 1 and bits % 8):
        raise mismatch(f"{rows} x {columns}, {samples} samples, {bits} bits, {frames} frames")
    pixel_count = rows * columns * samples * frames
    expected = (pixel_count + 7) // 8 if bits == 1 else pixel_count * bits // 8
    if pixels.length not in (expected, expected + expected % 2):
        raise mismatch(
            f"{pixels.length} bytes for {rows} x {columns} x {samples} samples x {frames} frames"
            f" of {bits} bits ({expected} expected)"
        )


# VRs whose printable-ASCII value pydicom returns as the same text (no charset, no number
# conversion that could fail): read straight from the raw element, without building a DataElement
_PLAIN_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "LO", "PN", "SH", "TM", "UI"})
_PRINTABLE = frozenset(range(0x20, 0x7F))
_TAGS: dict[str, tuple[BaseTag, str | None] | None] = {}
#: the tag objects of `_TAGS` by value: `_read_buffer` files its elements under them, so that a
#: lookup by keyword finds its key by identity (an equal BaseTag costs a call of its Python ``__eq__``)
_TAG_OBJECTS: dict[int, BaseTag] = {}


def _tag(keyword: str) -> tuple[BaseTag, str | None] | None:
    """The tag of a keyword and its VR in pydicom's dictionary, the VR pydicom gives a raw
    implicit-VR element of it (None if the dictionary has several); None for a keyword pydicom
    looks up itself (a repeating group)."""
    if keyword not in _TAGS:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        found = tag_for_keyword(keyword)
        if found is None:
            _TAGS[keyword] = None
        else:
            tag = _TAG_OBJECTS.setdefault(int(found), BaseTag(found))
            try:
                vr: str | None = str(dictionary_VR(tag))
            except KeyError:
                vr = None
            _TAGS[keyword] = (tag, vr)
    return _TAGS[keyword]


def _raw_element(ds: Dataset, keyword: str) -> tuple[bool, Any, str | None]:
    """(found, element, VR) of a keyword for the plain readings: (True, None, None) when absent;
    (False, ...) when pydicom must look it up or convert it (not a raw element); the VR is
    the element's, or for an implicit-VR element the dictionary's (pydicom's `raw_element_vr`)."""
    found = _tag(keyword)
    if found is None:  # (a repeating-group keyword: pydicom looks it up)
        return False, None, None
    tag, dictionary_vr = found
    elem = ds._dict.get(tag)
    if elem is None:
        return True, None, None
    if not getattr(elem, "is_raw", False):
        return False, None, None
    vr = getattr(elem, "VR", None)
    return True, elem, dictionary_vr if vr is None else vr


def _plain_text(ds: Dataset, keyword: str) -> tuple[bool, str | None]:
    """(True, value) when the element is absent or a raw element of a plain VR with a
    printable-ASCII value: its text as pydicom would give it (components stripped, trailing
    NULs and spaces dropped; '' when empty); (False, None) when pydicom must convert it."""
    found, elem, vr = _raw_element(ds, keyword)
    if not found or elem is None:
        return found, None
    if vr not in _PLAIN_VRS:
        return False, None
    if getattr(elem, "length", None) == 0:  # (pydicom's value: '', None or an empty name: all '')
        return True, ""
    raw = getattr(elem, "value", None)
    if not isinstance(raw, bytes):
        return False, None
    raw = raw.rstrip(b"\0 ")
    if not _PRINTABLE.issuperset(raw):
        return False, None
    text = raw.decode("ascii")
    parts = [part.strip() for part in text.split("\\")] if "\\" in text else [text.strip()]
    if vr == "DS" and not all(_is_decimal(part) for part in parts):
        return False, None  # (pydicom refuses it: `_safe_text` answers None)
    return True, "\\".join(parts)


def _is_decimal(text: str) -> bool:
    """A DS value pydicom keeps as written (its text back from ``str``): a number ``float`` reads."""
    try:
        float(text)
    except ValueError:
        return False
    return True


_NOT_PLAIN = object()


def _plain_int(ds: Dataset, keyword: str) -> Any:
    """`_int` of an absent element, of a raw IS element whose printable-ASCII value ``int``
    reads, of a raw little-endian US element of one value or of an empty raw element of either
    VR, without pydicom converting it; `_NOT_PLAIN` when pydicom must."""
    found, elem, vr = _raw_element(ds, keyword)
    if not found:
        return _NOT_PLAIN
    if elem is None:
        return None
    if vr != "US" and vr != "IS":
        return _NOT_PLAIN
    if getattr(elem, "length", None) == 0:  # (pydicom's value: None)
        return None
    raw = getattr(elem, "value", None)
    if not isinstance(raw, bytes):
        return _NOT_PLAIN
    if vr == "US":
        if len(raw) == 2 and getattr(elem, "is_little_endian", False):
            return raw[0] | raw[1] << 8
        return _NOT_PLAIN
    raw = raw.rstrip(b"\0 ")
    if not raw:
        return None
    if b"\\" in raw or not _PRINTABLE.issuperset(raw):
        return _NOT_PLAIN
    try:
        return int(raw.decode("ascii"))
    except ValueError:
        return _NOT_PLAIN  # ("1.0": pydicom's IS reads it)


def _text(ds: Dataset, keyword: str) -> str | None:
    """A text value: None if absent, '' if empty; multi-valued joined with backslash."""
    plain, text = _plain_text(ds, keyword)
    if plain:
        return text
    return pydicom_text(ds, keyword)


def pydicom_text(ds: Dataset, keyword: str) -> str | None:
    """A text value as pydicom converts it (what `_text` answers when the raw value is not plain)."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_fmt(v) for v in value)
    return _fmt(value).strip()


def _fmt(v: Any) -> str:
    return str(v).strip()  # DS/IS keep their original text


def _int(ds: Dataset, keyword: str) -> int | None:
    plain = _plain_int(ds, keyword)
    if plain is not _NOT_PLAIN:
        return plain
    return pydicom_int(ds, keyword)


def pydicom_int(ds: Dataset, keyword: str) -> int | None:
    """An integer value as pydicom converts it (None when absent, empty or not an integer)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _safe_text(ds: Dataset, keyword: str) -> str | None:
    try:
        return _text(ds, keyword)
    except Exception:  # an undecodable or invalid value is not a reason to refuse the object
        return None


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """The `InstanceHeader` of a dataset read elsewhere (e.g. a file read with ``stop_before_pixels``).

    Raises `IngestError` as `read_header` does for missing or malformed UIDs.
    """
    uids = {k: _safe_text(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise IngestError(MISSING_UID, f"missing {', '.join(missing)}")
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        raise IngestError(MALFORMED_UID, f"malformed {', '.join(bad)}")
    header = _header_from(ds, uids)
    header.acquisition  # noqa: B018 - read now: the caller may change or drop `ds`
    return header


#: `read_series_headers` reads at most this many files of a folder
MAX_SERIES_FILES = 4000


def read_series_headers(path: Path | str, *, max_files: int = MAX_SERIES_FILES) -> tuple[list[InstanceHeader], int]:
    """The headers of a DICOM file, or of the files of one folder (not its subfolders), and how many were skipped.

    Reads each file's header only (pydicom stops before the pixel data); files that are not
    DICOM, or lack the UIDs of an instance, are skipped. Raises `IngestError` (0xC000) when
    the path is neither a file nor a folder, or the folder holds more than ``max_files`` files.
    """
    from pydicom import dcmread

    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = []
        for entry in sorted(p.iterdir()):
            if entry.is_file():
                files.append(entry)
                if len(files) > max_files:
                    raise IngestError(
                        CANNOT_UNDERSTAND, f"{p} holds more than {max_files} files: give the folder of one series"
                    )
    else:
        raise IngestError(CANNOT_UNDERSTAND, f"{p} is neither a file nor a folder")
    from pydicom import config as pydicom_config

    headers: list[InstanceHeader] = []
    skipped = 0
    mode = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE  # odd values: no warning per file
    try:
        for f in files:
            try:
                ds = dcmread(f, stop_before_pixels=True)
                headers.append(header_from_dataset(ds))
            except Exception:  # not DICOM, unreadable, or not an instance: skipped (and counted)
                skipped += 1
    finally:
        pydicom_config.settings.reading_validation_mode = mode
    return headers, skipped


def _acquisition(ds: Dataset) -> dict[str, Any] | None:
    """The acquisition parameters (header only, bounded); None when there are none or they cannot be read."""
    try:
        return acquisition_from_dataset(ds).to_json() or None
    except Exception:  # odd values are no reason to refuse the object: routing falls back on the text
        return None


def _header_from(ds: Dataset, uids: dict[str, str | None]) -> InstanceHeader:
    laterality = _safe_text(ds, "Laterality") or _safe_text(ds, "ImageLaterality")
    frames = _int(ds, "NumberOfFrames")
    expected = _int(ds, "ImagesInAcquisition") or _int(ds, "NumberOfSeriesRelatedInstances")
    contributing: list[str] = []
    try:
        for item in ds.get("ContributingEquipmentSequence") or []:
            if "Manufacturer" in item:
                contributing.append(str(item.Manufacturer))
    except Exception:
        pass
    demographics = {
        "patient_name": _safe_text(ds, "PatientName"),
        "patient_id": _safe_text(ds, "PatientID"),
        "patient_birth_date": _safe_text(ds, "PatientBirthDate"),
        "patient_sex": _safe_text(ds, "PatientSex"),
        "accession_number": _safe_text(ds, "AccessionNumber"),
        "study_date": _safe_text(ds, "StudyDate"),
        "study_time": _safe_text(ds, "StudyTime"),
        "study_description": _safe_text(ds, "StudyDescription"),
        "referring_physician": _safe_text(ds, "ReferringPhysicianName"),
        "specific_character_set": _safe_text(ds, "SpecificCharacterSet"),
    }
    return InstanceHeader(
        sop_class_uid=str(uids["SOPClassUID"]),
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        study_uid=str(uids["StudyInstanceUID"]),
        series_uid=str(uids["SeriesInstanceUID"]),
        modality=_safe_text(ds, "Modality"),
        body_part=_safe_text(ds, "BodyPartExamined"),
        series_description=_safe_text(ds, "SeriesDescription"),
        protocol_name=_safe_text(ds, "ProtocolName"),
        laterality=laterality,
        series_number=_int(ds, "SeriesNumber"),
        manufacturer=_safe_text(ds, "Manufacturer"),
        instance_number=_int(ds, "InstanceNumber"),
        image_position=_safe_text(ds, "ImagePositionPatient"),
        image_orientation=_safe_text(ds, "ImageOrientationPatient"),
        number_of_frames=frames,
        expected_instances=expected if expected and expected > 0 else None,
        contributing_manufacturers=tuple(contributing),
        demographics=demographics,
        acquisition=functools.partial(_acquisition, ds),  # type: ignore[arg-type]
    )


def validate(header: InstanceHeader, *, request_sop_class_uid: str, request_sop_instance_uid: str) -> None:
    """The data set must be the object the C-STORE request announced (else 0xA900)."""
    if header.sop_class_uid != str(request_sop_class_uid).strip("\0 "):
        raise IngestError(SOP_MISMATCH, "SOP Class UID of the data set differs from the request")
    if header.sop_instance_uid != str(request_sop_instance_uid).strip("\0 "):
        raise IngestError(SOP_MISMATCH, "SOP Instance UID of the data set differs from the request")
