"""``msknode demo``: start the node on the embedded default, send a sample knee study, show it arrived.

Steps: start ``msknode serve`` (listener + worker + web, SQLite, no broker server) on a
data dir (``./demo-data`` by default), write a synthetic knee MR study (models.phantoms),
send it with dcmtk ``storescu``, print the ``msknode series`` table, stop the node.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="start the node, send a sample knee MR study, show it arrived, stop")
    p.add_argument("--data-dir", type=Path, default=Path("demo-data"), help="data dir of the demo node (default ./demo-data)")
    p.add_argument("--temp", action="store_true", help="use a temporary data dir, removed afterwards")
    p.add_argument("--wait", type=float, default=20.0, help="seconds to wait for the series to be routed (default 20)")
    p.set_defaults(func=_demo)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _echo(port: int, aet: str) -> bool:
    r = subprocess.run(["echoscu", "-to", "2", "-aec", aet, "127.0.0.1", str(port)], capture_output=True,
                       env=dict(os.environ, TCP_NODELAY="1"))
    return r.returncode == 0


def _demo(args, settings) -> int:
    from node.commands.core import series_rows
    from node.db import Database

    if not shutil.which("storescu"):
        print("msknode demo: storescu not found (install the Debian package dcmtk: scripts/install-system-deps.sh)", file=sys.stderr)
        return 1
    temp = Path(tempfile.mkdtemp(prefix="msknode-demo-")) if args.temp else None
    data_dir = (temp or args.data_dir).resolve()
    host = "127.0.0.1"
    port = settings.port if _port_free(host, settings.port) else _free_port(host)
    web_port = settings.web_port if _port_free(host, settings.web_port) else _free_port(host)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSKNODE_") or k == "MSKNODE_CONFIG"}
    env.update(
        TCP_NODELAY="1", MSKNODE_DATA_DIR=str(data_dir), MSKNODE_HOST=host, MSKNODE_PORT=str(port),
        MSKNODE_WEB_HOST=host, MSKNODE_WEB_PORT=str(web_port), MSKNODE_AE_TITLE=settings.ae_title,
        MSKNODE_ALLOWED_AE_TITLES="",
    )
    print(f"1. starting the node (msknode serve): data {data_dir}, DICOM {settings.ae_title}@{host}:{port}, "
          f"web http://{host}:{web_port}")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "demo-serve.log"
    log = open(log_path, "ab")
    node = subprocess.Popen([sys.executable, "-m", "node.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not _echo(port, settings.ae_title):
            if node.poll() is not None or time.monotonic() > deadline:
                print(f"msknode demo: the node did not start; see {log_path}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("   the node answers C-ECHO")

        from models.phantoms import write_study

        study_dir = Path(tempfile.mkdtemp(prefix="msknode-demo-study-"))
        try:
            series = write_study("knee", study_dir, seed=7)
            files = [p for paths in series.values() for p in paths]
            from pydicom import dcmread

            study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            print(f"2. sending a synthetic knee MR study ({len(series)} series, {len(files)} instances) with storescu")
            r = subprocess.run(["storescu", "-aet", "DEMOSCU", "-aec", settings.ae_title, host, str(port), *map(str, files)],
                               env=env, capture_output=True, text=True)
        finally:
            shutil.rmtree(study_dir, ignore_errors=True)
        if r.returncode != 0:
            print(f"msknode demo: storescu failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        print("   storescu: every instance acknowledged (stored and indexed before each Success)")

        db = Database(f"sqlite:///{data_dir / 'msknode.db'}", migrate=False)
        deadline = time.monotonic() + args.wait
        rows = [r for r in series_rows(db) if r["study_uid"] == study_uid]
        while any(row["state"] == "receiving" for row in rows) and time.monotonic() < deadline:
            time.sleep(1.0)
            rows = [r for r in series_rows(db) if r["study_uid"] == study_uid]
        db.dispose()
        print("3. msknode series:")
        print(f"   {'series description':<22} {'mod':<4} {'body part':<10} {'n':>4} {'state':<10} {'pipeline':<10} role")
        for row in rows:
            print(f"   {(row['series_description'] or '')[:22]:<22} {row['modality'] or '':<4} {(row['body_part'] or '')[:10]:<10} "
                  f"{row['instances']:>4} {row['state']:<10} {row['pipeline'] or '-':<10} {row.get('role') or '-'}")
        arrived = sum(row["instances"] for row in rows)
        print(f"   {arrived} of {len(files)} instances arrived")
        return 0 if arrived == len(files) else 1
    finally:
        print("4. stopping the node")
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        log.close()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
