"""Test support: a real ``msknode listen`` subprocess and a pynetdicom client that sends raw bytes.

`ListenerProcess` starts the listener on a (free) loopback port with its own data dir and
stops it (SIGTERM, then SIGKILL) or kills it. `send_raw` sends data set bytes exactly as given (no
re-encoding), which is what the byte-identity and malformed-input tests need.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification

from node.demo.loopback import child_env
from support.env import ROOT, free_port
from support.servers import track, untrack

PYDICOM_DATA = Path(__import__("data_store").__file__).parent / "data"
IMPLICIT_LE = "1.2.840.10008.1.2"


class ListenerProcess:
    """``msknode listen`` in a subprocess, on a free port, with its own data dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        ae_title: str = "MSKNODE",
        port: int | None = None,
        log_path: Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._token = None
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}-listener.log"

    @property
    def env(self) -> dict[str, str]:
        return child_env(
            **{
                "MSKNODE_DATA_DIR": self.data_dir,
                "MSKNODE_PORT": self.port,
                "MSKNODE_AE_TITLE": self.ae_title,
                "MSKNODE_QUIET_SECONDS": "0.5",
                "MSKNODE_LOG_LEVEL": "INFO",
                **self.extra_env,
            }
        )

    def start(self, timeout: float = 90.0, ready=None) -> ListenerProcess:
        """Starts the listener and waits until `ready(port)` (default: C-ECHO succeeds)."""
        ready = ready or (lambda port: echo(port, self.ae_title) == 0)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- the listener writes to it until it is stopped
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "listen"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._token = track(f"msknode listen :{self.port} pid {self.proc.pid}", self.kill)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                untrack(self._token)  # it is gone: nothing is left to stop
                raise RuntimeError(f"listener exited with {self.proc.returncode}:\n{self.log()}")
            if ready(self.port):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"listener did not answer C-ECHO within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        untrack(self._token)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown code runs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        untrack(self._token)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def msknode(self, *args: str) -> subprocess.CompletedProcess:
        """Runs another ``msknode`` command against the same data dir."""
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def series_json(self) -> list[dict]:
        r = self.msknode("series", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def echo(port: int, ae_title: str = "MSKNODE", calling: str = "ECHOSCU") -> int | None:
    """C-ECHO with pynetdicom; the status, or None if no association."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def dataset_bytes(path: Path) -> tuple[str, str, str, bytes]:
    """(SOP Class UID, SOP Instance UID, transfer syntax, data set bytes) of a DICOM file, as stored.

    A file without File Meta Information is implicit VR little endian from its first byte.
    """
    raw = Path(path).read_bytes()
    if raw[128:132] == b"DICM":
        meta, offset = split_dataset(path)
        ds = dcmread(path, stop_before_pixels=True, force=True)
        return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(meta.TransferSyntaxUID), raw[offset:]
    ds = dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), IMPLICIT_LE, raw


class RawSender:
    """A pynetdicom association that sends data set bytes unchanged (C-STORE as the SCU)."""

    def __init__(
        self, port: int, contexts: list[tuple[str, str]], *, called: str = "MSKNODE", calling: str = "PYNETSCU"
    ):
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for sop_class, ts in sorted(set(contexts)):
            ae.add_requested_context(sop_class, [ts])
        ae.add_requested_context(Verification)
        self.assoc = ae.associate("127.0.0.1", port, ae_title=called)
        self._msg_id = 0

    def __enter__(self) -> RawSender:
        assert self.assoc.is_established, "association not accepted"
        return self

    def __exit__(self, *exc) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def send(self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> int:
        """Sends one C-STORE with `data` as its data set; returns the status."""
        context = next(
            cx
            for cx in self.assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == transfer_syntax
        )
        self._msg_id += 1
        req = C_STORE()
        req.MessageID = self._msg_id
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req.DataSet = BytesIO(data)
        assoc = self.assoc
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, context.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)


@contextlib.contextmanager
def in_process_listener(settings, *, fast: bool = True):
    """A `node.receive.listener.Listener` in this process on a free loopback port (``settings`` changed in place:
    port, transport), its database migrated; stopped on exit."""
    from node.db.database import upgrade
    from node.receive.listener import Listener

    settings.port = free_port()
    settings.fast_transport = fast
    settings.ensure_dirs()
    upgrade(settings.database_url)
    node = Listener(settings)
    node.start()
    try:
        yield node
    finally:
        node.stop()
