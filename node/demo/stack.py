"""Orthanc (the PACS) and ``msknode serve`` (embedded default) started and stopped together.

`NodeStack(root, ports=..., ...)` keeps everything under ``root``: ``root/orthanc`` (Orthanc's
configuration, SQLite index, storage and log) and ``root/node`` (msknode's data dir:
SQLite database, instance store, results, broker files), logs in ``root/*.log``.
msknode runs exactly as an operator would start it (``msknode serve`` in its own process
group), configured only through ``MSKNODE_*`` variables; nothing is started in-process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from node.demo.loopback import echoscu, free_port
from node.demo.pacs import OrthancPacs
from node.errors import EndToEndError
from node.settings import Settings, load_settings

log = logging.getLogger(__name__)

#: MSKNODE_ACTIVATE_MODELS of the embedded stack (demo, bench e2e): every shipped model active, said in the log
ACTIVATED_MODELS = ("all",)

DEFAULT_PORTS = {"orthanc_dicom": 4242, "orthanc_http": 8042, "node_dicom": 11112, "node_web": 8080}
#: MSKNODE_* variables of the caller that must not leak into the embedded stack
_DROPPED_ENV = ("MSKNODE_CONFIG", "MSKNODE_DATABASE_URL", "MSKNODE_BROKER_URL")
PACS_AE_TITLE = "ORTHANC"
MODALITY_AE_TITLE = "MODALITY"


@dataclass(frozen=True)
class Ports:
    orthanc_dicom: int
    orthanc_http: int
    node_dicom: int
    node_web: int


def port_is_free(port: int) -> bool:
    """Nobody listens on ``port`` (checked on every address: Orthanc's DICOM port binds to all)."""
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def choose_ports(*, free: bool) -> tuple[Ports, list[str]]:
    """The default ports, or free ones (``free`` or a default port taken); notes say which moved."""
    chosen: dict[str, int] = {}
    notes: list[str] = []
    for name, default in DEFAULT_PORTS.items():
        if not free and port_is_free(default) and default not in chosen.values():
            chosen[name] = default
            continue
        port = free_port()
        while port in chosen.values():
            port = free_port()
        if not free:
            notes.append(f"port {default} ({name.replace('_', ' ')}) is taken; using {port}")
        chosen[name] = port
    return Ports(**chosen), notes


class NodeStack:
    """Orthanc + msknode under one directory; ``start()``, ``stop()``; usable as a context manager."""

    def __init__(
        self,
        root: Path,
        *,
        ports: Ports,
        base_settings: Settings,
        password: str,
        username: str = "demo",
        extra_env: dict[str, str] | None = None,
    ):
        self.root = Path(root)
        self.ports = ports
        self.username = username
        self.password = password
        self.extra_env = dict(extra_env or {})
        self.node_dir = self.root / "node"
        self.node_log = self.root / "msknode.log"
        destinations = [
            {
                "type": "dimse",
                "name": "pacs",
                "ae_title": PACS_AE_TITLE,
                "host": "127.0.0.1",
                "port": ports.orthanc_dicom,
            }
        ]
        self.settings = load_settings(
            data_dir=self.node_dir,
            database_url=f"sqlite:///{(self.node_dir / 'msknode.db').resolve()}",
            broker_url="filesystem://",
            host="127.0.0.1",
            port=ports.node_dicom,
            web_host="127.0.0.1",
            web_port=ports.node_web,
            ae_title=base_settings.ae_title,
            uid_root=base_settings.uid_root,
            destinations=destinations,
            allowed_ae_titles=[PACS_AE_TITLE],
            # the demo and the benchmarks show the models at work: their shipped versions are active from the
            # start (a site's node runs a model without real-data validation in shadow until an admin activates it)
            activate_models=list(ACTIVATED_MODELS),
        )
        self.pacs = OrthancPacs(
            self.root / "orthanc",
            dicom_port=ports.orthanc_dicom,
            http_port=ports.orthanc_http,
            node_ae_title=self.settings.ae_title,
            node_port=ports.node_dicom,
            node_uid_root=self.settings.uid_root,
            username=username,
            password=password,
            aet=PACS_AE_TITLE,
            modality_aets=(MODALITY_AE_TITLE,),
        )
        self._serve: subprocess.Popen | None = None

    # ---- addresses -------------------------------------------------------------------------
    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.node_web}"

    def node_env(self) -> dict[str, str]:
        """The environment of ``msknode serve``: the caller's, minus what would leave the embedded default."""
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        s = self.settings
        env.update(
            {
                "MSKNODE_DATA_DIR": str(s.data_dir),
                "MSKNODE_HOST": s.host,
                "MSKNODE_PORT": str(s.port),
                "MSKNODE_WEB_HOST": s.web_host,
                "MSKNODE_WEB_PORT": str(s.web_port),
                "MSKNODE_AE_TITLE": s.ae_title,
                "MSKNODE_UID_ROOT": s.uid_root,
                "MSKNODE_ALLOWED_AE_TITLES": ",".join(s.allowed_ae_titles),
                "MSKNODE_DESTINATIONS": json.dumps([d.model_dump(exclude_none=True) for d in s.destinations]),
                "MSKNODE_ACTIVATE_MODELS": ",".join(s.activate_models),
                "TCP_NODELAY": "1",
                # never import packages from the working directory (a folder named "node" would shadow msknode)
                "PYTHONSAFEPATH": "1",
            }
        )
        env.update(self.extra_env)
        return env

    # ---- lifecycle ---------------------------------------------------------------------------
    def prepare_node(self) -> None:
        """Creates the database (migrations) and the demo admin user."""
        from sqlalchemy import select

        from node.db.database import Database
        from node.web.users import add_user, set_password
        from worklists.tables import User

        self.settings.ensure_dirs()
        db = Database(self.settings.database_url)
        try:
            with db.session() as s:
                if s.scalars(select(User).where(User.username == self.username)).first() is None:
                    add_user(s, username=self.username, password=self.password, role="admin", actor="demo")
                else:
                    set_password(s, username=self.username, password=self.password, actor="demo")
        finally:
            db.dispose()

    def start(self, *, timeout: float = 120.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log.info(
            "this stack's configuration activates the shipped models (MSKNODE_ACTIVATE_MODELS=%s); at a site a model "
            "without real-data validation starts in shadow",
            ",".join(self.settings.activate_models),
        )
        self.prepare_node()
        self.pacs.start()
        with open(self.node_log, "ab") as log_fh:
            self._serve = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve"],
                env=self.node_env(),
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.node_dir,
                start_new_session=True,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until msknode answers C-ECHO and its web server answers /health."""
        deadline = time.monotonic() + timeout
        echo_ok = web_ok = False
        while time.monotonic() < deadline:
            if self._serve is not None and self._serve.poll() is not None:
                raise EndToEndError(f"msknode serve exited with code {self._serve.returncode}; see {self.node_log}")
            if not echo_ok:
                echo_ok = self._echo()
            if not web_ok:
                try:
                    web_ok = httpx.get(f"{self.web_url}/health", timeout=2).status_code in (200, 503)
                except httpx.HTTPError:
                    pass
            if echo_ok and web_ok:
                return
            time.sleep(0.3)
        missing = [n for n, ok in (("DICOM listener", echo_ok), ("web", web_ok)) if not ok]
        raise EndToEndError(
            f"msknode did not start within {timeout:.0f} s ({', '.join(missing)} not answering); see {self.node_log}"
        )

    def _echo(self) -> bool:
        return echoscu(self.ports.node_dicom, self.settings.ae_title, calling_ae=PACS_AE_TITLE, timeout=5)

    @property
    def serve_running(self) -> bool:
        return self._serve is not None and self._serve.poll() is None

    def check_running(self) -> None:
        """Raises if Orthanc or msknode stopped on its own."""
        if not self.pacs.running:
            raise EndToEndError(f"Orthanc stopped; see {self.pacs.log_path}")
        if not self.serve_running:
            code = self._serve.returncode if self._serve is not None else None
            raise EndToEndError(f"msknode serve stopped (exit code {code}); see {self.node_log}")

    def stop(self) -> None:
        serve, self._serve = self._serve, None
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)  # serve stops its parts (SIGTERM, then SIGKILL after a grace period)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("msknode serve did not stop within 60 s: killing its process group")
                try:
                    os.killpg(serve.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                serve.wait(timeout=10)
        self.pacs.stop()

    def __enter__(self) -> NodeStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
