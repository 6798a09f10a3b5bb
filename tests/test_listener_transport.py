"""The listener's transport where it leaves the happy path: a silent peer, a failing DUL loop, a
failing C-STORE handler, and pynetdicom internals that do not fit (stock fallback).

Each case logs one WARNING naming the association (index id, calling AE title, peer address),
never patient data. Real listeners on localhost, dcmtk and pynetdicom clients.
"""

from __future__ import annotations

import logging
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from test_listener import TRANSPORTS, storescu, transport_env, write_series

from node.db.database import Database
from node.db.schema import Association, Instance
from support.listener import ListenerProcess, in_process_listener

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def association_row(db: Database, calling: str) -> Association | None:
    with db.session() as s:
        return s.scalars(
            select(Association).where(Association.calling_ae == calling).order_by(Association.id.desc())
        ).first()


def ended(db: Database, calling: str) -> Association | None:
    row = association_row(db, calling)
    return row if row is not None and row.ended_at is not None else None


@pytest.fixture
def listener(settings):
    """An in-process listener (fast transport) on a free loopback port."""
    with in_process_listener(settings) as node:
        yield node


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "node.receive.listener"
    ]


@pytest.mark.parametrize("mode", list(TRANSPORTS))
def test_a_silent_peer_is_aborted_at_the_network_timeout(tmp_path, mode):
    """An association that sends nothing for MSKNODE_NETWORK_TIMEOUT is aborted and recorded as such,
    in both modes; the fast loop says so in a WARNING with the association's identifiers."""
    node = ListenerProcess(
        tmp_path / "data", env=transport_env(mode, MSKNODE_NETWORK_TIMEOUT="1", MSKNODE_LISTENER_PROCESSES="1")
    ).start()
    db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
    try:
        ae = AE(ae_title="IDLESCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60  # the listener must be the one to give up
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
        assert assoc.is_established
        client_port = assoc.dul.socket.socket.getsockname()[1]
        started = time.monotonic()
        assert wait_for(lambda: assoc.is_aborted, timeout=15), "the listener did not abort the silent association"
        assert 0.9 < time.monotonic() - started < 10
        row = wait_for(lambda: ended(db, "IDLESCU"))
        assert row is not None and row.end_reason == "aborted"
        lines = [line for line in node.log().splitlines() if "network timeout" in line]
        if mode == "fast":
            expected = f"association {row.id} from IDLESCU at 127.0.0.1:{client_port}: nothing received for 1 s"
            assert any(" WARNING " in line and expected in line for line in lines), node.log()
        else:
            assert lines == [], lines  # stock pynetdicom aborts on its own, without the transport's line
        assert echo_ok(node.port)  # and the listener keeps serving
    finally:
        db.dispose()
        assert node.stop() == 0


def echo_ok(port: int) -> bool:
    from node.demo.loopback import echoscu

    return echoscu(port, "MSKNODE")


@pytest.mark.parametrize("when", ["after_accept", "during_accept"])
def test_a_failing_dul_loop_aborts_the_association_with_a_warning(listener, monkeypatch, caplog, tmp_path, when):
    """An error inside the fast DUL loop: A-ABORT to the peer, the connection closed, the association
    recorded as aborted at once, a WARNING naming it; the next association is served as usual.
    `during_accept`: the error comes while the association row is still being written."""
    from node.receive import transport

    armed = {"on": True}
    read_pdu = transport._DUL._read_pdu_data

    def failing(self, *args):
        established = self.state_machine.current_state == "Sta6"  # a P-DATA is coming
        accepted = getattr(self.assoc, "index_id", None) is not None
        if armed["on"] and established and (accepted or when == "during_accept"):
            raise RuntimeError("Doe^Jane")  # an exception whose text must not reach the log
        return read_pdu(self, *args)

    monkeypatch.setattr(transport._DUL, "_read_pdu_data", failing)
    caplog.set_level(logging.INFO, logger="node.receive.listener")
    *_, paths = write_series(tmp_path / "s", n=2)
    r = storescu(listener.port, paths, calling="FAILSCU")
    assert r.returncode != 0 or "abort" in (r.stdout + r.stderr).lower(), r.stderr
    row = wait_for(lambda: ended(listener.db, "FAILSCU"), timeout=5)
    assert row is not None and row.end_reason == "aborted" and row.instances < len(paths)
    expected = f"association {row.id if when == 'after_accept' else ''}"
    assert any(
        m.startswith(expected)
        and " from FAILSCU at 127.0.0.1:" in m
        and m.endswith("the DUL loop failed (RuntimeError): aborting")
        for m in warnings_of(caplog)
    ), caplog.text
    assert "Doe" not in caplog.text and "PID0001" not in caplog.text

    armed["on"] = False
    assert storescu(listener.port, paths, calling="GOODSCU").returncode == 0
    with listener.db.session() as s:
        assert len(s.scalars(select(Instance.id)).all()) == 2
    assert wait_for(lambda: ended(listener.db, "GOODSCU")).end_reason == "released"


def test_a_failing_store_handler_answers_0xC211_with_a_warning(listener, caplog, tmp_path):
    """The fast path answers a C-STORE whose handler raises as pynetdicom's storage service does
    (0xC211, the association goes on), with a WARNING naming the association."""
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from test_listener import _good_instance

    from support.listener import RawSender

    calls = {"n": 0}
    handle_store = listener.handle_store

    def flaky(assoc, req, ts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("Doe^Jane")
        return handle_store(assoc, req, ts)

    listener.server.store_handler = flaky  # taken by each new association
    caplog.set_level(logging.INFO, logger="node.receive.listener")
    ds, data = _good_instance()
    with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)], calling="FLAKYSCU") as sender:
        assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0xC211
        assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0x0000
    row = wait_for(lambda: ended(listener.db, "FLAKYSCU"), timeout=5)
    assert row is not None and row.end_reason == "released" and row.instances == 1
    expected = f"association {row.id} from FLAKYSCU at 127.0.0.1:"
    assert any(
        expected in m and "the C-STORE handler failed (RuntimeError): answering 0xC211" in m
        for m in warnings_of(caplog)
    ), caplog.text
    assert "Doe" not in caplog.text


