"""Orthanc (Debian ``/usr/sbin/Orthanc``) as the hospital PACS, auto-routing new MR instances to msknode.

`OrthancPacs(workdir, ...)` writes a configuration in ``workdir``: loopback HTTP with basic
auth, SQLite index and storage under ``workdir``, DICOM peers restricted to the listed AE
titles on 127.0.0.1 (Orthanc 1.10 cannot bind its DICOM port to one address), and three
Lua scripts in this order:

1. a prelude that sets the routing rule's settings (msknode's modality name, UID root, AE title);
2. the shipped rule ``docker/orthanc-autoroute.lua`` (``OnStoredInstance`` → ``SendToModality``,
   never for objects msknode created);
3. a reception log: ``ReceivedInstanceFilter`` prints every instance Orthanc receives; Orthanc
   timestamps its log lines to the microsecond, which gives "stored in the PACS" times far
   finer than Orthanc's ``ReceptionDate`` metadata (whole seconds).

``TZ=UTC`` is set for the Orthanc process so that its log times are UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import httpx

from node.errors import EndToEndError

ORTHANC = "/usr/sbin/Orthanc"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
AUTOROUTE_LUA = REPO_ROOT / "docker" / "orthanc-autoroute.lua"
RECEIVED_MARK = "MSKNODE-RECEIVED"
#: Orthanc log line: level, MMDD, HH:MM:SS.micro, ..., our mark, SOP Instance UID, calling AE
_RECEIVED_RE = re.compile(
    r"^[IWE](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6}) .*" + RECEIVED_MARK + r" (\S+) ?(\S*)"
)
#: seconds Orthanc keeps the association Lua opened after the last forwarded instance (its default: 5)
ASSOCIATION_CLOSE_DELAY = 1

_TIMING_LUA = """-- Logs every instance Orthanc receives (the log line carries a microsecond timestamp).
function ReceivedInstanceFilter(dicom, origin, info)
  print('%s ' .. tostring(dicom.SOPInstanceUID) .. ' ' .. tostring(origin.RemoteAet or ''))
  return true
