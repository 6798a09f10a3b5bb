"""Test support: raw DICOM upper-layer PDUs for the attack suite (a peer that does not play by the rules).

`associate_rq` builds a well-formed A-ASSOCIATE-RQ with pynetdicom's encoder; `connect` opens a TCP
connection from a chosen loopback source address (Linux routes all of 127.0.0.0/8 to lo, so
127.0.0.2, 127.0.0.3 ... are distinct peers); `read_pdu` reads one PDU back (or None at EOF).
"""

from __future__ import annotations

import socket
import struct
import time

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF"}
PDU_NAMES |= {0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07


def associate_rq(called: str = "MSKNODE", calling: str = "ATTACKER", max_pdu: int = 16384) -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing Verification."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.0"
    prim.user_information = [ml, ic]
    cx = build_context(Verification)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """One PDU (type, variable field) or None when the peer closed first (or reset)."""
    deadline = time.monotonic() + timeout

    def exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(n - len(buf))
            except ConnectionError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    header = exact(6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = exact(length)
    if body is None:
        return None
    return pdu_type, body


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed `sock` (reading and discarding what it sends), or None if it
    was still open after `seconds`."""
    start = time.monotonic()
    while True:
        remaining = seconds - (time.monotonic() - start)
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionError:
            return time.monotonic() - start
        if not chunk:
            return time.monotonic() - start


def pdata_header(length: int) -> bytes:
    """The header of a P-DATA-TF PDU whose variable field is `length` bytes."""
    return struct.pack(">BBL", 0x04, 0x00, length)
