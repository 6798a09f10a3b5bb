"""The node's health: listener, broker, database, disk, workers — as one PHI-free dict.

`health_report(settings, db)` is the detailed report: ``GET /api/health`` (behind login; 503 when
``ok`` is false) shows the last one `HealthMonitor` made in the background, at most one every
``MSKNODE_HEALTH_INTERVAL_SECONDS`` however many ask. The anonymous ``GET /health`` answers only
`liveness` (database and disk; no association, no detail). Each component has ``ok`` and, when
not ok, an ``error``. ``status`` is ``ok`` (all fine), ``degraded`` (the node stores what it
receives but something else is wrong: no live worker, broker down, listener refusing) or
``down`` (database unreachable or disk below ``MSKNODE_MIN_FREE_GB``: nothing can be accepted).
Only counts, states, versions and host:port appear — never a patient attribute or UID.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import ssl
import threading
import time
from typing import Any

from sqlalchemy import func, select, text

from node.db.database import Database, utcnow
from node.settings import Settings

#: a worker whose last heartbeat is older than this many sweep intervals (at least 10 s) is gone
STALE_HEARTBEATS = 5


def check_database(db: Database) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        with db.session() as s:
            s.execute(text("SELECT 1"))
        return {
            "ok": True,
            "backend": db.engine.dialect.name,
            "latency_ms": round((time.perf_counter() - t0) * 1000, 1),
        }
    except Exception as e:
        return {
            "ok": False,
            "backend": db.engine.dialect.name,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
        }


def check_disk(settings: Settings) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(settings.data_dir)
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    free_gb = usage.free / 1e9
    out: dict[str, Any] = {
        "ok": free_gb >= settings.min_free_gb,
        "free_gb": round(free_gb, 2),
        "total_gb": round(usage.total / 1e9, 2),
        "min_free_gb": settings.min_free_gb,
    }
    if not out["ok"]:
        out["error"] = f"free space {free_gb:.2f} GB is below MSKNODE_MIN_FREE_GB={settings.min_free_gb:g}"
    return out


def check_broker(settings: Settings, *, timeout: float = 3.0) -> dict[str, Any]:
    """Connects to the broker (the filesystem transport: its folder must be writable)."""
    from node.jobs.celery_app import FilesystemBroker, is_filesystem, transport_options

    transport = str(settings.broker_url).split("://", 1)[0]
    if is_filesystem(settings):
        fs = FilesystemBroker.of(settings)
        try:
            fs.ensure()
            probe = fs.queue_dir / ".health"
            probe.write_bytes(b"")
            probe.unlink()
            waiting = sum(1 for p in fs.queue_dir.iterdir() if p.name.endswith(".msg"))
            return {"ok": True, "transport": transport, "messages": waiting}
        except OSError as e:
            return {"ok": False, "transport": transport, "error": f"{type(e).__name__}: {e}"}
    from kombu import Connection

    try:
        with Connection(
            settings.broker_url, transport_options=transport_options(settings), connect_timeout=timeout
        ) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)  # type: ignore[arg-type]  # seconds, a float: kombu's stubs say int
        return {"ok": True, "transport": transport}
    except Exception as e:
        return {"ok": False, "transport": transport, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


#: the calling AE title of the listener check when the node accepts any AE title
HEALTH_AE_TITLE = "MSKNODE_HEALTH"

#: what pynetdicom logs at ERROR when an association is rejected: not an error for the listener check
_REJECTION_LINES = ("Association Rejected", "Result: Rejected", "Reason: ")


def health_calling_ae(settings: Settings) -> str:
    """The calling AE title of the listener check: one the listener accepts, when there is one.

    No allow-list: ``MSKNODE_HEALTH`` (any AE title is accepted). An allow-list that names the
    node's own AE title (``MSKNODE_AE_TITLE``): that one, so the check is a full C-ECHO. An
    allow-list without it: ``MSKNODE_HEALTH`` again; the listener rejects it (calling AE not
    recognised), which proves it answers, and the check keeps that expected rejection out of the log.
    """
    allowed = settings.allowed_ae_titles
    return settings.ae_title if allowed and settings.ae_title in allowed else HEALTH_AE_TITLE


class _QuietRejection(logging.Filter):
    """Drops pynetdicom's rejection lines of the check: logged by the thread that runs it or by
    an association thread of its AE."""

    def __init__(self, ae: Any):
        super().__init__()
        self.ae = ae
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.thread == self.thread or getattr(threading.current_thread(), "ae", None) is self.ae
        return not (ours and str(record.msg).startswith(_REJECTION_LINES))


def listener_tls_args(settings: Settings) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for the check of a TLS listener (MSKNODE_LISTENER_TLS_CERT_FILE), else
    None. The check only needs the listener to answer: it does not verify the listener's certificate,
    and presents the node's own certificate when clients must have one (MSKNODE_LISTENER_TLS_CA_FILE:
    the node's certificate must then be signed by one of those CAs and allowed for client authentication)."""
    if settings.listener_tls_cert_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if settings.listener_tls_ca_file is not None:
        key = settings.listener_tls_key_file
        context.load_cert_chain(str(settings.listener_tls_cert_file), str(key) if key is not None else None)
    return context, "localhost"  # (the name sent in the handshake; not verified)


