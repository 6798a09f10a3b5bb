"""Developer tool: writes Alembic revisions into the package (``node/db/migrations/versions``).

- ``python -m node.db.revisions new "what changed"`` autogenerates the next revision from
  the difference between the metadata and a database migrated to the current head;
- ``python -m node.db.revisions regenerate-initial`` rewrites ``0001`` from the metadata.
  Only for the schema before anything was built on it: it refuses once a later revision exists.

``make migration`` runs the first with ``MESSAGE="..."``, the second without.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from node.db.database import MIGRATIONS_DIR, alembic_config, upgrade

VERSIONS_DIR = MIGRATIONS_DIR / "versions"


def _revision_ids() -> list[str]:
    return sorted(p.name.split("_", 1)[0] for p in VERSIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.py"))


def regenerate_initial() -> Path:
    """Rewrites revision 0001 from the metadata; refuses when a later revision depends on it."""
    from alembic import command

    later = [r for r in _revision_ids() if r != "0001"]
    if later:
        what = f"revision {later[0]} is" if len(later) == 1 else f"revisions {', '.join(later)} are"
        raise SystemExit(
            f'{what} built on 0001: add a new revision instead (python -m node.db.revisions new "what changed")'
        )
    for old in VERSIONS_DIR.glob("0001_*.py"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/empty.db"
        command.revision(alembic_config(url), message="initial schema", autogenerate=True, rev_id="0001")
    (new,) = VERSIONS_DIR.glob("0001_*.py")
    return new


def new_revision(message: str) -> Path:
    """Autogenerates the next revision (``NNNN_message.py``) against a database at the current head."""
    from alembic import command

    ids = _revision_ids()
    rev_id = f"{int(ids[-1]) + 1:04d}" if ids else "0001"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/head.db"
        upgrade(url)
        command.revision(alembic_config(url), message=message, autogenerate=True, rev_id=rev_id)
    (new,) = VERSIONS_DIR.glob(f"{rev_id}_*.py")
    return new


USAGE = 'usage: python -m node.db.revisions regenerate-initial | new "what changed"'

if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["regenerate-initial"]:
        print(regenerate_initial())
    elif len(args) == 2 and args[0] == "new" and args[1].strip():
        print(new_revision(args[1]))
    else:
        sys.exit(USAGE)
