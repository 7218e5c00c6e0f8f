"""Initial schema: the tables scheduler_job and scheduler_run.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 12:44:03.901857+00:00

Hand-checked against ``taskiq_beat.models``: constraint and index names are the ones that
``SchedulerBase.metadata``'s naming convention produces (``pk_%(table_name)s``,
``fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s``,
``uq_%(table_name)s_%(column_0_N_name)s``, ``ix_%(column_0_label)s``), so later revisions can
address them by name on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from taskiq_beat.models import MYSQL_TABLE_OPTIONS, UTCDateTime, long_text

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _enum(name: str, *values: str) -> sa.Enum:
    """A VARCHAR(32) holding enum values, without CHECK constraint (as ``models._enum``)."""
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=False, length=32)


def upgrade() -> None:
    """Create scheduler_job and scheduler_run with their constraints and indexes."""
    op.create_table(
        "scheduler_job",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("description", long_text(), nullable=True),
        sa.Column("task_name", sa.String(length=255), nullable=False),
        sa.Column("kind", _enum("job_kind", "single", "chain"), nullable=False),
        sa.Column(
            "strategy",
            _enum("job_strategy", "immediate", "one_off", "interval", "crontab"),
            nullable=False,
        ),
        sa.Column("trigger", sa.JSON(), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("kwargs", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("is_enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", UTCDateTime(), nullable=True),
        sa.Column("last_run_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", long_text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_job")),
        **MYSQL_TABLE_OPTIONS,
    )
    # Named explicitly in the model (not by the convention): the engine's due-jobs scan.
    op.create_index("ix_scheduler_job_due", "scheduler_job", ["is_enabled", "next_run_at"])
    op.create_index(op.f("ix_scheduler_job_task_name"), "scheduler_job", ["task_name"])
    op.create_index(op.f("ix_scheduler_job_updated_at"), "scheduler_job", ["updated_at"])

    op.create_table(
        "scheduler_run",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("scheduled_for", UTCDateTime(), nullable=False),
        sa.Column("status", _enum("run_status", "claimed", "dispatched", "failed"), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("error", long_text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("dispatched_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_run")),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["scheduler_job.id"],
            name=op.f("fk_scheduler_run_job_id_scheduler_job"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "job_id", "scheduled_for", name=op.f("uq_scheduler_run_job_id_scheduled_for")
        ),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index(op.f("ix_scheduler_run_next_attempt_at"), "scheduler_run", ["next_attempt_at"])


def downgrade() -> None:
    """Drop both tables (their indexes and constraints go with them), children first."""
    op.drop_table("scheduler_run")
    op.drop_table("scheduler_job")
