"""series recognition: acquisition parameters, plane, contrast, anatomy and the routing explanation

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("acquisition", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("plane", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("contrast", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("anatomy", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("routing_explanation", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("routing_explanation")
        batch_op.drop_column("anatomy")
        batch_op.drop_column("contrast")
        batch_op.drop_column("plane")
        batch_op.drop_column("acquisition")
