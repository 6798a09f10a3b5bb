"""The schema comes only from Alembic: ``alembic upgrade head`` on empty SQLite and PostgreSQL, no drift."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import create_engine, inspect

from node.db.database import Base, import_all_tables
from node.demo.loopback import child_env
from support.env import ROOT, VENV_BIN

pytestmark = pytest.mark.integration

import_all_tables()


def alembic(url: str, *args: str) -> subprocess.CompletedProcess:
    env = child_env(MSKNODE_ALEMBIC_URL=url)
    return subprocess.run(
        [str(VENV_BIN / "alembic"), "-c", str(ROOT / "alembic.ini"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_upgrade_and_no_drift(url: str) -> None:
    r = alembic(url, "upgrade", "head")
    assert r.returncode == 0, r.stderr
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables and "alembic_version" in tables
    r = alembic(url, "check")
    assert r.returncode == 0 and "No new upgrade operations detected" in (r.stdout + r.stderr), r.stdout + r.stderr
    r = alembic(url, "current")
    assert r.returncode == 0 and "(head)" in r.stdout


def test_upgrade_head_on_empty_sqlite_has_no_drift(tmp_path):
    assert_upgrade_and_no_drift(f"sqlite:///{tmp_path / 'empty.db'}")


def test_upgrade_head_on_postgresql_has_no_drift(postgres_url):
    assert_upgrade_and_no_drift(postgres_url)


def test_msknode_db_upgrade_is_idempotent(tmp_path):
    env = child_env(MSKNODE_DATA_DIR=tmp_path / "data")
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-m", "node.cli", "db", "upgrade"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "latest schema" in r.stdout, r.stderr
    assert (tmp_path / "data" / "msknode.db").exists()
