"""Fuzzed PDUs over many connections: garbage, truncated headers, wrong PDU types, malformed
A-ASSOCIATE-RQs, garbage after the association is accepted, peers that close or that stay silent.

The listener logs at most one line per bad peer (a WARNING naming its address and what it did; no
traceback), closes each bad connection at once (holding no association slot), and goes on serving:
right after the fuzzing, as many real associations as MSKNODE_MAX_ASSOCIATIONS are accepted at once
and dcmtk's echoscu succeeds.
"""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_listener import TRANSPORTS, transport_env

from support.hostile import A_ASSOCIATE_AC, associate_rq, closed_within, connect, read_pdu
from support.listener import ListenerProcess

pytestmark = [pytest.mark.integration]

CONNECTIONS = 96
MAX_ASSOCIATIONS = 8


def _garbage(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def wait_for_processes(node: ListenerProcess, n: int, timeout: float = 60.0) -> None:
    """Until `n` listener processes serve (the first C-ECHO only proves one)."""
    deadline = time.monotonic() + timeout
    while node.log_path.read_text(errors="replace").count(" as MSKNODE (pid ") < n:
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)


def fuzz_one(port: int, source: str, case: int, rng: random.Random) -> tuple[str, float | None]:
    """One hostile connection from `source`; (what it sent, seconds until the listener closed it,
    infinite if it did not within 10 s, or None when this peer closed first)."""
    rq = associate_rq(calling="FUZZER")
    sock = connect(port, source)
    stay = rng.random() < 0.5  # half of them stay connected and silent after their garbage
    try:
        kind = ["random", "truncated", "wrong_type", "bad_rq", "after_ac", "bad_length", "abort_first"][case % 7]
        if kind == "random":
            sock.sendall(_garbage(rng, rng.randint(1, 300)))
        elif kind == "truncated":
            sock.sendall(rq[: rng.randint(1, 5)])
            stay = False  # (else it is a drip-feeder: the deadline ends it, tested elsewhere)
        elif kind == "wrong_type":
            pdu_type = rng.choice([0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x08, 0x42, 0xFF])
            sock.sendall(_pdu(pdu_type, _garbage(rng, rng.randint(0, 64))))
        elif kind == "bad_rq":
            body = bytearray(rq[6:])
            for _ in range(rng.randint(1, 12)):
                body[rng.randrange(68, len(body))] = rng.getrandbits(8)
            if rng.random() < 0.5:
                body = body[: rng.randint(68, len(body))]
            sock.sendall(_pdu(0x01, bytes(body)))
            answer = read_pdu(sock) if stay else None
            if answer is not None and answer[0] == A_ASSOCIATE_AC:  # still a valid request: garbage next
                sock.sendall(_garbage(rng, rng.randint(6, 200)))
        elif kind == "after_ac":
            sock.sendall(rq)
            answer = read_pdu(sock)
            assert answer is not None and answer[0] == A_ASSOCIATE_AC
            choice = rng.randrange(4)
            if choice == 0:
                sock.sendall(_garbage(rng, rng.randint(6, 200)))
            elif choice == 1:  # a P-DATA-TF whose PDV lengths lie
                sock.sendall(_pdu(0x04, struct.pack(">LB", 0xFFFFFF00, 1) + _garbage(rng, 20)))
            elif choice == 2:  # an unknown PDU type
                sock.sendall(_pdu(0x42, _garbage(rng, 10)))
            else:  # a PDU cut short, then close
                sock.sendall(_pdu(0x04, _garbage(rng, 100))[:50])
                stay = False
        elif kind == "bad_length":  # an A-ASSOCIATE-RQ declaring fewer bytes than its fixed part
            sock.sendall(_pdu(0x01, rq[6:40]))
        else:  # an A-ABORT where an A-ASSOCIATE-RQ belongs
            sock.sendall(_pdu(0x07, b"\0\0\0\0"))
        if not stay:
            return kind, None
        closed = closed_within(sock, 10.0)
        return kind, closed if closed is not None else float("inf")
    finally:
        sock.close()


@pytest.mark.parametrize("mode", list(TRANSPORTS))
def test_fuzzed_pdus_cost_one_log_line_each_and_no_slot(tmp_path, mode):
    node = ListenerProcess(
        tmp_path / "data", env=transport_env(mode, MSKNODE_MAX_ASSOCIATIONS=str(MAX_ASSOCIATIONS))
    ).start()
    wait_for_processes(node, 2)
    rng = random.Random(20261203)
    jobs = [(f"127.0.{4 + i // 200}.{1 + i % 200}", i, random.Random(rng.getrandbits(32))) for i in range(CONNECTIONS)]
    try:
        with ThreadPoolExecutor(4) as pool:  # (at most 4 hostile associations at once: fewer than the limit)
            results = list(pool.map(lambda j: (j[0], *fuzz_one(node.port, *j)), jobs))

        # a bad peer that stays connected is disconnected at once, not after a timeout
        waits = {(kind, source): s for source, kind, s in results if s is not None}
        held = {k: s for k, s in waits.items() if s > 2.0}
        assert len(waits) > CONNECTIONS // 4 and not held, held

        # every association slot is free right away: MAX_ASSOCIATIONS associations at once, and echoscu
        started = time.monotonic()
        barrier = threading.Barrier(MAX_ASSOCIATIONS)

        def associate(_):
            ae = AE(ae_title="PACS")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.network_timeout = 10
            barrier.wait()
            return ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")

        with ThreadPoolExecutor(MAX_ASSOCIATIONS) as pool:
            assocs = list(pool.map(associate, range(MAX_ASSOCIATIONS)))
        assert all(a.is_established for a in assocs), [a.is_rejected for a in assocs]
        for a in assocs:
            a.release()
        r = subprocess.run(
            ["echoscu", "-aet", "PACS", "-aec", "MSKNODE", "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            env=dict(os.environ, TCP_NODELAY="1"),
            timeout=30,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert time.monotonic() - started < 5.0

        time.sleep(1.0)  # the last lines of aborted associations
        log = node.log_path.read_text(errors="replace")
        assert "Traceback" not in log
        lines = log.splitlines()
        for source, kind, _ in results:
            about = [line for line in lines if re.search(re.escape(source) + r"[:)]", line)]
            loud = [line for line in about if " WARNING " in line or " ERROR " in line]
            if kind == "bad_rq" and not loud:  # the mutations left a valid request: an association, ended
                assert any("accepted" in line for line in about), about
            else:
                assert len(loud) == 1, (kind, about)  # one line saying what this peer did
            assert len(about) <= 2, (kind, about)  # (+ "accepted" for those that got an association)
        print(
            f"\nfuzz ({mode}): {CONNECTIONS} connections, {len(lines)} log lines in all; "
            f"{len(waits)} stayed connected, closed by the listener after {max(waits.values()):.2f} s at most"
        )
    finally:
        assert node.stop() == 0
