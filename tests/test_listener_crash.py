"""A crash of the listener loses no instance it answered with Success.

`msknode listen` with two listener processes takes four parallel associations (the group
commit path: concurrent C-STOREs share one index transaction and one round of fsyncs); once
enough Success responses have come back, every listener process is SIGKILLed mid-stream. Each
instance that got Success must then be in the index with a file whose data set bytes are the
bytes sent, before and after the restart (whose unclean-stop check must not drop any of them),
and the restarted listener takes new instances.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from node.receive.storage import dataset_offset
from support.listener import ListenerProcess, RawSender, dataset_bytes
from support.mr import mr_dataset, save
from support.servers import wait_gone

pytestmark = [pytest.mark.integration]

ASSOCIATIONS = 4
PER_ASSOCIATION = 60  # more than are answered before the kill
KILL_AFTER = 40  # Success responses (all associations together)


def _instances(folder: Path, n: int, series_uid: str, study_uid: str, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        pixels = rng.integers(0, 4000, (128, 128), dtype=np.uint16)
        ds = mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            pixels=pixels,
            SeriesDescription="CRASH TEST",
            InstanceNumber=k + 1,
            ImagePositionPatient=[0.0, 0.0, float(k)],
        )
        _, uid, _, data = dataset_bytes(save(ds, folder / f"{seed}-{k}.dcm"))
        out.append((uid, data))
    return out


def _listener_processes(pid: int) -> list[int]:
    """The listener processes under `pid` (multiprocessing children; not its resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split() if b"spawn_main" in Path(f"/proc/{x}/cmdline").read_bytes()]


def _indexed(data_dir: Path) -> dict[str, str]:
    db = sqlite3.connect(str(data_dir / "msknode.db"))
    try:
        return dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    finally:
        db.close()


def _check_durable(data_dir: Path, acked: dict[str, bytes]) -> None:
    rows = _indexed(data_dir)
    missing = sorted(set(acked) - set(rows))
    assert not missing, f"{len(missing)} of {len(acked)} instances answered with Success are not in the index"
    for uid, data in acked.items():
        path = Path(rows[uid])
        assert path.is_file(), f"{uid}: indexed, but its file is missing"
        stored = path.read_bytes()[dataset_offset(path) :]
        assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest(), f"{uid}: stored bytes differ"


def test_sigkill_of_every_listener_process_loses_no_acknowledged_instance(tmp_path):
    data_dir = tmp_path / "node"
    listener = ListenerProcess(data_dir, env={"MSKNODE_LISTENER_PROCESSES": "2", "MSKNODE_LOG_LEVEL": "WARNING"})
    study = generate_uid()
    batches = [
        _instances(tmp_path / "sent", PER_ASSOCIATION, generate_uid(), study, seed=i) for i in range(ASSOCIATIONS)
    ]
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    enough = threading.Event()
    failures: list[str] = []

    def sender(batch: list[tuple[str, bytes]]) -> None:
        try:
            with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)]) as scu:
                for uid, data in batch:
                    status = scu.send(MRImageStorage, uid, ExplicitVRLittleEndian, data)
                    if status != 0:
                        failures.append(f"{uid}: status 0x{status:04X}")
                        return
                    with lock:
                        acked[uid] = data
                        if len(acked) >= KILL_AFTER:
                            enough.set()
        except Exception:
            pass  # the listener was killed under this association: what it answered is in `acked`

    listener.start()
    assert listener.proc is not None
    threads: list[threading.Thread] = []
    try:
        pids = _listener_processes(listener.proc.pid)
        assert len(pids) == 2, "two listener processes expected"
        threads = [threading.Thread(target=sender, args=(b,), daemon=True) for b in batches]
        for t in threads:
            t.start()
        assert enough.wait(120), f"only {len(acked)} Success responses within 120 s ({failures})"
        for pid in pids:  # a crash of every listener process at once, mid-stream
            os.kill(pid, signal.SIGKILL)
        assert all(wait_gone(pid, 10) for pid in pids), "a listener process outlived SIGKILL"
    finally:
        listener.kill()
        for t in threads:
            t.join(60)
    assert not failures, failures
    # every Success a sender got, also one read after the kill (SIGKILL takes effect asynchronously
    # and a response may still sit in the socket): each was sent before its process died
    with lock:
        answered = dict(acked)
    assert KILL_AFTER <= len(answered) < ASSOCIATIONS * PER_ASSOCIATION, "the kill did not come mid-stream"
    _check_durable(data_dir, answered)

    # the restart checks the rows of the unclean stop: none of the acknowledged ones may go
    listener.start()
    try:
        _check_durable(data_dir, answered)
        (uid, data), *_ = _instances(tmp_path / "sent", 1, generate_uid(), study, seed=99)
        with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)]) as scu:
            assert scu.send(MRImageStorage, uid, ExplicitVRLittleEndian, data) == 0
        _check_durable(data_dir, {**answered, uid: data})
        # an instance cut off by the kill (no Success) can be sent again and is then stored once
        resend = next((u, d) for b in batches for u, d in b if u not in answered)
        with RawSender(listener.port, [(MRImageStorage, ExplicitVRLittleEndian)]) as scu:
            assert scu.send(MRImageStorage, resend[0], ExplicitVRLittleEndian, resend[1]) == 0
        _check_durable(data_dir, {**answered, resend[0]: resend[1]})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "unclean" not in listener.log():
            time.sleep(0.1)
        assert "stopped uncleanly" in listener.log(), "the restart did not check the unclean stop"
    finally:
        listener.stop()
