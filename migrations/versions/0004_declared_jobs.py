"""Schedules declared in code: who owns a job, and which definition was applied.

Revision ID: 0004_declared_jobs
Revises: 0003
Create Date: 2026-12-06 14:30:00+00:00

Adds ``scheduler_job.source`` (``api`` or ``code``; every existing row is ``api``: it was made
through the API), ``definition_hash`` and ``schedule_version`` (set on rows declared in code,
see :mod:`taskiq_beat.declared`). Every row is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_declared_jobs"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column(
            "source",
            sa.Enum(
                "api",
                "code",
                name="job_source",
                native_enum=False,
                create_constraint=False,
                length=32,
            ),
            server_default="api",
            nullable=False,
        ),
        sa.Column("definition_hash", sa.String(length=64), nullable=True),
        sa.Column("schedule_version", sa.Integer(), nullable=True),
    ]


def upgrade() -> None:
    """Add the declaration columns to scheduler_job."""
    with op.batch_alter_table("scheduler_job") as batch:
        for column in _columns():
            batch.add_column(column)
    op.create_index(op.f("ix_scheduler_job_source"), "scheduler_job", ["source"])


def downgrade() -> None:
    """Drop them (jobs declared in code become ordinary jobs)."""
    op.drop_index(op.f("ix_scheduler_job_source"), table_name="scheduler_job")
    with op.batch_alter_table("scheduler_job") as batch:
        for column in reversed(_columns()):
            batch.drop_column(column.name)