def check_listener(settings: Settings, *, timeout: float = 3.0) -> dict[str, Any]:
    """A C-ECHO to the configured listener. A reject for an unknown calling AE still proves it answers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time from the UID tables

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    calling = health_calling_ae(settings)
    out: dict[str, Any] = {"address": f"{host}:{settings.port}", "ae_title": settings.ae_title, "calling_ae": calling}
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.network_timeout = timeout
    ae.dimse_timeout = timeout
    quiet = _QuietRejection(ae)
    acse_log = logging.getLogger("pynetdicom.acse")
    acse_log.addFilter(quiet)
    t0 = time.perf_counter()
    try:
        assoc = ae.associate(host, settings.port, ae_title=settings.ae_title, tls_args=listener_tls_args(settings))
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            ok = status is not None and getattr(status, "Status", None) == 0x0000
            out.update(ok=ok, latency_ms=round((time.perf_counter() - t0) * 1000, 1))
            if not ok:
                out["error"] = "C-ECHO did not succeed"
        elif assoc.is_rejected:
            rj = assoc.acceptor.primitive
            result, source, reason = (
                getattr(rj, "result", None),
                getattr(rj, "result_source", None),
                getattr(rj, "diagnostic", None),
            )
            if result == 0x01 and source == 0x01 and reason == 0x03:
                # rejected-permanent, service user, calling AE not recognised: it answers, with an allow-list
                out.update(
                    ok=True,
                    latency_ms=round((time.perf_counter() - t0) * 1000, 1),
                    note="answers; the check's AE title is not in MSKNODE_ALLOWED_AE_TITLES (add "
                    "MSKNODE_AE_TITLE to it for a full C-ECHO)",
                )
            else:
                out.update(ok=False, error=f"association rejected (result {result}, source {source}, reason {reason})")
        else:
            out.update(ok=False, error="no answer (association aborted or refused)")
    except Exception as e:
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        ae.shutdown()
        acse_log.removeFilter(quiet)
    return out


def check_workers(db: Database, settings: Settings, *, now: dt.datetime | None = None) -> dict[str, Any]:
    from node.jobs.lease import live_workers

    now = now or utcnow()
    stale = max(10.0, STALE_HEARTBEATS * settings.sweep_interval_seconds)
    try:
        with db.session() as s:
            alive = live_workers(s, now=now, stale_after=stale)
            workers = [
                {
                    "name": w.name,
                    "queues": w.queues or [],
                    "last_seen_at": w.last_seen_at.isoformat(),
                    "started_at": w.started_at.isoformat(),
                }
                for w in alive
            ]
    except Exception as e:
        return {"ok": False, "alive": 0, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    queues = sorted({q for w in workers for q in w["queues"]})
    out: dict[str, Any] = {"ok": bool(workers), "alive": len(workers), "queues": queues, "workers": workers}
    if not workers:
        out["error"] = f"no worker sent a heartbeat in the last {stale:g} s"
    return out


def job_counts(db: Database) -> dict[str, Any]:
    from node.db.schema import Job, OutboxItem

    try:
        with db.session() as s:
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            outbox = dict(s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
        return {"jobs": jobs, "outbox": outbox}
    except Exception:
        return {}


def health_report(
    settings: Settings, db: Database, *, check_listener_too: bool = True, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Every component's state; ``ok`` is True only when all are fine."""
    now = now or utcnow()
    components: dict[str, dict[str, Any]] = {
        "database": check_database(db),
        "disk": check_disk(settings),
        "broker": check_broker(settings),
    }
    if check_listener_too:
        components["listener"] = check_listener(settings)
    components["workers"] = (
        check_workers(db, settings, now=now)
        if components["database"]["ok"]
        else {"ok": False, "alive": 0, "error": "database unreachable"}
    )
    if not components["database"]["ok"] or not components["disk"]["ok"]:
        status = "down"
    elif all(c["ok"] for c in components.values()):
        status = "ok"
    else:
        status = "degraded"
    report: dict[str, Any] = {
        "ok": status == "ok",
        "status": status,
        "checked_at": now.isoformat(),
        "components": components,
    }
    if components["database"]["ok"]:
        report.update(job_counts(db))
    return report


class HealthMonitor:
    """The detailed report, probed in the background at most every `interval` seconds.

    `latest()` answers the last report at once; when it is older than `interval` it starts one probe
    in a background thread (never two at a time), so however many clients ask, the listener sees at
    most one C-ECHO association per interval. Only the very first call waits for a probe.
    """

    def __init__(self, settings: Settings, db: Database, *, interval: float, first_wait: float = 15.0):
        self.settings, self.db, self.interval, self.first_wait = settings, db, interval, first_wait
        self._lock = threading.Lock()
        self._report: dict[str, Any] | None = None
        self._at = 0.0  # monotonic time the last probe started
        self._report_at = 0.0  # ... and the one the report is from
        self._running: threading.Thread | None = None
        self._first = threading.Event()
        self.probes = 0

    def _probe(self, started: float) -> None:
        try:
            report = health_report(self.settings, self.db)
        except Exception as e:
            report = {"ok": False, "status": "down", "checked_at": utcnow().isoformat(), "error": type(e).__name__}
        with self._lock:
            self._report, self._report_at = report, started
            self._running = None
        self._first.set()

    def latest(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            if self._running is None and (self._report is None or now - self._at >= self.interval):
                self._at = now
                self.probes += 1
                self._running = threading.Thread(target=self._probe, args=(now,), name="msknode-health", daemon=True)
                self._running.start()
            report = self._report
        if report is None:
            self._first.wait(self.first_wait)
        with self._lock:
            report = self._report
            at = self._report_at
        if report is None:
            return {"ok": False, "status": "unknown", "error": "the first health check has not finished yet"}
        return report | {"age_seconds": round(max(0.0, now - at), 1)}

    def stop(self, timeout: float = 10.0) -> None:
        t = self._running
        if t is not None:
            t.join(timeout)


def liveness(settings: Settings, db: Database) -> bool:
    """What the anonymous ``GET /health`` answers: the database answers and the disk has room (no association)."""
    return bool(check_database(db)["ok"] and check_disk(settings)["ok"])
