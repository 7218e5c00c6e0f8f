"""Durable chains: a chain run's spec and progress, and one row per step attempt.

Revision ID: 0005_chain_steps
Revises: 0004_declared_jobs
Create Date: 2026-12-06 14:30:00+00:00

Adds two tables; no existing row changes. (A chain run's ``aborted`` status needs no DDL:
statuses are stored as text.)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from taskiq_beat.models import MYSQL_TABLE_OPTIONS, JSONValue, UTCDateTime, double_float, long_text

# revision identifiers, used by Alembic.
revision: str = "0005_chain_steps"
down_revision: str | Sequence[str] | None = "0004_declared_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``scheduler_chain`` and ``scheduler_chain_step``."""
    op.create_table(
        "scheduler_chain",
        sa.Column("run_id", _id(), nullable=False),
        sa.Column("spec", JSONValue(), nullable=False),
        sa.Column("chain_attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["scheduler_run.id"],
            name=op.f("fk_scheduler_chain_run_id_scheduler_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_scheduler_chain")),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_table(
        "scheduler_chain_step",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("run_id", _id(), nullable=False),
        sa.Column("chain_attempt", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("args", JSONValue(), nullable=False),
        sa.Column("kwargs", JSONValue(), nullable=False),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("deadline_at", UTCDateTime(), nullable=True),
        sa.Column("dispatched_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("duration_seconds", double_float(), nullable=True),
        sa.Column("worker_id", sa.String(length=64), nullable=True),
        sa.Column("executions", sa.Integer(), server_default="0", nullable=False),
        sa.Column("result", long_text(), nullable=True),
        sa.Column("error", long_text(), nullable=True),
        sa.Column("error_type", sa.String(length=255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["scheduler_run.id"],
            name=op.f("fk_scheduler_chain_step_run_id_scheduler_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_chain_step")),
        sa.UniqueConstraint(
            "run_id",
            "chain_attempt",
            "step",
            "attempt",
            name=op.f("uq_scheduler_chain_step_run_id_chain_attempt_step_attempt"),
        ),
        sa.UniqueConstraint("task_id", name=op.f("uq_scheduler_chain_step_task_id")),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_scheduler_chain_step_due", "scheduler_chain_step", ["status", "due_at"])
    op.create_index(
        "ix_scheduler_chain_step_deadline", "scheduler_chain_step", ["status", "deadline_at"]
    )
    op.create_index(
        op.f("ix_scheduler_chain_step_worker_id"), "scheduler_chain_step", ["worker_id"]
    )


def downgrade() -> None:
    """Drop the chain tables (the chains' progress is lost)."""
    op.drop_table("scheduler_chain_step")
    op.drop_table("scheduler_chain")
