"""`msknode demo` end to end, once (DEMO_ONCE=1), in a temporary data dir.

The demo starts Orthanc (the PACS, with the docker/orthanc-autoroute.lua rule) and
`msknode serve`, sends four phantom studies into Orthanc, waits for their results and stops.
Afterwards this test checks the outcome on its own: Orthanc is started again on the demo's
storage and asked for every result object msknode recorded (SR always; SEG/SC for the
positive studies whose model ships; a super-resolved series where super-resolution runs),
a copy of each kind passes dciodvfy, the web API (with the printed demo login) lists the
URGENT studies above the normal knee, and none of msknode's own objects came back to it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from node.demo.loopback import child_env
from node.demo.orthanc import OrthancProcess
from support.env import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MSKNODE = Path(sys.executable).parent / "msknode"
POSITIVE_MODELS = {
    "knee-acl": "knee.acl",
    "shoulder-cuff": "shoulder.rotator_cuff",
    "spine-stenosis": "lumbar_spine.stenosis",
}


def _clean_env(**extra) -> dict:
    return child_env(drop=("MSKNODE_", "DEMO_"), **extra)


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=120)
    lines = (proc.stdout + proc.stderr).decode("utf-8", errors="replace").splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


class ReopenedPacs(OrthancProcess):
    """Orthanc started again on the demo's index and storage (new ports, no routing)."""

    def __init__(self, demo_orthanc: Path, workdir: Path):
        self._demo_config = json.loads((demo_orthanc / "orthanc.json").read_text())
        username, password = next(iter(self._demo_config["RegisteredUsers"].items()))
        super().__init__(workdir, dicom_port=free_port(), http_port=free_port(), username=username, password=password)
        self.start()

    def config(self) -> dict:
        return {**self._demo_config, "HttpPort": self.http_port, "DicomPort": self.dicom_port, "LuaScripts": []}

    def study_objects(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> Orthanc id of every instance of the study."""
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in self.study_instances(study_uid)}


def test_demo_once_results_in_pacs_valid_and_triaged(tmp_path):
    data = tmp_path / "demo-data"
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(MSKNODE), "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=560,
        env=_clean_env(DEMO_ONCE="1", DEMO_DATA_DIR=str(data), DEMO_FREE_PORTS="1", DEMO_TIMEOUT="420"),
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"demo failed after {elapsed:.0f} s:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    # the table and the login
    for title in (
        "Knee, complete ACL tear",
        "Shoulder, full-thickness cuff tear",
        "Lumbar spine, severe stenosis",
        "Knee, normal",
    ):
        assert title in out
    m = re.search(r"worklist: (http://127\.0\.0\.1:\d+/worklist)\s+login: (\S+) / (\S+)", out)
    assert m, out[-2000:]
    username, password = m.group(2), m.group(3)
    assert "DEMO_ONCE: stopping" in out
    summary = json.loads((data / "demo-summary.json").read_text())
    assert summary["ok"] and not summary["problems"]
    studies = {s["case"]: s for s in summary["studies"]}
    assert set(studies) == {"knee-acl", "shoulder-cuff", "spine-stenosis", "knee-normal"}
    for s in studies.values():
        assert s["pacs_to_results_s"] is not None and 0 < s["pacs_to_results_s"] < 420

    # --- what msknode recorded, read from its own database
    from sqlalchemy import select

    from models.registry import ENTRIES, Registry
    from node.db.database import Database
    from node.db.schema import Job, ResultObject, Series, Study
    from node.settings import load_settings

    node_settings = load_settings(
        data_dir=data / "node", database_url=f"sqlite:///{data / 'node' / 'msknode.db'}", broker_url="filesystem://"
    )
    db = Database(node_settings.database_url)
    try:
        with db.session() as s:
            results: dict[str, list[ResultObject]] = defaultdict(list)
            for ro, study_uid in s.execute(
                select(ResultObject, Study.study_uid)
                .join(Job, Job.id == ResultObject.job_id)
                .join(Study, Study.id == Job.study_id)
                .where(Job.state == "done")
            ):
                results[study_uid].append(ro)
            # no routing loop: Orthanc never forwarded msknode's own objects back
            assert s.scalar(select(Series).where(Series.own_object.is_(True))) is None
            assert not s.scalars(select(Series).where(Series.series_uid.startswith(node_settings.uid_root))).all()
    finally:
        db.dispose()

    registry = Registry()
    shipped = {n for n in ENTRIES if registry.has_weights(n)}

    # --- Orthanc, reopened on the demo's storage: every result object is there and valid
    pacs = ReopenedPacs(data / "orthanc", tmp_path / "reopened")
    try:
        for key, s in studies.items():
            objects = results[s["study_uid"]]
            kinds = defaultdict(list)
            for ro in objects:
                kinds[ro.kind].append(ro)
            assert len(kinds["sr"]) == 1, key
            in_pacs = pacs.study_objects(s["study_uid"])
            assert {ro.sop_instance_uid for ro in objects} <= set(in_pacs), f"{key}: results missing in the PACS"
            model = POSITIVE_MODELS.get(key)
            if model in shipped:
                assert kinds["seg"] and kinds["sc"], f"{key}: {model} ships but no SEG/SC came back"
            if key == "knee-normal":
                assert not kinds["seg"], "the normal knee got a SEG"
            if "superres" in shipped and "superres" in s["expected"]["min_counts"]:
                assert kinds["superres"], f"{key}: no super-resolved series"
            # one object of each kind, as the PACS returns it, passes dciodvfy
            for kind, ros in kinds.items():
                if not ros:
                    continue
                path = tmp_path / f"{key}-{kind}.dcm"
                path.write_bytes(pacs.instance_file(in_pacs[ros[0].sop_instance_uid]))
                assert _dciodvfy_errors(path) == [], f"{key} {kind}"
    finally:
        pacs.stop()

    # --- the worklist through the web API with the printed demo login: URGENT above the normal knee
    from fastapi.testclient import TestClient

    from node.web.app import create_app

    db = Database(node_settings.database_url)
    try:
        with TestClient(create_app(node_settings, db)) as client:
            r = client.post("/api/auth/token", json={"username": username, "password": password})
            assert r.status_code == 200, r.text
            entries = client.get(
                "/api/worklist", headers={"Authorization": f"Bearer {r.json()['access_token']}"}
            ).json()["entries"]
    finally:
        db.dispose()
    order = [e["study_uid"] for e in entries]
    priority = {e["study_uid"]: e["priority"] for e in entries}
    assert {s["study_uid"] for s in studies.values()} <= set(order)
    normal = studies["knee-normal"]["study_uid"]
    assert priority[normal] == "ROUTINE"
    urgent = [key for key, model in POSITIVE_MODELS.items() if model in shipped]
    for key in urgent:
        uid = studies[key]["study_uid"]
        assert priority[uid] == "URGENT", f"{key}: {priority[uid]}"
        assert order.index(uid) < order.index(normal), f"{key} is not above the normal knee"

    # --- a second run on the same data dir works (reset, phantom cache reused); one study keeps it short
    proc = subprocess.run(
        [str(MSKNODE), "demo", "--case", "knee-normal"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env=_clean_env(DEMO_ONCE="1", DEMO_DATA_DIR=str(data), DEMO_FREE_PORTS="1", DEMO_TIMEOUT="300"),
    )
    assert proc.returncode == 0, f"second run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    again = json.loads((data / "demo-summary.json").read_text())
    assert again["ok"] and [s["case"] for s in again["studies"]] == ["knee-normal"]
    assert again["studies"][0]["study_uid"] == studies["knee-normal"]["study_uid"]
