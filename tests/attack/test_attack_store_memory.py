"""What one C-STORE may cost the listener's memory: a deflate bomb and a 300 MB object.

Each test runs ``msknode listen`` as one process (MSKNODE_LISTENER_PROCESSES=1), sends the object
and reads the process's peak resident set (VmHWM in /proc/<pid>/status) before and after.

- a deflate bomb (about 1.5 MB of Deflated Explicit VR Little Endian that inflates to 1.5 GB)
  is refused with 0xA700 and the listener's peak grows by less than 100 MB (it inflated the
  whole data set in memory: over 3 GB);
- a 300 MB object sent by dcmtk storescu is stored byte for byte while the listener's peak grows
  by less than 150 MB (it held about four copies of the object: over 1 GB);
- with MSKNODE_MAX_OBJECT_MB under the object's size it is refused with 0xA700, logged with its
  UID, and nothing is left on disk.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage
from sqlalchemy import select

from node.db.database import Database
from node.db.schema import Instance, Quarantine
from node.receive.storage import dataset_offset
from support.listener import ListenerProcess, RawSender
from support.mr import mr_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MB = 1024 * 1024


def peak_kb(pid: int) -> int:
    """VmHWM (peak resident set, kB) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


TRANSPORTS = {"fast": "1", "stock": "0"}  # MSKNODE_FAST_TRANSPORT
transports = pytest.mark.parametrize("mode", list(TRANSPORTS))


def listener(tmp_path: Path, mode: str = "fast", **env: str) -> ListenerProcess:
    env = {"MSKNODE_LISTENER_PROCESSES": "1", "MSKNODE_FAST_TRANSPORT": TRANSPORTS[mode], **env}
    return ListenerProcess(tmp_path / "data", env={"MSKNODE_DIMSE_TIMEOUT": "120", **env}).start()


def header_bytes(ds, *, explicit: bool = True) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, not explicit
    write_dataset(buf, ds)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def deflate_bomb(inflated_pixels: int) -> tuple[str, bytes]:
    """(SOP Instance UID, deflated data set): an MR header whose pixel data element holds
    `inflated_pixels` zero bytes (consistent with Rows x Columns x frames), raw-deflated.

    Deflating 1.5 GB takes ~6 s: made once for the tests of both transports (each sends it to a
    listener of its own, on a data directory of its own)."""
    frames = inflated_pixels // (512 * 512 * 2)
    ds = mr_dataset(Rows=512, Columns=512, SamplesPerPixel=1, BitsAllocated=16, BitsStored=12, HighBit=11)
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    head = header_bytes(ds)
    length = frames * 512 * 512 * 2
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(head), z.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))]
    chunk = bytes(16 * MB)
    left = length
    while left:
        n = min(left, len(chunk))
        parts.append(z.compress(chunk[:n]))
        left -= n
    parts.append(z.flush())
    return str(ds.SOPInstanceUID), b"".join(parts)


@transports
def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path, mode):
    sop, bomb = deflate_bomb(1536 * MB)
    assert len(bomb) < 2 * MB
    node = listener(tmp_path, mode)
    try:
        before = peak_kb(node.proc.pid)
        with RawSender(node.port, [(MRImageStorage, DeflatedExplicitVRLittleEndian)]) as sender:
            status = sender.send(MRImageStorage, sop, DeflatedExplicitVRLittleEndian, bomb)
        grown_mb = (peak_kb(node.proc.pid) - before) / 1024
        print(
            f"{mode}: deflate bomb ({len(bomb) / MB:.2f} MB -> 1536 MB): status 0x{status:04X}, peak grew {grown_mb:.0f} MB"
        )
        assert status == 0xA700
        assert grown_mb < 100, f"the listener's peak memory grew by {grown_mb:.0f} MB"
        # a normal deflated object on the same listener is still stored as received (deflated bytes)
        ds = mr_dataset(pixels=__import__("numpy").arange(64 * 64, dtype="uint16").reshape(64, 64))
        z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        small = z.compress(header_bytes(ds)) + z.flush()
        with RawSender(node.port, [(MRImageStorage, DeflatedExplicitVRLittleEndian)]) as sender:
            assert sender.send(MRImageStorage, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, small) == 0
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        try:
            with db.session() as s:
                inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
                assert s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).first() is None
                row = s.scalars(select(Quarantine).where(Quarantine.sop_instance_uid == sop)).one()
        finally:
            db.dispose()
        stored = Path(inst.path).read_bytes()
        assert stored[dataset_offset(Path(inst.path)) :] == small
        assert row.status == 0xA700 and "inflate" in row.reason, row.reason
        assert sop in node.log() and "0xA700" in node.log()
    finally:
        assert node.stop() == 0, node.log()


def big_object(path: Path, size_mb: int) -> tuple[str, str]:
    """A multi-frame MR file of about `size_mb` MB (explicit VR little endian); (SOP UID, pixel sha256)."""
    frames = size_mb * MB // (512 * 512 * 2)
    ds = mr_dataset(Rows=512, Columns=512, SamplesPerPixel=1, BitsAllocated=16, BitsStored=12, HighBit=11)
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.is_little_endian, ds.is_implicit_VR = True, False
    length = frames * 512 * 512 * 2
    digest = hashlib.sha256()
    from pydicom.filewriter import write_file_meta_info

    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta, enforce_standard=True)
        head = header_bytes(ds)
        element = b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little")
        f.write(head + element)
        digest.update(head + element)
        block = os.urandom(MB)  # incompressible, distinct content
        left = length
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            digest.update(block[:n])
            left -= n
    return str(ds.SOPInstanceUID), digest.hexdigest()


