"""Objects whose pixel data contradicts their header are refused (0xA900) and quarantined.

A native (uncompressed) data set's Pixel Data must hold Rows x Columns x Samples per Pixel x
Number of Frames x Bits Allocated / 8 bytes (Bits Allocated 1: packed bits, rounded up to a
byte; one pad byte to an even length); an encapsulated one a basic offset table item and at
least one fragment. The listener answered 0x0000 to 100 bytes of pixel data for a 384 x 384
16-bit image, or to an image cut to a third: the model failed on them later. Each refusal is
quarantined with its reason (index row, log); objects that are right, however unusual (odd
8-bit lengths, 1-bit packing, several frames, deflated, encapsulated), are still stored.
Both transports (fast, stock pynetdicom) are exercised.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)
from sqlalchemy import select

from models.realdata import realdata_root
from node.db.database import Database
from node.db.schema import Instance, Quarantine
from node.receive.storage import dataset_offset
from support.env import ROOT
from support.listener import PYDICOM_DATA, ListenerProcess, RawSender, dataset_bytes
from support.mr import mr_dataset

pytestmark = [pytest.mark.integration]

REALDATA_DICOM = (realdata_root() or ROOT.parent / "shared" / "realdata") / "knee" / "siemens_sagittal_dicom"
MISMATCH = "pixel data does not match the header"


@pytest.fixture(scope="module", params=["fast", "stock"])
def node(request, tmp_path_factory):
    env = {"MSKNODE_LISTENER_PROCESSES": "1", "MSKNODE_FAST_TRANSPORT": "1" if request.param == "fast" else "0"}
    listener = ListenerProcess(tmp_path_factory.mktemp(f"pixels-{request.param}") / "data", env=env).start()
    listener.db = Database(f"sqlite:///{listener.data_dir / 'msknode.db'}", migrate=False)
    yield listener
    listener.db.dispose()
    assert listener.stop() == 0, listener.log()


def encode(ds, *, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def image(rows: int, columns: int, *, bits: int = 16, frames: int | None = None, samples: int = 1):
    """An MR data set of the given geometry, without pixel data."""
    ds = mr_dataset(Rows=rows, Columns=columns, BitsAllocated=bits, BitsStored=bits, HighBit=bits - 1)
    ds.SamplesPerPixel, ds.PixelRepresentation = samples, 0
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def with_pixels(ds, raw: bytes, vr: str = "OW") -> bytes:
    ds.add_new(0x7FE00010, vr, raw)
    return encode(ds)


def encapsulated(ds, items: list[bytes]) -> bytes:
    """The data set with encapsulated pixel data made of exactly these items (then the delimiter)."""
    if "PixelData" in ds:
        del ds.PixelData
    body = b"".join(b"\xfe\xff\x00\xe0" + len(i).to_bytes(4, "little") + i for i in items)
    return encode(ds) + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + body + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def quarantine_row(node, sop: str) -> Quarantine:
    with node.db.session() as s:
        return s.scalars(select(Quarantine).where(Quarantine.sop_instance_uid == sop)).one()


def stored(node, sop: str) -> Instance | None:
    with node.db.session() as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).first()


def j2k_case() -> tuple[object, list[bytes]]:
    """A real JPEG 2000 lossless MR (pydicom's test data) and its items (offset table, fragments)."""
    from pydicom.encaps import generate_fragments

    ds = dcmread(PYDICOM_DATA / "MR2_J2KR.dcm")
    fragments = list(generate_fragments(ds.PixelData))
    return ds, fragments


def test_pixel_data_that_contradicts_the_header_is_refused_and_quarantined(node):
    pixels = np.arange(384 * 384, dtype=np.uint16).reshape(384, 384)
    full = pixels.tobytes()
    j2k, _ = j2k_case()
    cases = []

    def case(label, ds, data, ts=ExplicitVRLittleEndian, expected=0xA900):
        cases.append((label, str(ds.SOPInstanceUID), data, ts, expected))

    ds = image(384, 384)
    case("100 bytes for 384 x 384 x 16 bits", ds, with_pixels(ds, full[:100]))
    ds = image(384, 384)
    case("an image cut to a third (well-formed)", ds, with_pixels(ds, full[: len(full) // 3]))
    ds = image(384, 384)
    case("twice the pixel data", ds, with_pixels(ds, full + full))
    ds = image(64, 64, frames=3)
    case("two frames' pixels for three frames", ds, with_pixels(ds, bytes(64 * 64 * 2 * 2)))
    ds = image(384, 384)
    del ds.Rows
    case("pixel data without Rows", ds, with_pixels(ds, full))
    ds = image(384, 384)
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    case("deflated, 100 bytes", ds, z.compress(with_pixels(ds, full[:100])) + z.flush(), DeflatedExplicitVRLittleEndian)
    ds = image(384, 384)
    case("encapsulated pixel data in a native syntax", ds, encapsulated(ds, [b"", b"\xff\xd8" * 50]))
    j2k.SOPInstanceUID = generate_uid()
    case("JPEG 2000 with an offset table and no fragment", j2k, encapsulated(j2k, [b""]), JPEG2000Lossless)
    j2k.SOPInstanceUID = generate_uid()
    case("JPEG 2000 with no item at all", j2k, encapsulated(j2k, []), JPEG2000Lossless)
    ds = image(384, 384)
    good = with_pixels(ds, full)
    case("cut to a third mid-element (truncated)", ds, good[: len(good) // 3], expected=0xC000)

    contexts = {(MRImageStorage, ts) for *_, ts, _ in cases}
    with RawSender(node.port, sorted(contexts)) as sender:
        statuses = {label: sender.send(MRImageStorage, sop, ts, data) for label, sop, data, ts, _ in cases}
    assert statuses == {label: expected for label, *_, expected in cases}
    log = node.log()
    for label, sop, data, _, expected in cases:
        assert stored(node, sop) is None, label
        row = quarantine_row(node, sop)
        assert row.status == expected and row.calling_ae == "PYNETSCU", label
        assert Path(row.path).read_bytes().endswith(data), label
        if expected == 0xA900:
            assert row.reason.startswith(MISMATCH), (label, row.reason)
            assert f"C-STORE {sop} from PYNETSCU refused: 0xA900 ({row.reason})" in log, label
    by_label = {label: quarantine_row(node, sop).reason for label, sop, *_ in cases}
    assert "100 bytes for 384 x 384" in by_label["100 bytes for 384 x 384 x 16 bits"]
    assert "294912 expected" in by_label["an image cut to a third (well-formed)"]
    assert "no Rows" in by_label["pixel data without Rows"]
    assert "0 fragments" in by_label["JPEG 2000 with an offset table and no fragment"]
    assert "Doe" not in log


def test_pixel_data_that_matches_its_header_is_stored(node):
    """Odd 8-bit lengths (one pad byte), 1-bit packing, several frames, RGB, deflated, implicit VR,
    encapsulated (real JPEG 2000) are stored as sent, byte for byte."""
    j2k, j2k_items = j2k_case()
    j2k.SOPInstanceUID = generate_uid()
    objects = []

    def add(ds, data, ts=ExplicitVRLittleEndian):
        objects.append((str(ds.SOPInstanceUID), data, ts))

    ds = image(3, 3, bits=8)
    add(ds, with_pixels(ds, bytes(range(9)) + b"\0", "OB"))  # 9 bytes + pad
    ds = image(10, 10, bits=1)
    add(ds, with_pixels(ds, bytes(14), "OB"))  # 100 bits: 13 bytes + pad
    ds = image(64, 64, frames=3)
    add(ds, with_pixels(ds, bytes(64 * 64 * 2 * 3)))
    ds = image(5, 7, bits=8, samples=3)
    add(ds, with_pixels(ds, bytes(5 * 7 * 3) + b"\0", "OB"))
    ds = image(384, 384)
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    add(ds, z.compress(with_pixels(ds, bytes(384 * 384 * 2))) + z.flush(), DeflatedExplicitVRLittleEndian)
    ds = image(32, 32)
    ds.add_new(0x7FE00010, "OW", bytes(32 * 32 * 2))
    add(ds, encode(ds, implicit=True), ImplicitVRLittleEndian)
    add(j2k, encapsulated(j2k, j2k_items), JPEG2000Lossless)

    contexts = {(MRImageStorage, ts) for *_, ts in objects}
    with RawSender(node.port, sorted(contexts)) as sender:
        statuses = [sender.send(MRImageStorage, sop, ts, data) for sop, data, ts in objects]
    assert statuses == [0] * len(objects)
    for sop, data, _ in objects:
        inst = stored(node, sop)
        assert inst is not None
        assert Path(inst.path).read_bytes()[dataset_offset(Path(inst.path)) :] == data


@pytest.mark.skipif(not REALDATA_DICOM.is_dir(), reason=f"real MSK MRI not present ({REALDATA_DICOM})")
def test_real_knee_mri_is_stored_and_its_cut_copy_refused(node):
    path = sorted(REALDATA_DICOM.iterdir())[0]
    sop_class, sop, ts, data = dataset_bytes(path)
    ds = dcmread(path)
    cut_pixels = ds.PixelData[: len(ds.PixelData) // 3]
    ds.SOPInstanceUID = cut_sop = generate_uid()
    ds.PixelData = cut_pixels
    cut = encode(ds, implicit=ts == ImplicitVRLittleEndian)
    with RawSender(node.port, [(sop_class, ts)]) as sender:
        assert sender.send(sop_class, cut_sop, ts, cut) == 0xA900
        assert sender.send(sop_class, sop, ts, data) == 0
    assert quarantine_row(node, cut_sop).reason.startswith(MISMATCH)
    assert stored(node, sop) is not None and stored(node, cut_sop) is None


def test_a_large_object_that_contradicts_its_header_is_quarantined_from_its_spooled_file(node):
    """Over 8 MB the data set arrives in a staged file: refused, that file itself goes to the quarantine."""
    ds = image(2048, 2048, frames=2)
    data = with_pixels(ds, bytes(2048 * 2048 * 2))  # one frame of two
    assert len(data) > 8 * 1024 * 1024
    with RawSender(node.port, [(MRImageStorage, ExplicitVRLittleEndian)]) as sender:
        assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0xA900
    row = quarantine_row(node, str(ds.SOPInstanceUID))
    assert row.reason.startswith(MISMATCH) and "2 frames" in row.reason
    kept = Path(row.path).read_bytes()
    assert kept.endswith(data) and kept[128:132] == b"DICM"
    assert dcmread(row.path, stop_before_pixels=True).SOPInstanceUID == ds.SOPInstanceUID
    assert not list((node.data_dir / "store" / ".incoming").iterdir())
    assert stored(node, str(ds.SOPInstanceUID)) is None
