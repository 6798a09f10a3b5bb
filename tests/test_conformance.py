"""docs/conformance.md against the node itself: what ``msknode listen`` (a real process, default settings)
accepts when offered every SOP class and transfer syntax, its A-ASSOCIATE-AC and AE-title checks, the
SOP classes our result objects really have, the transfer syntaxes the outbox really proposes, and the
document being exactly what scripts/conformance_statement.py generates now."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.demo.loopback import child_env
from node.dispatch.senders import SEND_TRANSFER_SYNTAXES, Claimed, send_dimse
from node.results import build_results, save
from node.results.objects import RESULT_SOP_CLASSES
from node.settings import DimseDestination
from support.env import ROOT, free_port
from support.listener import ListenerProcess
from support.results_data import knee_output, volume_from_files, write_mr_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOC = ROOT / "docs" / "conformance.md"


def _script():
    spec = importlib.util.spec_from_file_location(
        "conformance_statement", ROOT / "scripts" / "conformance_statement.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def documented_scp(text: str, all_ts: list[str]) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes, as section 2.1 of the document states them."""
    out: dict[str, set[str]] = {}
    body = _section(text, "### 2.1 ", "### 2.2 ")
    for group in re.split(r"\n#### 2\.1\.\d+ ", body)[1:]:
        if group.startswith("Refused"):
            continue
        head, _, table = group.partition("| SOP class | UID | Role |")
        if "all " in head.split("Transfer syntaxes accepted:")[1].split("\n")[0]:
            tss = set(all_ts)
        else:
            tss = set(re.findall(r"\(`([0-9.]+)`\)", head.split("Transfer syntaxes accepted:")[1].split("\n")[0]))
        for sop in re.findall(r"\| `([0-9.]+)` \| SCP \|", table):
            out[sop] = tss
    return out


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    proc = ListenerProcess(tmp_path_factory.mktemp("conformance") / "data").start()
    try:
        yield proc
    finally:
        proc.stop()


def test_the_listener_negotiates_what_the_document_says(listener):
    mod = _script()
    text = DOC.read_text(encoding="utf-8")
    neg = mod.negotiate("127.0.0.1", listener.port, listener.ae_title)
    documented = documented_scp(text, mod.all_transfer_syntaxes())
    assert documented.keys() == neg.accepted.keys()
    for sop, tss in neg.accepted.items():
        assert documented[sop] == tss, sop
    refused = set(re.findall(r"\| `([0-9.]+)` \|\n", _section(text, "#### 2.1.", "### 2.2 ").split("Refused", 1)[1]))
    assert refused == set(mod.known_sop_classes()) - set(neg.accepted)
    # the storage classes accept every transfer syntax; the table of 2.3 says so
    ts_rows = re.findall(r"\| `([0-9.]+)` \| (yes|no) \| (yes|no) \|", _section(text, "### 2.3 ", "### 2.4 "))
    assert {ts for ts, scp, _scu in ts_rows if scp == "yes"} == neg.accepted["1.2.840.10008.5.1.4.1.1.4"]
    assert tuple(ts for ts, _scp, scu in ts_rows if scu == "yes") == tuple(
        sorted(SEND_TRANSFER_SYNTAXES, key=[ts for ts, _a, _b in ts_rows].index)
    )
    # the maximum PDU length the A-ASSOCIATE-AC advertises
    pdu = re.search(r"advertised in A-ASSOCIATE-AC\) \| (\d+) bytes", text)
    assert pdu is not None and int(pdu.group(1)) == neg.max_pdu_length


def test_the_called_ae_title_check_the_document_states(listener):
    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| Called AE title |"))
    ae = AE(ae_title="CONFORMANCE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="NOT_THE_NODE")
    try:
        if row.split("|")[2].strip().startswith("checked"):
            assert assoc.is_rejected
            rsp = assoc.acceptor.primitive
            assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x07)
        else:
            assert assoc.is_established
    finally:
        if assoc.is_established:
            assoc.release()


def test_the_results_and_the_transfer_syntaxes_we_send_are_the_documented_ones(settings, tmp_path):
    text = DOC.read_text(encoding="utf-8")
    scu = dict(re.findall(r"\| (\w+) \| [^|]+ \| `([0-9.]+)` \| SCU \|", _section(text, "### 2.2 ", "### 2.3 ")))
    assert scu == RESULT_SOP_CLASSES
    # the objects build_results really makes have those SOP classes
    paths = write_mr_series(tmp_path / "src", n_slices=4)
    vol = volume_from_files(paths)
    results = build_results(
        output=knee_output(vol),
        source_files={vol.series_uid: paths},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="conformance",
    )
    assert {r.kind for r in results} == set(RESULT_SOP_CLASSES)
    assert all(r.sop_class_uid == RESULT_SOP_CLASSES[r.kind] for r in results)

    # what the outbox proposes in its A-ASSOCIATE-RQ, seen by a real SCP
    proposed: list[tuple[str, list[str]]] = []
    lock = threading.Lock()

    def on_requested(event):
        with lock:
            for cx in event.assoc.requestor.requested_contexts:
                proposed.append((str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax]))

    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    try:
        items = [
            Claimed(i, "pacs", r.sop_instance_uid, r.sop_class_uid, save(r, settings), 0) for i, r in enumerate(results)
        ]
        dest = DimseDestination(ae_title="PACS", host="127.0.0.1", port=port)
        outcomes = list(send_dimse(dest, items, settings))
        assert all(o.ok for _i, o in outcomes), outcomes
    finally:
        server.shutdown()
    assert {sop for sop, _ts in proposed} == set(RESULT_SOP_CLASSES.values())
    for sop in RESULT_SOP_CLASSES.values():  # each syntax in a context of its own, in the documented order
        assert [ts for s, ts in proposed if s == sop] == [[t] for t in SEND_TRANSFER_SYNTAXES], proposed
    row = _section(text, "### 2.2 ", "### 2.3 ").split("Transfer syntaxes proposed:")[1].split("\n")[0]
    assert re.findall(r"`([0-9.]+)`", row) == list(SEND_TRANSFER_SYNTAXES)


def test_the_document_is_what_the_generator_makes_now():
    """The generator runs in its own process (its listener sets pynetdicom's process-wide options)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "conformance_statement.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert DOC.read_text(encoding="utf-8").rstrip("\n") == proc.stdout.rstrip("\n"), (
        "docs/conformance.md is stale: .venv/bin/python scripts/conformance_statement.py --write"
    )
