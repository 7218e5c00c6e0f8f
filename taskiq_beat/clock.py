"""Time: the injectable clock and the one rule for datetimes (timezone-aware, stored as UTC)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

from taskiq_beat.exceptions import InvalidJobError

__all__ = ["Clock", "SystemClock", "to_utc"]


@runtime_checkable
class Clock(Protocol):
    """Source of the current time. Only the engine and the app facade read it."""

    def now(self) -> datetime:
        """Return the current time as a timezone-aware UTC datetime."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


def to_utc(value: datetime, field: str) -> datetime:
    """Return ``value`` converted to UTC, rejecting naive datetimes.

    :raises InvalidJobError: if ``value`` is not a timezone-aware datetime.
    """
    if not isinstance(value, datetime):
        raise InvalidJobError(field, value, "expected a timezone-aware datetime")
    if value.tzinfo is timezone.utc:  # the common case, on every fire: nothing to convert
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidJobError(
            field, value, "naive datetime; pass a timezone-aware one (e.g. tzinfo=timezone.utc)"
        )
    return value.astimezone(timezone.utc)