def test_when_the_fast_transport_cannot_be_set_up_the_association_is_served_by_stock_pynetdicom(
    listener, monkeypatch, caplog, tmp_path
):
    """pynetdicom internals that do not fit (here: the DUL cannot be built): a WARNING naming the
    peer, and the association is served by pynetdicom's own loops, instances stored and indexed."""
    from node.receive import transport

    def broken(self, assoc):
        raise AttributeError("DULServiceProvider has no attribute ...")

    monkeypatch.setattr(transport._DUL, "__init__", broken)
    caplog.set_level(logging.INFO, logger="node.receive.listener")
    *_, paths = write_series(tmp_path / "s", n=3)
    r = storescu(listener.port, paths, calling="OLDSCU")
    assert r.returncode == 0, r.stderr
    row = wait_for(lambda: ended(listener.db, "OLDSCU"))
    assert row is not None and row.end_reason == "released" and row.instances == 3
    with listener.db.session() as s:
        assert len(s.scalars(select(Instance.id).where(Instance.association_id == row.id)).all()) == 3
    fallback = [m for m in warnings_of(caplog) if "the fast transport is unavailable (AttributeError)" in m]
    assert len(fallback) == 1 and fallback[0].startswith("connection from 127.0.0.1:"), caplog.text
    assert fallback[0].endswith("served by stock pynetdicom")
    assert "Doe" not in caplog.text


def test_a_c_store_is_served_by_the_thread_that_read_its_last_fragment(listener):
    """The fast transport stores a C-STORE and answers it in the DUL thread that read it (no
    hand-over to the association's reactor thread per instance), in order, every one indexed."""
    import threading

    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from test_listener import _good_instance

    from support.listener import RawSender

    served: list[tuple[str, bool]] = []
    handle_store = listener.handle_store

    def recording(assoc, req, ts):
        served.append((str(req.AffectedSOPInstanceUID), threading.current_thread() is assoc.dul))
        return handle_store(assoc, req, ts)

    listener.server.store_handler = recording
    instances = [_good_instance() for _ in range(3)]
    with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)], calling="INLINESCU") as sender:
        for ds, data in instances:
            assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0x0000
    assert served == [(str(ds.SOPInstanceUID), True) for ds, _ in instances]
    row = wait_for(lambda: ended(listener.db, "INLINESCU"), timeout=5)
    assert row is not None and row.end_reason == "released" and row.instances == 3


def test_a_c_store_sent_while_the_association_is_being_recorded_waits_for_it(listener, monkeypatch):
    """A peer may send its first C-STORE the moment it holds the A-ASSOCIATE-AC, while the listener
    still records the association (EVT_ACCEPTED): that request is served once the association is
    recorded (answered, its row carrying the association), not lost in between."""
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from test_listener import _good_instance

    from support.listener import RawSender

    open_association = listener.writer.open_association

    def slow_open(*args, **kwargs):
        time.sleep(0.5)  # the first C-STORE is in before the association is recorded
        return open_association(*args, **kwargs)

    monkeypatch.setattr(listener.writer, "open_association", slow_open)
    ds, data = _good_instance()
    with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)], calling="EARLYSCU") as sender:
        sender.assoc.dimse_timeout = 10
        assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0x0000
    row = wait_for(lambda: ended(listener.db, "EARLYSCU"), timeout=5)
    assert row is not None and row.instances == 1
    with listener.db.session() as s:
        stored = s.scalars(select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))).one()
    assert stored.association_id == row.id


