"""Names shared by the deployed app, the job-creating client and the test.

Kept apart from :mod:`tests.e2e.deployment.app`, which needs its environment to import.
"""

from __future__ import annotations

DATABASE_URL_ENV = "E2E_DATABASE_URL"
"""postgresql+asyncpg URL of the scheduler's database."""
REDIS_URL_ENV = "E2E_REDIS_URL"
QUEUE_ENV = "E2E_QUEUE"
"""The Redis list the broker uses: unique per test run, so runs never see each other."""
RESULTS_PREFIX_ENV = "E2E_RESULTS_PREFIX"
"""Prefix of every other Redis key of a run: task results and the execution log."""

RECORD_TASK = "e2e.record"
STEP_TASKS = ("e2e.step_a", "e2e.step_b", "e2e.step_c")

SYSTEM_JOB = "e2e.system"
"""Upserted by the scheduler's startup hook; hourly, so it only fires through run-now."""
INTERVAL_JOB = "e2e.interval"
CRON_JOB = "e2e.cron"
ONE_OFF_JOB = "e2e.one_off"
CHAIN_JOB = "e2e.chain"

SYSTEM_INTERVAL_SECONDS = 3600
INTERVAL_SECONDS = 1
CRON_SECONDS = "*/2"
ONE_OFF_DELAY_SECONDS = 2.0
CHAIN_DELAY_SECONDS = 2.0


def executed_key(results_prefix: str) -> str:
    """The Redis list every task of the app appends one JSON record to when it runs."""
    return f"{results_prefix}:executed"
