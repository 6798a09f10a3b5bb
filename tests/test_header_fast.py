"""`read_header` walks a data set in memory itself (`_read_buffer`) and gives exactly what pydicom's
`read_dataset` gives (`_parse_pydicom`): the same elements, warnings, errors and headers, for every
file of pydicom's test data, generated and real MR, and broken variants of them."""

from __future__ import annotations

import random
import struct
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config
from pydicom import filereader
from pydicom.data import get_testdata_files
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info

import node.receive.header as header
from node.errors import IngestError

pytestmark = [pytest.mark.unit]

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = header.IMPLICIT_VR_LITTLE_ENDIAN
EXPLICIT_BE = header.EXPLICIT_VR_BIG_ENDIAN
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


# ---- comparing the two readings ------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> tuple[Any, Any, list[tuple[type, str]]]:
    """(result, error, warnings) of a call: the error as what identifies it (type, status, text)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = call(), None
        except IngestError as e:
            result, error = None, ("IngestError", e.status, str(e))
        except Exception as e:
            result, error = None, (type(e).__name__, str(e))
    return result, error, [(w.category, str(w.message)) for w in caught]


def _json(ds: Dataset) -> Any:
    try:
        return ds.to_json_dict()
    except Exception as e:
        return type(e).__name__


def _assert_same_dataset(a: Dataset, b: Dataset, where: str) -> None:
    assert list(a._dict) == list(b._dict), where
    for attr in (
        "_parent_encoding",
        "_read_implicit",
        "_read_little",
        "_read_charset",
        "is_undefined_length_sequence_item",
        "file_tell",
        "seq_item_tell",
    ):
        assert getattr(a, attr, None) == getattr(b, attr, None), (where, attr)
    for tag, x in a._dict.items():
        y = b._dict[tag]
        here = f"{where} ({int(tag):08X})"
        assert type(x) is type(y), here
        assert type(x.tag) is type(y.tag), here
        if isinstance(x, RawDataElement):
            assert tuple(x) == tuple(y), here  # tag, VR, length, value, value_tell, implicit, little, ...
            assert type(x.value) is type(y.value) and type(x.VR) is type(y.VR), here
            continue
        assert isinstance(x, DataElement) and isinstance(y, DataElement)
        assert (x.tag, x.VR, x.file_tell, x.is_undefined_length) == (y.tag, y.VR, y.file_tell, y.is_undefined_length)
        if x.VR == "SQ":
            assert len(x.value) == len(y.value), here
            assert x.value.is_undefined_length == y.value.is_undefined_length, here
            for i, (p, q) in enumerate(zip(x.value, y.value, strict=True)):
                _assert_same_dataset(p, q, f"{here} item {i}")
        else:
            assert x.value == y.value and type(x.value) is type(y.value), here


def _as(kind: str, data: bytes) -> bytes | bytearray | memoryview:
    return {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(bytearray(data))}[kind]


@contextmanager
def _parse_as_before() -> Iterator[None]:
    """`read_header` with pydicom reading the whole header (what it did before `_read_buffer`)."""
    fast = header._parse
    header._parse = header._parse_pydicom
    try:
        yield
    finally:
        header._parse = fast


@contextmanager
def _validation_mode(mode: int) -> Iterator[None]:
    before = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = mode
    try:
        yield
    finally:
        pydicom_config.settings.reading_validation_mode = before


class _Paths:
    """Counts the data sets `_parse` leaves to pydicom's own reading."""

    def __init__(self) -> None:
        self.fast = self.pydicom = 0

    @contextmanager
    def count(self) -> Iterator[None]:
        read_file = header._parse_file
        used: list[bool] = []

        def spy(*args: Any, **kwargs: Any) -> Any:
            used.append(True)
            return read_file(*args, **kwargs)

        header._parse_file = spy
        try:
            yield
        finally:
            header._parse_file = read_file
            if used:
                self.pydicom += 1
            else:
                self.fast += 1


