"""instances.association_id and association_series.series_id indexed: the end of an association scanned both

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 08:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_association_id"), ["association_id"], unique=False)
    with op.batch_alter_table("association_series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_association_series_series_id"), ["series_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("association_series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_association_series_series_id"))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_association_id"))
