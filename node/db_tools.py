"""Developer tool: regenerates the initial migration from the metadata.

Only for the schema before the first release: once a release has shipped, every change
is a new Alembic revision (``alembic revision --autogenerate -m ...``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from node.db import ALEMBIC_DIR, alembic_config


def regenerate_initial() -> Path:
    from alembic import command

    versions = ALEMBIC_DIR / "versions"
    for old in versions.glob("0001_*.py"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/empty.db"
        command.revision(alembic_config(url), message="initial schema", autogenerate=True, rev_id="0001")
    (new,) = versions.glob("0001_*.py")
    return new


if __name__ == "__main__":
    if sys.argv[1:] != ["regenerate-initial"]:
        sys.exit("usage: python -m node.db_tools regenerate-initial")
    print(regenerate_initial())
