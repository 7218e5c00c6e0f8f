"""Per-job policies: the job's policy, a fire's jitter, and the index of runs in flight.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 15:00:00+00:00

Upgrades in place; every row is kept. On MySQL and MariaDB (no partial indexes) the index
of the runs in flight covers every run of the job. Jobs read as jobs without a policy (``policy`` is
``NULL``) and runs as fires without jitter.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from taskiq_beat.models import ACTIVE_RUNS_SQL, JSONValue, double_float

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``scheduler_job.policy``, ``scheduler_run.jitter_seconds`` and the partial index
    of the runs still going."""
    with op.batch_alter_table("scheduler_job") as batch:
        batch.add_column(sa.Column("policy", JSONValue(), nullable=True))
    with op.batch_alter_table("scheduler_run") as batch:
        batch.add_column(sa.Column("jitter_seconds", double_float(), nullable=True))
    op.create_index(
        "ix_scheduler_run_active",
        "scheduler_run",
        ["job_id"],
        postgresql_where=sa.text(ACTIVE_RUNS_SQL),
        sqlite_where=sa.text(ACTIVE_RUNS_SQL),
    )


def downgrade() -> None:
    """Drop them (policies and jitters are lost)."""
    op.drop_index("ix_scheduler_run_active", table_name="scheduler_run")
    with op.batch_alter_table("scheduler_run") as batch:
        batch.drop_column("jitter_seconds")
    with op.batch_alter_table("scheduler_job") as batch:
        batch.drop_column("policy")
