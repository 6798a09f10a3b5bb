"""Hostile PDUs at the association level: a declared 4 GiB A-ASSOCIATE-RQ, a P-DATA-TF longer than
the maximum PDU length we advertised, a called AE title that is not ours.

Each is refused at once with an A-ABORT or A-ASSOCIATE-RJ, logged in one line naming the peer and
the reason, counted in ``msknode_listener_refusals_total{reason}``, and the listener goes on serving.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC as AC_PDU
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from test_listener import TRANSPORTS, storescu, transport_env, write_series

from node.db.database import Database
from node.db.schema import Instance
from node.ops.metrics import listener_refusals, render
from node.receive.listener import REFUSALS_FLUSH_SECONDS
from node.settings import load_settings
from support.hostile import A_ABORT, A_ASSOCIATE_AC, associate_rq, closed_within, connect, pdata_header, read_pdu
from support.listener import ListenerProcess, echo

pytestmark = [pytest.mark.integration]


def refusals_metric(node: ListenerProcess, timeout: float = 15.0) -> dict[str, float]:
    """``msknode_listener_refusals_total`` by reason as /metrics renders it, once the listener has
    recorded counts while serving (it does every REFUSALS_FLUSH_SECONDS; waits up to `timeout`) and
    has then been stopped cleanly: the refusals of its last moments are recorded at shutdown, so the
    figures are its final ones (rather than those of the next record, REFUSALS_FLUSH_SECONDS later).
    Stops `node`; a later ``node.stop()`` gives its exit status again."""
    settings = load_settings(data_dir=node.data_dir)
    deadline = time.monotonic() + timeout
    while not listener_refusals(settings) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listener_refusals(settings), (
        f"no refusal counts recorded within {timeout} s (every {REFUSALS_FLUSH_SECONDS} s)"
    )
    assert node.stop() == 0, node.log()
    db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
    try:
        body, _ = render(settings, db)
    finally:
        db.dispose()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    family = families.get("msknode_listener_refusals")
    return {s.labels["reason"]: s.value for s in family.samples} if family is not None else {}


def test_a_declared_4_gib_associate_request_is_refused_at_once(tmp_path):
    node = ListenerProcess(tmp_path / "data").start()
    try:
        sock = connect(node.port)
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFFF) + b"\0" * 4096)
        answer = read_pdu(sock, timeout=5.0)
        assert answer is not None and answer[0] == A_ABORT, answer  # not read on towards 4 GiB
        assert closed_within(sock, 2.0) is not None
        sock.close()
        assert echo(node.port) == 0
        log = node.log()
        assert re.search(r"connection from 127\.0\.0\.1:\d+ refused \(associate_request_too_large\)", log), log
        assert "4294967295 bytes declared" in log
        assert refusals_metric(node).get("associate_request_too_large") == 1
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize("mode", list(TRANSPORTS))
def test_a_pdu_longer_than_advertised_aborts_the_association(tmp_path, mode):
    limit = 65536
    node = ListenerProcess(tmp_path / "data", env=transport_env(mode, MSKNODE_MAX_PDU_LENGTH=str(limit))).start()
    try:
        sock = connect(node.port)
        sock.sendall(associate_rq(calling="BIGPDU"))
        answer = read_pdu(sock)
        assert answer is not None and answer[0] == A_ASSOCIATE_AC
        ac = AC_PDU()
        ac.decode(struct.pack(">BBL", answer[0], 0, len(answer[1])) + answer[1])
        assert ac.to_primitive().maximum_length_received == limit  # what we advertise

        sock.sendall(pdata_header(limit + 1) + b"\0" * 1024)
        answer = read_pdu(sock, timeout=5.0)
        assert answer is not None and answer[0] == A_ABORT, answer
        assert closed_within(sock, 5.0) is not None
        sock.close()
        log = node.log()
        assert f"a PDU of {limit + 1} bytes declared (we accept at most {limit}): aborting" in log, log
        assert re.search(r"association \S+ from BIGPDU at 127\.0\.0\.1:\d+: a PDU of", log)

        # a real peer keeps to the limit we advertise: a study goes through in PDUs of 64 KiB
        _, _, paths = write_series(tmp_path / "series", n=3)
        r = storescu(node.port, paths)
        assert r.returncode == 0, r.stderr
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 3
        db.dispose()
        assert refusals_metric(node).get("pdu_too_large") == 1
    finally:
        assert node.stop() == 0


def _associate(port: int, called: str):
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_a_called_ae_title_that_is_not_ours_is_rejected(tmp_path):
    node = ListenerProcess(tmp_path / "data").start()
    try:
        assoc = _associate(node.port, "ANY-SCP")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)  # called AE not recognised
        r = subprocess.run(
            ["echoscu", "-aet", "ECHOSCU", "-aec", "NOTUS", "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
        assert echo(node.port, "MSKNODE") == 0
        log = node.log()
        assert re.search(
            r"association from ECHOSCU \(called NOTUS\) at 127\.0\.0\.1:\d+ rejected \(called_ae_title\): "
            r"called AE title not recognised",
            log,
        ), log
        assert refusals_metric(node).get("called_ae_title") == 2
    finally:
        assert node.stop() == 0


def test_the_called_ae_title_check_can_be_relaxed(tmp_path):
    node = ListenerProcess(tmp_path / "data", env={"MSKNODE_REQUIRE_CALLED_AE_TITLE": "0"}).start()
    try:
        assoc = _associate(node.port, "ANY-SCP")
        assert assoc.is_established
        assoc.release()
    finally:
        assert node.stop() == 0
