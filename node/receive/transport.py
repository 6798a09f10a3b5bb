"""The listener's association server: pynetdicom with event-driven reactors and SO_REUSEPORT.

pynetdicom's two per-association loops poll: the DUL thread sleeps 1 ms whenever it has
nothing to do, and the association thread sleeps 1 ms before each look at its message
queue. On one association that adds 2-3 ms to every C-STORE round trip, more than the
durable write itself. Here:

- `_DUL` waits in ``select()`` on the socket and on a wake-up pipe written whenever the
  association queues a PDU to send, so it reacts to either at once;
- `_Association` blocks on the DIMSE message queue instead of sleeping, and answers a
  C-STORE by calling the server's `store_handler` directly and sending a C-STORE-RSP
  encoded here (pynetdicom builds a pydicom Dataset for each response: ~0.7 ms of CPU),
  0xC211 if the handler raises, as pynetdicom's storage service does;
- `ReusePortServer` binds with SO_REUSEPORT so several listener processes share the port.

Both transports share the admission (`ReusePortServer.admit`): a connection becomes a pynetdicom
association only once its whole A-ASSOCIATE-RQ (at most 64 KiB, decodable) arrived within
``request_timeout`` of the TCP connection (TLS handshake included), with at most ``gate.per_ip``
connections of one address in that phase; so pynetdicom's association limit counts associations,
never idle sockets. `_GuardedSocket` then enforces the maximum PDU length we advertise and logs
one line for a peer that breaks the protocol; each connection is closed when its association ends.

Everything else (state machine, PDU coding, negotiation, other services) is pynetdicom's own.
This relies on pynetdicom 3.0 internals (pinned in pyproject.toml); the listener tests
exercise it on every run, with it and without it. ``MSKNODE_FAST_TRANSPORT=0`` serves with
pynetdicom's own loops instead (`request_handler(fast=False)`); so does any association for
which the swap fails (logged as a WARNING). Where the event-driven loops abort an association
(the DUL loop raised, the network timeout) or a C-STORE fails in the handler (0xC211), they
log a WARNING naming the association, the calling AE title and the peer address (never
patient data).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, Self, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger("node.receive.listener")

# store_handler(assoc, request: C_STORE, transfer_syntax_uid: str) -> status
StoreHandler = Callable[[Association, C_STORE, str], int]

# longest wait of an idle loop: bounds how late the ARTIM timer and kill flags are seen
_IDLE_WAIT = 0.05
# longest wait of the association's reactor for a request: bounds how late it sees the network
# timeout and a kill (a release, an abort and the end of the DUL wake it at once: `_NudgingQueue`)
_QUEUE_WAIT = 0.2
HANDLER_FAILED = 0xC211  # the status pynetdicom answers when its EVT_C_STORE handler raises


def describe(assoc) -> str:
    """``association 12 from STORESCU at 127.0.0.1:40412``: identifiers only, for log lines."""
    requestor = getattr(assoc, "requestor", None)
    calling = (getattr(requestor, "ae_title", "") or "").strip() or "?"
    where = "?"
    try:
        peer = requestor.address_info if requestor is not None else None
        if peer is not None:
            where = f"{peer.address}:{peer.port}"
    except Exception:
        pass
    index_id = getattr(assoc, "index_id", None)  # (None until the association is recorded)
    return f"association {index_id if index_id is not None else '(new)'} from {calling} at {where}"


# ---- admission: everything before an association exists -----------------------------------
#
# A connection is only handed to pynetdicom once its whole A-ASSOCIATE-RQ has been read here,
# within a hard deadline (`ReusePortServer.request_timeout`, from the TCP connection: TLS
# handshake included), at most `ASSOCIATE_RQ_LIMIT` bytes of it, and with at most
# `negotiating_per_ip` connections of one peer address in this phase at once. Until then no
# association thread exists, so pynetdicom's association limit (it counts association threads)
# only counts associations that are negotiated or established. A connection refused here is
# closed at once with one log line (peer address and reason) and counted by reason (`Refusals`).

#: the largest A-ASSOCIATE-RQ (variable field) read: real ones are a few KiB
ASSOCIATE_RQ_LIMIT = 64 * 1024
_ASSOCIATE_RQ = 0x01
_ASSOCIATE_RQ_FIXED = 68  # protocol version, reserved, called and calling AE titles, reserved

# reasons of refusal (the metric's label values and the log lines' parenthesis)
REFUSED_DEADLINE = "request_deadline"
REFUSED_PER_IP = "negotiating_per_ip"
REFUSED_CLOSED = "closed_before_request"
REFUSED_NOT_REQUEST = "not_associate_request"
REFUSED_REQUEST_TOO_LARGE = "associate_request_too_large"
REFUSED_TLS = "tls_handshake"
REFUSED_PDU_TOO_LARGE = "pdu_too_large"
REFUSED_PROTOCOL = "protocol_error"


class Refusals:
    """Refused connections and associations by reason since the last `take()` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + n

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def put_back(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.add(reason, n)


class NegotiationGate:
    """How many connections of each peer address are still before their association (thread-safe)."""

    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def enter(self, ip: str) -> bool:
        """Counts a connection in, unless `per_ip` of this address are in already."""
        with self._lock:
            n = self._open.get(ip, 0)
            if self.per_ip and n >= self.per_ip:
                return False
            self._open[ip] = n + 1
            return True

    def leave(self, ip: str) -> None:
        with self._lock:
            n = self._open.get(ip, 0) - 1
            if n > 0:
                self._open[ip] = n
            else:
                self._open.pop(ip, None)

    def negotiating(self, ip: str | None = None) -> int:
        with self._lock:
            return self._open.get(ip, 0) if ip is not None else sum(self._open.values())


class Refused(Exception):
    """A connection refused before its association: `reason` (a REFUSED_* value) and what happened."""

    def __init__(self, reason: str, detail: str, *, abort: bool = False, level: int = logging.WARNING):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.abort = abort  # answer with an A-ABORT before closing
        self.level = level


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8): `source` 0x02 service provider, `reason` 0x00 not specified,
    0x01 unrecognised PDU, 0x02 unexpected PDU, 0x06 invalid PDU parameter value."""
    return struct.pack(">BBLBBBB", 0x07, 0x00, 4, 0x00, 0x00, source, reason)


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    """`n` bytes from `sock` by `deadline` (time.monotonic), however slowly they come."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused(REFUSED_DEADLINE, f"no complete {what} within the deadline ({len(buf)} of {n} bytes)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - len(buf), 65536))
        except TimeoutError:
            raise Refused(
                REFUSED_DEADLINE, f"no complete {what} within the deadline ({len(buf)} of {n} bytes)"
            ) from None
        except OSError as e:
            raise Refused(REFUSED_CLOSED, f"connection failed inside the {what} ({type(e).__name__})") from None
        if not chunk:
            raise Refused(REFUSED_CLOSED, f"connection closed inside the {what} ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


class _AdmittedRequest(A_ASSOCIATE_RQ):
    """An A-ASSOCIATE-RQ decoded at admission: the primitive built there (to check the request) is
    what the association's first `to_primitive` returns, instead of building it a second time."""

    primitive: Any = None

    def to_primitive(self):
        primitive, self.primitive = self.primitive, None
        return primitive if primitive is not None else super().to_primitive()


def read_associate_request(
    sock: socket.socket, deadline: float, limit: int = ASSOCIATE_RQ_LIMIT
) -> tuple[bytes, A_ASSOCIATE_RQ]:
    """The whole A-ASSOCIATE-RQ PDU (header included) read from `sock` by `deadline`, and the PDU decoded
    from it (the association uses that one instead of decoding it again); raises `Refused`."""
    try:
        header = _recv_exact(sock, 6, deadline, "PDU header")
    except Refused as e:
        if e.reason == REFUSED_CLOSED and "(0 of 6" in e.detail:  # a port probe: connected and closed
            e.detail, e.level = "connection closed before any PDU", logging.INFO
        raise
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != _ASSOCIATE_RQ:
        raise Refused(
            REFUSED_NOT_REQUEST, f"PDU type 0x{pdu_type:02X} where an A-ASSOCIATE-RQ was expected", abort=True
        )
    if length > limit:
        raise Refused(
            REFUSED_REQUEST_TOO_LARGE, f"an A-ASSOCIATE-RQ of {length} bytes declared (at most {limit})", abort=True
        )
    if length < _ASSOCIATE_RQ_FIXED:
        raise Refused(REFUSED_PROTOCOL, f"an A-ASSOCIATE-RQ of {length} bytes declared (too short)", abort=True)
    pdu = header + _recv_exact(sock, length, deadline, "A-ASSOCIATE-RQ")
    try:  # one pynetdicom cannot decode would leave its association waiting 30 s
        rq = _AdmittedRequest()
        rq.decode(pdu)
        rq.primitive = A_ASSOCIATE_RQ.to_primitive(rq)
    except Exception as e:
        raise Refused(REFUSED_PROTOCOL, f"a malformed A-ASSOCIATE-RQ ({type(e).__name__})", abort=True) from None
    return pdu, rq


def tls_handshake(raw: socket.socket, context: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
    """The server side of a TLS handshake on `raw`, finished by `deadline`; raises `Refused`."""
    tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    tls.setblocking(False)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tls.close()
            raise Refused(REFUSED_DEADLINE, "no TLS handshake within the deadline")
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            select.select([tls], [], [], remaining)
        except ssl.SSLWantWriteError:
            select.select([], [tls], [], remaining)
        except (ssl.SSLError, OSError) as e:
            tls.close()
            why = getattr(e, "reason", None) or type(e).__name__
            raise Refused(REFUSED_TLS, f"TLS handshake failed ({why})") from None
    tls.setblocking(True)
    return tls


def _direct_io(sock: socket.socket) -> bool:
    """A plain TCP socket with a timeout: non-blocking underneath, so `_read_available` may read it and
    `_GuardedSocket.send` write it with one system call each (no poll first)."""
    return not isinstance(sock, ssl.SSLSocket) and sock.gettimeout() is not None


def _read_available(fd: int, buf: bytearray | memoryview) -> int:
    """Reads into `buf` what the kernel already holds for a non-blocking socket (0 at its end), or
    -1 when it holds nothing: one system call, without the poll Python makes before every receive
    on a socket with a timeout (a second system call, and a second hand-over of the GIL, per read)."""
    try:
        return os.readv(fd, [buf])
    except BlockingIOError:
        return -1


class _GuardedSocket(AssociationSocket):
    """pynetdicom's socket wrapper that first hands out the A-ASSOCIATE-RQ read at admission, and
    refuses to read a PDU longer than the maximum length we advertised (`max_pdu`, 0: any): it
    logs, sends an A-ABORT and fails the read (pynetdicom then ends the association as closed).
    A peer that breaks the protocol (an unknown PDU type, a PDU cut short, one that cannot be
    decoded: `protocol_error`) gets one WARNING line; pynetdicom aborts the association.

    pynetdicom reads each PDU as ``recv(6)`` (the header) then ``recv(length)``."""

    _primed: bytearray
    _max_pdu: int = 0
    _refusals: Refusals | None = None
    _body: int | None = None  # the length of the PDU whose header was read last
    _complained = False
    _send_lock: threading.Lock  # the DUL thread and the association thread (`send_store_response`) both send

    def send(self, bytestream: bytes) -> None:
        with self._send_lock:
            sock = self.socket
            if sock is not None and _direct_io(sock):
                # what the kernel takes at once is written in one system call, without the poll Python
                # makes before every send on a socket with a timeout; the rest (a full send buffer)
                # goes the usual way, waiting up to that timeout
                try:
                    try:
                        sent = os.write(sock.fileno(), bytestream)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(bytestream):
                        sock.sendall(memoryview(bytestream)[sent:])
                    evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})
                except Exception:
                    self.event_queue.put("Evt17")  # the transport connection closed (as `AssociationSocket.send`)
                return
            super().send(bytestream)

    def protocol_error(self, what: str) -> None:
        """One WARNING line per association for a peer that breaks the protocol (then aborted)."""
        if self._complained:
            return
        self._complained = True
        log.warning("%s: %s: aborting", describe(self.assoc), what)
        if self._refusals is not None:
            self._refusals.add(REFUSED_PROTOCOL)

    @property
    def ready(self) -> bool:
        if self._primed:
            return True
        return AssociationSocket.ready.fget(self)  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        if self._primed:
            data = self._primed[:nr_bytes]
            del self._primed[:nr_bytes]
            if len(data) < nr_bytes:
                data += super().recv(nr_bytes - len(data))
            return data
        if self._complained:  # aborted: the rest is not read (it could hold pynetdicom in recv)
            return bytearray()
        if self._body is None:  # a PDU header
            return self._header(self._read_fully(nr_bytes))
        self._body = None
        if self._max_pdu and nr_bytes > self._max_pdu:
            log.warning(
                "%s: a PDU of %d bytes declared (we accept at most %d): aborting",
                describe(self.assoc),
                nr_bytes,
                self._max_pdu,
            )
            if self._refusals is not None:
                self._refusals.add(REFUSED_PDU_TOO_LARGE)
            self._complained = True
            sock = self.socket
            if sock is not None:
                try:
                    sock.sendall(abort_pdu(0x02, 0x06))
                except OSError:
                    pass
            raise ConnectionAbortedError("PDU longer than the maximum length advertised")
        data = self._read_fully(nr_bytes)
        if len(data) < nr_bytes:
            self.protocol_error(f"the connection closed inside a PDU ({len(data)} of {nr_bytes} bytes)")
        return data

    def _header(self, data: bytearray) -> bytearray:
        """Notes a PDU header just read (its body's length, for the check of the next read)."""
        if len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if 0x01 <= pdu_type <= 0x07:
                self._body = length
            else:
                self.protocol_error(f"an unrecognised PDU type 0x{pdu_type:02X}")
        elif data:
            self.protocol_error(f"the connection closed inside a PDU header ({len(data)} of 6 bytes)")
        return data

    @property
    def direct_reads(self) -> bool:
        """`header_if_arrived` may be asked: a plain TCP socket with a timeout, at a PDU boundary."""
        sock = self.socket
        return (
            sock is not None
            and self._is_connected
            and not self._primed
            and not self._complained
            and self._body is None
            and _direct_io(sock)
        )

    def header_if_arrived(self) -> bytearray | None:
        """The next PDU header, as `recv(6)` reads it, if its first bytes have arrived; None (at
        once, without waiting) when nothing has. One non-blocking read instead of pynetdicom's
        ``ready`` (a ``select``) followed by the read. Only when `direct_reads`."""
        sock = self.socket
        assert sock is not None
        data = bytearray(6)
        k = _read_available(sock.fileno(), data)
        if k < 0:
            return None
        if 0 < k < 6:
            data[k:] = self._read_fully(6 - k)
        elif k == 0:
            data = bytearray()
        return self._header(data)

    def _read_fully(self, n: int) -> bytearray:
        """`n` bytes (fewer only if the connection closes first) received straight into one buffer,
        as many as the socket holds per call. (pynetdicom receives 4 KiB per call, each after a
        poll for the socket's timeout, and appends each to its buffer: for a 300 kB data set about
        75 calls, 75 polls and 75 copies.) Errors and timeouts propagate as from pynetdicom's recv."""
        sock = self.socket
        assert sock is not None
        buf = bytearray(n)
        got = 0
        # what the kernel already holds is taken without Python's poll (`_read_available`); only
        # when it holds nothing does Python's own receive wait, with the socket's timeout as before
        direct = _direct_io(sock)
        fd = sock.fileno()
        with memoryview(buf) as view:
            while got < n:
                k = _read_available(fd, view[got:]) if direct else -1
                if k < 0:
                    k = sock.recv_into(view[got:])
                if not k:
                    break
                got += k
        if got < n:
            del buf[got:]
        return buf


