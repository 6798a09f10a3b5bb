"""`read_header` against hostile data sets, in process: deflated streams cut short or inflating past
the maximum, headers too large to hold, and the same answers from a spooled file as from bytes."""

from __future__ import annotations

import zlib
from io import BytesIO

import numpy as np
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from node.errors import IngestError
from node.receive.header import MAX_HEADER_BYTES, read_header
from support.mr import mr_dataset

pytestmark = [pytest.mark.unit]

EXPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"


def encode(ds) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


def status(data, ts: str, **kw) -> int:
    try:
        read_header(data, ts, **kw)
    except IngestError as e:
        return e.status
    return 0


@pytest.fixture(scope="module")
def instance() -> tuple[object, bytes]:
    ds = mr_dataset(pixels=np.arange(128 * 128, dtype=np.uint16).reshape(128, 128), SeriesDescription="SAG PD")
    return ds, encode(ds)


def test_a_deflated_data_set_cut_short_is_truncated_not_stored(instance):
    _, data = instance
    deflated = deflate(data)
    assert status(deflated, DEFLATED) == 0
    assert status(deflated[: len(deflated) // 2], DEFLATED) == 0xC000
    assert status(deflated[:20], DEFLATED) == 0xC000


def test_a_deflated_data_set_may_inflate_to_the_maximum_and_not_one_byte_more(instance):
    _, data = instance
    deflated = deflate(data)
    assert status(deflated, DEFLATED, max_bytes=len(data)) == 0
    assert status(deflated, DEFLATED, max_bytes=len(data) - 1) == 0xA700
    with pytest.raises(IngestError, match="inflate to more than"):
        read_header(deflated, DEFLATED, max_bytes=4096)


def test_a_header_over_the_limit_is_refused_with_0xA700_and_not_read():
    big = mr_dataset(Rows=1, Columns=1, BitsAllocated=8, SamplesPerPixel=1)
    big.add_new(0x00291010, "OB", bytes(MAX_HEADER_BYTES + 2))  # a private element before the pixel data
    big.add_new(0x7FE00010, "OB", b"\0\0")
    data = encode(big)
    assert status(data, EXPLICIT) == 0xA700
    assert status(deflate(data), DEFLATED) == 0xA700


def test_a_spooled_file_reads_as_its_bytes(instance, tmp_path):
    ds, data = instance
    meta = b"M" * 200  # the spool's file starts with the file meta: the data set follows it
    path = tmp_path / "spooled.part"
    path.write_bytes(meta + data)
    with open(path, "rb") as f:
        f.seek(len(meta))
        from_file = read_header(f, EXPLICIT)
    assert from_file == read_header(data, EXPLICIT)
    assert from_file.sop_instance_uid == ds.SOPInstanceUID and from_file.series_description == "SAG PD"
    cut = BytesIO(data[: len(data) - 1000])
    assert status(cut, EXPLICIT) == 0xC000


def test_bits_allocated_must_be_1_or_whole_bytes():
    ds = mr_dataset(Rows=4, Columns=4, BitsAllocated=12, BitsStored=12, HighBit=11, SamplesPerPixel=1)
    ds.add_new(0x7FE00010, "OW", bytes(24))
    with pytest.raises(IngestError) as e:
        read_header(encode(ds), EXPLICIT)
    assert e.value.status == 0xA900 and "12 bits" in e.value.reason