def _check(
    data: bytes, ts: str, *, kinds: tuple[str, ...] = ("bytes", "bytearray"), paths: _Paths | None = None
) -> Any:
    """Asserts that `_parse` and `read_header` give what pydicom alone gives; returns that header (or error)."""
    old, old_error, old_warnings = _outcome(lambda: header._parse_pydicom(data, ts, max_bytes=None))
    with _parse_as_before():
        old_header = _outcome(lambda: header.read_header(data, ts))
    read: list[Dataset] = []
    for kind in kinds:
        given = _as(kind, data)
        with paths.count() if paths is not None else nullcontext():
            new, new_error, new_warnings = _outcome(lambda given=given: header._parse(given, ts, max_bytes=None))
        where = f"{kind} of {len(data)} bytes, {ts}"
        assert new_error == old_error, where
        assert new_warnings == old_warnings, where
        if old is not None:
            _assert_same_dataset(new[0], old[0], where)
            assert new[1] == old[1], where
            read.append(new[0])
        new_header = _outcome(lambda given=given: header.read_header(given, ts))
        assert new_header == old_header, where
        if isinstance(given, bytearray):
            given.extend(b"\0")  # (no view of the buffer outlives the call)
    if old is not None:  # (last: converting the values changes the datasets)
        assert all(_json(ds) == _json(old[0]) for ds in read)
    return old_header[0] or old_header[1]


# ---- data sets -----------------------------------------------------------------------------


def _dataset_bytes(path: str | Path) -> tuple[bytes, str] | None:
    """The data set after the file meta of a DICOM file, and its transfer syntax (None: no meta)."""
    raw = Path(path).read_bytes()
    if raw[128:132] != b"DICM":
        return None
    fp = BytesIO(raw)
    fp.seek(132)
    try:
        meta = _read_file_meta_info(fp)
    except Exception:
        return None
    return raw[fp.tell() :], str(meta.get("TransferSyntaxUID", "") or "")


def _element(tag: int, vr: str, value: bytes, *, implicit: bool, little: bool = True, undefined: bool = False) -> bytes:
    e = "<" if little else ">"
    length = 0xFFFFFFFF if undefined else len(value)
    if implicit:
        return struct.pack(e + "HHL", tag >> 16, tag & 0xFFFF, length) + value
    if vr.encode() in header._LONG_VRS:
        return struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length) + value
    return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length) + value


def _item(body: bytes, *, little: bool = True, undefined: bool = False) -> bytes:
    e = "<" if little else ">"
    if undefined:
        return struct.pack(e + "HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0)
    return struct.pack(e + "HHL", 0xFFFE, 0xE000, len(body)) + body


def _delimiter(little: bool = True) -> bytes:
    return struct.pack(("<" if little else ">") + "HHL", 0xFFFE, 0xE0DD, 0)


def _text(value: str, encoding: str = "latin-1") -> bytes:
    raw = value.encode(encoding)
    return raw + b" " * (len(raw) % 2)


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def _crafted(
    *,
    implicit: bool,
    little: bool = True,
    charset: bytes = b"ISO_IR 100",
    name: str = "Müller^Jörg",
    encoding: str = "latin-1",
    undefined_sequence: bool = True,
    undefined_value: bool = True,
    extra: bytes = b"",
) -> bytes:
    """An MR data set with what the walk hands to pydicom: an undefined-length sequence (items of
    undefined and defined length, non-ASCII names in the Specific Character Set), an undefined-
    length private value, a defined-length sequence; then 4 x 4 16-bit pixels."""

    def el(tag: int, vr: str, value: bytes, undefined: bool = False) -> bytes:
        return _element(tag, vr, value, implicit=implicit, little=little, undefined=undefined)

    item_a = el(0x00081150, "UI", _uid(MR_STORAGE)) + el(0x00100010, "PN", _text(name, encoding))
    item_b = el(0x00081155, "UI", _uid("1.2.3.4")) + el(0x00081030, "LO", _text("Étude", encoding))
    if undefined_sequence:
        sequence = el(
            0x00081111, "SQ", _item(item_a, little=little, undefined=True) + _item(item_b, little=little), True
        )
        sequence += _delimiter(little)
    else:
        sequence = el(0x00081111, "SQ", _item(item_a, little=little) + _item(item_b, little=little))
    private = el(0x00290010, "LO", _text("ACME PRIVATE"))
    if undefined_value:
        private += el(0x00291010, "OB", b"\x01\x02\x03\x04\x05\x06", True) + _delimiter(little)
    pixels = struct.pack(("<" if little else ">") + "16H", *range(16))
    e = "<" if little else ">"
    return b"".join(
        [
            el(0x00080005, "CS", _text(charset.decode("latin-1"))),
            el(0x00080016, "UI", _uid(MR_STORAGE)),
            el(0x00080018, "UI", _uid("1.2.826.0.1.3680043.8.498.1")),
            el(0x00080020, "DA", b""),
            el(0x00080060, "CS", _text("MR")),
            el(0x00080070, "LO", _text("ACME")),
            sequence,
            el(0x00100010, "PN", _text(name, encoding)),
            el(0x0020000D, "UI", _uid("1.2.826.0.1.3680043.8.498.2")),
            el(0x0020000E, "UI", _uid("1.2.826.0.1.3680043.8.498.3")),
            el(0x00200013, "IS", _text("7")),
            el(0x00280002, "US", struct.pack(e + "H", 1)),
            el(0x00280010, "US", struct.pack(e + "H", 4)),
            el(0x00280011, "US", struct.pack(e + "H", 4)),
            el(0x00280100, "US", struct.pack(e + "H", 16)),
            private,
            el(0x00400275, "SQ", _item(el(0x00401001, "SH", _text("RP1")), little=little)),
            extra,
            el(0x7FE00010, "OW", pixels),
        ]
    )


CRAFTED = [
    (_crafted(implicit=False), EXPLICIT_LE),
    (_crafted(implicit=True), IMPLICIT_LE),
    (_crafted(implicit=False, little=False), EXPLICIT_BE),
    (_crafted(implicit=False, charset=b"ISO_IR 192", name="Łukasz^Żółw", encoding="utf-8"), EXPLICIT_LE),
    (_crafted(implicit=True, charset=b"\\ISO 2022 IR 100", name="Müller^Jörg"), IMPLICIT_LE),
    (_crafted(implicit=False, charset=b"NOT A CHARSET", name="Müller"), EXPLICIT_LE),
    (_crafted(implicit=True, undefined_sequence=False, undefined_value=False), IMPLICIT_LE),
]


@pytest.fixture(scope="module")
def generated_mr(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, str]]:
    from node.demo.bench_ingest import generate_mr_set

    out = tmp_path_factory.mktemp("mr")
    found = [_dataset_bytes(p) for p in generate_mr_set(out, 2)]
    return [f for f in found if f is not None]


