"""The senders of the outbox: C-STORE (DIMSE), STOW-RS, HL7 v2 ORU^R01 over MLLP and FHIR R4, one registry
entry per destination type.

A sender takes a destination and the items leased for it and yields ``(item id, Outcome)`` as
each answer comes; `classify_status` turns a DICOM status (PS3.4 B.2.3, PS3.7 C) into an outcome:
acknowledged, transient (retried with backoff) or permanent (dead at once). `SENDERS` maps a
destination ``type`` (`node.settings.Destination`) to its sender; `node.dispatch.outbox` uses it.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from node.settings import DimseDestination, Settings, StowDestination

if TYPE_CHECKING:
    import pydicom

_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
#: the transfer syntaxes C-STORE proposes for every result object, in order of preference, each in a presentation
#: context of its own (a peer choosing one syntax of a list may take Implicit, and our files are Explicit VR Little
#: Endian: proposed alone, Explicit is accepted wherever the peer can, and the file is sent as it is)
SEND_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


@dataclass(frozen=True)
class Outcome:
    """What a destination said about one object."""

    ok: bool
    permanent: bool = False
    status: int | None = None
    error: str | None = None

    @classmethod
    def sent(cls, status: int | None = 0) -> Outcome:
        return cls(True, status=status)

    @classmethod
    def transient(cls, error: str, status: int | None = None) -> Outcome:
        return cls(False, False, status, error)

    @classmethod
    def permanent_failure(cls, error: str, status: int | None = None) -> Outcome:
        return cls(False, True, status, error)


@dataclass(frozen=True)
class Claimed:
    """An outbox item this process holds the lease on."""

    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    attempts: int


Sender = Callable[[Any, Sequence[Claimed], Settings], Iterable[tuple[int, Outcome]]]


# ---- status classification --------------------------------------------------------------------


def classify_status(status: int) -> Outcome:
    """A C-STORE response status (PS3.4 B.2.3, PS3.7 C) as an outcome."""
    if status in _OK_STATUSES:
        return Outcome.sent(status)
    hexs = f"0x{status:04X}"
    if 0xA700 <= status <= 0xA7FF:
        return Outcome.transient(f"{hexs} refused: out of resources", status)
    if status == 0x0122:
        return Outcome.permanent_failure(f"{hexs} SOP class not supported", status)
    if status == 0x0124:
        return Outcome.permanent_failure(f"{hexs} not authorized", status)
    if status == 0x0117:
        return Outcome.permanent_failure(f"{hexs} invalid SOP instance", status)
    if 0xA900 <= status <= 0xA9FF:
        return Outcome.permanent_failure(f"{hexs} data set does not match SOP class", status)
    if 0xC000 <= status <= 0xCFFF:
        return Outcome.permanent_failure(f"{hexs} cannot understand", status)
    if status == 0x0110:
        return Outcome.transient(f"{hexs} processing failure", status)
    return Outcome.transient(f"{hexs} failure", status)


# ---- DIMSE (C-STORE) ----------------------------------------------------------------------------


def _tls_context(dest: DimseDestination) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca_file)
    if dest.tls_cert_file:
        ctx.load_cert_chain(dest.tls_cert_file, dest.tls_key_file)
    return ctx


def _probe(host: str, port: int) -> str:
    """Why an association could not be made, as far as TCP tells."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return "association aborted or not answered"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return "connection timed out"
    except OSError as e:
        return f"connection failed: {e.strerror or e}"


