"""Subcommands of the ``msknode`` command line, one module per feature, and what their handlers share."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.db.database import Database
    from node.settings import Settings


@contextmanager
def database(settings: Settings) -> Iterator[Database]:
    """The node's database for one command (migrated to the current schema), disposed of afterwards."""
    from node.db.database import Database

    db = Database(settings.database_url)
    try:
        yield db
    finally:
        db.dispose()


def print_json_or_empty(rows: Sequence[Any], *, as_json: bool, empty: str) -> bool:
    """Prints ``rows`` as JSON (``--json``), or ``empty`` when there are none; True if nothing is left to print."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return True
    if not rows:
        print(empty)
        return True
    return False
