"""Idle and drip-feeding sockets must not take the association slots of the real PACS.

A flood of 50 hostile connections is kept open (each reconnects as soon as the listener drops it):
20 idle ones and 20 that drip an A-ASSOCIATE-RQ one byte a second, each from its own loopback
address, and 10 more from one address. Meanwhile dcmtk's storescu sends a study and echoscu
echoes: every instance is stored and nothing is rejected for the local limit, because only
associations count toward MSKNODE_MAX_ASSOCIATIONS, a connection has MSKNODE_ASSOCIATION_REQUEST_TIMEOUT
seconds for its whole A-ASSOCIATE-RQ, and one address has at most MSKNODE_NEGOTIATING_PER_ADDRESS
connections before association (across all listener processes). Each refusal is logged with the
peer address and counted by reason.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlalchemy import select as sql_select
from test_attack_assoc_pdu import refusals_metric
from test_listener import TRANSPORTS, storescu, write_series

from node.db.database import Database
from node.db.schema import Instance
from support.hostile import associate_rq, connect
from support.listener import ListenerProcess, echo

pytestmark = [pytest.mark.integration]

DEADLINE = 3.0  # MSKNODE_ASSOCIATION_REQUEST_TIMEOUT in these tests
PER_ADDRESS = 8  # MSKNODE_NEGOTIATING_PER_ADDRESS (the default)


class Flood:
    """Hostile connections, each slot reconnecting as soon as the listener drops it."""

    def __init__(self, port: int, *, idle: int = 20, drip: int = 20, crowd: int = 10):
        self.port = port
        self.slots = [(f"127.0.1.{i + 1}", False) for i in range(idle)]
        self.slots += [(f"127.0.2.{i + 1}", True) for i in range(drip)]
        self.slots += [("127.0.3.1", False)] * crowd
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.open = 0
        self.connections = 0
        self.lifetimes: list[tuple[bool, float]] = []  # (drip-feeder, seconds until the listener closed it)
        self.threads = [threading.Thread(target=self._slot, args=s, daemon=True) for s in self.slots]
        self.rq = associate_rq(calling="DRIPPER")

    def __enter__(self) -> Flood:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _slot(self, source: str, drip: bool) -> None:
        while not self.stop.is_set():
            try:
                sock = connect(self.port, source)
            except OSError:
                self.stop.wait(0.2)
                continue
            opened = time.monotonic()
            with self.lock:
                self.open += 1
                self.connections += 1
            closed = False
            try:
                if drip:
                    sock.sendall(self.rq[:6])  # a header that announces the whole A-ASSOCIATE-RQ
                sent = 6
                while not self.stop.is_set():
                    ready, _, _ = select.select([sock], [], [], 1.0)
                    if ready:
                        try:
                            data = sock.recv(4096)
                        except OSError:
                            data = b""
                        if not data:
                            closed = True
                            break
                    elif drip and sent < len(self.rq):
                        try:
                            sock.send(self.rq[sent : sent + 1])
                        except OSError:
                            closed = True
                            break
                        sent += 1
            finally:
                with self.lock:
                    self.open -= 1
                    if closed:
                        self.lifetimes.append((drip, time.monotonic() - opened))
                sock.close()
            self.stop.wait(0.2)  # then the same peer tries again


REALDATA = Path(os.environ.get("MSKNODE_REALDATA") or Path(__file__).resolve().parents[3] / "shared" / "realdata")
SIEMENS_KNEE = REALDATA / "knee" / "siemens_sagittal_dicom"


@pytest.mark.parametrize(("processes", "mode"), [("1", "fast"), ("2", "fast"), ("2", "stock")])
def test_idle_and_drip_feeding_sockets_do_not_take_the_slots_of_a_real_pacs(tmp_path, processes, mode):
    _, _, paths = write_series(tmp_path / "study", n=40)
    flood_while_sending(tmp_path, processes, paths, mode)


def test_a_real_knee_series_arrives_whole_through_the_flood(tmp_path):
    if not SIEMENS_KNEE.is_dir():
        pytest.skip(f"real DICOM not available: {SIEMENS_KNEE} is absent (set MSKNODE_REALDATA to ../shared/realdata)")
    paths = sorted(SIEMENS_KNEE.glob("*.DCM"))
    assert paths, f"no DICOM files in {SIEMENS_KNEE}"
    flood_while_sending(tmp_path, "2", paths)


def flood_while_sending(tmp_path: Path, processes: str, paths: list[Path], mode: str = "fast") -> None:
    """The flood of `Flood` while storescu sends `paths` and echoscu echoes; checks all arrived."""
    node = ListenerProcess(
        tmp_path / "data",
        env={
            "MSKNODE_FAST_TRANSPORT": TRANSPORTS[mode],
            "MSKNODE_LISTENER_PROCESSES": processes,
            "MSKNODE_ASSOCIATION_REQUEST_TIMEOUT": str(DEADLINE),
            "MSKNODE_NEGOTIATING_PER_ADDRESS": str(PER_ADDRESS),
        },
    ).start()
    try:
        with Flood(node.port) as flood:
            t0 = time.monotonic()
            while flood.open < 45 and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            assert flood.open >= 45, f"only {flood.open} hostile connections open"
            echoes = []
            r = storescu(node.port, paths)
            for _ in range(3):
                echoes.append(
                    subprocess.run(
                        ["echoscu", "-aet", "PACS", "-aec", "MSKNODE", "127.0.0.1", str(node.port)],
                        capture_output=True,
                        text=True,
                        env=dict(os.environ, TCP_NODELAY="1"),
                        timeout=30,
                    )
                )
            while time.monotonic() - t0 < 2 * DEADLINE + 2:  # let the drip-feeders reach the deadline
                time.sleep(0.2)
            open_at_end, connections = flood.open, flood.connections
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Local Limit" not in r.stdout + r.stderr
        assert all(e.returncode == 0 for e in echoes), [e.stdout + e.stderr for e in echoes]
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        with db.session() as s:
            stored = s.scalar(sql_select(func.count()).select_from(Instance))
        db.dispose()
        assert stored == len(paths)
        assert echo(node.port) == 0  # at once after the flood

        log = node.log_path.read_text(errors="replace")
        assert "local_limit" not in log and "Local Limit" not in log
        drips = [s for d, s in flood.lifetimes if d]
        assert drips and max(drips) < DEADLINE + 3, drips  # cut at the deadline (plus scheduling) however they drip
        assert re.search(r"connection from 127\.0\.2\.\d+:\d+ refused \(request_deadline\)", log)
        assert re.search(r"connection from 127\.0\.3\.1:\d+ refused \(negotiating_per_ip\)", log)
        assert "DRIPPER" not in log  # never got as far as an association
        counts = refusals_metric(node)
        assert counts.get("request_deadline", 0) >= 20 and counts.get("negotiating_per_ip", 0) >= 1, counts
        print(
            f"\nflood ({processes} listener processes, {mode} transport): {stored}/{len(paths)} instances stored, "
            f"storescu rc {r.returncode}, {sum(e.returncode == 0 for e in echoes)}/3 echoes, "
            f"{connections} hostile connections ({open_at_end} open at the end), refusals {counts}, "
            f"longest drip-feeder {max(drips):.1f} s"
        )
    finally:
        assert node.stop() == 0
