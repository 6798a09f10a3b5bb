"""The outbox against real DICOM peers (pynetdicom SCPs on localhost): acknowledgement, backoff,
dead letter, leases after a restart, TLS, and the ``msknode outbox`` commands."""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from node.db.schema import Job, OutboxItem, ResultObject, Study
from node.dispatch.outbox import RetryPolicy, anything_due, claim, process_outbox, retry_item
from node.errors import DispatchError
from node.results import build_results, save
from node.settings import DimseDestination, StowDestination
from support.cli import msknode
from support.env import free_port
from support.results_data import knee_output, volume_from_files, write_mr_series

pytestmark = pytest.mark.integration

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


class StoreSCP:
    """A real C-STORE SCP on 127.0.0.1 that records what it received and answers ``status(ds)``."""

    def __init__(
        self,
        *,
        ae_title="PACS",
        sop_classes=None,
        status=None,
        require_called_aet=False,
        maximum_associations=10,
        ssl_context=None,
        transfer_syntaxes=None,
    ):
        self.port = free_port()
        self.received: list[str] = []
        self.raw: dict[str, bytes] = {}  # SOP Instance UID -> the data set as it came over the wire
        self.status = status or (lambda ds: 0x0000)
        self.lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = require_called_aet
        self.ae.maximum_associations = maximum_associations
        if sop_classes is None:
            sop_classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
        for uid in sop_classes:
            if transfer_syntaxes is None:
                self.ae.add_supported_context(uid)
            else:
                self.ae.add_supported_context(uid, list(transfer_syntaxes))
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=ssl_context,
        )

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        code = self.status(ds)
        if code in (0x0000, 0xB000, 0xB006, 0xB007):
            with self.lock:
                self.received.append(str(ds.SOPInstanceUID))
                self.raw[str(ds.SOPInstanceUID)] = event.request.DataSet.getvalue()
        return code

    def destination(self, **kw) -> DimseDestination:
        return DimseDestination(ae_title=kw.pop("ae_title", "PACS"), host="127.0.0.1", port=self.port, **kw)

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def result_files(tmp_path_factory):
    """One knee job's result objects (SR, SEG, SC, 15 super-resolved MR) saved once for the module."""
    from node.settings import Settings

    tmp = tmp_path_factory.mktemp("dispatch-results")
    settings = Settings(data_dir=tmp / "data")
    paths = write_mr_series(tmp / "src", n_slices=4)
    vol = volume_from_files(paths)
    results = build_results(
        output=knee_output(vol),
        source_files={vol.series_uid: paths},
        triage=None,
        predecessors=[],
        settings=settings,
        job_fingerprint="dispatch-tests",
    )
    return vol, [(r, save(r, settings)) for r in results]


def enqueue(db, results, destinations: list[str], *, study_uid: str, now=T0) -> list[int]:
    """What orchestration does after a job: result_objects + one outbox row per destination."""
    ids = []
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            study = Study(study_uid=study_uid)
            s.add(study)
            s.flush()
        job = Job(study_id=study.id, pipeline="knee", state="done")
        s.add(job)
        s.flush()
        for r, path in results:
            ro = ResultObject(
                job_id=job.id,
                kind=r.kind,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_uid=r.series_uid,
                path=str(path),
            )
            s.add(ro)
            s.flush()
            for d in destinations:
                item = OutboxItem(result_object_id=ro.id, destination=d, state="pending", next_attempt_at=now)
                s.add(item)
                s.flush()
                ids.append(item.id)
    return ids


def items(db):
    with db.session() as s:
        return {
            i.id: (i.state, i.attempts, i.last_status, i.last_error, i.next_attempt_at)
            for i in s.scalars(select(OutboxItem))
        }


def with_dest(settings, *dests):
    return settings.model_copy(update={"destinations": list(dests)})


def test_acknowledged_objects_are_sent_once(settings, db, result_files):
    vol, results = result_files
    scp = StoreSCP()
    try:
        s = with_dest(settings, scp.destination())
        enqueue(db, results, [s.destinations[0].key], study_uid=vol.study_uid)
        rep = process_outbox(db, s, now=T0)
        assert (rep.claimed, rep.sent, rep.dead, rep.retrying) == (len(results), len(results), 0, 0)
        assert sorted(scp.received) == sorted(r.sop_instance_uid for r, _ in results)
        assert all(st == "sent" and att == 1 and status == 0 for st, att, status, _e, _n in items(db).values())
        # later runs find nothing to send; an acknowledged item is never re-sent
        rep2 = process_outbox(db, s, now=T0 + dt.timedelta(days=1))
        assert rep2.claimed == 0 and len(scp.received) == len(results)
        with pytest.raises(DispatchError, match="acknowledged"):
            retry_item(db, s, next(iter(items(db))))
    finally:
        scp.stop()


