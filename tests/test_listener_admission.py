"""Who may send and when: AE allow-list, low disk, several listener processes, clean shutdown, `msknode serve`.

The tests of admission and of the association path run with the fast transport and with stock
pynetdicom (``mode``); those of process management run with the default.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from test_listener import TRANSPORT_LOG, TRANSPORTS, _good_instance, storescu, transport_env, write_series

from node.db.database import Database
from node.db.schema import Association, Instance, Series
from node.demo.loopback import child_env
from support.env import ROOT, free_port
from support.listener import PYDICOM_DATA, ListenerProcess, RawSender, dataset_bytes, echo, in_process_listener

modes = pytest.mark.parametrize("mode", list(TRANSPORTS))


def associate(port: int, calling: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="MSKNODE")


def rejection(assoc) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


@modes
def test_calling_ae_not_in_allow_list_is_rejected_permanent(tmp_path, mode):
    node = ListenerProcess(tmp_path / "data", env=transport_env(mode, MSKNODE_ALLOWED_AE_TITLES="GOODSCU, OTHERSCU"))
    node.start(ready=lambda port: echo(port, calling="GOODSCU") == 0)
    try:
        assoc = associate(node.port, "BADSCU")
        assert assoc.is_rejected and not assoc.is_established
        assert rejection(assoc) == (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
        r = subprocess.run(
            ["echoscu", "-aet", "BADSCU", "-aec", "MSKNODE", "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
        assert echo(node.port, calling="OTHERSCU") == 0
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        with db.session() as s:
            callers = set(s.scalars(select(Association.calling_ae)))
        db.dispose()
        assert "BADSCU" not in callers and {"GOODSCU", "OTHERSCU"} <= callers
    finally:
        assert node.stop() == 0


@modes
def test_low_disk_rejects_new_associations_transient(tmp_path, mode):
    node = ListenerProcess(tmp_path / "data", env=transport_env(mode, MSKNODE_MIN_FREE_GB="100000000"))
    node.start(ready=lambda port: associate(port, "STORESCU").is_rejected)
    try:
        assoc = associate(node.port, "STORESCU")
        assert assoc.is_rejected
        assert rejection(assoc) == (0x02, 0x01, 0x01)  # rejected-transient (the PACS retries later), service-user
        assert "free disk below MSKNODE_MIN_FREE_GB" in node.log()
    finally:
        assert node.stop() == 0


@modes
def test_store_inside_an_open_association_gets_0xA700_when_disk_runs_low(settings, mode):
    """In-process listener: free space drops under the minimum while an association is open."""
    with in_process_listener(settings, fast=mode == "fast") as listener:
        ds, data = _good_instance()
        with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)]) as sender:
            listener.store.min_free_bytes = 10**18
            assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0xA700
            listener.store.min_free_bytes = 0
            assert sender.send(MRImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data) == 0x0000
        store = settings.store_dir
        files = [p for p in store.rglob("*") if p.is_file()]
        assert [p.name for p in files] == [f"{ds.SOPInstanceUID}.dcm"]  # nothing half-written, nothing staged


@modes
def test_compressed_transfer_syntaxes_from_storescu(tmp_path, mode):
    """dcmtk proposes the files' own compressed syntax; msknode stores the encapsulated pixel data as received."""
    from pydicom import dcmread

    node = ListenerProcess(tmp_path / "data", env=transport_env(mode)).start()
    cases = {
        "-xv": "MR2_J2KR.dcm",  # JPEG 2000 lossless
        "-xs": "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1
        "-xy": "color3d_jpeg_baseline.dcm",  # JPEG baseline
        "-xt": "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "-xr": "emri_small_RLE.dcm",  # RLE
    }
    db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
    try:
        for option, name in cases.items():
            path = PYDICOM_DATA / name
            r = storescu(node.port, [path], "-R", option)
            assert r.returncode == 0, (name, r.stderr)
            _sop_class, sop, ts, _ = dataset_bytes(path)
            with db.session() as s:
                inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
            assert inst.transfer_syntax_uid == ts, name
            assert dcmread(inst.path).PixelData == dcmread(path).PixelData, name
    finally:
        db.dispose()
        assert node.stop() == 0


