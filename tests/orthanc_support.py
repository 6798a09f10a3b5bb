"""A real Orthanc (Debian ``/usr/sbin/Orthanc``) for tests: the PACS our results go to.

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

from node.demo.orthanc import OrthancProcess, dicom_peer, restricted_peers

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


class OrthancServer(OrthancProcess):
    """The test PACS: DICOMweb, basic auth, the listed AE titles may store/find/move, a reception log."""

    def __init__(self, workdir: Path, *, dicom_port: int, http_port: int, aet: str = "ORTHANC",
                 allowed_aets: tuple[str, ...] = ("MSKNODE", "STORESCU", "ECHOSCU", "FINDSCU", "MOVESCU")):
        super().__init__(workdir, dicom_port=dicom_port, http_port=http_port, aet=aet,
                         username="msknode", password="orthanc-test-pw")
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
