"""C-STOREs whose P-DATA-TF PDUs are laid out unlike dcmtk's and pynetdicom's (one command PDU,
then data set PDUs of one fragment each): a command and its data set in one PDU, data set
fragments spread over PDUs of several fragments, a command set in two fragments, and a command
set with a C-MOVE originator (decoded by pynetdicom, not by the fast transport). Each is stored
byte for byte with Success, with the fast transport and with stock pynetdicom.

An in-process listener on a free loopback port; a pynetdicom association whose PDUs are written
to its socket as bytes.
"""

from __future__ import annotations

import struct
import time
from io import BytesIO

import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from sqlalchemy import select
from test_listener import _good_instance, stored_dataset

from node.db.database import Database
from node.db.schema import Instance
from support.listener import in_process_listener

pytestmark = pytest.mark.integration


@pytest.fixture(params=["fast", "stock"])
def listener(request, settings):
    with in_process_listener(settings, fast=request.param == "fast") as node:
        yield node


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A presentation data value item: control 0 data / 1 command, +2 the last fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def pdu(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBL", 0x04, 0x00, len(body)) + body


def command_set(sop_instance: str, message_id: int = 1, *, move_originator: str | None = None) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = MRImageStorage
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    if move_originator is not None:
        req.MoveOriginatorApplicationEntityTitle = move_originator
        req.MoveOriginatorMessageID = 7
    req.DataSet = BytesIO(b"\0")  # (a data set follows: Command Data Set Type 0x0001)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    encoded = encode(msg.command_set, True, True)
    assert encoded is not None
    return encoded


class Scu:
    """A pynetdicom association whose C-STORE PDUs are written by hand."""

    def __init__(self, port: int):
        ae = AE(ae_title="PDATASCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
        self.assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
        assert self.assoc.is_established
        self.context_id = self.assoc.accepted_contexts[0].context_id

    def store(self, *pdus: bytes) -> int:
        """Writes the PDUs, returns the status of the C-STORE-RSP."""
        assoc = self.assoc
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dul.socket.socket.sendall(b"".join(pdus))
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)

    def release(self) -> None:
        self.assoc.release()


def stored(node, sop_instance: str) -> bytes:
    db = Database(node.settings.database_url, migrate=False)
    try:
        with db.session() as s:
            path = s.scalars(select(Instance.path).where(Instance.sop_instance_uid == sop_instance)).one()
    finally:
        db.dispose()
    return stored_dataset(path)


def test_pdata_layouts_are_stored_byte_for_byte(listener):
    scu = Scu(listener.port)
    cx = scu.context_id
    try:
        # a command and its whole data set in one PDU
        ds, data = _good_instance()
        uid = str(ds.SOPInstanceUID)
        assert scu.store(pdu(pdv(cx, 0x03, command_set(uid, 1)), pdv(cx, 0x02, data))) == 0x0000
        assert stored(listener, uid) == data

        # the data set in four fragments: one per PDU, then two in one PDU, then the last
        ds, data = _good_instance()
        uid = str(ds.SOPInstanceUID)
        q = len(data) // 4
        parts = [data[:q], data[q : 2 * q], data[2 * q : 3 * q], data[3 * q :]]
        assert (
            scu.store(
                pdu(pdv(cx, 0x03, command_set(uid, 2))),
                pdu(pdv(cx, 0x00, parts[0])),
                pdu(pdv(cx, 0x00, parts[1]), pdv(cx, 0x00, parts[2])),
                pdu(pdv(cx, 0x02, parts[3])),
            )
            == 0x0000
        )
        assert stored(listener, uid) == data

        # the command set in two fragments
        ds, data = _good_instance()
        uid = str(ds.SOPInstanceUID)
        cmd = command_set(uid, 3)
        assert scu.store(pdu(pdv(cx, 0x01, cmd[:20])), pdu(pdv(cx, 0x03, cmd[20:])), pdu(pdv(cx, 0x02, data))) == 0x0000
        assert stored(listener, uid) == data

        # a C-STORE on behalf of a C-MOVE (Move Originator AE title and Message ID)
        ds, data = _good_instance()
        uid = str(ds.SOPInstanceUID)
        assert (
            scu.store(pdu(pdv(cx, 0x03, command_set(uid, 4, move_originator="MOVESCU"))), pdu(pdv(cx, 0x02, data)))
            == 0x0000
        )
        assert stored(listener, uid) == data
    finally:
        scu.release()