def test_one_info_line_per_job_and_destination_once_everything_is_sent(settings, db, result_files, caplog):
    vol, results = result_files
    calls = {"n": 0}

    def status(ds):  # the first object is refused once: the job is complete only after the retry
        calls["n"] += 1
        return 0xA700 if calls["n"] == 1 else 0x0000

    scp = StoreSCP(status=status)
    try:
        s = with_dest(settings, scp.destination())
        enqueue(db, results, [s.destinations[0].key], study_uid=vol.study_uid)
        with caplog.at_level(logging.INFO, logger="node.dispatch.outbox"):
            process_outbox(db, s, now=T0)
            info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            assert not [m for m in info if "results of job" in m]  # one object still pending
            assert not [m for m in info if m.startswith("sent ")]  # per-object lines are DEBUG
            process_outbox(db, s, now=T0 + dt.timedelta(seconds=5))
        done = [r.getMessage() for r in caplog.records if "results of job" in r.getMessage()]
        assert len(done) == 1, done
        assert done[0].startswith(f"study {vol.study_uid}: results of job ")
        assert done[0].endswith(f" sent to {s.destinations[0].key} ({len(results)} objects)")
    finally:
        scp.stop()


def test_a_job_that_published_its_findings_gets_its_info_line_once_everything_is_sent(
    settings, db, result_files, caplog
):
    """Findings first: the SR and SEG of a job still processing are sent at once, without the job's line; the line
    comes when the rest, committed with the job done, is sent too."""
    vol, results = result_files
    findings = [(r, p) for r, p in results if r.kind in ("sr", "seg")]
    rest = [(r, p) for r, p in results if r.kind not in ("sr", "seg")]
    assert findings and rest
    scp = StoreSCP()
    try:
        s = with_dest(settings, scp.destination())
        key = s.destinations[0].key
        enqueue(db, findings, [key], study_uid=vol.study_uid)
        with db.session() as ses:
            job = ses.scalars(select(Job)).one()
            job.state = "processing"  # published, super-resolution still running
        with caplog.at_level(logging.INFO, logger="node.dispatch.outbox"):
            process_outbox(db, s, now=T0)
            assert sorted(scp.received) == sorted(r.sop_instance_uid for r, _ in findings)  # sent at once
            assert not [r for r in caplog.records if "results of job" in r.getMessage()]
            with db.session() as ses:  # the final commit: the rest of the objects, the job done
                job = ses.scalars(select(Job)).one()
                job.state = "done"
                for r, path in rest:
                    ro = ResultObject(
                        job_id=job.id,
                        kind=r.kind,
                        sop_class_uid=r.sop_class_uid,
                        sop_instance_uid=r.sop_instance_uid,
                        series_uid=r.series_uid,
                        path=str(path),
                    )
                    ses.add(ro)
                    ses.flush()
                    ses.add(OutboxItem(result_object_id=ro.id, destination=key, state="pending", next_attempt_at=T0))
            process_outbox(db, s, now=T0 + dt.timedelta(seconds=1))
        done = [r.getMessage() for r in caplog.records if "results of job" in r.getMessage()]
        assert len(done) == 1 and done[0].endswith(f" sent to {key} ({len(results)} objects)"), done
    finally:
        scp.stop()


def test_out_of_resources_backs_off_then_succeeds(settings, db, result_files):
    vol, results = result_files
    calls = {"n": 0}

    def status(ds):
        calls["n"] += 1
        return 0xA700 if calls["n"] <= 2 else 0x0000

    scp = StoreSCP(status=status)
    try:
        s = with_dest(settings, scp.destination())
        ids = enqueue(db, results[:2], [s.destinations[0].key], study_uid=vol.study_uid)
        rep = process_outbox(db, s, now=T0)
        assert rep.retrying == 2 and rep.sent == 0
        for i in ids:
            state, att, st, err, nxt = items(db)[i]
            assert (state, att, st) == ("pending", 1, 0xA700) and "out of resources" in err
            assert nxt == T0 + dt.timedelta(seconds=5)
        assert process_outbox(db, s, now=T0 + dt.timedelta(seconds=4)).claimed == 0  # not due yet
        rep = process_outbox(db, s, now=T0 + dt.timedelta(seconds=5))
        assert rep.sent == 2
        assert [items(db)[i][:2] for i in ids] == [("sent", 2), ("sent", 2)]
        assert len(scp.received) == 2
    finally:
        scp.stop()


