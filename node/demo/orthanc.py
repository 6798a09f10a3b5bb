"""An Orthanc process (Debian ``/usr/sbin/Orthanc``) on loopback, and its REST API.

`OrthancProcess(workdir, dicom_port=..., http_port=...)` is the base of every Orthanc msknode
starts: the demo/benchmark PACS (`node.demo.pacs.OrthancPacs`) and the test PACSes. A subclass
returns its JSON configuration from `config()` (starting from the base's: storage, index,
ports, AE title, loopback HTTP, basic auth when credentials are given); `start()` writes it to
``workdir/orthanc.json``, runs Orthanc (``TCP_NODELAY=1``, ``TZ=UTC`` so that its log times are
UTC, output to ``workdir/orthanc.log``) and waits until ``GET /system`` answers; `stop()`
terminates it (kills it if it does not stop). `start()` again reuses the same ports and storage.

Orthanc 1.10 cannot bind its DICOM port to one address: `restricted_peers()` is the part of a
configuration that refuses C-STORE/C-ECHO from any AE title/host it does not list.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from node.errors import NodeError

ORTHANC = "/usr/sbin/Orthanc"


def orthanc_binary() -> str | None:
    """The Orthanc executable: the Debian package's, else ``Orthanc`` on the PATH; None if there is none."""
    return ORTHANC if Path(ORTHANC).exists() else shutil.which("Orthanc")


def dicom_peer(aet: str, *, host: str = "127.0.0.1", port: int = 104, move_get: bool = False) -> dict[str, Any]:
    """A ``DicomModalities`` entry: may store, echo and find (and move/get with ``move_get``)."""
    return {
        "AET": aet,
        "Host": host,
        "Port": port,
        "AllowStore": True,
        "AllowEcho": True,
        "AllowFind": True,
        "AllowMove": move_get,
        "AllowGet": move_get,
    }


def restricted_peers(modalities: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Configuration keys that admit only the listed peers (AE title and host checked) on the DICOM port."""
    return {
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomCheckModalityHost": True,
        "DicomCheckCalledAet": True,
        "DicomModalities": modalities,
    }


class OrthancProcess:
    """One Orthanc process with its configuration, storage and log in ``workdir``."""

    #: raised when Orthanc is missing, exits at start or does not answer
    error: type[Exception] = NodeError

    def __init__(
        self,
        workdir: Path,
        *,
        dicom_port: int,
        http_port: int,
        aet: str = "ORTHANC",
        username: str | None = None,
        password: str | None = None,
    ):
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        self.username = username
        self.password = password
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen | None = None

    # ---- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """HTTP basic-auth credentials, or None when authentication is off."""
        return (self.username, self.password or "") if self.username is not None else None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self._proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- configuration -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The JSON configuration; subclasses extend this one."""
        config: dict[str, Any] = {
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.auth is not None,
        }
        if self.auth is not None:
            config["RegisteredUsers"] = {self.username: self.password}
        return config

    def _binary(self) -> str:
        binary = orthanc_binary()
        if binary is None:
            raise self.error(f"Orthanc is not installed ({ORTHANC}); run scripts/install-system-deps.sh")
        return binary

    def write_config(self) -> None:
        self._binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        # it holds the REST password: readable by this user alone, also when it existed before
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.config(), indent=2))

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0):
        """Starts Orthanc (if it is not running) and waits until its REST API answers; returns self."""
        if self.running:
            return self
        self.write_config()
        env = dict(os.environ, TCP_NODELAY="1", TZ="UTC")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self._binary(), str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self.error(
                    f"Orthanc exited with code {self._proc.returncode}; see {self.log_path}{self._log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise self.error(
            f"Orthanc did not answer on {self.url} within {timeout:.0f} s; see {self.log_path}{self._log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Terminates Orthanc (SIGKILL if it has not stopped within ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n  {line}" for line in tail)

    # ---- REST --------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=60)
        r.raise_for_status()
        return r.json()

    def get_bytes(self, path: str) -> bytes:
        r = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=60)
        r.raise_for_status()
        return r.content

    def post(self, path: str, body: Any) -> Any:
        """POSTs bytes/str as they are, anything else as JSON; returns the JSON answer."""
        r = httpx.post(
            f"{self.url}{path}",
            auth=self.auth,
            timeout=60,
            content=body if isinstance(body, (bytes, str)) else json.dumps(body),
        )
        r.raise_for_status()
        return r.json()

    def lookup(self, uid: str, kind: str) -> str | None:
        """Orthanc's id of the Study/Series/Instance with this DICOM UID, or None."""
        for item in self.post("/tools/lookup", uid):
            if item.get("Type") == kind:
                return item["ID"]
        return None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds in the study (``ID``, ``MainDicomTags``, …); [] for an unknown study."""
        sid = self.lookup(study_uid, "Study")
        return [] if sid is None else self.get(f"/studies/{sid}/instances")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get_bytes(f"/instances/{orthanc_id}/file")


# ---- the auto-routing script for a site's Orthanc ------------------------------------------------
AUTOROUTE_RULE = Path(__file__).resolve().parent.parent.parent / "docker" / "orthanc-autoroute.lua"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def autoroute_script(
    settings: Any,
    *,
    host: str | None = None,
    modality: str = "msknode",
    route_modalities: str = "MR",
    rule: Path | None = None,
) -> str:
    """One Lua file for Orthanc's ``LuaScripts``: msknode's AE title, host, port and UID root from the
    settings, an ``Initialize`` that registers msknode as the modality ``modality`` (``PUT
    /modalities/<modality>``: no ``DicomModalities`` entry needed), then the shipped rule
    (``docker/orthanc-autoroute.lua``), which reads those globals."""
    host = host or settings.host
    if host in _WILDCARD_HOSTS:
        raise NodeError(
            f"MSKNODE_HOST is {settings.host or 'empty'}: give the address Orthanc reaches msknode at (--host)"
        )
    rule_text = (rule or AUTOROUTE_RULE).read_text(encoding="utf-8")
    return (
        "-- msknode auto-routing for Orthanc, generated by `msknode orthanc autoroute-script` from the node's settings.\n"
        '-- Load it in Orthanc\'s configuration: "LuaScripts": [ "/etc/orthanc/msknode-autoroute.lua" ].\n'
        f"MSKNODE_MODALITY = {lua_string(modality)}\n"
        f"MSKNODE_AE_TITLE = {lua_string(settings.ae_title)}\n"
        f"MSKNODE_HOST = {lua_string(host)}\n"
        f"MSKNODE_PORT = {int(settings.port)}\n"
        f"MSKNODE_UID_ROOT = {lua_string(settings.uid_root)}\n"
        f"MSKNODE_ROUTE_MODALITIES = {lua_string(route_modalities)}\n"
        "\n"
        "-- msknode as the modality MSKNODE_MODALITY (replaces an entry of that name in DicomModalities)\n"
        "function Initialize()\n"
        "  RestApiPut('/modalities/' .. MSKNODE_MODALITY,\n"
        "             DumpJson({ AET = MSKNODE_AE_TITLE, Host = MSKNODE_HOST, Port = MSKNODE_PORT }, true))\n"
        "end\n"
        "\n" + rule_text
    )