def _test_files() -> list[tuple[str, bytes, str]]:
    out = []
    for path in sorted(get_testdata_files()):
        found = _dataset_bytes(path) if Path(path).is_file() else None
        if found is not None:
            out.append((Path(path).name, *found))
    return out


# ---- the tests -----------------------------------------------------------------------------


def test_every_test_file_reads_the_same_and_almost_all_without_pydicom():
    files = _test_files()
    assert len(files) > 100
    paths = _Paths()
    for name, data, ts in files:
        try:
            _check(data, ts, paths=paths if ts not in header.DEFLATED_TRANSFER_SYNTAXES else None)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    # (pydicom reads two of them itself: one without a transfer syntax, in implicit VR; one cut in a 4-byte length)
    assert paths.fast > 200 and paths.pydicom <= paths.fast // 50, (paths.fast, paths.pydicom)


def test_generated_mr_reads_the_same_without_pydicom(generated_mr):
    paths = _Paths()
    for data, ts in generated_mr:
        got = _check(data, ts, kinds=("bytes", "bytearray", "memoryview"), paths=paths)
        assert isinstance(got, header.InstanceHeader) and got.modality == "MR"
    assert paths.pydicom == 0


def test_real_mr_reads_the_same():
    from models.realdata import realdata_root

    root = realdata_root()
    if root is None:
        pytest.skip("no real data corpus (MSKNODE_REALDATA or ../shared/realdata)")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm", ".ima")):
        with open(path, "rb") as f:
            if f.read(132)[128:] == b"DICM":
                files.append(path)
    if not files:
        pytest.skip(f"no DICOM file with file meta under {root}")
    by_folder: dict[Path, list[Path]] = {}
    for path in files:
        by_folder.setdefault(path.parent, []).append(path)
    sample: list[Path] = []
    while len(sample) < 200 and any(by_folder.values()):  # (each folder, a vendor's series, in turn)
        for folder in sorted(by_folder):
            if by_folder[folder] and len(sample) < 200:
                sample.append(by_folder[folder].pop(0))
    paths = _Paths()
    for path in sample:
        found = _dataset_bytes(path)
        assert found is not None, path
        _check(*found, kinds=("bytearray",), paths=paths)
    assert paths.pydicom == 0


