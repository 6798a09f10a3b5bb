"""The parent of several listener processes counts the connections each one serves, and counts
every one off when it ends: associations it rejects (calling AE title not on the allow-list, the
association limit) as well as those it accepts. Otherwise the parent would think a process busier
than it is and stop handing it its share.

Real ``msknode listen`` with two listener processes on localhost, pynetdicom and dcmtk peers; the
tally is the one the parent logs (DEBUG) whenever it changes.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_listener import TRANSPORTS, storescu, transport_env, write_series

from support.listener import ListenerProcess, echo

pytestmark = pytest.mark.integration

modes = pytest.mark.parametrize("mode", list(TRANSPORTS))

TALLY = re.compile(r"\(connections per process: ([0-9, ]+)\)")
MAX_ASSOCIATIONS = 2
PROCESSES = 2


def associate(port: int, calling: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="MSKNODE")


def rejection(assoc) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def tally(node: ListenerProcess) -> list[int] | None:
    """The parent's latest count of connections per listener process."""
    found = TALLY.findall(node.log_path.read_text(errors="replace"))
    return [int(n) for n in found[-1].split(",")] if found else None


def settled(node: ListenerProcess, timeout: float = 15.0) -> list[int] | None:
    """The tally once it is back to 0 for every process (or as it is after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while (counts := tally(node)) != [0] * PROCESSES and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


def dcmtk_echo(port: int, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", "MSKNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, TCP_NODELAY="1"),
    )


@modes
def test_rejected_associations_are_counted_off(tmp_path, mode):
    env = transport_env(
        mode,
        MSKNODE_LISTENER_PROCESSES=str(PROCESSES),
        MSKNODE_MAX_ASSOCIATIONS=str(MAX_ASSOCIATIONS),
        MSKNODE_ALLOWED_AE_TITLES="GOODSCU,STORESCU",
        MSKNODE_LOG_LEVEL="DEBUG",
    )
    node = ListenerProcess(tmp_path / "data", env=env)
    node.start(ready=lambda port: echo(port, calling="GOODSCU") == 0)
    try:
        # a calling AE title not on the allow-list, many times more than the processes may serve at once
        for _ in range(6 * MAX_ASSOCIATIONS * PROCESSES):
            assoc = associate(node.port, "BADSCU")
            assert assoc.is_rejected and rejection(assoc) == (0x01, 0x01, 0x03)
        for _ in range(2 * PROCESSES):
            r = dcmtk_echo(node.port, "BADSCU")
            assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
        assert settled(node) == [0, 0], node.log()

        # the association limit: each process serves MAX_ASSOCIATIONS, the next ones are rejected
        held = [associate(node.port, "GOODSCU") for _ in range(MAX_ASSOCIATIONS * PROCESSES)]
        try:
            assert all(a.is_established for a in held), node.log()
            assert tally(node) == [MAX_ASSOCIATIONS] * PROCESSES
            for _ in range(3 * MAX_ASSOCIATIONS * PROCESSES):
                assoc = associate(node.port, "GOODSCU")
                assert assoc.is_rejected and rejection(assoc) == (0x02, 0x03, 0x02)  # transient, local limit
        finally:
            for a in held:
                a.release()
        assert settled(node) == [0, 0], node.log()

        # then valid peers are served as before, and the tally is back to 0
        _, _, paths = write_series(tmp_path / "series", n=3, size=32)
        r = storescu(node.port, paths)
        assert r.returncode == 0, r.stdout + r.stderr
        r = dcmtk_echo(node.port, "GOODSCU")
        assert r.returncode == 0, r.stdout + r.stderr
        assert echo(node.port, calling="GOODSCU") == 0
        assert settled(node) == [0, 0], node.log()
        assert len(node.series_json()) == 1
    finally:
        assert node.stop() == 0
