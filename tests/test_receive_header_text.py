"""The header's text values read straight from raw elements are what pydicom itself decodes, for
every element of a plain VR in every file of pydicom's test data (many charsets, odd values)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.tag import Tag

from node.receive.header import (
    _NOT_PLAIN,
    _PLAIN_VRS,
    _int,
    _plain_int,
    _plain_text,
    _text,
    pydicom_int,
    pydicom_text,
)
from support.listener import PYDICOM_DATA

pytestmark = [pytest.mark.unit]


_pydicom_text = pydicom_text  # what `_text` answered before its raw fast path


def test_plain_text_equals_pydicom_for_every_plain_element_of_the_test_files(monkeypatch):
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)
    files = sorted(PYDICOM_DATA.rglob("*.dcm")) + sorted(Path(get_testdata_file("MR_small.dcm")).parent.glob("*.dcm"))
    assert len(files) > 50, PYDICOM_DATA
    fast = checked = 0
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # (files that are broken on purpose)
        raws = {}
        for tag, elem in list(ds._dict.items()):
            keyword = keyword_for_tag(tag)
            if keyword and tag_for_keyword(keyword) is not None and getattr(elem, "VR", None) in _PLAIN_VRS:
                raws[keyword] = elem
        for keyword in raws:
            plain, value = _plain_text(ds, keyword)
            got = _text(ds, keyword)  # the fast path when `plain` (before pydicom converts the element)
            fast += plain
            try:
                expected = _pydicom_text(ds, keyword)
            except Exception:
                assert not plain, (path.name, keyword)  # pydicom cannot read it: neither do we
                continue
            checked += 1
            assert got == expected, (path.name, keyword, got, expected)
            if plain:
                assert value == expected
    assert fast > 1000 and checked > 1000, (fast, checked)


def test_absent_elements_are_none_and_non_plain_vrs_go_through_pydicom():
    ds = dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    assert "ImageLaterality" not in ds and ds.Laterality == ""
    assert _plain_text(ds, "ImageLaterality") == (True, None)
    assert _text(ds, "ImageLaterality") is None
    assert _text(ds, "Laterality") == ""
    assert _plain_text(ds, "PatientName") == (True, str(ds.PatientName))  # printable ASCII: the same in every charset
    assert _plain_text(ds, "ImagePositionPatient") == (True, "\\".join(str(v) for v in ds.ImagePositionPatient))
    assert _plain_text(ds, "Rows")[0] is False  # US: pydicom converts it (`_int` reads it raw)
    assert _text(ds, "SOPInstanceUID") == str(ds.SOPInstanceUID)


def test_a_ds_value_that_is_no_number_goes_through_pydicom(monkeypatch):
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)
    ds = dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    tag = Tag("SliceThickness")
    ds._dict[tag] = ds._dict[tag]._replace(value=b"abc ")
    assert _plain_text(ds, "SliceThickness") == (False, None)


def test_int_equals_pydicom_for_every_is_and_us_element_of_the_test_files(monkeypatch):
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)
    files = sorted(PYDICOM_DATA.rglob("*.dcm")) + sorted(Path(get_testdata_file("MR_small.dcm")).parent.glob("*.dcm"))
    fast = checked = 0
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        keywords = [
            keyword_for_tag(tag) for tag, elem in list(ds._dict.items()) if getattr(elem, "VR", None) in ("IS", "US")
        ]
        for keyword in [k for k in keywords if k and tag_for_keyword(k) is not None]:
            fast += _plain_int(ds, keyword) is not _NOT_PLAIN
            got = _int(ds, keyword)  # the fast path first (before pydicom converts the element)
            checked += 1
            assert got == pydicom_int(ds, keyword), (path.name, keyword)
    assert fast > 200 and checked > 300, (fast, checked)
