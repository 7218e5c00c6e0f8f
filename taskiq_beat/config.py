"""Scheduler settings, validated when constructed; also readable from the environment
(``SchedulerConfig.from_env()``, every field as ``TASKIQ_BEAT_<FIELD>``)."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taskiq_beat.exceptions import InvalidConfigError
from taskiq_beat.triggers import resolve_timezone

__all__ = ["DEFAULT_TIMEZONE", "ENV_PREFIX", "SchedulerConfig"]

DEFAULT_TIMEZONE = "UTC"
"""Timezone of a ``CrontabTrigger`` that names none, unless ``default_timezone`` says another."""

ENV_PREFIX = "TASKIQ_BEAT_"
"""Prefix of the environment variables read by ``SchedulerConfig.from_env()``."""


class SchedulerConfig(BaseModel):
    """How the scheduler loop behaves. Every field has a working default."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    sync_interval_seconds: float = Field(default=1.0, gt=0)
    """How often the engine reads due and changed jobs from the database."""
    idle_sleep_seconds: float = Field(default=0.2, gt=0)
    """Longest pause of the loop when nothing is due; it wakes earlier for due jobs and changes."""
    dispatch_retry_seconds: float = Field(default=5, gt=0)
    """Delay before a fire whose ``kiq`` failed is sent again."""
    dispatch_concurrency: int = Field(default=32, gt=0)
    """How many ``kiq`` calls of one batch are in flight at once."""
    dispatch_batch_size: int = Field(default=256, gt=0)
    """Due jobs claimed and sent in one batch (one transaction each side). While more jobs
    are due than a batch holds, batches double, up to 32 times this size (at most 8,192); they
    fall back to this size when the backlog is gone or a send fails."""
    misfire_grace_seconds: float = Field(default=30.0, ge=0)
    """A fire found at most this late (the scheduler was busy, stalled on the broker, or
    restarted) is still sent, each one as scheduled; older fires are missed: skipped when a
    later fire is within the grace, else coalesced into one send of the latest. ``0``
    coalesces every overdue fire."""
    record_runs: bool = True
    """Keep a ``scheduler_run`` row per fire after it was sent (claims are written regardless)."""
    default_timezone: str = DEFAULT_TIMEZONE
    """Timezone of a ``CrontabTrigger`` that names none."""
    lookahead_seconds: float | None = Field(default=None, gt=0)
    """How far ahead each sync loads jobs; defaults to twice ``sync_interval_seconds``."""
    claim_lease_seconds: float = Field(default=30.0, gt=0)
    """How long a claimed fire belongs to its scheduler before another one may send it."""
    claim_ahead_seconds: float = Field(default=0.0, ge=0, le=60)
    """Claim the fires of jobs without a policy up to this long before their time, and send
    each on time: thousands of jobs due on one instant then leave as fast as the broker
    takes them, their claims written beforehand. A change to such a job (an edit, a pause,
    a deletion) made after its fire was claimed still stops or changes that fire if this
    scheduler hears of it before the fire's time: at once in this process, by notification
    on PostgreSQL, and everywhere by reading the jobs' newest ``updated_at`` just before
    sending; a deletion made by another process is not heard on SQLite and MySQL (nor on
    PostgreSQL while its listener is down or deaf), and that fire is sent. Jobs firing more
    often than this are claimed when due. ``0`` (the default): fires are claimed when due.
    Must be shorter than the look-ahead window."""
    dispatch_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest wait for one ``kiq``; a send that takes longer counts as failed."""
    database_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest wait for one database operation of the scheduler loop; a slower one counts as
    failed and the loop retries (a connection can hang without an error on a network
    partition)."""
    shutdown_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long ``stop()`` waits for the batch in flight before giving up on it."""
    record_lifecycle: bool = True
    """Workers that run a fire write its lifecycle onto its run (``running``, then
    ``succeeded`` / ``failed``) and execute each fire once (see :mod:`taskiq_beat.worker`).
    Needs ``record_runs``: without run rows there is nothing to write onto."""
    lifecycle_flush_seconds: float = Field(default=0.1, gt=0)
    """How long a worker gathers finished runs before it writes them in one batch."""
    lifecycle_batch_size: int = Field(default=500, gt=0)
    """A worker writes its finished runs at once when this many wait."""
    lifecycle_buffer_size: int = Field(default=10_000, gt=0)
    """Most finished runs a worker keeps while the database is unreachable; older ones are
    dropped beyond it (with one warning per outage)."""
    worker_heartbeat_seconds: float = Field(default=5.0, gt=0)
    """How often a worker renews its row in ``scheduler_worker``."""
    worker_timeout_seconds: float = Field(default=30.0, gt=0)
    """A worker not seen for this long is gone: the scheduler marks its running runs
    ``lost``."""
    housekeeping_interval_seconds: float = Field(default=5.0, gt=0)
    """How often the scheduler looks for lost runs and runs the durable chains' watchdog
    (timed-out steps, steps of lost workers, steps due and not sent: the grace given to the
    worker that should have sent one), and, every minute or so, old history."""
    run_history_retention_days: float | None = Field(default=None, gt=0)
    """Finished runs scheduled longer ago than this are deleted, and one-off jobs whose last
    fire was that long ago; ``None`` keeps everything."""

    @field_validator("default_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        resolve_timezone(value, "default_timezone")
        return value

    @model_validator(mode="after")
    def _check_lease(self) -> SchedulerConfig:
        if self.claim_lease_seconds <= self.dispatch_timeout_seconds:
            raise ValueError(
                f"claim_lease_seconds={self.claim_lease_seconds} must be longer than "
                f"dispatch_timeout_seconds={self.dispatch_timeout_seconds}"
            )
        return self

    @model_validator(mode="after")
    def _check_claim_ahead(self) -> SchedulerConfig:
        if self.claim_ahead_seconds and self.claim_ahead_seconds >= self.lookahead:
            raise ValueError(
                f"claim_ahead_seconds={self.claim_ahead_seconds} must be shorter than the"
                f" look-ahead window ({self.lookahead} s: lookahead_seconds, or twice"
                " sync_interval_seconds)"
            )
        return self

    @model_validator(mode="after")
    def _check_heartbeat(self) -> SchedulerConfig:
        if self.worker_timeout_seconds <= self.worker_heartbeat_seconds:
            raise ValueError(
                f"worker_timeout_seconds={self.worker_timeout_seconds} must be longer than "
                f"worker_heartbeat_seconds={self.worker_heartbeat_seconds}"
            )
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> SchedulerConfig:
        """A config whose fields come from ``overrides``, else from the environment variables
        ``TASKIQ_BEAT_<FIELD>`` (``TASKIQ_BEAT_SYNC_INTERVAL_SECONDS=2.5``; names are not
        case-sensitive), else from the defaults. Read with pydantic-settings (the ``env``
        extra): numbers as written, booleans as ``true``/``false``/``1``/``0``, ``none`` for
        ``None``; an empty variable counts as unset.

        Validation is the constructor's, on the merged values.

        :raises InvalidConfigError: naming the variable (or the keyword) and its value.
        :raises ImportError: if pydantic-settings is not installed.
        """
        values = {**_read_environment(), **overrides}
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else ""
            reason = str(error["msg"]).removeprefix("Value error, ")
            if field and field not in overrides and field in values:
                raise InvalidConfigError(
                    f"{ENV_PREFIX}{field.upper()}", values[field], reason
                ) from None
            raise InvalidConfigError(
                field or "SchedulerConfig", error.get("input"), reason
            ) from None

    @property
    def lookahead(self) -> float:
        """The look-ahead window of a sync, in seconds."""
        return self.lookahead_seconds or 2 * self.sync_interval_seconds


def _read_environment() -> dict[str, Any]:
    """The fields of ``SchedulerConfig`` set in the environment, as pydantic-settings reads
    them, not yet validated."""
    source_class, settings_class = _settings_classes()
    return dict(source_class(settings_class)())


@functools.cache
def _settings_classes() -> tuple[Any, Any]:
    try:
        from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
    except ImportError as exc:  # pragma: no cover - the env extra is part of the test extra
        raise ImportError(
            "SchedulerConfig.from_env() needs pydantic-settings: pip install 'taskiq-beat[env]'"
        ) from exc

    class _EnvironmentFields(SchedulerConfig, BaseSettings):
        """``SchedulerConfig``'s fields as pydantic-settings sees them; only read, never
        instantiated."""

        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_ignore_empty=True,
            env_parse_none_str="none",
            case_sensitive=False,
            frozen=True,
            extra="forbid",
        )

    return EnvSettingsSource, _EnvironmentFields
