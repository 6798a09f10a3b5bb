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
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.demo.orthanc import OrthancProcess, dicom_peer, restricted_peers
from node.errors import EndToEndError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
AUTOROUTE_LUA = REPO_ROOT / "docker" / "orthanc-autoroute.lua"
RECEIVED_MARK = "MSKNODE-RECEIVED"
#: Orthanc log line: level, MMDD, HH:MM:SS.micro, ..., our mark, SOP Instance UID, calling AE
_RECEIVED_RE = re.compile(
    r"^[IWE](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6}) .*" + RECEIVED_MARK + r" (\S+) ?(\S*)"
)
#: seconds Orthanc keeps the association Lua opened after the last forwarded instance (its default: 5)
ASSOCIATION_CLOSE_DELAY = 1

_TIMING_LUA = f"""-- Logs every instance Orthanc receives (the log line carries a microsecond timestamp).
function ReceivedInstanceFilter(dicom, origin, info)
  print('{RECEIVED_MARK} ' .. tostring(dicom.SOPInstanceUID) .. ' ' .. tostring(origin.RemoteAet or ''))
  return true
end
"""


@dataclass(frozen=True)
class Reception:
    """One instance received by Orthanc: when (UTC) and from which AE title."""

    sop_instance_uid: str
    at: dt.datetime
    calling_ae: str


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class OrthancPacs(OrthancProcess):
    """An Orthanc process with the msknode auto-routing rule; ``start()`` / ``stop()``."""

    error = EndToEndError

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
        super().__init__(
            workdir, dicom_port=dicom_port, http_port=http_port, aet=aet, username=username, password=password
        )
        self.node_ae_title = node_ae_title
        self.node_port = node_port
        self.node_host = node_host
        self.node_uid_root = node_uid_root
        self.modality_aets = tuple(modality_aets)
        self.autoroute_lua = Path(autoroute_lua)
        self._prelude_path = self.workdir / "autoroute-settings.lua"
        self._timing_path = self.workdir / "reception-log.lua"

    # ---- configuration -----------------------------------------------------------------------
    def write_config(self) -> None:
        if not self.autoroute_lua.is_file():
            raise EndToEndError(f"the auto-routing rule {self.autoroute_lua} is missing")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prelude_path.write_text(
            "-- settings of the msknode auto-routing rule (read by orthanc-autoroute.lua)\n"
            f"MSKNODE_MODALITY = 'msknode'\n"
            f"MSKNODE_UID_ROOT = {_lua_string(self.node_uid_root)}\n"
            f"MSKNODE_AE_TITLE = {_lua_string(self.node_ae_title)}\n"
            "MSKNODE_ROUTE_MODALITIES = 'MR'\n"
        )
        self._timing_path.write_text(_TIMING_LUA)
        super().write_config()

    def config(self) -> dict:
        modalities = {"msknode": dicom_peer(self.node_ae_title, host=self.node_host, port=self.node_port)}
        for aet in self.modality_aets:
            if aet != self.node_ae_title:  # msknode's entry already lets it store (its results)
                modalities[f"modality-{aet.lower()}"] = dicom_peer(aet)
        return {
            "Name": "msknode-demo-pacs",
            **super().config(),
            **restricted_peers(modalities),
            "LuaScripts": [str(self._prelude_path), str(self.autoroute_lua), str(self._timing_path)],
            "DicomAssociationCloseDelay": ASSOCIATION_CLOSE_DELAY,
            "DicomScuTimeout": 30,
            "SaveJobs": False,
            "JobsHistorySize": 50,
            "StableAge": 60,
            "HttpTimeout": 60,
        }

    # ---- sending, the way a modality does ----------------------------------------------------
    def store_files(self, paths: Iterable[Path], *, calling_aet: str | None = None, timeout: float = 600.0) -> None:
        """Sends DICOM files to Orthanc with dcmtk ``storescu`` in one association (as a modality would)."""
        files = [str(p) for p in paths]
        if not files:
            raise EndToEndError("no files to send")
        aet = calling_aet or self.modality_aets[0]
        cmd = ["storescu", "-aet", aet, "-aec", self.aet, "127.0.0.1", str(self.dicom_port), *files]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, TCP_NODELAY="1")
            )
        except FileNotFoundError:
            raise EndToEndError("dcmtk storescu is not installed; run scripts/install-system-deps.sh") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise EndToEndError(f"storescu to Orthanc failed (exit {proc.returncode}): {' | '.join(tail)}")

    # ---- the routing jobs --------------------------------------------------------------------
    def routing_busy(self) -> bool:
        """Whether a job of Orthanc's (the Lua routing's sequence of stores among them) is pending or running."""
        return any(job.get("State") in ("Pending", "Running", "Retry") for job in self.get("/jobs?expand"))

    def wait_routing_idle(self, timeout: float = 30.0) -> float:
        """Waits until Orthanc has no pending or running job; returns the seconds waited.

        Orthanc's Lua ``SendToModality`` appends every forwarded instance to ONE job that stays
        open for 5 s after its last store (``LuaJobManager``'s trailing timeout, up to 1,000
        stores) and re-serializes all of its stores at every step, so each instance forwarded
        into a long-lived job costs Orthanc more than the one before. A study sent while that
        job is open is forwarded ever more slowly (measured: 5.4 -> 20.6 ms between instances
        over five back-to-back studies); a study sent after it has ended is forwarded at the
        PACS's idle pace.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        while self.routing_busy():
            if time.monotonic() > deadline:
                raise EndToEndError(f"Orthanc still has a running job after {timeout:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - t0

    # ---- REST --------------------------------------------------------------------------------
    def instance_ids(self, sop_instance_uids: Iterable[str]) -> dict[str, str | None]:
        return {uid: self.lookup(uid, "Instance") for uid in sop_instance_uids}

    def study_instance_uids(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs Orthanc holds in the study."""
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.study_instances(study_uid)}

    # ---- reception log -----------------------------------------------------------------------
    def receptions(self) -> dict[str, Reception]:
        """SOP Instance UID → its FIRST reception by Orthanc (UTC, microseconds), from the log."""
        if not self.log_path.exists():
            return {}
        now = dt.datetime.now(dt.UTC)
        out: dict[str, Reception] = {}
        with open(self.log_path, errors="replace") as fh:
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
            t = dt.datetime(year, month, day, hh, mm, ss, us, tzinfo=dt.UTC)
        except ValueError:  # 29 February
            continue
        if best is None or abs((t - now).total_seconds()) < abs((best - now).total_seconds()):
            best = t
    assert best is not None
    return best