def test_crafted_data_sets_with_what_pydicom_reads_for_the_walk():
    for data, ts in CRAFTED:
        got = _check(data, ts, kinds=("bytes", "bytearray", "memoryview"))
        assert isinstance(got, header.InstanceHeader), got
    ds, _ = header._parse(bytearray(CRAFTED[0][0]), EXPLICIT_LE, max_bytes=None)
    assert isinstance(ds._dict[0x00081111], DataElement)  # (read by pydicom: undefined length)
    assert ds[0x00081111].value[0].PatientName == "Müller^Jörg"
    assert ds._dict[0x00291010].length == 0xFFFFFFFF and ds._dict[0x00291010].value == b"\x01\x02\x03\x04\x05\x06"
    ds, _ = header._parse(CRAFTED[3][0], EXPLICIT_LE, max_bytes=None)
    assert ds[0x00081111].value[0].PatientName == "Łukasz^Żółw"


def test_truncated_at_every_offset(generated_mr):
    data, ts = generated_mr[0]
    stop = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    sources = [(data, ts, range(stop + 40)), *((d, t, range(len(d))) for d, t in CRAFTED[:3])]
    for source, syntax, offsets in sources:
        for cut in offsets:
            _check(source[:cut], syntax, kinds=("bytearray",))
    for cut in (stop + 1000, len(data) - 1, len(data) + 1):  # (in the pixel data)
        _check(data[:cut], ts, kinds=("bytearray",))


def test_random_byte_flips_in_the_header(generated_mr):
    rng = random.Random(20240601)
    data, ts = generated_mr[0]
    stop = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    sources = [(data[: stop + 200], ts, stop + 12), *((d, t, len(d)) for d, t in CRAFTED)]
    with _validation_mode(pydicom_config.IGNORE):  # (pydicom's own warnings on odd values: fewer to compare)
        for source, syntax, span in sources:
            for _ in range(60):
                flipped = bytearray(source)
                for _ in range(rng.randint(1, 3)):
                    flipped[rng.randrange(span)] ^= 1 << rng.randrange(8)
                _check(bytes(flipped), syntax, kinds=("bytearray",))


def test_an_encoding_other_than_the_transfer_syntax_s_is_read_by_pydicom():
    explicit, implicit = CRAFTED[0][0], CRAFTED[1][0]
    paths = _Paths()
    _check(explicit, IMPLICIT_LE, paths=paths)  # (explicit VR bytes in an implicit transfer syntax)
    _check(implicit, EXPLICIT_LE, paths=paths)
    assert paths.pydicom == 4 and paths.fast == 0  # (bytes and bytearray of each)


def test_pydicom_reads_the_rest_from_an_unknown_vr():
    explicit = CRAFTED[0][0]
    paths = _Paths()
    for vr in (b"ZZ", b"\x01\x02", b"ob"):  # (unknown; not letters: pydicom switches to implicit VR)
        unknown = explicit.replace(b"LO\x04\x00ACME", vr + b"\x04\x00ACME", 1)  # (the Manufacturer's VR)
        assert unknown != explicit
        _check(unknown, EXPLICIT_LE, paths=paths)
    # after a sequence read with a charset pydicom warns about: its warnings are given once
    unknown_after = struct.pack("<HH2sH", 0x0029, 0x1030, b"ZZ", 2) + b"ab"
    bad_charset = _crafted(implicit=False, charset=b"NOT A CHARSET", name="Müller", extra=unknown_after)
    _check(bad_charset, EXPLICIT_LE, paths=paths)
    assert paths.pydicom == 0


def test_an_item_delimiter_a_missing_delimiter_and_a_cut_4_byte_length():
    explicit, implicit = CRAFTED[0][0], CRAFTED[1][0]
    delimiter = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    with_length = struct.pack("<HHL", 0xFFFE, 0xE00D, 8)  # (the tail is checked from after its header)
    at = implicit.index(struct.pack("<HH", 0x0020, 0x000D))
    _check(implicit[:at] + delimiter + implicit[at:], IMPLICIT_LE)  # (the top level ends there)
    _check(implicit[:at] + with_length + implicit[at:], IMPLICIT_LE)
    at = explicit.index(struct.pack("<HH", 0x0020, 0x000D))
    _check(explicit[:at] + delimiter + explicit[at:], EXPLICIT_LE)  # (pydicom: its VR is no VR, read as implicit)
    no_delimiter = _crafted(
        implicit=False, extra=_element(0x00291020, "OB", b"\x07" * 40, implicit=False, undefined=True)
    )
    no_delimiter = no_delimiter[: no_delimiter.index(struct.pack("<HH", 0x7FE0, 0x0010))]
    assert isinstance(_check(no_delimiter, EXPLICIT_LE)[2], str)  # (EOFError: pydicom warns, keeps nothing)
    with _validation_mode(pydicom_config.RAISE):
        assert "EOFError" in _check(no_delimiter, EXPLICIT_LE)[2]
    cut = _element(0x00080016, "UI", _uid(MR_STORAGE), implicit=False) + b"\x08\x00\x70\x00OB\0\0\1"
    _check(cut, EXPLICIT_LE)


