"""The DICOM listener: C-ECHO and C-STORE SCP for every storage SOP class.

The handlers are thin: check space, parse the header, stage the raw bytes durably,
hand the index rows to the process's `IndexWriter` and answer once both are durable.
Refused objects get a PS3.4 status and are quarantined. Associations from AE titles
outside MSKNODE_ALLOWED_AE_TITLES are rejected (rejected-permanent, service-user,
calling AE title not recognised); when free disk is under MSKNODE_MIN_FREE_GB new
associations are rejected-transient and C-STOREs get 0xA700.

`run_listener` serves until SIGTERM/SIGINT. With ``MSKNODE_LISTENER_PROCESSES`` > 1 it
starts that many processes, accepts connections itself and hands each one to the process
serving the fewest associations (restarting any process that dies). Listening sockets use
SO_REUSEPORT, so several ``msknode listen`` may also share a port on one host.
Logs carry UIDs, AE titles and statuses, never patient data.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import, not in its stubs

from node.db.database import Database, upgrade
from node.errors import IngestError, NodeError, OutOfSpaceError, StorageError
from node.ops.restart import RestartBackoff
from node.receive.header import OUT_OF_RESOURCES, SUCCESS, read_header, validate
from node.receive.index import Received, publish_new
from node.receive.negotiation import configure_pynetdicom
from node.receive.spool import SPOOL_MEMORY_BYTES, Spool, close_pending, install, spool_of
from node.receive.storage import InstanceStore, StagedFile, encode_file_meta
from node.receive.transport import (
    REFUSED_PER_IP,
    HandoffServer,
    NegotiationGate,
    Refusals,
    ReusePortServer,
    request_handler,
)
from node.receive.writer import IndexWriter

log = logging.getLogger("node.receive.listener")

SHUTDOWN_GRACE_SECONDS = 10.0

# A-ASSOCIATE-RJ (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognised
REJECT_LOW_DISK = (0x02, 0x01, 0x01)  # rejected-transient, service-user, no reason given
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit exceeded

# why an association was rejected: (reason label, words) for the log line and the refusal count
REJECTIONS = {
    REJECT_CALLING_AE: ("calling_ae_title", "calling AE title not recognised"),
    REJECT_CALLED_AE: ("called_ae_title", "called AE title not recognised"),
    REJECT_LOW_DISK: ("low_disk", "free disk below MSKNODE_MIN_FREE_GB"),
    REJECT_LOCAL_LIMIT: ("local_limit", "local limit exceeded (MSKNODE_MAX_ASSOCIATIONS associations established)"),
}
REFUSALS_FLUSH_SECONDS = 2.0


def listener_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def listener_ssl_context(settings):
    """The listener's TLS context (None without MSKNODE_LISTENER_TLS_CERT_FILE): TLS 1.2 or later,
    client certificates required and verified against MSKNODE_LISTENER_TLS_CA_FILE when it is set."""
    import ssl

    cert, key, ca = settings.listener_tls_cert_file, settings.listener_tls_key_file, settings.listener_tls_ca_file
    if cert is None:
        if key is not None or ca is not None:
            raise NodeError("MSKNODE_LISTENER_TLS_KEY_FILE/CA_FILE are set without MSKNODE_LISTENER_TLS_CERT_FILE")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
        if ca is not None:
            context.load_verify_locations(cafile=str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise NodeError(f"cannot load the listener's TLS certificate, key or CA: {e}") from None
    return context


class Listener:
    """One listener process: the association server, its handlers and the index writer."""

    def __init__(
        self,
        settings,
        *,
        db: Database | None = None,
        logger: logging.Logger | None = None,
        handoff: socket.socket | None = None,
    ):
        """`handoff`: connections come from a parent process over this socket instead of a bound port."""
        self.settings = settings
        self.handoff = handoff
        self.log = logger or log
        self.store = InstanceStore.from_settings(settings)
        self.db = db or Database(settings.database_url, migrate=False)
        self.writer = IndexWriter(self.db, self.store, settings, logger=self.log)
        self.server: ReusePortServer | None = None
        self._assocs: dict[Any, int | None] = {}
        # associations that ended (an abort from the DUL thread) before EVT_ACCEPTED was handled
        self._ended_early: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.listener = listener_id()
        self.store_timeout = max(5.0, settings.dimse_timeout * 0.8)
        self.max_object_bytes = int(settings.max_object_mb) * 1024 * 1024
        self.refusals = Refusals()  # refused connections and associations by reason, not yet recorded
        self.refusal_counts = RefusalCounts(settings)
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> ReusePortServer:
        """Binds the port and serves in a background thread."""
        configure_pynetdicom()
        self.store.prepare()
        ae = AE(ae_title=self.settings.ae_title)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = self.settings.max_pdu_length  # advertised in A-ASSOCIATE-AC, enforced on receive
        # counts association threads: they start only once the A-ASSOCIATE-RQ is in (transport's admission)
        ae.maximum_associations = self.settings.max_associations
        ae.network_timeout = self.settings.network_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.acse_timeout = 30
        ae.require_calling_aet = list(self.settings.allowed_ae_titles)
        ae.require_called_aet = self.settings.require_called_ae_title
        ssl_context = listener_ssl_context(self.settings)
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REQUESTED, self._install_spool),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_CONN_CLOSE, self._close_spools),
        ]
        # Unified Procedure Steps on the same AE, behind the same AE-title allow-list
        from node.ups.dimse import add_ups_service

        add_ups_service(ae, handlers, self.db, self.settings)
        address = (self.settings.host, self.settings.port)
        server_class = HandoffServer if self.handoff is not None else ReusePortServer
        fast = self.settings.fast_transport
        try:
            server = ae.make_server(
                address,
                evt_handlers=handlers,
                server_class=server_class,
                request_handler=request_handler(fast),
                ssl_context=ssl_context,
            )
        except OSError as e:
            raise NodeError(f"cannot listen on {address[0]}:{address[1]}: {e.strerror or e}") from None
        assert isinstance(server, ReusePortServer)  # an instance of `server_class`
        server.request_timeout = self.settings.association_request_timeout
        server.gate = NegotiationGate(self.settings.negotiating_per_address)
        server.refusals = self.refusals
        if fast:
            server.store_handler = self.handle_store  # else C-STOREs go through EVT_C_STORE
        self.server = server
        target: Callable[..., None]
        kwargs: dict[str, Any]
        if self.handoff is not None:
            assert isinstance(server, HandoffServer)
            target = server.serve_handoff
            kwargs = {"handoff": self.handoff, "on_parent_gone": lambda: os.kill(os.getpid(), signal.SIGTERM)}
        else:
            target, kwargs = server.serve_forever, {"poll_interval": 0.2}
        self._thread = threading.Thread(target=target, kwargs=kwargs, name="dicom-accept", daemon=True)
        self._thread.start()
        self._flusher = threading.Thread(target=self._flush_loop, name="refusals", daemon=True)
        self._flusher.start()
        self.log.info(
            "listening on %s:%d as %s (pid %d, allowed AE titles: %s, transport: %s%s)",
            address[0],
            server.server_address[1],
            self.settings.ae_title,
            os.getpid(),
            ",".join(self.settings.allowed_ae_titles) or "any",
            "fast" if fast else "stock pynetdicom",
            ", TLS" if ssl_context is not None else "",
        )
        return server

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stops accepting, lets open associations finish (up to `grace` s), aborts the rest."""
        server = self.server
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            self.log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        with self._lock:
            leftover = list(self._assocs.items())
            self._assocs.clear()
        for _, association_id in leftover:
            if association_id is not None:
                self._close_row(association_id, "aborted")
        self._stopping.set()
        if self._flusher is not None:
            self._flusher.join(5.0)
        self.refusal_counts.flush(self.refusals)
        self.writer.flush()
        self.writer.close()
        self.log.debug("index writer: %d operations in %d transactions", self.writer.committed, self.writer.batches)
        self.store.close()
        self.db.dispose()
        self.server = None

    def _flush_loop(self) -> None:
        while not self._stopping.wait(REFUSALS_FLUSH_SECONDS):
            self.refusal_counts.flush(self.refusals)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    # ---- association events ---------------------------------------------------------
    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling = (assoc.requestor.primitive.calling_ae_title or "").strip()
        allowed = self.settings.allowed_ae_titles
        if allowed and calling not in allowed:
            return  # pynetdicom rejects it (require_calling_aet): rejected-permanent, calling AE
        if not self.store.has_space():
            assoc.acse.send_reject(*REJECT_LOW_DISK)  # logged by _on_rejected
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

    def _on_accepted(self, event) -> None:
        assoc = event.assoc
        peer = assoc.requestor.address_info
        calling = (assoc.requestor.ae_title or "").strip()
        try:
            association_id = self.writer.open_association(
                calling_ae=calling,
                called_ae=(assoc.acceptor.ae_title or "").strip(),
                peer_address=f"{peer.address}:{peer.port}",
                listener=self.listener,
                timeout=self.store_timeout,
            )
        except Exception as e:  # instances are still stored; completeness then just cannot wait for release
            self.log.error("cannot record the association from %s: %s", calling, e)
            association_id = None
        assoc.index_id = association_id  # named in the transport's log lines
        with self._lock:
            self._assocs[assoc] = association_id
            early = self._ended_early.pop(assoc, None)
        self.log.info("association %s from %s (%s:%s) accepted", association_id, calling, peer.address, peer.port)
        if early is not None:
            self._end(assoc, early)

    def _on_rejected(self, event) -> None:
        """One WARNING line per rejected association (why, who, from where) and its count by reason."""
        assoc = event.assoc
        rj = assoc.acceptor.primitive
        key = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else None
        reason, words = REJECTIONS.get(key, ("rejected", f"result {key}"))  # type: ignore[arg-type]
        rq = assoc.requestor.primitive
        called = (getattr(rq, "called_ae_title", "") or "").strip()
        calling = (getattr(rq, "calling_ae_title", "") or "").strip()
        peer = assoc.requestor.address_info
        self.refusals.add(reason)
        self.log.warning(
            "association from %s (called %s) at %s:%s rejected (%s): %s",
            calling or "?",
            called or "?",
            peer.address,
            peer.port,
            reason,
            words,
        )

    def _end(self, assoc, reason: str) -> None:
        with self._lock:
            if assoc not in self._assocs:
                self._ended_early.setdefault(assoc, reason)
                return
            association_id = self._assocs.pop(assoc)
        if association_id is not None:
            self._close_row(association_id, reason)
        self.log.info("association %s %s", association_id, reason)

    def _close_row(self, association_id: int, reason: str) -> None:
        try:
            self.writer.close_association(association_id, reason, timeout=self.store_timeout)
        except Exception as e:
            self.log.error("cannot record the end of association %s: %s", association_id, e)

    def _on_released(self, event) -> None:
        self._end(event.assoc, "released")

    def _on_aborted(self, event) -> None:
        self._end(event.assoc, "aborted")

    def _on_conn_close(self, event) -> None:
        # the peer may close the socket right after our A-RELEASE-RP, before EVT_RELEASED fires
        released = event.assoc.is_released or getattr(event.assoc, "release_requested", False)
        self._end(event.assoc, "released" if released else "aborted")

    # ---- DIMSE services ----------------------------------------------------------------
    def _on_echo(self, event) -> int:
        return SUCCESS

    def _on_store(self, event) -> int:
        """EVT_C_STORE (pynetdicom's own path, used when the fast path is off)."""
        return self.handle_store(event.assoc, event.request, str(event.context.transfer_syntax))

    # ---- C-STORE ----------------------------------------------------------------------
    def _install_spool(self, event) -> None:
        """EVT_REQUESTED (before any P-DATA): C-STORE data sets of this association go to a `Spool`."""
        install(event.assoc, self._new_spool)

    def _new_spool(self, assoc, msg) -> Spool:
        """The spool of one C-STORE request, made once its command set is in: headed by the File
        Meta Information the stored file will carry (from the request's UIDs, which the data
        set's must equal)."""
        cs = msg.command_set
        sop_class = str(cs.AffectedSOPClassUID or "").strip("\0 ")
        sop = str(cs.AffectedSOPInstanceUID or "").strip("\0 ")
        context = assoc._accepted_cx.get(msg.context_id)
        ts = str(context.transfer_syntax[0]) if context is not None else ""
        calling = (assoc.requestor.ae_title or "").strip()
        try:
            meta = encode_file_meta(sop_class, sop, ts, calling)
        except UnicodeError:  # refused anyway (validate): quarantined without file meta
            meta = b""
        return Spool(
            self.store.incoming,
            file_meta=meta,
            memory_limit=SPOOL_MEMORY_BYTES,
            max_bytes=self.max_object_bytes,
            has_space=self.store.has_space,
        )

    def _close_spools(self, event) -> None:
        """EVT_CONN_CLOSE: C-STOREs cut off by the end of the connection leave no staged file behind."""
        dropped = close_pending(event.assoc)
        if dropped:
            self.log.info(
                "association %s closed with %d C-STORE(s) unanswered: dropped",
                getattr(event.assoc, "index_id", None),
                dropped,
            )

    def handle_store(self, assoc, req, transfer_syntax: str) -> int:
        """One C-STORE: the status to answer, returned only once file and index row are durable."""
        spool = spool_of(req)
        try:
            return self._store(assoc, req, transfer_syntax, spool)
        finally:
            if spool is not None:
                spool.close()  # frees its bytes; deletes its file unless published or quarantined

    def _store(self, assoc, req, transfer_syntax: str, spool: Spool | None) -> int:
        calling = (assoc.requestor.ae_title or "").strip()
        request_sop = str(req.AffectedSOPInstanceUID or "")
        data: bytes | bytearray | None
        if spool is None:  # (no spool: the data set is in pynetdicom's BytesIO)
            data = req.DataSet.getvalue() if req.DataSet is not None else b""
            size = len(data)
        else:
            data = spool.data() if spool.in_memory else None
            size = spool.size
        if size > self.max_object_bytes:
            limit = self.max_object_bytes // 2**20
            error = IngestError(
                OUT_OF_RESOURCES, f"a data set of {size / 2**20:.0f} MB (MSKNODE_MAX_OBJECT_MB {limit})"
            )
            self._refuse(None, req, transfer_syntax, calling, error)
            return OUT_OF_RESOURCES
        if spool is not None and spool.error is not None:
            self.log.error("C-STORE %s from %s: 0xA700 (cannot stage: %s)", request_sop, calling, spool.error)
            return OUT_OF_RESOURCES
        if not self.store.has_space(size if data is not None else 0):  # (a spooled data set is on disk already)
            self.log.warning("C-STORE %s from %s: 0xA700 (free disk below MSKNODE_MIN_FREE_GB)", request_sop, calling)
            return OUT_OF_RESOURCES
        try:
            if data is not None:
                header = read_header(data, transfer_syntax, max_bytes=self.max_object_bytes)
            else:
                assert spool is not None
                with spool.open_dataset() as f:
                    header = read_header(f, transfer_syntax, max_bytes=self.max_object_bytes)
            validate(header, request_sop_class_uid=str(req.AffectedSOPClassUID), request_sop_instance_uid=request_sop)
        except IngestError as e:
            self._refuse(data, req, transfer_syntax, calling, e, spool=spool)
            return e.status

        meta = encode_file_meta(header.sop_class_uid, header.sop_instance_uid, transfer_syntax, calling)
        try:
            if data is not None:
                staged = self.store.stage(meta, data, check_space=False)  # (free space checked above)
            else:
                assert spool is not None
                if spool.file_meta != meta:  # (cannot happen: the request's UIDs are the data set's)
                    raise StorageError("the spooled file's meta information differs")
                staged = StagedFile(path=spool.take(), size=len(meta) + spool.size, sha256=spool.sha256)
        except OutOfSpaceError:
            self.log.warning("C-STORE %s from %s: 0xA700 (disk full)", request_sop, calling)
            return OUT_OF_RESOURCES
        except StorageError as e:
            self.log.error("C-STORE %s from %s: 0xA700 (%s)", request_sop, calling, e)
            return OUT_OF_RESOURCES

        with self._lock:
            association_id = self._assocs.get(assoc)
        item = Received(
            header,
            staged,
            transfer_syntax,
            calling_ae=calling,
            association_id=association_id,
            file_meta=meta,
            data=data,
        )
        try:
            if data is not None:  # a spooled file is published under the index lock (`index_instances`)
                publish_new(self.store, item, sync=not self.writer.overlap)
            outcome = self.writer.store_instance(item, timeout=self.store_timeout)
        except Exception as e:
            if item.published is None:
                self.store.discard(staged)
            self.log.error("C-STORE %s from %s: 0xA700 (index not written: %s)", request_sop, calling, type(e).__name__)
            return OUT_OF_RESOURCES
        if outcome.demographics_changed:
            self.log.info(
                "study %s: demographics corrected by instance %s (fields: %s)",
                header.study_uid,
                header.sop_instance_uid,
                ",".join(outcome.demographics_changed),
            )
        return outcome.status

    def _refuse(
        self,
        data: bytes | bytearray | None,
        req,
        transfer_syntax: str,
        calling: str,
        error: IngestError,
        *,
        spool: Spool | None = None,
    ) -> None:
        """Keeps a refused object in the quarantine (file + row; without `data` or a spooled file,
        the row only, e.g. for a data set over MSKNODE_MAX_OBJECT_MB); never raises."""
        sop_class = str(req.AffectedSOPClassUID or "")
        sop = str(req.AffectedSOPInstanceUID or "")
        path = None
        try:
            if data is not None:
                meta = (
                    encode_file_meta(sop_class, sop, transfer_syntax, calling)
                    if sop.isascii() and sop_class.isascii()
                    else b""
                )
                path = str(self.store.quarantine(data, file_meta=meta))
            elif spool is not None and not spool.in_memory:
                path = str(self.store.quarantine_file(spool.take(), digest=spool.sha256))
            self.writer.quarantine(
                calling_ae=calling,
                sop_instance_uid=sop or None,
                status=error.status,
                reason=error.reason,
                path=path,
                timeout=self.store_timeout,
            )
        except Exception as e:
            self.log.error("cannot quarantine the refused object %s: %s", sop, e)
        self.log.warning(
            "C-STORE %s from %s refused: 0x%04X (%s); quarantined at %s", sop, calling, error.status, error.reason, path
        )


