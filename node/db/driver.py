"""A Core statement compiled once and run straight on a DB-API cursor.

For statements run very often (the listener's per-instance INSERT and arrival UPDATEs, the dispatch
loop's "anything due?" poll): `Connection.execute` builds an execution context and a result for each
call, which costs more CPU than SQLite's own work. The SQL text and the bind processors are
SQLAlchemy's own (the same text and values as `Connection.execute` would send), compiled once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Dialect


class DriverStatement:
    def __init__(self, statement: Any, dialect: Dialect, column_keys: tuple[str, ...] | None = None):
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self.sql: str = compiled.string
        self.names: list[str] = list(compiled.positiontup or ())
        given = compiled.construct_params(_check=False)
        #: the values the statement carries itself (its literals); the caller gives the others at each run
        self.constants = {n: given[n] for n, b in compiled.binds.items() if not b.required and n in self.names}
        # (through the dialect's own type, as the engine converts: SQLite's DATETIME text, no offset)
        self.processors = [compiled.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in self.names]

    def values(self, params: dict) -> list:
        """The DB-API parameters of one execution, in the statement's order."""
        if self.constants:
            params = {**self.constants, **params}
        return [p(params[n]) if p is not None else params[n] for n, p in zip(self.names, self.processors, strict=True)]

    def fetchall(self, driver_connection: Any, params: dict) -> list[tuple]:
        """Runs on ``driver_connection`` (inside whatever transaction it is in) and returns every row (a
        RETURNING statement completes only once its rows are read)."""
        cursor = driver_connection.cursor()
        try:
            cursor.execute(self.sql, self.values(params))
            return cursor.fetchall()
        finally:
            cursor.close()