def test_connection_refused_retries_with_exponential_backoff_then_dead_letter(settings, db, result_files):
    vol, results = result_files
    dest = DimseDestination(ae_title="NOBODY", host="127.0.0.1", port=free_port())
    s = with_dest(settings, dest)
    [item_id] = enqueue(db, results[:1], [dest.key], study_uid=vol.study_uid)
    policy = RetryPolicy(base_delay=5, max_delay=15, max_attempts=4)
    now = T0
    delays = []
    for _ in range(3):
        rep = process_outbox(db, s, now=now, policy=policy)
        assert rep.retrying == 1
        state, att, _st, err, nxt = items(db)[item_id]
        assert state == "pending" and "connection refused" in err
        delays.append((nxt - now).total_seconds())
        now = nxt
    assert delays == [5.0, 10.0, 15.0]  # doubling, capped
    rep = process_outbox(db, s, now=now, policy=policy)
    assert rep.dead == 1
    state, att, _st, err, _n = items(db)[item_id]
    assert state == "dead" and att == 4 and err.startswith("gave up after 4 attempts")
    # re-queued by hand, it is due at once with a fresh attempt count
    out = retry_item(db, s, item_id, actor="test", now=now)
    assert out["previous_state"] == "dead" and items(db)[item_id][:2] == ("pending", 0)


def test_unsupported_sop_class_goes_to_dead_letter_and_the_rest_is_sent(settings, db, result_files):
    vol, results = result_files
    scp = StoreSCP(sop_classes=[MRImageStorage])  # an MR-only archive
    try:
        s = with_dest(settings, scp.destination())
        enqueue(db, results, [s.destinations[0].key], study_uid=vol.study_uid)
        rep = process_outbox(db, s, now=T0)
        n_mr = sum(1 for r, _ in results if r.kind == "superres")
        assert rep.sent == n_mr and rep.dead == len(results) - n_mr
        with db.session() as ses:
            for item, ro in ses.execute(select(OutboxItem, ResultObject).join(ResultObject)).all():
                if ro.kind == "superres":
                    assert item.state == "sent"
                else:
                    assert item.state == "dead" and item.last_status == 0x0122
                    assert "0x0122 SOP class not supported" in item.last_error
    finally:
        scp.stop()


@pytest.mark.parametrize(
    "code,state",
    [(0x0122, "dead"), (0xA900, "dead"), (0xC000, "dead"), (0x0110, "pending"), (0xA702, "pending"), (0xB007, "sent")],
)
def test_store_status_codes(settings, db, result_files, code, state):
    vol, results = result_files
    scp = StoreSCP(status=lambda ds: code)
    try:
        s = with_dest(settings, scp.destination())
        [i] = enqueue(db, results[:1], [s.destinations[0].key], study_uid=vol.study_uid)
        process_outbox(db, s, now=T0)
        got_state, _att, got_status, err, _n = items(db)[i]
        assert (got_state, got_status) == (state, code)
        assert (err is None) == (state == "sent")
    finally:
        scp.stop()