end
""" % RECEIVED_MARK


@dataclass(frozen=True)
class Reception:
    """One instance received by Orthanc: when (UTC) and from which AE title."""

    sop_instance_uid: str
    at: dt.datetime
    calling_ae: str


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class OrthancPacs:
    """An Orthanc process with the msknode auto-routing rule; ``start()`` / ``stop()``."""

    def __init__(
        self,
        workdir: Path,
        *,
        dicom_port: int,
        http_port: int,
        node_ae_title: str,
        node_port: int,
        node_uid_root: str,
        username: str,
        password: str,
        aet: str = "ORTHANC",
        modality_aets: Sequence[str] = ("MODALITY",),
        node_host: str = "127.0.0.1",
        autoroute_lua: Path = AUTOROUTE_LUA,
    ):
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        self.node_ae_title = node_ae_title
        self.node_port = node_port
        self.node_host = node_host
        self.node_uid_root = node_uid_root
        self.username = username
        self.password = password
        self.modality_aets = tuple(modality_aets)
        self.autoroute_lua = Path(autoroute_lua)
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen | None = None

    # ---- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- configuration -----------------------------------------------------------------------
    def write_config(self) -> None:
        if not Path(ORTHANC).exists():
            raise EndToEndError(f"Orthanc is not installed ({ORTHANC}); run scripts/install-system-deps.sh")
        if not self.autoroute_lua.is_file():
            raise EndToEndError(f"the auto-routing rule {self.autoroute_lua} is missing")
        self.workdir.mkdir(parents=True, exist_ok=True)
        prelude = self.workdir / "autoroute-settings.lua"
        prelude.write_text(
            "-- settings of the msknode auto-routing rule (read by orthanc-autoroute.lua)\n"
            f"MSKNODE_MODALITY = 'msknode'\n"
            f"MSKNODE_UID_ROOT = {_lua_string(self.node_uid_root)}\n"
            f"MSKNODE_AE_TITLE = {_lua_string(self.node_ae_title)}\n"
            "MSKNODE_ROUTE_MODALITIES = 'MR'\n"
        )
        timing = self.workdir / "reception-log.lua"
        timing.write_text(_TIMING_LUA)
        peer = {"AllowStore": True, "AllowEcho": True, "AllowFind": True, "AllowMove": False, "AllowGet": False}
        modalities = {
            "msknode": {"AET": self.node_ae_title, "Host": self.node_host, "Port": self.node_port, **peer},
        }
        for aet in self.modality_aets:
            if aet != self.node_ae_title:  # msknode's entry already lets it store (its results)
                modalities[f"modality-{aet.lower()}"] = {"AET": aet, "Host": "127.0.0.1", "Port": 104, **peer}
        config = {
            "Name": "msknode-demo-pacs",
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
            "LuaScripts": [str(prelude), str(self.autoroute_lua), str(timing)],
            "DicomAssociationCloseDelay": ASSOCIATION_CLOSE_DELAY,
            "DicomScuTimeout": 30,
            "SaveJobs": False,
            "JobsHistorySize": 50,
            "StableAge": 60,
            "HttpTimeout": 60,
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "OrthancPacs":
        if self.running:
            return self
        self.write_config()
        env = dict(os.environ, TCP_NODELAY="1", TZ="UTC")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.workdir, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EndToEndError(f"Orthanc exited with code {self._proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise EndToEndError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s; see {self.log_path}")

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

    # ---- sending, the way a modality does ----------------------------------------------------
    def store_files(self, paths: Iterable[Path], *, calling_aet: str | None = None, timeout: float = 600.0) -> None:
        """Sends DICOM files to Orthanc with dcmtk ``storescu`` in one association (as a modality would)."""
        files = [str(p) for p in paths]
        if not files:
            raise EndToEndError("no files to send")
        aet = calling_aet or self.modality_aets[0]
        cmd = ["storescu", "-aet", aet, "-aec", self.aet, "127.0.0.1", str(self.dicom_port), *files]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, TCP_NODELAY="1"))
        except FileNotFoundError:
            raise EndToEndError("dcmtk storescu is not installed; run scripts/install-system-deps.sh") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise EndToEndError(f"storescu to Orthanc failed (exit {proc.returncode}): {' | '.join(tail)}")

    # ---- REST --------------------------------------------------------------------------------
    def get(self, path: str):
        r = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=60)
        r.raise_for_status()
        return r.json()

    def get_bytes(self, path: str) -> bytes:
        r = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=60)
        r.raise_for_status()
        return r.content

    def post(self, path: str, body):
        r = httpx.post(f"{self.url}{path}", auth=self.auth, timeout=60,
                       content=body if isinstance(body, (bytes, str)) else json.dumps(body))
        r.raise_for_status()
        return r.json()

    def lookup(self, uid: str, kind: str) -> str | None:
        """Orthanc's id of the study/series/instance with this DICOM UID, or None."""
        for item in self.post("/tools/lookup", uid):
            if item.get("Type") == kind:
                return item["ID"]
        return None

    def instance_ids(self, sop_instance_uids: Iterable[str]) -> dict[str, str | None]:
        return {uid: self.lookup(uid, "Instance") for uid in sop_instance_uids}

    def study_instance_uids(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs Orthanc holds in the study."""
        sid = self.lookup(study_uid, "Study")
        if sid is None:
            return set()
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.get(f"/studies/{sid}/instances")}

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get_bytes(f"/instances/{orthanc_id}/file")

    # ---- reception log -----------------------------------------------------------------------
    def receptions(self) -> dict[str, Reception]:
        """SOP Instance UID → its FIRST reception by Orthanc (UTC, microseconds), from the log."""
        if not self.log_path.exists():
            return {}
        now = dt.datetime.now(dt.timezone.utc)
        out: dict[str, Reception] = {}
        with open(self.log_path, "r", errors="replace") as fh:
            for line in fh:
                if RECEIVED_MARK not in line:
                    continue
                m = _RECEIVED_RE.match(line)
                if m is None:
                    continue
                month, day, hh, mm, ss, us, uid, aet = m.groups()
                at = _log_time(now, int(month), int(day), int(hh), int(mm), int(ss), int(us))
                if uid not in out:
                    out[uid] = Reception(uid, at, aet)
        return out


def _log_time(now: dt.datetime, month: int, day: int, hh: int, mm: int, ss: int, us: int) -> dt.datetime:
    """An Orthanc log time (no year) as UTC: the year that puts it closest to now."""
    best = None
    for year in (now.year - 1, now.year, now.year + 1):
        try:
            t = dt.datetime(year, month, day, hh, mm, ss, us, tzinfo=dt.timezone.utc)
        except ValueError:  # 29 February
            continue
        if best is None or abs((t - now).total_seconds()) < abs((best - now).total_seconds()):
            best = t
    assert best is not None
    return best
