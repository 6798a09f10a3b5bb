"""A real Orthanc (Debian ``/usr/sbin/Orthanc``) for tests: the PACS our results go to.

`OrthancServer(workdir)` writes a JSON configuration in ``workdir`` (free loopback
ports, SQLite index and storage in ``workdir``, the DICOMweb plugin, HTTP basic auth),
``start()`` waits until the REST API answers, ``stop()`` terminates it; ``start()``
again reuses the same ports and storage, so tests can take the PACS down and bring it
back. A Lua ``ReceivedInstanceFilter`` logs every instance Orthanc receives — also
duplicates, which Orthanc itself does not store twice — so `received()` counts real
deliveries.

Orthanc 1.10 cannot bind its DICOM port to one address; the configuration therefore
refuses C-STORE/C-ECHO from any AE title/host it does not list (``DicomModalities``,
host 127.0.0.1, ``DicomCheckModalityHost``). HTTP answers loopback only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('MSKTEST-RECEIVED ' .. dicom.SOPInstanceUID .. ' ' .. origin.RequestOrigin)
  return true
end
"""


def dicomweb_plugin() -> Path:
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")):
            return p
    raise FileNotFoundError("the orthanc-dicomweb plugin (libOrthancDicomWeb.so) is not installed")


class OrthancServer:
    def __init__(self, workdir: Path, *, dicom_port: int, http_port: int, aet: str = "ORTHANC",
                 allowed_aets: tuple[str, ...] = ("MSKNODE", "STORESCU", "ECHOSCU", "FINDSCU", "MOVESCU")):
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        self.username = "msknode"
        self.password = "orthanc-test-pw"
        self.allowed_aets = allowed_aets
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._proc: subprocess.Popen | None = None
        self._write_config()

    # ---- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    # ---- lifecycle ---------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "received.lua").write_text(_LUA)
        modalities = {
            aet.lower(): {"AET": aet, "Host": "127.0.0.1", "Port": 104, "AllowStore": True, "AllowEcho": True,
                          "AllowFind": True, "AllowMove": True, "AllowGet": True}
            for aet in self.allowed_aets
        }
        config = {
            "Name": "msknode-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomCheckCalledAet": True,
            "DicomModalities": modalities,
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [str(self.workdir / "received.lua")],
            "SaveJobs": False,
            "StableAge": 1,
            "HttpTimeout": 30,
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> "OrthancServer":
        if self._proc is not None and self._proc.poll() is None:
            return self
        env = dict(os.environ, TCP_NODELAY="1")
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.workdir, env=env)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
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

    # ---- REST helpers ------------------------------------------------------------------------
    def get(self, path: str):
        r = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body):
        r = httpx.post(f"{self.url}{path}", auth=self.auth, timeout=30,
                       content=body if isinstance(body, (bytes, str)) else json.dumps(body))
        r.raise_for_status()
        return r.json()

    def study_id(self, study_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_uid)
        ids = [f["ID"] for f in found if f.get("Type") == "Study"]
        return ids[0] if ids else None

    def study_series(self, study_uid: str) -> dict[str, list[str]]:
        """Series Instance UID -> SOP Instance UIDs stored in the study."""
        sid = self.study_id(study_uid)
        if sid is None:
            return {}
        out: dict[str, list[str]] = {}
        for series in self.get(f"/studies/{sid}/series"):
            uid = series["MainDicomTags"]["SeriesInstanceUID"]
            out[uid] = [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get(f"/series/{series['ID']}/instances")]
        return out

    def received(self) -> Counter:
        """How often each SOP Instance UID reached Orthanc (any protocol, duplicates included)."""
        if not self.log_path.exists():
            return Counter()
        text = self.log_path.read_text(errors="replace")
        return Counter(re.findall(r"MSKTEST-RECEIVED (\S+) ", text))