def no_delay(assoc: Any) -> None:
    """Sets TCP_NODELAY on an association's socket. A C-STORE request goes out as several PDUs (command, then
    the data set in fragments of the peer's maximum PDU length); with Nagle's algorithm on, each small write
    waits for the peer's delayed ACK of the one before, ~40 ms per object on loopback."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a test's socket pair): nothing to hold
        pass


def keep_responses(assoc: Any) -> None:
    """pynetdicom's reactor thread can take a C-STORE response off the DIMSE queue while send_c_store is about to
    wait for it (its pause check races with the reactor's loop); the response is then logged as an "unexpected
    service message" and the send waits out the DIMSE timeout. A response the reactor sees goes back on the queue."""
    serve = assoc._serve_request

    def _serve(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = _serve


def _read(item: Claimed, accepted: Iterable[tuple[str, str]] = ()) -> pydicom.Dataset | Path | Outcome:
    """What `send_c_store` is given for ``item``: its file's path when the peer accepted the file's own transfer
    syntax for its SOP class, ``accepted`` (pynetdicom then sends the file's encoded data set as it is, in fragments,
    `STORE_SEND_CHUNKED_DATASET`), else the decoded data set (pynetdicom re-encodes it for the context the
    peer accepted: Implicit VR Little Endian)."""
    import pydicom  # imported when sending: listing and retrying stay fast
    from pydicom.filereader import read_file_meta_info

    path = Path(item.path)
    try:
        meta = read_file_meta_info(path)
        own = (str(meta.get("MediaStorageSOPClassUID", "")), str(meta.get("TransferSyntaxUID", "")))
        if own[0] == item.sop_class_uid and own in accepted and meta.get("MediaStorageSOPInstanceUID"):
            return path
        return pydicom.dcmread(path)
    except FileNotFoundError:
        return Outcome.permanent_failure(f"result file missing: {item.path}")
    except Exception as e:  # a file we wrote ourselves and cannot read: nothing a retry fixes
        return Outcome.permanent_failure(f"result file unreadable: {item.path}: {e}")


def send_dimse(dest: DimseDestination, items: Sequence[Claimed], settings: Settings) -> Iterator[tuple[int, Outcome]]:
    """C-STORE of ``items`` over one association; yields (item id, outcome) as each answer comes."""
    from pynetdicom import AE, _config, build_context

    _config.STORE_SEND_CHUNKED_DATASET = True  # a path given to send_c_store: its bytes, not decoded and re-encoded
    sop_classes = list(dict.fromkeys(it.sop_class_uid for it in items))[: 128 // len(SEND_TRANSFER_SYNTAXES)]
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = min(settings.network_timeout, 30.0)
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.requested_contexts = [build_context(sop, [ts]) for sop in sop_classes for ts in SEND_TRANSFER_SYNTAXES]
    tls_args = (_tls_context(dest), dest.host) if dest.tls else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as e:
        for it in items:
            yield it.id, Outcome.transient(f"{dest.key}: {e}")
        return
    try:
        if assoc.is_established:
            no_delay(assoc)
            keep_responses(assoc)
            as_is = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            accepted = {sop for sop, _ in as_is}
            for it in items:
                if it.sop_class_uid not in accepted:
                    yield (
                        it.id,
                        Outcome.permanent_failure(
                            f"0x0122 SOP class not supported: no presentation context accepted for {it.sop_class_uid}",
                            0x0122,
                        ),
                    )
                    continue
                if not assoc.is_established:
                    yield it.id, Outcome.transient(f"{dest.key}: association aborted during the transfer")
                    continue
                ds = _read(it, as_is)  # one file in memory at a time (none, sent from its file)
                if isinstance(ds, Outcome):
                    yield it.id, ds
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, ValueError, OSError) as e:
                    yield it.id, Outcome.transient(f"{dest.key}: C-STORE failed: {e}")
                    continue
                if not status or "Status" not in status:
                    yield (
                        it.id,
                        Outcome.transient(f"{dest.key}: no C-STORE response (association aborted or timed out)"),
                    )
                    continue
                yield it.id, classify_status(int(status.Status))
            if assoc.is_established:
                assoc.release()
        elif assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            result = getattr(rsp, "result", None)
            why = f"{getattr(rsp, 'result_str', '')}; source: {getattr(rsp, 'source_str', '')}; reason: {getattr(rsp, 'reason_str', '')}"
            for it in items:
                if result == 0x01:
                    yield it.id, Outcome.permanent_failure(f"{dest.key}: association rejected (permanent): {why}")
                else:
                    yield it.id, Outcome.transient(f"{dest.key}: association rejected (transient): {why}")
        elif assoc.rejected_contexts and not assoc.accepted_contexts:
            for it in items:
                yield (
                    it.id,
                    Outcome.permanent_failure(
                        f"0x0122 SOP class not supported: {dest.key} accepted no presentation context for {it.sop_class_uid}",
                        0x0122,
                    ),
                )
        else:
            reason = _probe(dest.host, dest.port)
            for it in items:
                yield it.id, Outcome.transient(f"{dest.key}: {reason}")
    finally:
        if assoc.is_established:
            assoc.abort()


# ---- STOW-RS ---------------------------------------------------------------------------------------


def _stow_client(dest: StowDestination):
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if dest.username is not None:
        session.auth = (dest.username, dest.password or "")
    session.verify = dest.verify_tls
    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    client = DICOMwebClient(url=dest.url, session=session, headers=headers)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff
    return client


def _stow_outcome(response: Any, sop_uid: str) -> Outcome:
    """The STOW-RS response data set for one instance."""
    if response is None:
        return Outcome.sent(None)
    for item in response.get("FailedSOPSequence", []) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            reason = int(item.get("FailureReason", 0x0110) or 0x0110)
            out = classify_status(reason)
            return Outcome(False, out.permanent, reason, f"STOW-RS failure: {out.error}")
    for item in response.get("ReferencedSOPSequence", []) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            return Outcome.sent(int(item.get("WarningReason", 0) or 0))
    return Outcome.transient("STOW-RS response does not mention the instance")


def send_stow(dest: StowDestination, items: Sequence[Claimed], settings: Settings) -> Iterator[tuple[int, Outcome]]:
    """STOW-RS of ``items``, one request per instance so each gets its own status; yields as it goes."""
    import requests

    client = _stow_client(dest)
    for it in items:
        ds = _read(it)
        if isinstance(ds, Outcome):
            yield it.id, ds
            continue
        dataset = cast("pydicom.Dataset", ds)  # (never a path: nothing is accepted as it is over STOW-RS)
        try:
            response = client.store_instances(datasets=[dataset])
            outcome = _stow_outcome(response, it.sop_instance_uid)
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else None
            text = f"{dest.key}: HTTP {code}: {(e.response.text[:200] if e.response is not None else str(e))}"
            if code is None or code >= 500 or code in (408, 429):
                outcome = Outcome.transient(text)
            else:
                outcome = Outcome.permanent_failure(text)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            outcome = Outcome.transient(f"{dest.key}: {type(e).__name__}: {e}"[:500])
        except requests.exceptions.RequestException as e:
            outcome = Outcome.transient(f"{dest.key}: {e}"[:500])
        yield it.id, outcome


# ---- HL7 v2 and FHIR (one report per finished job; modules of their own) ---------------------------------


def send_hl7(dest: Any, items: Sequence[Claimed], settings: Settings) -> Iterable[tuple[int, Outcome]]:
    """ORU^R01 over MLLP (`node.dispatch.hl7v2`)."""
    from node.dispatch.hl7v2 import send_hl7 as send

    return send(dest, items, settings)


def send_fhir(dest: Any, items: Sequence[Claimed], settings: Settings) -> Iterable[tuple[int, Outcome]]:
    """A FHIR R4 transaction Bundle over HTTP (`node.dispatch.fhir`)."""
    from node.dispatch.fhir import send_fhir as send

    return send(dest, items, settings)


SENDERS: dict[str, Sender] = {"dimse": send_dimse, "stow": send_stow, "hl7": send_hl7, "fhir": send_fhir}
