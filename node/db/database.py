"""Database access: the one SQLAlchemy metadata, engines, sessions and migrations.

A leaf module: it imports nothing else of msknode, so every module that declares
tables (`node.db.schema`, `worklists.tables`) imports `Base` from here without a cycle.

The schema changes only through Alembic (the revisions in ``node/db/migrations/``,
shipped inside the package); `upgrade` applies them and is called at every start.
SQLite (WAL) is the embedded default, PostgreSQL the production database; the same
code runs on both.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, DateTime, Executable, MetaData, create_engine, event
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from node.db import finite

if TYPE_CHECKING:
    from alembic.config import Config

#: the Alembic environment and revisions, inside the package (an installed node migrates too)
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: how new revision files are named (``0003_what_changed.py``)
REVISION_FILE_TEMPLATE = "%%(rev)s_%%(slug)s"

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


finite.install(Base)  # a NaN or infinite Float value is stored as NULL (node.db.finite)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def import_all_tables() -> None:
    """Imports every module that declares tables, so `Base.metadata` is complete."""
    import node.db.schema  # noqa: F401
    import worklists.tables  # noqa: F401


def _private(path: str) -> None:
    """The SQLite database and its WAL and shm files: readable by the node's user alone (0600), also
    when they were made before, or by a process with a wider umask (SQLite gives the WAL and shm files
    the database file's mode)."""
    if not path or path == ":memory:":
        return
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(path + suffix, 0o600)
        except (FileNotFoundError, PermissionError):
            pass


def make_engine(database_url: str, *, echo: bool = False) -> Engine:
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            database_url,
            echo=echo,
            connect_args={"timeout": 30, "check_same_thread": False},
            json_serializer=finite.json_dumps,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - exercised by every test
            # Disable pysqlite's implicit BEGIN handling; we emit BEGIN ourselves so that
            # write transactions take the lock up front (BEGIN IMMEDIATE) and never
            # deadlock on a read-to-write upgrade.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            _private(path)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:  # pragma: no cover - exercised by every test
            # on the DB-API connection itself: through `exec_driver_sql` (an execution context, its
            # events and result) the BEGIN cost the listener more CPU than SQLite's work for it
            driver = conn.connection.driver_connection
            if driver is None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                driver.execute("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        database_url,
        echo=echo,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        json_serializer=finite.json_dumps,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def execute_dml(session: Session, statement: Executable) -> CursorResult[Any]:
    """Runs an INSERT, UPDATE or DELETE: its result is a `CursorResult`, with ``rowcount``."""
    return cast(CursorResult[Any], session.execute(statement))


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commits on success, rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(database_url: str) -> Config:
    """The Alembic configuration, built from the package (no ``alembic.ini`` needed at run time)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("file_template", REVISION_FILE_TEMPLATE)
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str) -> None:
    """Applies every Alembic migration (``alembic upgrade head``)."""
    from alembic import command

    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), "head")


class Database:
    """Engine + session factory for one database URL, passed down to whoever needs it."""

    def __init__(self, database_url: str, *, migrate: bool = True) -> None:
        self.url = database_url
        if migrate:
            upgrade(database_url)
        self.engine = make_engine(database_url)
        self.sessions = make_session_factory(self.engine)

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.sessions)

    def dispose(self) -> None:
        self.engine.dispose()
