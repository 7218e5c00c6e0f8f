"""Names shared by the reliability app and the tests (the app needs its environment to import)."""

from __future__ import annotations

DATABASE_URL_ENV = "RELIABILITY_DATABASE_URL"
REDIS_URL_ENV = "RELIABILITY_REDIS_URL"
QUEUE_ENV = "RELIABILITY_QUEUE"
CONFIG_ENV = "RELIABILITY_CONFIG"
SEND_DELAY_ENV = "RELIABILITY_SEND_DELAY"

APP = "tests.reliability.app:scheduler_app"
BROKER = "tests.reliability.app:broker"
TASK = "reliability.tick"
REDIS_SOCKET_TIMEOUT = 2.0


def executed_key(queue: str) -> str:
    """The Redis list of the task ids the workers executed (one entry per execution)."""
    return f"{queue}:executed"
