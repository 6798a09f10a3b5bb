"""The built wheel, installed outside the checkout, is a working node: migrations, C-ECHO, C-STORE, web.

The wheel is built from a copy of what the Docker image copies (pyproject.toml, README.md,
node/, models/, worklists/: `docker/Dockerfile`), so nothing else in the checkout can leak in,
and installed without its dependencies into a fresh venv outside the checkout. The venv finds
the dependencies in this venv's site-packages through a ``.pth`` line (no download, no second
torch); that path is searched after the venv's own site-packages, and the commands run from a
scratch folder, so ``node``, ``models`` and ``worklists`` come from the wheel (checked).
There: ``msknode db upgrade``, ``msknode serve`` on free loopback ports, a C-ECHO with dcmtk
``echoscu``, one instance stored with ``storescu``, found again with ``msknode series``; the web
app answers with its templates and static files. Everything started is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from node.demo.loopback import child_env, echoscu, free_port
from support.env import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: what the Docker image copies before ``pip install .``
SOURCES = ("pyproject.toml", "README.md", "node", "models", "worklists")


def _copy_sources(dest: Path) -> None:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 600), **kw)
    assert r.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    _copy_sources(src)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            ".",
            "-w",
            str(work / "dist"),
        ],
        cwd=src,
    )
    (whl,) = (work / "dist").glob("msknode-*.whl")
    return whl


def test_the_wheel_carries_migrations_weights_rules_templates_and_static_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    def has(path: Path) -> bool:
        return path.relative_to(ROOT).as_posix() in names

    migrations = ROOT / "node" / "db" / "migrations"
    expected = [migrations / "env.py", migrations / "script.py.mako", *sorted((migrations / "versions").glob("*.py"))]
    weights = sorted(p for p in (ROOT / "models" / "weights").iterdir() if p.is_dir())
    assert weights
    for folder in weights:
        checkpoints = sorted(folder.glob("*.pt"))
        assert checkpoints, f"{folder} holds no weights"
        for pt in checkpoints:
            expected += [pt, pt.with_name(pt.name + ".sha256")]
        expected.append(folder / "card.json")
    expected += sorted((ROOT / "node").rglob("*.toml"))  # routing rules, vendor table
    expected += sorted((ROOT / "worklists").glob("*.toml"))  # triage policy
    web = ROOT / "node" / "web"
    expected += sorted((web / "templates").glob("*.html")) + sorted(
        p for p in (web / "static").iterdir() if p.is_file()
    )
    missing = [str(p.relative_to(ROOT)) for p in expected if not has(p)]
    assert not missing, f"not in the wheel: {missing}"
    assert len(expected) > 40  # (a glob that matched nothing would make this test pass for nothing)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; its dependencies are this venv's."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_msknode_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_installed_node_migrates_serves_echoes_and_stores(installed, tmp_path):
    bin_dir = installed / "bin"
    scratch = tmp_path / "scratch"  # cwd: the checkout is not on sys.path
    scratch.mkdir()
    data = tmp_path / "data"
    port, web_port = free_port(), free_port()
    env = child_env(
        MSKNODE_DATA_DIR=data,
        MSKNODE_PORT=port,
        MSKNODE_HOST="127.0.0.1",
        MSKNODE_WEB_PORT=web_port,
        MSKNODE_WEB_HOST="127.0.0.1",
        MSKNODE_LOG_LEVEL="INFO",
        MSKNODE_QUIET_SECONDS="0.5",
        MSKNODE_WORKER_CONCURRENCY="1",
    )
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    where = json.loads(
        _run(
            [
                str(bin_dir / "python"),
                "-c",
                "import json, node, models, worklists, node.db.database as d;"
                "print(json.dumps([node.__file__, models.__file__, worklists.__file__, str(d.MIGRATIONS_DIR)]))",
            ],
            cwd=scratch,
            env=env,
        ).stdout
    )
    for path in where:
        assert Path(path).resolve().is_relative_to(installed.resolve()), f"{path} is not from the installed wheel"

    _run([str(bin_dir / "msknode"), "db", "upgrade"], cwd=scratch, env=env)
    heads = sorted(
        p.name.split("_", 1)[0] for p in (ROOT / "node" / "db" / "migrations" / "versions").glob("[0-9]*_*.py")
    )
    with sqlite3.connect(data / "msknode.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == heads[-1]

    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 -- msknode serve writes to it while the test runs; closed below
    proc = subprocess.Popen(
        [str(bin_dir / "msknode"), "serve"],
        cwd=scratch,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not echoscu(port, "MSKNODE"):  # dcmtk C-ECHO
            assert proc.poll() is None, f"msknode serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no C-ECHO answer:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)

        mr = get_testdata_file("MR_small.dcm")
        _run(["storescu", "-to", "30", "-aec", "MSKNODE", "127.0.0.1", str(port), mr], cwd=scratch, env=env, timeout=60)
        series = json.loads(_run([str(bin_dir / "msknode"), "series", "--json"], cwd=scratch, env=env).stdout)
        assert [(s["modality"], s["instances"]) for s in series] == [("MR", 1)]

        base = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                login = urllib.request.urlopen(base + "/login", timeout=5)  # a template of the wheel
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
        assert login.status == 200 and "<form" in login.read().decode()
        css = urllib.request.urlopen(base + "/static/app.css", timeout=5)  # a static file of the wheel
        assert css.status == 200 and css.read()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text()[-3000:]
        assert "all parts stopped" in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the parts too (they share its session)
            proc.wait()
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # any part left behind
            except ProcessLookupError:
                pass
        log.close()
