"""Live schedulers: the registry several schedulers share the due jobs by.

Revision ID: 0006_scheduler_instances
Revises: 0005_chain_steps
Create Date: 2026-12-06 15:10:00+00:00

Adds ``scheduler_instance`` (one row per running scheduler, renewed while it runs; see
:class:`taskiq_beat.models.SchedulerInstance`). No existing row changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from taskiq_beat.models import MYSQL_TABLE_OPTIONS, UTCDateTime

# revision identifiers, used by Alembic.
revision: str = "0006_scheduler_instances"
down_revision: str | Sequence[str] | None = "0005_chain_steps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create scheduler_instance."""
    op.create_table(
        "scheduler_instance",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_instance")),
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    """Drop it (schedulers then each take every due job, as before)."""
    op.drop_table("scheduler_instance")
