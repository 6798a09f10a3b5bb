"""Shared fixtures, the test markers, and the check that no server outlives the run.

Servers started here bind to 127.0.0.1 and are stopped by the fixture. Helpers live in
``tests/support`` (import them as ``support.<module>``), not here.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from support import servers
from support.env import ROOT, free_port, isolate_env

os.environ.setdefault("TCP_NODELAY", "1")
servers.mark_run()

# ---- markers: every module is unit, integration or slow (pyproject.toml registers them) ---------
#
# unit: pure in-process and sub-second; integration: real servers, sockets or subprocesses
# (listener, Orthanc, dcmtk, Redis, PostgreSQL, Chromium); slow: model training or evaluation, or
# anything over ~10 s. A module says so with `pytestmark`; the modules listed here get theirs
# from this hook (their files are maintained apart from the markers). `make test-fast` runs
# ``-m "not integration and not slow"``.
MODULE_MARKERS: dict[str, tuple[str, ...]] = {
    "test_ingest.py": ("unit",),
    "test_listener.py": ("integration",),
    "test_listener_admission.py": ("integration",),
    "test_listener_bench.py": ("integration", "slow"),
    "test_models_io.py": ("unit",),
    "test_models_protocol.py": ("unit",),
    "test_models_qc.py": ("slow",),
    "test_models_qc_realdata.py": ("slow",),
    "test_models_registry.py": ("unit",),
    "test_models_superres.py": ("slow",),
    "test_models_training.py": ("slow",),
}
# single tests of those modules that differ from their module (file::test name, parameters aside)
TEST_MARKERS: dict[str, tuple[str, ...]] = {
    "test_models_registry.py::test_cli_models_list_json_and_refusal_of_corrupted_site_weights": ("integration", "slow"),
}
KINDS = ("unit", "integration", "slow")
# a test that uses one of these fixtures talks to a real server: integration, whatever its module says
SERVER_FIXTURES = {"pg_server", "postgres_url", "redis_server", "redis_url", "orthanc", "browser"}


def pytest_collection_modifyitems(config, items):
    """Adds the markers of `MODULE_MARKERS` and `TEST_MARKERS`, and `integration` to every test that uses a server
    fixture (`SERVER_FIXTURES`); a module with none of `KINDS` counts as integration (so the fast
    loop leaves it out) and is named in a warning."""
    unmarked = set()
    for item in items:
        name = Path(str(item.fspath)).name
        test_id = f"{name}::{getattr(item, 'originalname', item.name)}"
        for marker in MODULE_MARKERS.get(name, ()) + TEST_MARKERS.get(test_id, ()):
            if not item.get_closest_marker(marker):
                item.add_marker(marker)
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("integration"):
            item.add_marker("integration")
        if not any(item.get_closest_marker(k) for k in KINDS):
            item.add_marker("integration")
            unmarked.add(name)
    if unmarked:
        import warnings

        warnings.warn(
            pytest.PytestWarning(
                f"test modules without a unit/integration/slow marker (run as integration): {', '.join(sorted(unmarked))}; "
                "set pytestmark in the module (see tests/conftest.py)"
            ),
            stacklevel=2,
        )


# ---- no server outlives the run ---------------------------------------------------------------


def pytest_configure(config):
    # SIGTERM (a CI time limit, `kill`) ends the run like Ctrl-C: fixture finalizers and atexit run
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fails the run if a server it started is still alive (after every fixture finalizer ran)."""
    if hasattr(session.config, "workerinput"):
        return
    still_tracked = servers.stop_all()
    leaks = servers.leaked_processes()
    if not still_tracked and not leaks:
        return
    servers.kill_leaks(leaks)
    lines = [f"  still registered, stopped now: {name}" for name in still_tracked]
    lines += [f"  still running, killed now: {leak}" for leak in leaks]
    message = "error: the test run left servers running (a fixture did not stop them):\n" + "\n".join(lines)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---- settings and database --------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def settings(data_dir, monkeypatch):
    """Settings on a fresh data dir (SQLite), isolated from the caller's environment."""
    isolate_env(monkeypatch, MSKNODE_DATA_DIR=data_dir)
    from node.settings import load_settings

    return load_settings()


@pytest.fixture
def db(settings):
    from node.db.database import Database

    database = Database(settings.database_url)
    yield database
    database.dispose()


# ---- real servers for the scale-out mode (PostgreSQL, Redis) ----------------------------------


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL 15 cluster for the test session (initdb as user postgres, loopback, fsync off)."""
    server = servers.PostgresServer(free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(pg_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server (SQLAlchemy URL, psycopg 3)."""
    import uuid

    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port (no persistence); ``.stop()``/``.start()`` restart it on the same port."""
    server = servers.RedisServer(tmp_path / "redis", free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


# ---- a real PACS (Orthanc) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc for the test module (DICOM + REST + DICOMweb on free loopback ports).

    ``.dicom_port``, ``.http_port``, ``.aet``, ``.url``, ``.dicomweb_url``, ``.auth``; ``.stop()`` /
    ``.start()`` restart it on the same ports and storage; ``.study_series(uid)`` and ``.received()``
    show what arrived. AE titles MSKNODE, STORESCU, ECHOSCU, FINDSCU, MOVESCU from 127.0.0.1 may store.
    """
    from support.orthanc import OrthancServer

    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), dicom_port=free_port(), http_port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- a real browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Selenium driver) for the test module; quit with its chromedriver at the end."""
    from support.browser import chromium

    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where the browser tests' screenshots go: docs/screenshots with MSKNODE_UPDATE_SCREENSHOTS=1, else a
    temporary folder."""
    if os.environ.get("MSKNODE_UPDATE_SCREENSHOTS") == "1":
        d = ROOT / "docs" / "screenshots"
        d.mkdir(parents=True, exist_ok=True)
        return d
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs ``msknode`` in-process (`node.cli.main`) installs the node's log handler on the root
    logger, bound to the test's captured stderr; the root logger's handlers and level are put back after each
    test, so later tests do not log into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
        try:
            h.close()
        except Exception:
            pass
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
