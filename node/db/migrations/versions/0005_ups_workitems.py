"""unified procedure steps: workitems, subscriptions and the events owed to subscribers

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 07:35:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import node.db.database

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ups_workitems",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=True),
        sa.Column("dataset", sa.JSON(), nullable=False),
        sa.Column("created_at", node.db.database.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", node.db.database.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_ups_workitems_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ups_workitems")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_ups_workitems_sop_instance_uid")),
    )
    with op.batch_alter_table("ups_workitems", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ups_workitems_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ups_workitems_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_ups_workitems_study_uid"), ["study_uid"], unique=False)
    op.create_table(
        "ups_subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("workitem_uid", sa.String(length=64), nullable=True),
        sa.Column("deletion_lock", sa.Boolean(), nullable=False),
        sa.Column("created_at", node.db.database.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ups_subscriptions")),
        sa.UniqueConstraint("ae_title", "workitem_uid", name="uq_ups_subscription"),
    )
    op.create_table(
        "ups_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("workitem_uid", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.Integer(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", node.db.database.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", node.db.database.UTCDateTime(timezone=True), nullable=False),
        sa.Column("sent_at", node.db.database.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ups_events")),
    )
    with op.batch_alter_table("ups_events", schema=None) as batch_op:
        batch_op.create_index("ix_ups_events_state_ae", ["state", "ae_title"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ups_events", schema=None) as batch_op:
        batch_op.drop_index("ix_ups_events_state_ae")
    op.drop_table("ups_events")
    op.drop_table("ups_subscriptions")
    with op.batch_alter_table("ups_workitems", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ups_workitems_study_uid"))
        batch_op.drop_index(batch_op.f("ix_ups_workitems_state"))
        batch_op.drop_index(batch_op.f("ix_ups_workitems_job_id"))
    op.drop_table("ups_workitems")
