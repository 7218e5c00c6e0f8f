"""Run lifecycle: what the workers report of each run, the job counters and worker tables.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 12:00:00+00:00

Upgrades a database made by ``0001`` in place; every row is kept. New columns are nullable
or have a server default, so the rows already there read as runs no worker reported on
(``executions = 0``); jobs have no counters row until a worker reports one of their runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from taskiq_beat.models import MYSQL_TABLE_OPTIONS, UTCDateTime, double_float

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _run_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("duration_seconds", double_float(), nullable=True),
        sa.Column("worker_id", sa.String(length=64), nullable=True),
        sa.Column("executions", sa.Integer(), server_default="0", nullable=False),
        sa.Column("retries", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error_type", sa.String(length=255), nullable=True),
    ]


def upgrade() -> None:
    """Add the lifecycle columns and the worker table."""
    # batch_alter_table: SQLite cannot add several columns in one ALTER (it recreates the
    # table only where it must; plain ADD COLUMN otherwise).
    with op.batch_alter_table("scheduler_run") as batch:
        for column in _run_columns():
            batch.add_column(column)
    op.create_index(op.f("ix_scheduler_run_worker_id"), "scheduler_run", ["worker_id"])
    op.create_index("ix_scheduler_run_scheduled_for", "scheduler_run", ["scheduled_for"])
    op.create_table(
        "scheduler_job_stats",
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("success_count", sa.Integer(), nullable=False),
        sa.Column("failure_count", sa.Integer(), nullable=False),
        sa.Column("last_success_at", UTCDateTime(), nullable=True),
        sa.Column("last_failure_at", UTCDateTime(), nullable=True),
        sa.Column("last_duration_seconds", double_float(), nullable=True),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_scheduler_job_stats")),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["scheduler_job.id"],
            name=op.f("fk_scheduler_job_stats_job_id_scheduler_job"),
            ondelete="CASCADE",
        ),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_table(
        "scheduler_worker",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_worker")),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index(op.f("ix_scheduler_worker_last_seen_at"), "scheduler_worker", ["last_seen_at"])


def downgrade() -> None:
    """Drop the worker table and the lifecycle columns (the runs' outcomes are lost)."""
    op.drop_table("scheduler_worker")
    op.drop_table("scheduler_job_stats")
    op.drop_index("ix_scheduler_run_scheduled_for", table_name="scheduler_run")
    op.drop_index(op.f("ix_scheduler_run_worker_id"), table_name="scheduler_run")
    with op.batch_alter_table("scheduler_run") as batch:
        for column in reversed(_run_columns()):
            batch.drop_column(column.name)
