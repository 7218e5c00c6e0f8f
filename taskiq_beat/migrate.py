"""Applying taskiq-beat's own Alembic migrations from code or from ``taskiq-beat db upgrade``.

The migrations ship inside the package (``taskiq_beat.migrations``) and keep their history in
the table ``taskiq_beat_alembic_version``, apart from the host application's own Alembic
history.
"""

from __future__ import annotations

from argparse import Namespace
from importlib.resources import files

from alembic import command
from alembic.config import Config

__all__ = ["alembic_config", "upgrade_database"]


def alembic_config(url: str) -> Config:
    """An Alembic configuration for the bundled migrations, aimed at ``url``."""
    config = Config(cmd_opts=Namespace(x=[f"url={url}"]))
    config.set_main_option("script_location", str(files("taskiq_beat.migrations")))
    config.attributes["configure_logger"] = False
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Upgrade the scheduler tables at ``url`` (an async SQLAlchemy URL) to ``revision``.

    Runs its own event loop: call it from synchronous code (a deploy step, a CLI).
    """
    command.upgrade(alembic_config(url), revision)
