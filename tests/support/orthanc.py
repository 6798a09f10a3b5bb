"""Real Orthanc instances (Debian ``/usr/sbin/Orthanc``) for tests: the PACS our results go to.

`OrthancPacs(workdir)` is the plain one (DICOM + REST on loopback, no auth, no plugins), the PACS
of the job and survival tests. The rest of this docstring is about `OrthancServer`.

`OrthancServer(workdir)` is a `node.demo.orthanc.OrthancProcess` (free loopback ports, SQLite
index and storage in ``workdir``, HTTP basic auth) with the DICOMweb plugin;
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

import re
from collections import Counter
from pathlib import Path

from node.demo.loopback import free_port
from node.demo.orthanc import OrthancProcess, dicom_peer, restricted_peers
from support.servers import track, untrack

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


class _Tracked(OrthancProcess):
    """Registers the running Orthanc with `support.servers.track`, so no run leaves one behind."""

    _token = None

    def start(self, timeout: float = 60.0):
        if not self.running:
            self._token = track(f"Orthanc {self.workdir} :{self.dicom_port}/{self.http_port}", self.stop)
        return super().start(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        try:
            super().stop(timeout)
        finally:
            untrack(self._token)
            self._token = None


class OrthancServer(_Tracked):
    """The test PACS: DICOMweb, basic auth, the listed AE titles may store/find/move, a reception log."""

    def __init__(
        self,
        workdir: Path,
        *,
        dicom_port: int,
        http_port: int,
        aet: str = "ORTHANC",
        allowed_aets: tuple[str, ...] = ("MSKNODE", "STORESCU", "ECHOSCU", "FINDSCU", "MOVESCU"),
    ):
        super().__init__(
            workdir, dicom_port=dicom_port, http_port=http_port, aet=aet, username="msknode", password="orthanc-test-pw"
        )
        self.allowed_aets = allowed_aets
        self._lua_path = self.workdir / "received.lua"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lua_path.write_text(_LUA)
        super().write_config()

    def config(self) -> dict:
        return {
            "Name": "msknode-test-pacs",
            **super().config(),
            **restricted_peers({aet.lower(): dicom_peer(aet, move_get=True) for aet in self.allowed_aets}),
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [str(self._lua_path)],
            "SaveJobs": False,
            "StableAge": 1,
            "HttpTimeout": 30,
        }

    def study_id(self, study_uid: str) -> str | None:
        return self.lookup(study_uid, "Study")

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


class OrthancPacs(_Tracked):
    """A real Orthanc as the PACS: DICOM + REST on loopback (no auth), its own storage dir, free ports."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC"):
        super().__init__(workdir, dicom_port=free_port(), http_port=free_port(), aet=aet)

    def config(self) -> dict:
        return {
            "Name": "pacs",
            **super().config(),
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomServerEnabled": True,
            "Plugins": [],
            "StableAge": 1,
        }

    def instances_of_study(self, study_uid: str) -> list[dict]:
        """Every instance Orthanc holds in the study (its MainDicomTags: SOPInstanceUID, ...)."""
        return self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})

    @property
    def destination(self) -> dict:
        return {"type": "dimse", "name": "pacs", "ae_title": self.aet, "host": "127.0.0.1", "port": self.dicom_port}