def test_association_rejected_permanent_and_transient(settings, db, result_files):
    vol, results = result_files
    strict = StoreSCP(ae_title="PACS", require_called_aet=True)
    busy = StoreSCP(ae_title="BUSY", maximum_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(MRImageStorage)
    held = holder.associate("127.0.0.1", busy.port, ae_title="BUSY")
    try:
        assert held.is_established
        wrong = strict.destination(ae_title="WRONGAE", name="strict")
        full = busy.destination(ae_title="BUSY", name="busy")
        s = with_dest(settings, wrong, full)
        enqueue(db, results[:1], ["strict", "busy"], study_uid=vol.study_uid)
        process_outbox(db, s, now=T0)
        with db.session() as ses:
            by_dest = {i.destination: i for i in ses.scalars(select(OutboxItem))}
            assert by_dest["strict"].state == "dead"
            assert "rejected (permanent)" in by_dest["strict"].last_error
            assert by_dest["busy"].state == "pending"
            assert "rejected (transient)" in by_dest["busy"].last_error
    finally:
        held.release()
        strict.stop()
        busy.stop()


def test_a_restart_resumes_items_whose_sender_died(settings, db, result_files):
    vol, results = result_files
    scp = StoreSCP()
    try:
        s = with_dest(settings, scp.destination())
        ids = enqueue(db, results[:3], [s.destinations[0].key], study_uid=vol.study_uid)
        with db.session() as ses:  # a sender claimed them and was killed before it stored anything
            assert len(claim(ses, now=T0, owner="dead-host:1", limit=10, lease_seconds=60)) == 3
        assert process_outbox(db, s, now=T0 + dt.timedelta(seconds=30)).claimed == 0  # lease still valid
        rep = process_outbox(db, s, now=T0 + dt.timedelta(seconds=61))
        assert rep.sent == 3 and all(items(db)[i][0] == "sent" for i in ids)
        assert len(scp.received) == 3
    finally:
        scp.stop()


def test_unconfigured_destination_and_missing_file_are_dead_letters(settings, db, result_files, tmp_path):
    vol, results = result_files
    scp = StoreSCP()
    try:
        s = with_dest(settings, scp.destination())
        [gone] = enqueue(db, results[:1], ["dimse:OLD@10.0.0.1:104"], study_uid=vol.study_uid)
        r, path = results[1]
        copy = tmp_path / "copy.dcm"
        copy.write_bytes(Path(path).read_bytes())
        [missing] = enqueue(db, [(r, copy)], [s.destinations[0].key], study_uid=vol.study_uid)
        copy.unlink()
        process_outbox(db, s, now=T0)
        assert items(db)[gone][0] == "dead" and "not configured" in items(db)[gone][3]
        assert items(db)[missing][0] == "dead" and "result file missing" in items(db)[missing][3]
        assert scp.received == []
    finally:
        scp.stop()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "pacs.crt", tmp / "pacs.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_destination(settings, db, result_files, tmp_path):
    vol, results = result_files
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    scp = StoreSCP(ssl_context=server_ctx)
    try:
        good = scp.destination(tls=True, tls_ca_file=str(cert), name="tls")
        plain = scp.destination(name="plain")  # no TLS against a TLS port: never acknowledged
        s = with_dest(settings, good, plain)
        enqueue(db, results[:2], ["tls", "plain"], study_uid=vol.study_uid)
        process_outbox(db, s, now=T0)
        with db.session() as ses:
            states = {(i.destination, i.state) for i in ses.scalars(select(OutboxItem))}
        assert states == {("tls", "sent"), ("plain", "pending")}
        assert sorted(scp.received) == sorted(r.sop_instance_uid for r, _ in results[:2])
    finally:
        scp.stop()


def test_outbox_commands(settings, db, result_files, capsys):
    vol, results = result_files
    scp = StoreSCP(sop_classes=[MRImageStorage])
    try:
        s = with_dest(settings, scp.destination())

        def _cli(*args: str) -> subprocess.CompletedProcess:
            destinations = json.dumps([d.model_dump() for d in s.destinations])
            return msknode(capsys, *args, MSKNODE_DATA_DIR=s.data_dir, MSKNODE_DESTINATIONS=destinations)

        chosen = [r for r in results if r[0].kind in ("sr", "seg")] + [r for r in results if r[0].kind == "superres"][
            :1
        ]
        enqueue(db, chosen, [s.destinations[0].key], study_uid=vol.study_uid)
        process_outbox(db, s, now=T0)
        out = _cli("outbox", "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert {r["kind"]: r["state"] for r in rows} == {"sr": "dead", "seg": "dead", "superres": "sent"}
        for r in rows:
            assert set(r) >= {
                "id",
                "state",
                "destination",
                "attempts",
                "last_error",
                "sop_instance_uid",
                "kind",
                "study_uid",
            }
            assert r["study_uid"] == vol.study_uid and r["attempts"] == 1 and r["destination"] == s.destinations[0].key
        dead = [r for r in rows if r["state"] == "dead"]
        assert all("0x0122" in r["last_error"] for r in dead)
        human = _cli("outbox", "--state", "dead")  # the table for people, filtered
        assert human.returncode == 0
        listed = [
            line.split()[0] for line in human.stdout.splitlines()[1:] if line.strip() and line.split()[0].isdigit()
        ]
        assert sorted(map(int, listed)) == sorted(r["id"] for r in dead)
        assert "0x0122 SOP class not supported" in human.stdout
        # retry a dead item: back to pending, audited
        out = _cli("outbox", "retry", str(dead[0]["id"]))
        assert out.returncode == 0, out.stderr
        assert "dead -> pending" in out.stdout
        from node.dispatch.outbox import list_items

        with db.session() as ses:
            again = {r["id"]: r for r in list_items(ses)}
        assert again[dead[0]["id"]]["state"] == "pending" and again[dead[0]["id"]]["attempts"] == 0
        from worklists.tables import AuditEvent

        with db.session() as ses:
            ev = ses.scalars(select(AuditEvent).where(AuditEvent.action == "outbox.retry")).all()
            assert len(ev) == 1 and ev[0].actor == "cli" and ev[0].old_value == "dead"
        # clear errors for an unknown id and an acknowledged item
        bad = _cli("outbox", "retry", "99999")
        assert bad.returncode == 1 and "no outbox item with id 99999" in bad.stderr
        sent_id = next(r["id"] for r in rows if r["state"] == "sent")
        bad = _cli("outbox", "retry", str(sent_id))
        assert bad.returncode == 1 and "not sent again" in bad.stderr
        # `outbox send` sends what is due (the re-queued SR is refused again by the MR-only peer)
        out = _cli("outbox", "send", "--json")
        assert json.loads(out.stdout)["dead"] == 1 and out.returncode == 1
    finally:
        scp.stop()


def test_stow_response_classification():
    from pydicom import Dataset

    from node.dispatch.senders import _stow_outcome

    ok = Dataset()
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3"
    ok.ReferencedSOPSequence = [ref]
    assert _stow_outcome(ok, "1.2.3").ok
    bad = Dataset()
    f = Dataset()
    f.ReferencedSOPInstanceUID = "1.2.3"
    f.FailureReason = 0x0122
    bad.FailedSOPSequence = [f]
    out = _stow_outcome(bad, "1.2.3")
    assert not out.ok and out.permanent and out.status == 0x0122
    f.FailureReason = 0xA700
    out = _stow_outcome(bad, "1.2.3")
    assert not out.ok and not out.permanent
    assert StowDestination(type="stow", url="http://x/dicom-web/").key == "stow:http://x/dicom-web"


def test_a_long_batch_keeps_its_leases(settings, db, result_files):
    """While a slow PACS answers, the items still queued in the batch stay leased (no second sender)."""
    import time

    vol, results = result_files
    scp = StoreSCP(status=lambda ds: (time.sleep(0.4), 0x0000)[1])
    try:
        s = with_dest(settings, scp.destination())
        ids = enqueue(db, results[:4], [s.destinations[0].key], study_uid=vol.study_uid)
        policy = RetryPolicy(lease_seconds=0.6)
        worker = threading.Thread(target=process_outbox, args=(db, s), kwargs={"now": T0, "policy": policy})
        worker.start()
        extended = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not extended:
            with db.session() as ses:
                extended = any(
                    i.state == "sending" and i.lease_expires_at > T0 + dt.timedelta(seconds=0.6)
                    for i in ses.scalars(select(OutboxItem))
                )
            time.sleep(0.05)
        assert extended
        with db.session() as ses:  # another sender, at a time the original lease would have expired
            assert claim(ses, now=T0 + dt.timedelta(seconds=0.7), owner="other", limit=10, lease_seconds=60) == []
        worker.join(timeout=30)
        assert all(items(db)[i][0] == "sent" for i in ids)
        assert sorted(scp.received) == sorted(r.sop_instance_uid for r, _ in results[:4])
    finally:
        scp.stop()


class OrderSCP(StoreSCP):
    """A StoreSCP that also records, per stored object, the association (the requestor's port) it came on."""

    def __init__(self, **kw):
        self.via: dict[str, int] = {}
        super().__init__(**kw)

    def _on_store(self, event):
        code = super()._on_store(event)
        with self.lock:
            self.via[str(event.request.AffectedSOPInstanceUID)] = int(event.assoc.requestor.port)
        return code


@pytest.mark.parametrize("associations", [1, 3])
def test_findings_go_first_then_the_derived_objects_over_several_associations(settings, db, result_files, associations):
    vol, results = result_files
    kinds = {r.sop_instance_uid: r.kind for r, _ in results}
    # the job writes the SR last; the outbox must still send it (and the SEG) before any derived object
    assert [r.kind for r, _ in results][-1] == "sr" and {"seg", "sc", "superres"} <= set(kinds.values())
    scp = OrderSCP()
    try:
        s = with_dest(settings, scp.destination()).model_copy(update={"dispatch_associations": associations})
        enqueue(db, results, [s.destinations[0].key], study_uid=vol.study_uid)
        rep = process_outbox(db, s, now=T0)
        assert (rep.claimed, rep.sent, rep.dead, rep.retrying) == (len(results), len(results), 0, 0)
        assert sorted(scp.received) == sorted(kinds)  # each object once
        order = [kinds[u] for u in scp.received]
        assert order[0] == "sr"
        n_findings = sum(1 for k in order if k in ("sr", "seg"))
        assert set(order[:n_findings]) == {"sr", "seg"}, order
        # the findings on one association of their own; the derived objects on `associations` others
        findings_assoc = {scp.via[u] for u in scp.received if kinds[u] in ("sr", "seg")}
        derived_assoc = {scp.via[u] for u in scp.received if kinds[u] not in ("sr", "seg")}
        assert len(findings_assoc) == 1
        assert len(derived_assoc) == associations and not derived_assoc & findings_assoc
        assert all(st == "sent" and att == 1 for st, att, _s, _e, _n in items(db).values())
    finally:
        scp.stop()


def test_a_failing_association_among_several_leaves_the_others_sent(settings, db, result_files):
    vol, results = result_files
    refused = {r.sop_instance_uid for r, _ in results if r.kind == "superres"}
    refused = set(sorted(refused)[:2])
    scp = OrderSCP(status=lambda ds: 0xA700 if str(ds.SOPInstanceUID) in refused else 0x0000)
    try:
        s = with_dest(settings, scp.destination()).model_copy(update={"dispatch_associations": 4})
        enqueue(db, results, [s.destinations[0].key], study_uid=vol.study_uid)
        rep = process_outbox(db, s, now=T0)
        assert (rep.sent, rep.retrying, rep.dead) == (len(results) - 2, 2, 0)
        assert set(scp.received) == {r.sop_instance_uid for r, _ in results} - refused
        rep = process_outbox(db, s.model_copy(update={"dispatch_associations": 4}), now=T0 + dt.timedelta(seconds=5))
        assert rep.claimed == 2 and rep.retrying == 2  # still refused: pending again, nothing else re-sent
        assert len(scp.received) == len(results) - 2
    finally:
        scp.stop()


def test_c_store_requests_leave_without_nagle_delay(settings, db, result_files, monkeypatch):
    """Each C-STORE goes out as several PDUs; the sender's socket has TCP_NODELAY so no small write waits for
    the peer's delayed ACK (~40 ms an object on loopback)."""
    import socket

    from pynetdicom.association import Association

    vol, results = result_files
    seen: list[int] = []
    send = Association.send_c_store

    def recording(self, *args, **kwargs):
        seen.append(self.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return send(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", recording)
    scp = StoreSCP()
    try:
        s = with_dest(settings, scp.destination())
        enqueue(db, results, [s.destinations[0].key], study_uid=vol.study_uid)
        rep = process_outbox(db, s, now=T0)
        assert rep.sent == len(results) == len(seen)
        assert all(seen), seen
    finally:
        scp.stop()


def test_the_dispatch_loop_asks_whether_anything_is_due_without_the_write_lock(settings, db, result_files):
    """`anything_due` answers what `claim` would take (pending and due, or sending with an expired lease) and
    answers while another connection holds SQLite's write lock (the listener indexing an instance)."""
    import sqlite3

    from sqlalchemy import update

    vol, results = result_files
    assert not anything_due(db.engine, T0)
    enqueue(db, results[:1], ["pacs"], study_uid=vol.study_uid, now=T0 + dt.timedelta(seconds=30))
    assert not anything_due(db.engine, T0)  # not due yet (a backoff)
    assert anything_due(db.engine, T0 + dt.timedelta(seconds=30))
    with db.session() as s:
        claimed = claim(s, now=T0 + dt.timedelta(seconds=30), owner="me", limit=10, lease_seconds=60)
    assert len(claimed) == 1
    assert not anything_due(db.engine, T0 + dt.timedelta(seconds=60))  # leased
    assert anything_due(db.engine, T0 + dt.timedelta(seconds=91))  # the lease expired: a restart resumes it
    with db.session() as s:
        s.execute(update(OutboxItem).values(state="sent", lease_owner=None, lease_expires_at=None))
    assert not anything_due(db.engine, T0 + dt.timedelta(days=1))
    enqueue(db, results[1:2], ["pacs"], study_uid=vol.study_uid, now=T0)
    holder = sqlite3.connect(db.engine.url.database, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held
        assert anything_due(db.engine, T0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _send_all(scp: StoreSCP, results, settings) -> dict[str, bytes]:
    """``results`` sent to ``scp`` in one `send_dimse`; each one's data set as it came over the wire."""
    from node.dispatch.senders import Claimed, send_dimse

    items = [
        Claimed(i + 1, "pacs", r.sop_instance_uid, r.sop_class_uid, path, 0) for i, (r, path) in enumerate(results)
    ]
    try:
        outcomes = dict(send_dimse(scp.destination(), items, settings))
    finally:
        scp.stop()
    assert len(outcomes) == len(results) and all(o.ok for o in outcomes.values()), outcomes
    return {uid: scp.raw[uid] for uid in (r.sop_instance_uid for r, _ in results)}


def test_a_result_file_goes_out_as_its_own_bytes_when_the_peer_accepts_its_transfer_syntax(
    settings, result_files, monkeypatch
):
    """Sent from the file (pynetdicom's chunked send of a path): the data set is not decoded and encoded again."""
    import pydicom
    from pynetdicom.dsutils import split_dataset

    _, results = result_files

    def no_decoding(*a, **kw):
        raise AssertionError("a result file was decoded to be sent")

    monkeypatch.setattr(pydicom, "dcmread", no_decoding)
    received = _send_all(StoreSCP(), results, settings)
    for r, path in results:
        _, offset = split_dataset(path)
        assert received[r.sop_instance_uid] == path.read_bytes()[offset:]


def test_a_peer_accepting_only_implicit_vr_gets_each_object_encoded_for_it(settings, result_files):
    """Where the file's own transfer syntax was not accepted, the data set is decoded and pynetdicom encodes it in
    the one the peer accepted."""
    from io import BytesIO

    import pydicom
    from pydicom.filereader import read_dataset
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom.dsutils import split_dataset

    _, results = result_files
    received = _send_all(StoreSCP(transfer_syntaxes=[ImplicitVRLittleEndian]), results, settings)
    for r, path in results:
        _, offset = split_dataset(path)
        raw = received[r.sop_instance_uid]
        assert raw != path.read_bytes()[offset:]  # not the file's explicit-VR bytes
        arrived = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
        sent = pydicom.dcmread(path)
        assert arrived.SOPInstanceUID == sent.SOPInstanceUID and arrived.SOPClassUID == sent.SOPClassUID
        if "PixelData" in sent:
            assert arrived.PixelData == sent.PixelData


def test_a_c_store_response_the_association_reactor_takes_goes_back_to_the_waiting_send():
    """pynetdicom's reactor thread can take the C-STORE-RSP that send_c_store is about to wait for (it then logged
    "unexpected service message" and the send waited out the DIMSE timeout, 30 s): it goes back on the queue;
    a request is still served as pynetdicom serves it."""
    import queue
    from io import BytesIO
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_STORE

    from node.dispatch.senders import keep_responses

    served = []
    assoc = SimpleNamespace(dimse=SimpleNamespace(msg_queue=queue.Queue()))
    assoc._serve_request = lambda msg, cx: served.append((cx, msg))
    keep_responses(assoc)
    rsp = C_STORE()  # as the DIMSE provider queues it: the primitive
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0x0000
    assert rsp.is_valid_response and not rsp.is_valid_request
    assoc._serve_request(rsp, 1)
    assert assoc.dimse.msg_queue.get_nowait() == (1, rsp) and not served
    req = C_STORE()
    req.MessageID = 8
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    req.AffectedSOPInstanceUID = "1.2.3.5"
    req.Priority = 2
    req.DataSet = BytesIO(b"\x08\x00\x18\x00")
    assert req.is_valid_request
    assoc._serve_request(req, 3)
    assert served == [(3, req)] and assoc.dimse.msg_queue.empty()