@pytest.mark.parametrize("error", [EOFError, NotImplementedError, ValueError])
def test_errors_of_the_sequence_pydicom_reads(monkeypatch, error):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise error("broken sequence")

    monkeypatch.setattr(filereader, "read_sequence", broken)
    for data, ts in CRAFTED[:3]:
        _check(data, ts)


def test_the_header_size_limit(monkeypatch, generated_mr):
    data, ts = generated_mr[0]
    stop = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    cut = [  # (in a value)
        (d[: d.index(struct.pack(">HH" if t == EXPLICIT_BE else "<HH", 0x0020, 0x000D)) + 20], t)
        for d, t in CRAFTED[:3]
    ]
    sources = [(data[: stop + 300], ts), *CRAFTED[:3], *cut]
    for source, syntax in sources:
        refused = 0
        for limit in [*range(0, 140, 3), *range(140, len(source) + 16, 17)]:
            monkeypatch.setattr(header, "MAX_HEADER_BYTES", limit)
            got = _check(source, syntax, kinds=("bytearray",))
            refused += isinstance(got, tuple) and got[1] == header.OUT_OF_RESOURCES
        assert 0 < refused < 40 + len(source) // 17, refused  # (the smaller limits only)


def test_empty_and_short_data_sets():
    for data in (
        b"",
        b"\x08\x00",
        b"\x08\x00\x05\x00CS\x00",
        b"\x08\x00\x05\x00CS\x00\x00",
        b"\x08\x00\x05\x00CS\x02\x00",
    ):
        for ts in (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE):
            assert _check(data, ts)[1] in (header.CANNOT_UNDERSTAND, header.MISSING_UID)


def test_a_bytearray_is_not_copied(generated_mr):
    data, ts = generated_mr[0]
    stop = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    pixels = 2 * 1024 * 1024
    head = data[:stop] + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels)
    big = bytearray(head) + bytearray(pixels)  # (more pixels than the header says: refused after the tail check)

    def peak(call: Callable[[], Any]) -> int:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            _outcome(call)
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()

    with _parse_as_before():
        before = peak(lambda: header.read_header(big, ts))
    after = peak(lambda: header.read_header(big, ts))
    assert before > pixels  # (BytesIO copies a bytearray)
    assert after < pixels // 8, after
    big.extend(b"\0\0")  # (no view of it is left behind, even by the error)


_pydicom_text = header.pydicom_text  # what `_text` answers without its raw readings


def test_implicit_vr_elements_are_read_raw_as_pydicom_converts_them():
    """Raw implicit-VR elements have no VR: `_plain_text` and `_plain_int` take the dictionary's,
    as pydicom does, for every element of every keyword of pydicom's test files."""
    from pydicom import dcmread
    from pydicom.datadict import keyword_for_tag

    text = numbers = 0
    with _validation_mode(pydicom_config.IGNORE):
        for path in sorted(p for p in get_testdata_files() if p.endswith(".dcm")):
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:
                continue  # (files that are broken on purpose)
            keywords = [
                keyword_for_tag(tag)
                for tag, elem in list(ds._dict.items())
                if isinstance(elem, RawDataElement) and elem.VR is None
            ]
            for keyword in filter(None, keywords):
                plain, value = header._plain_text(ds, keyword)
                plain_int = header._plain_int(ds, keyword)
                try:
                    expected = _pydicom_text(ds, keyword)
                except Exception:
                    assert not plain, (path, keyword)
                    continue
                if plain:
                    text += 1
                    assert value == expected, (path, keyword, value, expected)
                if plain_int is not header._NOT_PLAIN:
                    numbers += 1
                    assert plain_int == header.pydicom_int(ds, keyword), (path, keyword)
    assert text > 200 and numbers > 40, (text, numbers)