class _QuietLibrary(logging.Filter):
    """pynetdicom's own error lines (with tracebacks) about peers that break the protocol, at DEBUG:
    the transport logs one line per bad peer itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_QUIET = _QuietLibrary()


#: pynetdicom's loggers that speak of the bytes on the wire (the DUL loop, its state machine, PDU
#: and value decoding, the socket): what they say of a peer that breaks the protocol is what the transport says
#: once itself. The others (acse, association, dimse, services ...) keep their warnings: a rejected
#: association or a refused context is worth a line at the library level.
PROTOCOL_LOGGERS = (
    "pynetdicom.dul",
    "pynetdicom.fsm",
    "pynetdicom.pdu",
    "pynetdicom.pdu_items",
    "pynetdicom.pdu_primitives",
    "pynetdicom.transport",
    "pynetdicom.utils",  # decoding of the AE titles and UIDs a peer sent
)


def quiet_pynetdicom() -> None:
    """Routes the records of pynetdicom's `PROTOCOL_LOGGERS` through `_QuietLibrary` (idempotent)."""
    for name in PROTOCOL_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


class _WakingQueue(queue.Queue):
    """A queue that writes a byte to a pipe on every put, waking a ``select()``."""

    def __init__(self, wake_fd: int):
        super().__init__()
        self._wake_fd = wake_fd
        self._wake_lock = threading.Lock()

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        with self._wake_lock:
            if self._wake_fd < 0:
                return  # the DUL has stopped (its fd number may already belong to another file)
            try:
                os.write(self._wake_fd, b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: the DUL is already awake

    def close_wake(self, *fds: int) -> None:
        """Closes the pipe; later puts write nothing."""
        with self._wake_lock:
            if self._wake_fd < 0:
                return
            self._wake_fd = -1
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


class _NudgingQueue(queue.Queue):
    """The DUL's queue of primitives for the association (A-RELEASE, A-ABORT ...): each put also
    wakes the association's reactor, which waits on its DIMSE queue (an empty request), so it
    answers a release or sees an abort at once instead of at its next poll."""

    def __init__(self, assoc):
        super().__init__()
        self._assoc = assoc

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        _nudge(self._assoc)


def _nudge(assoc) -> None:
    dimse = getattr(assoc, "dimse", None)
    if dimse is not None:
        dimse.msg_queue.put((None, None))  # (carries no request: the reactor only looks at its flags)


class _DUL(DULServiceProvider):
    """A DUL provider that sleeps in ``select()`` on the socket and a wake-up pipe."""

    def __init__(self, assoc):
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._waking = _WakingQueue(self._wake_w)
        self.to_provider_queue = self._waking
        self.to_user_queue = _NudgingQueue(assoc)

    def _wait(self) -> None:
        fds: list = [self._wake_r]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and sock.fileno() >= 0:
            fds.append(sock)
        try:
            ready, _, _ = select.select(fds, [], [], _IDLE_WAIT)
        except (OSError, ValueError):
            return
        if len(fds) == 2 and not isinstance(sock, ssl.SSLSocket):  # (TLS may hold data select does not see)
            self._readable = sock in ready
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom's reactor loop with the idle ``sleep`` replaced by `_wait`."""
        self._idle_timer.start()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    self._wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as e:
                    self._abort_on_error(e)
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = not self._delivered  # (a P-DATA-TF just delivered: look for the next PDU at once)
                    self._delivered = False
                    continue
                self.state_machine.do_action(event)
                idle = False
        finally:
            self.close_pipe()
            self.ended = True  # (before the thread is seen dead: the reactor, woken now, reads this)
            _nudge(self.assoc)  # the reactor sees the DUL gone at once

    def close_pipe(self) -> None:
        self._waking.close_wake(self._wake_r, self._wake_w)

    ended = False  # the loop has ended (set just before the thread does)
    _delivered = False  # `_read_pdu_data` handed a P-DATA-TF to the DIMSE provider itself, more is coming
    _readable: bool | None = None  # what `_wait` just saw of the (plain TCP) socket; None: not looked

    def _is_transport_event(self) -> bool:
        """pynetdicom's check for a PDU on the socket, without asking the socket again (a
        ``select`` per loop: a system call and a hand-over of the GIL, often to a handler thread
        that then makes this one wait) when `_wait` has just seen whether it is readable."""
        readable, self._readable = self._readable, None
        if self.state_machine.current_state != "Sta6":  # (Sta2: the request is primed)
            return super()._is_transport_event()
        if readable is None:
            sock = self.socket
            if not (isinstance(sock, _GuardedSocket) and sock.direct_reads):
                return super()._is_transport_event()
            try:  # (not looked: a non-blocking read of the next header instead of a select, then the read)
                header = sock.header_if_arrived()
            except (OSError, TimeoutError):
                self.event_queue.put("Evt17")  # transport connection closed
                return True
            if header is None:
                return False
            self._read_pdu_data(header)
            return True
        if readable:
            self._read_pdu_data()
        return readable

    def _read_pdu_data(self, header: bytearray | None = None) -> None:
        """Reads one PDU (after its `header`, if already read) and queues its event, as pynetdicom's
        `_read_pdu_data` (the same events on a short read, an unknown PDU type or a PDU that cannot
        be decoded); except that a well-formed
        P-DATA-TF in Sta6 (established, nothing else queued) goes straight to the DIMSE provider
        (`_deliver_pdata`): what the state machine's DT-2 does with it, without the PDU, item and
        primitive objects pynetdicom makes of it (each a copy of the data set) and its PDU queue.
        (pynetdicom's EVT_DATA_RECV / EVT_PDU_RECV / EVT_FSM_TRANSITION are then not triggered for
        it: the listener binds none of them.)"""
        sock = self.socket
        if not isinstance(sock, _GuardedSocket):
            super()._read_pdu_data()
            return
        if header is None:
            try:
                header = sock.recv(6)
            except (OSError, TimeoutError):
                self.event_queue.put("Evt17")  # transport connection closed
                return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not 0x01 <= pdu_type <= 0x07:
            self.event_queue.put("Evt19")  # unrecognised PDU
            return
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            self.event_queue.put("Evt17")
            return
        if (
            pdu_type == 0x04
            and self.state_machine.current_state == "Sta6"
            and self.event_queue.empty()
            and self._deliver_pdata(body)
        ):
            # after a message's last fragment the peer waits for the response: wait in `_wait`
            self._delivered = body[_last_control(body)] & 3 != 2
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception:
            self.event_queue.put("Evt19")  # invalid PDU (logged once by `_watch_decoding`)
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _deliver_pdata(self, body: bytearray) -> bool:
        """Hands the presentation data values of a P-DATA-TF PDU (`body`: after its 6-byte header)
        to the association's DIMSE provider, as pynetdicom's DT-2 and `DIMSEMessage.decode_msg` do:
        command fragments as P-DATA primitives, data set fragments written straight into the
        message's data set (its `Spool`) as views of `body`. False (nothing done): the PDU is not
        well formed; pynetdicom decodes it (and refuses it) instead."""
        n = len(body)
        items: list[tuple[int, int, int]] = []  # (context ID, offset of the message control header, end)
        pos = 0
        while pos < n:
            if n - pos < 6:
                return False
            (item_length,) = _UINT4.unpack_from(body, pos)
            end = pos + 4 + item_length
            if item_length < 2 or end > n:
                return False
            items.append((body[pos + 4], pos + 5, end))
            pos = end
        if not items:
            return False
        dimse = self.assoc.dimse
        try:
            with memoryview(body) as view:
                for context_id, start, end in items:
                    control = body[start]
                    msg = dimse.message
                    if control & 3 == 3 and msg is None:  # a whole command set: a C-STORE-RQ is decoded here
                        store = _store_command(context_id, view[start + 1 : end])
                        if store is not None:
                            self._begin_store(dimse, store)
                            continue
                    if control & 1 or msg is None:  # a command fragment (or data before any command)
                        dimse.receive_primitive(_pdata(context_id, bytes(view[start:end])))
                        continue
                    spool: Any = msg._data_set_file  # (a `Spool`; pynetdicom types it a temporary file)
                    if spool:
                        spool.write(view[start + 1 : end])
                        spool.file.flush()
                    else:
                        cast(BytesIO, msg.data_set).write(view[start + 1 : end])
                    if not control & 2:
                        continue
                    if isinstance(msg, _StoreCommand):  # the last fragment: the C-STORE is served
                        dimse.message = None
                        request = msg.request()
                        serve_here = getattr(self.assoc, "serve_store_here", None)
                        if serve_here is None or not serve_here(msg.context_id, request):
                            dimse.msg_queue.put((msg.context_id, request))
                    else:  # pynetdicom completes its message (given an empty last fragment)
                        dimse.receive_primitive(_pdata(context_id, bytes((control,))))
        except Exception:  # as the state machine does when DT-2 fails: the DUL stops (the association ends)
            log.debug("P-DATA delivery failure", exc_info=True)
            self.kill_dul()
        return True

    def _begin_store(self, dimse, store: _StoreCommand) -> None:
        """A C-STORE-RQ's command set is in: its data set fragments go to a `Spool` from now on
        (`SpoolingDIMSE.spool_factory`, as `SpoolingDIMSE` gives pynetdicom's messages one), or to
        a BytesIO without one."""
        dimse.message = store
        factory = getattr(dimse, "spool_factory", None)
        if factory is None:
            return
        try:
            store._data_set_file = factory(self.assoc, store)
        except Exception as e:  # the data set then collects in memory (as without spooling)
            log.error("cannot make a spool for a C-STORE: %s", type(e).__name__)

    def _abort_on_error(self, error: Exception) -> None:
        """As pynetdicom does on an error in its DUL loop: bypass the state machine, send an
        A-ABORT and stop both loops; then (unlike pynetdicom, which leaves both as they are)
        close the connection and trigger EVT_ABORTED, so the index records the end at once."""
        from pynetdicom.pdu import A_ABORT_RQ

        log.warning("%s: the DUL loop failed (%s): aborting", describe(self.assoc), type(error).__name__)
        log.debug("DUL loop failure", exc_info=True)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        sock = self.socket
        if sock is not None:
            try:
                sock.send(abort_pdu.encode())
            except Exception:
                pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        if sock is not None:
            try:
                sock.close()
            except Exception:
                pass
        evt.trigger(self.assoc, evt.EVT_ABORTED, {})


_UINT4 = struct.Struct(">L")
_COMMAND_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, length
# the elements of a C-STORE-RQ decoded here (others, e.g. a C-MOVE originator: pynetdicom decodes it)
_GROUP_LENGTH, _SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _SOP_INSTANCE = (
    0x0000,
    0x0002,
    0x0100,
    0x0110,
    0x0700,
    0x0800,
    0x1000,
)
_STORE_ELEMENTS = frozenset(
    {_GROUP_LENGTH, _SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _SOP_INSTANCE}
)
_PRINTABLE = frozenset(range(0x20, 0x7F))


class _StoreCommand:
    """A C-STORE-RQ whose command set `_store_command` decoded, while its data set arrives: what
    the DIMSE provider's ``message`` holds meanwhile (the attributes of pynetdicom's message that
    the spool factory, `close_pending` and `_DUL._deliver_pdata` read)."""

    def __init__(self, context_id: int, request: C_STORE):
        self.context_id = context_id
        self.command_set = request  # (its AffectedSOPClassUID / AffectedSOPInstanceUID, for the spool)
        self._request = request
        self._data_set_file: Any = None
        self._data_set_path = None
        self.data_set = BytesIO()

    def request(self) -> C_STORE:
        """The C-STORE primitive, its data set complete (as pynetdicom's `message_to_primitive`)."""
        req = self._request
        req.DataSet = self.data_set
        req._context_id = self.context_id
        req._dataset_path = None
        req._dataset_file = self._data_set_file
        return req

    def decode_msg(self, primitive, assoc=None) -> bool:
        """(pynetdicom's own P-DATA path meets this message only if a P-DATA-TF interleaves with
        events of the state machine: the association then ends, as on a DT-2 failure.)"""
        raise RuntimeError("a C-STORE-RQ decoded by the transport cannot take pynetdicom's fragments")


def _uid_value(raw: bytes) -> str | None:
    """A command set's UID as pydicom reads it (trailing NULs and spaces dropped); None: not plain."""
    raw = raw.rstrip(b"\0 ")
    if b"\\" in raw or not _PRINTABLE.issuperset(raw):
        return None
    return raw.decode("ascii")


def _store_command(context_id: int, raw: memoryview) -> _StoreCommand | None:
    """The C-STORE-RQ of a whole command set (implicit VR little endian) with a data set, decoded
    without pydicom (pynetdicom decodes each command set into a Dataset, then each value again
    into its primitive); None for anything else or anything unusual: pynetdicom decodes it."""
    values: dict[int, bytes] = {}
    pos, n = 0, len(raw)
    while pos < n:
        if n - pos < 8:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group != 0 or element not in _STORE_ELEMENTS or element in values or pos + length > n:
            return None
        values[element] = bytes(raw[pos : pos + length])
        pos += length
    if values.get(_COMMAND_FIELD) != b"\x01\x00":  # C-STORE-RQ
        return None
    data_set_type = values.get(_DATA_SET_TYPE)
    if data_set_type is None or len(data_set_type) != 2 or data_set_type == b"\x01\x01":  # (0x0101: none)
        return None
    message_id, priority = values.get(_MESSAGE_ID), values.get(_PRIORITY)
    sop_class, sop_instance = values.get(_SOP_CLASS), values.get(_SOP_INSTANCE)
    if message_id is None or priority is None or sop_class is None or sop_instance is None:
        return None
    if len(message_id) != 2 or len(priority) != 2:
        return None
    sop_class_uid, sop_instance_uid = _uid_value(sop_class), _uid_value(sop_instance)
    if sop_class_uid is None or sop_instance_uid is None:
        return None
    request = C_STORE()
    try:  # pynetdicom's setters: the same checks as on its own path
        request.MessageID = int.from_bytes(message_id, "little")
        request.Priority = int.from_bytes(priority, "little")
        request.AffectedSOPClassUID = sop_class_uid
        request.AffectedSOPInstanceUID = sop_instance_uid
    except (TypeError, ValueError):
        return None
    return _StoreCommand(context_id, request)


def _last_control(body: bytearray) -> int:
    """The offset of the message control header of the last PDV of a well-formed P-DATA-TF body."""
    pos = last = 0
    while pos < len(body):
        last = pos + 5
        pos += 4 + _UINT4.unpack_from(body, pos)[0]
    return last


def _pdata(context_id: int, value: bytes) -> P_DATA:
    """A P-DATA primitive of one presentation data value (message control header first)."""
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((context_id, value))  # (as pynetdicom's to_primitive)
    return primitive


def _uid_element(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def _us_element(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def encode_store_response(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int) -> bytes:
    """The command set of a C-STORE-RSP (implicit VR little endian, PS3.7 9.3.1.2), no data set."""
    body = b"".join(
        [
            _uid_element(0x0002, sop_class_uid),
            _us_element(0x0100, 0x8001),  # Command Field: C-STORE-RSP
            _us_element(0x0120, message_id),  # Message ID Being Responded To
            _us_element(0x0800, 0x0101),  # Command Data Set Type: none
            _us_element(0x0900, status),
            _uid_element(0x1000, sop_instance_uid),
        ]
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


class _Association(Association):
    """An acceptor whose reactor blocks on the DIMSE queue instead of polling every 1 ms."""

    release_requested = False  # the peer asked for an orderly release
    _serving_queued = False  # the reactor thread is serving a request it took from the DIMSE queue
    _reactor_running = False
    store_handler: StoreHandler | None = None

    def _serve_request(self, msg, context_id: int) -> None:
        handler = self.store_handler
        context = self._accepted_cx.get(context_id)
        if handler is None or not isinstance(msg, C_STORE) or context is None or self._sent_release:
            super()._serve_request(msg, context_id)
            return
        message_id = msg.MessageID
        try:
            if not msg.is_valid_request or message_id is None:  # (a valid request has a Message ID)
                log.warning("%s: invalid C-STORE request ignored", describe(self))
                return
            try:
                status = handler(self, msg, str(context.transfer_syntax[0]))
            except Exception as e:  # as pynetdicom's storage service: 0xC211 (error in the handler)
                log.warning("%s: the C-STORE handler failed (%s): answering 0xC211", describe(self), type(e).__name__)
                log.debug("C-STORE handler failure", exc_info=True)
                status = HANDLER_FAILED
        finally:
            msg.DataSet = None  # free the received bytes now
            spool, msg._dataset_file = msg._dataset_file, None
            if spool is not None:  # (node.receive.spool: its staged file, unless published or quarantined)
                spool.close()
        if not self.is_established:
            return
        command = encode_store_response(
            str(msg.AffectedSOPClassUID or ""), str(msg.AffectedSOPInstanceUID or ""), message_id, int(status)
        )
        if self._send_direct(context_id, command):
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)

    def kill(self) -> None:
        """pynetdicom's kill, with the reactor woken at once to see it (it waits on its queue)."""
        self._kill = True
        _nudge(self)
        super().kill()

    def serve_store_here(self, context_id: int, request: C_STORE) -> bool:
        """Serves a C-STORE in the calling thread (the DUL's, whose P-DATA-TF completed it) instead
        of queueing it for the association's reactor thread; False: queue it.

        The hand-over to the reactor thread cost a wake-up and a switch of threads per instance
        (and, with two associations in a process, a hand-over of the GIL): the DUL thread stores
        the instance and writes the response itself. Meanwhile it reads nothing more from the
        peer, which waits for the response (an acceptor that negotiates no asynchronous
        operations). Only when nothing is queued for the reactor thread, so that requests are
        still served in the order they came."""
        if not self._reactor_running or self.store_handler is None or self._serving_queued:
            return False  # (before the reactor runs, the association is not yet recorded as accepted)
        if not self.dimse.msg_queue.empty():
            return False
        self._serve_request(request, context_id)
        return True

    def _send_direct(self, context_id: int, command: bytes) -> bool:
        """Writes a C-STORE-RSP as one P-DATA-TF PDU from this thread; False: send it through the DUL.

        Through the DUL the response is a primitive queued for the DUL thread, which wakes up,
        runs the state machine (DT-1: send P-DATA-TF, stay in Sta6) and writes it: one more
        thread hand-over per C-STORE, which on a loaded machine waits for a CPU. Written here
        instead, in the states where DT-1 / AR-7 would send it (Sta6, Sta7), with nothing queued
        for the DUL before it (so the order of what we send is kept), under the socket's send lock.
        """
        dul = self.dul
        sock = dul.socket
        if not isinstance(sock, _GuardedSocket) or not dul.to_provider_queue.empty():
            return False
        if dul.state_machine.current_state not in ("Sta6", "Sta7"):
            return False
        # PDV item: length, presentation context ID, message control header (command, last fragment)
        item = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
        peer_max = int(getattr(self.requestor, "maximum_length", 0) or 0)
        if peer_max and len(item) > peer_max:
            return False
        sock.send(struct.pack(">BBL", 0x04, 0x00, len(item)) + item)
        return True

    def _run_reactor(self) -> None:
        self._is_paused = False
        self._reactor_running = True  # (established, EVT_ACCEPTED handled: the DUL thread may serve)
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_QUEUE_WAIT)
            except queue.Empty:
                pass
            else:
                if msg and context_id is not None:  # (None, None) carries no request
                    self._serving_queued = True
                    try:
                        self._serve_request(msg, context_id)
                    finally:
                        self._serving_queued = False

            if self.is_established and self.acse.is_release_requested():
                self.release_requested = True  # read by the connection-closed handler (another thread)
                self.is_released = True
                self.is_established = False
                # record the release before answering it: once the peer holds our A-RELEASE-RP,
                # the index already shows the association closed (completeness waits on that)
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.acse.send_release(is_response=True)
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive() or getattr(self.dul, "ended", False):
                self.kill()  # (waits for the DUL thread's last steps)
                return

            if self.dul.idle_timer_expired():
                log.warning(
                    "%s: nothing received for %.0f s (network timeout): aborting",
                    describe(self),
                    self.network_timeout or 0,
                )
                self.abort()
                self.kill()
                return


class _StockRequestHandler(RequestHandler):
    """pynetdicom's request handler, after admission (`ReusePortServer.admit`); it also keeps the
    association it starts (`HandoffServer` waits for it to end)."""

    assoc: Association | None = None
    primed: bytes = b""  # the A-ASSOCIATE-RQ read at admission
    primed_pdu: A_ASSOCIATE_RQ | None = None  # and decoded there

    def handle(self) -> None:
        """Admission, then pynetdicom's association (as `RequestHandler.handle`), served to its end in
        this connection's thread; then the connection is closed, however the association ended."""
        admit = getattr(self.server, "admit", None)
        if admit is not None:
            admitted = admit(self.request, self.client_address)
            if admitted is None:
                return  # refused, logged and closed
            self.request, self.primed, self.primed_pdu = admitted
        assoc = self._create_association()
        _watch_decoding(assoc, (self.primed, self.primed_pdu) if self.primed_pdu is not None else None)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        sock = assoc.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is not None:  # (pynetdicom leaves it open after an abort, until the peer closes it)
            _close(raw)
        _close(self.request)

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if sock is not None and type(sock) is AssociationSocket:
            sock.__class__ = _GuardedSocket
            assert isinstance(sock, _GuardedSocket)
            sock._send_lock = threading.Lock()
            sock._primed = bytearray(self.primed)
            sock._max_pdu = int(self.ae.maximum_pdu_size or 0)
            sock._refusals = getattr(self.server, "refusals", None)
        self.assoc = assoc
        return assoc


class _RequestHandler(_StockRequestHandler):
    def _create_association(self) -> Association:
        """pynetdicom's acceptor, switched to `_Association` with a fresh `_DUL` (before any thread starts).

        If the switch fails (pynetdicom's internals are not what this module expects), the
        association is served by pynetdicom's own loops, with a WARNING."""
        assoc = super()._create_association()
        old_class, old = assoc.__class__, assoc.dul
        dul = None
        try:
            dul = _DUL(assoc)
            dul.socket = old.socket
            dul.event_queue = old.event_queue  # holds Evt5, the transport connection indication
            assoc.__class__ = _Association
            assert isinstance(assoc, _Association)
            assoc.dul = dul
            assoc.acse_timeout = assoc.acse_timeout  # the setters configure the DUL's timers
            assoc.network_timeout = assoc.network_timeout
            assoc.store_handler = getattr(self.server, "store_handler", None)  # a ReusePortServer's
        except Exception as e:
            assoc.__class__, assoc.dul = old_class, old  # its timers were set by pynetdicom already
            if dul is not None:
                dul.close_pipe()
            peer = self.client_address
            log.warning(
                "connection from %s:%s: the fast transport is unavailable (%s): served by stock pynetdicom",
                peer[0],
                peer[1],
                type(e).__name__,
            )
        return assoc


def _watch_decoding(assoc, request: tuple[bytes, A_ASSOCIATE_RQ] | None = None) -> None:
    """A PDU that pynetdicom cannot decode is a protocol error (one WARNING line; pynetdicom aborts).

    `request`: the A-ASSOCIATE-RQ as read and decoded at admission; when the association reads
    those bytes (its first PDU) it gets that PDU instead of decoding it a second time."""
    dul = assoc.dul
    sock = dul.socket
    decode = dul._decode_pdu
    if not isinstance(sock, _GuardedSocket):
        return
    admitted = [request] if request is not None else []

    def _decode_pdu(bytestream):
        if admitted:
            raw, pdu = admitted.pop()
            if bytestream == raw:  # (as `DULServiceProvider._decode_pdu`, without the decoding)
                evt.trigger(assoc, evt.EVT_DATA_RECV, {"data": raw})
                evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
                return pdu, _PDU_TYPES[raw[0:1]][1]
        try:
            return decode(bytestream)
        except Exception as e:
            sock.protocol_error(f"a PDU that cannot be decoded (type 0x{bytestream[0]:02X}, {type(e).__name__})")
            raise

    dul._decode_pdu = _decode_pdu


def request_handler(fast: bool = True) -> type[RequestHandler]:
    """The request handler of the association server: the event-driven loops, or pynetdicom's own."""
    return _RequestHandler if fast else _StockRequestHandler


class ReusePortServer(ThreadedAssociationServer):
    """A threaded association server on a SO_REUSEPORT socket (with the event-driven reactors unless
    `request_handler` says otherwise)."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog: many PACS connect at once
    store_handler: StoreHandler | None = None  # answers C-STOREs without pynetdicom's service class
    request_timeout = 5.0  # seconds from the TCP connection to the complete A-ASSOCIATE-RQ

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None, request_handler=None):
        self.gate = NegotiationGate(8)
        self.refusals = Refusals()
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            request_handler=request_handler or _RequestHandler,
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """The accepted connection as it is: a TLS handshake happens in its own thread (`admit`),
        never in the accepting one."""
        assert self.socket is not None
        conn, address = self.socket.accept()
        return conn, address

    def admit(self, request: socket.socket, client_address) -> tuple[socket.socket, bytes, A_ASSOCIATE_RQ] | None:
        """The connection (TLS-wrapped if the server has an ssl_context) and its A-ASSOCIATE-RQ (bytes and
        decoded), read within `request_timeout`; or None: refused (one log line, counted in `refusals`) and closed."""
        host, port = str(client_address[0]), client_address[1]
        deadline = time.monotonic() + self.request_timeout
        sock = request
        try:  # our PDUs (C-STORE-RSP ...) are small: each goes out at once, not held for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            if not self.gate.enter(host):
                raise Refused(
                    REFUSED_PER_IP, f"{self.gate.per_ip} connections from this address are already negotiating"
                )
            try:
                if self.ssl_context is not None and not isinstance(sock, ssl.SSLSocket):
                    sock = tls_handshake(sock, self.ssl_context, deadline)
                primed, rq = read_associate_request(sock, deadline)
            finally:
                self.gate.leave(host)
        except Refused as e:
            log.log(e.level, "connection from %s:%s refused (%s): %s", host, port, e.reason, e.detail)
            self.refusals.add(e.reason)
            if e.abort:
                try:
                    sock.settimeout(1.0)
                    sock.sendall(abort_pdu(0x02, 0x02 if e.reason == REFUSED_NOT_REQUEST else 0x06))
                except OSError:
                    pass
            _close(sock)
            return None
        finally:
            self.negotiated(client_address)
        sock.settimeout(self.ae.network_timeout)
        return sock, primed, rq

    def negotiated(self, client_address) -> None:
        """Called once per connection when its admission ends (admitted or refused)."""

    def handle_error(self, request, client_address) -> None:
        """One WARNING line for a connection whose handler failed (the traceback at DEBUG)."""
        import sys

        error = sys.exc_info()[1]
        log.warning("connection from %s:%s failed (%s)", client_address[0], client_address[1], type(error).__name__)
        log.debug("connection failure", exc_info=True)
        _close(request)

    def server_bind(self) -> None:
        if self.socket is not None and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        """Stops serving and closes the listening socket (associations in progress go on)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)

    def server_close(self) -> None:
        # only the listening socket; open associations are ended by their own threads
        if self.socket is None:
            return
        try:
            self.socket.close()
        except OSError:
            pass


def _close(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class HandoffServer(ReusePortServer):
    """An association server without a port of its own: a parent process accepts the TCP
    connections and passes them over a Unix socket (SCM_RIGHTS), see `node.receive.listener._supervise`.

    The parent counts the connections each process serves: when one ends, however it ends
    (released, aborted, rejected, or closed before any association was requested), this process
    sends one ``-`` back over the same socket."""

    _handoff: socket.socket | None = None

    def server_bind(self) -> None:
        pass  # the parent holds the listening socket

    def server_activate(self) -> None:
        pass

    def serve_handoff(self, handoff: socket.socket, on_parent_gone: Callable[[], None] | None = None) -> None:
        """Serves each connection received on `handoff` until `shutdown()`; calls `on_parent_gone`
        if the parent process closes its end (it died: this process must not linger)."""
        self._handoff = handoff
        self._stopping = False
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(handoff, 256, 1)
            except OSError:
                msg, fds = b"", []
            if not fds:
                if not self._stopping and on_parent_gone is not None:
                    on_parent_gone()
                return
            conn = socket.socket(fileno=fds[0])
            try:
                host, port = json.loads(msg)
            except ValueError:
                host, port = "?", 0
            self.process_request(conn, (host, port))

    def finish_request(self: Self, request, client_address) -> None:  # (Self: as typeshed types the handler's server)
        """Serves one handed-off connection (in its own thread) until its association thread ends,
        then tells the parent."""
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
            assoc = getattr(handler, "assoc", None)
            if assoc is not None and assoc.ident is not None:  # (started)
                assoc.join()
        finally:
            self._connection_ended()

    def negotiated(self, client_address) -> None:
        """Tells the parent that this connection's admission ended (``n`` and its address): the
        parent counts connections still negotiating per peer address across all processes."""
        if self._handoff is None:
            return
        try:
            self._handoff.send(b"n" + json.dumps([str(client_address[0]), client_address[1]]).encode())
        except OSError:
            pass

    def _connection_ended(self) -> None:
        if self._handoff is None:
            return
        try:
            self._handoff.send(b"-")
        except OSError:
            pass  # the parent is gone (this process is stopping)

    def shutdown(self) -> None:
        """Stops taking connections (associations in progress go on)."""
        self._stopping = True
        handoff = getattr(self, "_handoff", None)
        if handoff is not None:
            try:
                handoff.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)
