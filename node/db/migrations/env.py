"""Alembic environment: one metadata (`node.db.database.Base`), SQLite and PostgreSQL.

Used by `node.db.database.upgrade` (the configuration built from the package) and by the
developers' ``alembic`` command (``alembic.ini`` at the top of the checkout points here).
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from node.db.database import Base, import_all_tables

import_all_tables()
config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return os.environ.get("MSKNODE_ALEMBIC_URL") or config.get_main_option("sqlalchemy.url") or ""


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    if not url:
        from node.settings import load_settings

        resolved = load_settings().database_url
        assert resolved is not None  # resolved by Settings' validator
        url = resolved
    connectable = create_engine(url, poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=url.startswith("sqlite"),
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