def dciodvfy_errors(path: Path) -> set[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return {line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")}


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-v", "-aet", "STORESCU", "-aec", "MSKNODE", "-xe", "127.0.0.1", str(port), str(path)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )


@transports
def test_a_300_mb_object_is_stored_with_bounded_memory(tmp_path, mode):
    path = tmp_path / "big.dcm"
    sop, digest = big_object(path, 300)
    node = listener(tmp_path, mode)
    try:
        before = peak_kb(node.proc.pid)
        r = storescu(node.port, path)
        grown_mb = (peak_kb(node.proc.pid) - before) / 1024
        print(f"{mode}: 300 MB object: storescu exit {r.returncode}, peak grew {grown_mb:.0f} MB")
        assert r.returncode == 0, r.stderr
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        try:
            with db.session() as s:
                inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        finally:
            db.dispose()
        assert inst.sha256 == digest
        h = hashlib.sha256()
        with open(inst.path, "rb") as f:
            f.seek(dataset_offset(Path(inst.path)))
            while block := f.read(MB):
                h.update(block)
        assert h.hexdigest() == digest
        # the stored file (our File Meta Information + the data set as sent) says nothing dciodvfy did
        # not already say of the sent file (the test object lacks type 2 attributes)
        assert dciodvfy_errors(Path(inst.path)) == dciodvfy_errors(path)
        assert grown_mb < 150, f"the listener's peak memory grew by {grown_mb:.0f} MB for a 300 MB object"
        assert not list((node.data_dir / "store" / ".incoming").iterdir())
        # sent again: a duplicate (Success), still one file, nothing left staged, memory still bounded
        assert storescu(node.port, path).returncode == 0
        assert (peak_kb(node.proc.pid) - before) / 1024 < 150
        assert [p.name for p in (node.data_dir / "store").rglob("*.dcm")] == [f"{sop}.dcm"]
        assert not list((node.data_dir / "store" / ".incoming").iterdir())
    finally:
        assert node.stop() == 0, node.log()


def test_an_object_over_the_maximum_is_refused_with_0xA700(tmp_path):
    path = tmp_path / "big.dcm"
    sop, _ = big_object(path, 40)
    node = listener(tmp_path, MSKNODE_MAX_OBJECT_MB="16")
    try:
        before = peak_kb(node.proc.pid)
        r = storescu(node.port, path)
        grown_mb = (peak_kb(node.proc.pid) - before) / 1024
        assert "Received Store Response (Refused: OutOfResources)" in r.stderr, r.stderr  # 0xA700
        log = node.log()
        assert f"C-STORE {sop} from STORESCU refused: 0xA700" in log, log
        assert grown_mb < 40, grown_mb
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        try:
            with db.session() as s:
                assert s.scalars(select(Instance)).first() is None
        finally:
            db.dispose()
        assert not list((node.data_dir / "store" / ".incoming").iterdir())
        # the listener goes on: a small object after it is stored
        small = tmp_path / "small.dcm"
        big_object(small, 2)
        assert storescu(node.port, small).returncode == 0
    finally:
        assert node.stop() == 0, node.log()


def open_incoming_files(pid: int) -> list[str]:
    """Files in a staging directory the process holds open."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "/.incoming/" in target:
            found.append(target)
    return found


@transports
def test_a_c_store_cut_off_by_an_abort_leaves_nothing_staged(tmp_path, mode):
    """20 MB of a 40 MB data set, then A-ABORT: the spooled part is deleted and its file closed."""
    from io import BytesIO

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    path = tmp_path / "big.dcm"
    sop, _ = big_object(path, 40)
    data = path.read_bytes()[dataset_offset(path) :]
    node = listener(tmp_path, mode)
    incoming = node.data_dir / "store" / ".incoming"
    try:
        sender = RawSender(node.port, [(MRImageStorage, ExplicitVRLittleEndian)])
        assoc = sender.assoc
        assert assoc.is_established
        cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == MRImageStorage)
        req = C_STORE()
        req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, req.Priority = 1, MRImageStorage, sop, 2
        req.DataSet = BytesIO(data)
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        assoc._reactor_checkpoint.clear()
        sent = 0
        for pdata in msg.encode_msg(cx.context_id, assoc.acceptor.maximum_length):
            assoc.dul.send_pdu(pdata)
            sent += sum(len(v) for _, v in pdata.presentation_data_value_list)
            if sent >= 20 * MB:
                break
        deadline = time.monotonic() + 30
        while not list(incoming.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(incoming.iterdir()), "the data set was not spooled to a staged file"
        assoc.abort()
        deadline = time.monotonic() + 15
        while (list(incoming.iterdir()) or open_incoming_files(node.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(incoming.iterdir())
        assert not open_incoming_files(node.proc.pid)
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        try:
            with db.session() as s:
                assert s.scalars(select(Instance)).first() is None
        finally:
            db.dispose()
    finally:
        assert node.stop() == 0, node.log()