class RefusalCounts:
    """This process's refused connections and associations by reason since it started, in
    ``<data_dir>/run/refusals-<host>-<pid>.json`` (rewritten atomically when they change): the
    ``msknode_listener_refusals_total`` metric sums these files (`node.ops.metrics`)."""

    def __init__(self, settings):
        self.path = Path(settings.data_dir) / "run" / f"refusals-{socket.gethostname()}-{os.getpid()}.json"
        self.totals: dict[str, int] = {}
        try:  # a process that had this pid before: its counts go on
            self.totals = {str(k): int(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass

    def flush(self, refusals: Refusals) -> None:
        new = refusals.take()
        if not new:
            return
        totals = dict(self.totals)
        for reason, n in new.items():
            totals[reason] = totals.get(reason, 0) + n
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(totals, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:
            refusals.put_back(new)
            log.error("cannot record the refusal counts in %s: %s", self.path, e)
            return
        self.totals = totals


# ---- process entry points -----------------------------------------------------------------


def _wait_for_signal() -> None:
    stop = threading.Event()

    def _handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    while not stop.wait(0.5):
        pass


#: what a listener process sends its parent once it serves (`serve_one`)
READY = b"r"


def settle_garbage_collector() -> None:
    """Moves everything allocated so far (modules, the AE, the engine: ~120 000 objects) out of the
    cyclic garbage collector's reach (`gc.freeze`).

    They live as long as the process; without this, the first full collection during ingest
    walks all of them while holding the GIL: measured 0.36-0.50 s in which no association of
    the process moved (a 400-instance send, loaded 2-core machine), about 1 ms per instance of
    that send. After it a full collection walks only what ingest allocates (~1.4 ms)."""
    gc.collect()
    gc.freeze()


def serve_one(settings, *, handoff: socket.socket | None = None) -> int:
    """Runs one listener process until SIGTERM/SIGINT (the database is already migrated)."""
    listener = Listener(settings, handoff=handoff)
    listener.start()
    settle_garbage_collector()
    if handoff is not None:  # the parent hands connections to started processes first
        try:
            handoff.send(READY)
        except OSError:
            pass
    try:
        _wait_for_signal()
    finally:
        log.info("stopping the listener (pid %d)", os.getpid())
        listener.stop()
    return 0


def _child_main(settings, index: int, handoff: socket.socket) -> None:
    from node.cli import setup_logging

    setup_logging(settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    try:
        raise SystemExit(serve_one(settings, handoff=handoff))
    except NodeError as e:
        log.error("listener process %d: %s", index, e)
        raise SystemExit(1) from None


class RunMarker:
    """``<data_dir>/run/listener-<pid>.running``: present while a listener runs, touched every
    few seconds; left behind by an unclean stop (kill, crash, power loss)."""

    TOUCH_SECONDS = 10.0
    MARGIN_SECONDS = 60.0  # longer than any commit-to-fsync window

    def __init__(self, settings):
        self.dir = Path(settings.data_dir) / "run"
        self.path = self.dir / f"listener-{os.getpid()}.running"
        self._stop = threading.Event()

    def leftovers(self) -> list[Path]:
        """Markers of listener processes (on this host) that are gone."""
        found = []
        for marker in self.dir.glob("listener-*.running"):
            try:
                pid = int(marker.stem.split("-", 1)[1].split(".")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                found.append(marker)
        return found

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._touch()
        threading.Thread(target=self._loop, name="run-marker", daemon=True).start()

    def _touch(self) -> None:
        with open(self.path, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
            f.flush()
            os.fsync(f.fileno())

    def _loop(self) -> None:
        while not self._stop.wait(self.TOUCH_SECONDS):
            try:
                self._touch()
            except OSError as e:
                log.error("cannot touch %s: %s", self.path, e)

    def remove(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def recover(settings, marker: RunMarker) -> int:
    """After an unclean stop of a listener on SQLite (overlapped fsync): checks the latest rows."""
    import datetime as dt

    from node.receive.index import recover_unclean_stop

    stale = marker.leftovers()
    if not stale:
        return 0
    newest = max(m.stat().st_mtime for m in stale)
    since = dt.datetime.fromtimestamp(newest - RunMarker.MARGIN_SECONDS, dt.UTC)
    log.warning(
        "a listener stopped uncleanly (%d marker(s) left): checking the instances received since %s", len(stale), since
    )
    db = Database(settings.database_url, migrate=False)
    try:
        with db.session() as s:
            removed = recover_unclean_stop(s, InstanceStore.from_settings(settings), since=since, logger=log)
    finally:
        db.dispose()
    for m in stale:
        m.unlink(missing_ok=True)
    return removed


def run_listener(settings) -> int:
    """``msknode listen``: migrates the database, then serves with MSKNODE_LISTENER_PROCESSES processes."""
    settings.ensure_dirs()
    upgrade(settings.database_url)
    InstanceStore.from_settings(settings).prepare()
    marker = RunMarker(settings)
    if settings.is_sqlite:
        recover(settings, marker)
    marker.start()
    try:
        n = settings.listener_processes
        if n == 1:
            return serve_one(settings)
        return _supervise(settings, n)
    finally:
        marker.remove()


class _Child:
    """A listener process fed by the parent: its hand-off socket and how many connections it serves
    (counted up when one is handed to it, down when it reports one ended: `HandoffServer`)."""

    def __init__(self, ctx, settings, index: int):
        self.index = index
        self.parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = ctx.Process(
            target=_child_main, args=(settings, index, child_end), name=f"msknode-listener-{index}"
        )
        self.process.start()
        child_end.close()
        self.active = 0
        self.ready = False  # it said it serves (`READY`): until then it is handed connections only if none is ready
        self.negotiating: dict[tuple[str, int], str] = {}  # handed-off connections before their association
        self.backoff = RestartBackoff(stable_seconds=None)  # 1 s, 2 s ... 30 s


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):  # other `msknode listen` instances may share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NodeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(ReusePortServer.request_queue_size)
    return sock


def _supervise(settings, n: int) -> int:
    """Accepts connections and hands each to the listener process serving the fewest associations
    (among those that have started serving, while any has).

    The `n` children are restarted with backoff when they die. (The kernel's SO_REUSEPORT
    balancing is by a hash of the peer's port: four associations land 2-2 on two processes only
    6 times in 16.) The listening socket keeps SO_REUSEPORT, so several `msknode listen` may
    still share a port.
    """
    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def _handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    lsock = _listening_socket(settings.host, settings.port)
    children = [_Child(ctx, settings, i) for i in range(n)]
    lock = threading.Lock()
    # connections of each peer address before their association, across all processes: a child
    # reports ``n<address>`` when a connection's admission ends (`HandoffServer.negotiated`)
    gate = NegotiationGate(settings.negotiating_per_address)
    refusals = Refusals()
    refusal_counts = RefusalCounts(settings)
    log.info("listening on %s:%d with %d listener processes", settings.host, settings.port, n)

    def tally() -> str:
        return ", ".join(str(c.active) for c in children)

    limit = settings.max_associations or 1 << 30

    def accept_loop() -> None:
        lsock.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, addr = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                continue
            peer = (str(addr[0]), int(addr[1]))
            if not gate.enter(peer[0]):
                log.warning(
                    "connection from %s:%s refused (%s): %d connections from this address are already negotiating",
                    peer[0],
                    peer[1],
                    REFUSED_PER_IP,
                    gate.per_ip,
                )
                refusals.add(REFUSED_PER_IP)
                conn.close()
                continue
            with lock:
                alive = [c for c in children if c.process.is_alive()]
                # a process still starting keeps a connection waiting until it serves: a started
                # one takes it first, unless it is at its association limit (it would reject it)
                order = sorted(alive, key=lambda c: (c.active >= limit, not c.ready, c.active, c.index))
                for child in order:
                    try:
                        socket.send_fds(child.parent_end, [json.dumps(list(peer)).encode()], [conn.fileno()])
                    except OSError:
                        continue
                    child.active += 1
                    child.negotiating[peer] = peer[0]
                    log.debug(
                        "connection from %s handed to listener process %d (connections per process: %s)",
                        addr[0],
                        child.index,
                        tally(),
                    )
                    break
                else:
                    gate.leave(peer[0])
                    log.error("no listener process can take the connection from %s", addr[0])
            conn.close()

    def done_loop() -> None:
        while not stop.is_set():
            with lock:
                socks = {c.parent_end: c for c in children if c.process.is_alive()}
            try:
                ready, _, _ = select.select(list(socks), [], [], 0.5)
            except (OSError, ValueError):
                continue
            for s in ready:
                try:
                    msg = s.recv(512)
                except OSError:
                    msg = b""
                if not msg:  # the process is exiting; the supervisor restarts it
                    time.sleep(0.1)
                    continue
                if msg == READY:
                    with lock:
                        socks[s].ready = True
                    log.info("listener process %d ready", socks[s].index)
                    continue
                if msg.startswith(b"n"):  # a connection's admission ended
                    try:
                        host, port = json.loads(msg[1:])
                    except ValueError:
                        continue
                    with lock:
                        ip = socks[s].negotiating.pop((str(host), int(port)), None)
                    if ip is not None:
                        gate.leave(ip)
                    continue
                with lock:
                    child = socks[s]
                    child.active = max(0, child.active - msg.count(b"-"))
                    log.debug(
                        "listener process %d: a connection ended (connections per process: %s)", child.index, tally()
                    )

    threads = [
        threading.Thread(target=accept_loop, name="accept", daemon=True),
        threading.Thread(target=done_loop, name="handoff-done", daemon=True),
    ]
    for th in threads:
        th.start()
    last_flush = time.monotonic()
    while not stop.wait(0.5):
        if time.monotonic() - last_flush >= REFUSALS_FLUSH_SECONDS:
            refusal_counts.flush(refusals)
            last_flush = time.monotonic()
        for i, child in enumerate(children):
            if child.process.is_alive():
                continue
            with lock:  # its connections before association are gone with it
                for ip in child.negotiating.values():
                    gate.leave(ip)
                child.negotiating.clear()
            now = time.monotonic()
            if not child.backoff.waiting:
                delay = child.backoff.exited(now, started_at=now)
                log.error("listener process %d exited with %s; restarting in %.0f s", i, child.process.exitcode, delay)
            elif child.backoff.due(now):
                replacement = _Child(ctx, settings, i)
                replacement.backoff = child.backoff
                replacement.backoff.started()
                with lock:
                    children[i] = replacement
                child.parent_end.close()
    lsock.close()
    refusal_counts.flush(refusals)
    for child in children:
        if child.process.is_alive():
            child.process.terminate()
    for child in children:
        child.process.join(SHUTDOWN_GRACE_SECONDS + 5)
        if child.process.is_alive():
            child.process.kill()
            child.process.join()
        child.parent_end.close()
    return 0