@pytest.mark.parametrize("ending", ["release", "abort"])
def test_a_release_or_abort_wakes_the_association_at_once(listener, monkeypatch, ending):
    """The association's reactor waits on its request queue; a release or an abort from the peer
    wakes it (it answers / records the end at once), however long its poll (here 30 s)."""
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from test_listener import _good_instance

    from node.receive import transport
    from support.listener import RawSender

    monkeypatch.setattr(transport, "_QUEUE_WAIT", 30.0)
    ds, data = _good_instance()
    calling = f"WAKE{ending.upper()}"
    sender = RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)], calling=calling)
    assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0x0000
    t0 = time.monotonic()
    if ending == "release":
        sender.assoc.release()
        assert sender.assoc.is_released
    else:
        sender.assoc.abort()
    row = wait_for(lambda: ended(listener.db, calling), timeout=20)
    assert row is not None and row.end_reason == ("released" if ending == "release" else "aborted")
    assert time.monotonic() - t0 < 10  # (not the 30 s poll)


def test_a_killed_association_ends_its_reactor_at_once(listener, monkeypatch):
    """Killing an association (the listener's stop aborts what is left) wakes its reactor thread,
    which ends at once, not at its next poll (here 30 s)."""
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    from node.receive import transport
    from support.listener import RawSender

    monkeypatch.setattr(transport, "_QUEUE_WAIT", 30.0)
    sender = RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)], calling="KILLSCU")
    try:
        served = wait_for(lambda: listener.server.active_associations, timeout=5)
        assert served, "the association is not being served"
        assoc = served[0]
        assert isinstance(assoc, transport._Association)
        t0 = time.monotonic()
        assoc.abort()
        assoc.join(10)
        assert not assoc.is_alive() and time.monotonic() - t0 < 3
    finally:
        sender.assoc.abort()


def test_the_a_associate_rq_is_decoded_once_at_admission_and_the_association_uses_it(listener, tmp_path, monkeypatch):
    """Admission reads and decodes the A-ASSOCIATE-RQ (a malformed one is refused there); the
    association then negotiates from that PDU (and its primitive) instead of decoding the same bytes a
    second time.
    storescu proposes 128 presentation contexts: the instance is stored through one of them."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    decoded: list[int] = []
    built: list[int] = []
    decode, to_primitive = A_ASSOCIATE_RQ.decode, A_ASSOCIATE_RQ.to_primitive

    def counting(self, bytestream):
        decoded.append(len(bytestream))
        return decode(self, bytestream)

    def building(self):
        primitive = to_primitive(self)
        built.append(len(primitive.presentation_context_definition_list))
        return primitive

    monkeypatch.setattr(A_ASSOCIATE_RQ, "decode", counting)
    monkeypatch.setattr(A_ASSOCIATE_RQ, "to_primitive", building)
    _, _, paths = write_series(tmp_path / "series", 1)
    result = storescu(listener.port, paths, calling="ONCESCU")
    assert result.returncode == 0, result.stderr
    row = wait_for(lambda: ended(listener.db, "ONCESCU"), timeout=5)
    assert row is not None and row.instances == 1 and row.end_reason == "released"
    assert len(decoded) == 1 and decoded[0] > 128 * 50, decoded
    assert built == [128]  # its primitive, built once too


@pytest.mark.parametrize("kernel_takes", ["all", "part"])
def test_responses_are_written_straight_to_the_socket_and_a_partial_write_is_finished(
    listener, monkeypatch, kernel_takes
):
    """What the listener sends (A-ASSOCIATE-AC, C-STORE-RSP, A-RELEASE-RP) is written in one system
    call, without the poll Python makes before every send on a socket with a timeout; when the
    kernel takes only part of it, the rest is sent (waiting as before) and the peer gets every byte."""
    import os

    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from pynetdicom.transport import AssociationSocket
    from test_listener import _good_instance

    from node.receive.transport import _GuardedSocket
    from support.listener import RawSender

    stock_sends: list[int] = []
    send = AssociationSocket.send

    def recording(self, bytestream):
        if isinstance(self, _GuardedSocket):
            stock_sends.append(len(bytestream))
        return send(self, bytestream)

    monkeypatch.setattr(AssociationSocket, "send", recording)
    written: list[int] = []
    write = os.write
    listener_fds: set[int] = set()

    def short_write(fd, data):
        if fd in listener_fds:
            written.append(len(data))
            if kernel_takes == "part":
                data = bytes(data[:7])
        return write(fd, data)

    monkeypatch.setattr(os, "write", short_write)
    guarded_send = _GuardedSocket.send

    def note_fd(self, bytestream):
        listener_fds.add(self.socket.fileno())
        return guarded_send(self, bytestream)

    monkeypatch.setattr(_GuardedSocket, "send", note_fd)
    instances = [_good_instance() for _ in range(3)]
    with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)], calling="WRITESCU") as sender:
        for ds, data in instances:
            assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0x0000
    row = wait_for(lambda: ended(listener.db, "WRITESCU"), timeout=5)
    assert row is not None and row.end_reason == "released" and row.instances == 3
    assert stock_sends == []
    assert len(written) >= 5  # the A-ASSOCIATE-AC, three C-STORE-RSPs, the A-RELEASE-RP