@modes
def test_several_listener_processes_share_the_port(tmp_path, mode):
    node = ListenerProcess(tmp_path / "data", env=transport_env(mode, MSKNODE_LISTENER_PROCESSES="3")).start()
    batches = [write_series(tmp_path / f"b{k}", n=6, size=32) for k in range(8)]
    try:
        # connections go to processes that serve already; here all three have started
        deadline = time.monotonic() + 60
        while node.log().count("ready") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(f"listener process {i} ready" in node.log() for i in range(3)), node.log()
        results = []
        threads = [threading.Thread(target=lambda p=p: results.append(storescu(node.port, p))) for _, _, p in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.returncode for r in results] == [0] * 8
        out = subprocess.run(
            ["ps", "-ww", "--ppid", str(node.proc.pid), "-o", "pid=,args="], capture_output=True, text=True
        ).stdout
        children = [line.split()[0] for line in out.splitlines() if "spawn_main" in line]
        assert len(children) == 3, out
        assert node.log().count(TRANSPORT_LOG[mode]) == 3, node.log()  # every listener process serves in `mode`
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        with db.session() as s:
            counts = [s.scalar(select(Series.instances).where(Series.series_uid == uid)) for _, uid, _ in batches]
            listeners = list(s.scalars(select(Association.listener).where(Association.calling_ae == "STORESCU")))
            total = s.scalar(select(func.count()).select_from(Instance))
        db.dispose()
        assert counts == [6] * 8 and total == 48
        # the parent hands each connection to the least busy process: all three serve
        per_process = {int(c): 0 for c in children}
        for listener_id in listeners:
            per_process[int(listener_id.rsplit(":", 1)[1])] += 1
        assert sum(per_process.values()) == 8 and min(per_process.values()) >= 1, per_process
    finally:
        assert node.stop() == 0
    for pid in children:  # the listener processes are gone with their parent
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_serve_runs_the_parts_restarts_a_crashed_one_and_stops_cleanly(tmp_path):
    port, web_port = free_port(), free_port()
    env = child_env(
        MSKNODE_DATA_DIR=tmp_path / "data", MSKNODE_PORT=port, MSKNODE_WEB_PORT=web_port, MSKNODE_LOG_LEVEL="INFO"
    )
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115  (the server writes it until it is stopped)
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def children() -> dict[str, int]:
        out = subprocess.run(
            ["ps", "-ww", "--ppid", str(proc.pid), "-o", "pid=,args="], capture_output=True, text=True
        ).stdout
        found = {}
        for line in out.splitlines():
            pid, args = line.strip().split(None, 1)
            for part in ("listen", "worker", "web"):
                if args.endswith(f"node.cli {part}"):
                    found[part] = int(pid)
        return found

    def wait_echo(timeout=120.0):
        deadline = time.monotonic() + timeout
        while echo(port) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.3)

    try:
        wait_echo()
        first = children()
        assert set(first) == {"listen", "worker", "web"}
        os.kill(first["listen"], signal.SIGKILL)  # a crash
        deadline = time.monotonic() + 60
        while children().get("listen") in (None, first["listen"]):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        wait_echo()
        assert children()["worker"] == first["worker"] and children()["web"] == first["web"]
        running = children()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in running.values():
            assert not Path(f"/proc/{pid}").exists()
        text = (tmp_path / "serve.log").read_text()
        assert "listen exited with code" in text and "all parts stopped" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_listener_processes_exit_when_their_parent_is_killed(tmp_path):
    node = ListenerProcess(tmp_path / "data", env={"MSKNODE_LISTENER_PROCESSES": "2"}).start()
    out = subprocess.run(
        ["ps", "-ww", "--ppid", str(node.proc.pid), "-o", "pid=,args="], capture_output=True, text=True
    ).stdout
    children = [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]
    assert len(children) == 2
    node.kill()  # SIGKILL to the parent only
    deadline = time.monotonic() + 30
    while any(
        Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        for pid in children
    ):
        assert time.monotonic() < deadline, "listener processes outlived their parent"
        time.sleep(0.2)
    assert echo(node.port) is None  # nothing answers on the port any more


def test_after_an_unclean_stop_the_listener_checks_the_latest_rows(tmp_path):
    """A listener killed (or a power loss) leaves its run marker; the next start checks the rows of
    the last minute and drops those whose file lacks the indexed bytes (their sender resends)."""
    node = ListenerProcess(tmp_path / "data").start()
    _study_uid, series_uid, paths = write_series(tmp_path / "s", n=3)
    assert storescu(node.port, paths).returncode == 0
    node.kill()  # unclean: the run marker stays
    markers = list((node.data_dir / "run").glob("listener-*.running"))
    assert len(markers) == 1
    db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
    with db.session() as s:
        victim = s.scalars(select(Instance).order_by(Instance.id)).all()[1]
    Path(victim.path).write_bytes(Path(victim.path).read_bytes()[:500])  # as if the data never reached the disk
    node.start()
    try:
        with db.session() as s:
            left = s.scalars(select(Instance.sop_instance_uid)).all()
            series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        assert victim.sop_instance_uid not in left and len(left) == 2 and series.instances == 2
        assert not markers[0].exists()
        assert f"instance {victim.sop_instance_uid} was not durable" in node.log()
        assert storescu(node.port, paths).returncode == 0  # the resend completes the series
        with db.session() as s:
            assert s.scalars(select(Series).where(Series.series_uid == series_uid)).one().instances == 3
    finally:
        db.dispose()
        assert node.stop() == 0
    assert not list((node.data_dir / "run").glob("*.running"))  # a clean stop leaves no marker
