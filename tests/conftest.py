"""Shared fixtures. Servers started here bind to 127.0.0.1 and are stopped by the fixture."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from node.demo.loopback import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
os.environ.setdefault("TCP_NODELAY", "1")


def isolate_env(monkeypatch, **values: object) -> None:
    """Removes the caller's MSKNODE_* variables from this process's environment, then sets ``values``."""
    for k in list(os.environ):
        if k.startswith("MSKNODE_"):
            monkeypatch.delenv(k)
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))


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
    from jobs_support import PostgresServer

    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(pg_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server (SQLAlchemy URL, psycopg 3)."""
    import uuid

    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port (no persistence); ``.stop()``/``.start()`` restart it on the same port."""
    from jobs_support import RedisServer

    server = RedisServer(tmp_path / "redis", free_port()).start()
    yield server
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
    from orthanc_support import OrthancServer

    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), dicom_port=free_port(), http_port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
