"""Words and pictures for the dashboard: a trigger in words, its next fires, a run chart."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from taskiq_beat.triggers import (
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    OneOffSchedule,
    Trigger,
)

if TYPE_CHECKING:
    from taskiq_beat.models import SchedulerRun

__all__ = [
    "ChartBar",
    "describe_trigger",
    "duration_text",
    "next_fires",
    "run_chart",
    "utc_text",
]

_DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_DAY_NUMBERS = {name[:3].lower(): number for number, name in enumerate(_DAYS)}
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_MONTH_NUMBERS = {name[:3].lower(): number for number, name in enumerate(_MONTHS, start=1)}


def utc_text(value: datetime | None) -> str:
    """``value`` as ``2026-12-06 13:05:03 UTC`` (``-`` for none)."""
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_trigger(trigger: Trigger) -> str:
    """The trigger in words: ``every weekday at 09:00 Europe/Berlin``."""
    if isinstance(trigger, ImmediateDispatch):
        return "once, when it was created"
    if isinstance(trigger, OneOffSchedule):
        return f"once, at {utc_text(trigger.run_at)}"
    if trigger.interval is not None:
        text = f"every {_period(trigger.interval)}"
    else:
        assert trigger.crontab is not None
        text = _crontab(trigger.crontab)
    if trigger.start_at is not None:
        text += f", from {utc_text(trigger.start_at)}"
    if trigger.end_at is not None:
        text += f", until {utc_text(trigger.end_at)}"
    return text


def next_fires(trigger: Trigger, first: datetime | None, count: int = 10) -> list[datetime]:
    """Up to ``count`` fires, from ``first`` (the job's next fire) on."""
    fires: list[datetime] = []
    current = first
    while current is not None and len(fires) < count:
        fires.append(current)
        current = trigger.get_next_run_at(current)
    return fires


def _plural(value: float, unit: str) -> str:
    number = int(value) if float(value).is_integer() else value
    return f"{number} {unit}" if number == 1 else f"{number} {unit}s"


def _period(interval: IntervalTrigger) -> str:
    parts = [
        _plural(getattr(interval, unit), unit[:-1])
        for unit in ("weeks", "days", "hours", "minutes", "seconds")
        if getattr(interval, unit)
    ]
    if parts == ["1 week"] or parts == ["1 day"] or parts == ["1 hour"] or parts == ["1 minute"]:
        return parts[0][2:]
    if parts == ["1 second"]:
        return "second"
    return " ".join(parts)


def _number(field: str) -> int | None:
    return int(field) if field.isdigit() else None


def _days_of_week(field: str) -> str | None:
    """``every weekday`` and the like; ``None`` when it needs the cron text."""
    if field == "*":
        return "every day"
    normalized = field.lower()
    if normalized in ("mon-fri", "1-5"):
        return "every weekday"
    if normalized in ("sat,sun", "sun,sat", "0,6", "6,0", "6,7"):
        return "every Saturday and Sunday"
    names = []
    for part in normalized.split(","):
        number = _DAY_NUMBERS.get(part, _number(part))
        if number is None or number > 7:
            return None
        names.append(_DAYS[number % 7])
    return "every " + _join(names)


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _crontab(crontab: CrontabTrigger) -> str:
    zone = crontab.timezone or "UTC"
    raw = f"cron {crontab.second} {crontab.minute} {crontab.hour} {crontab.day_of_month} "
    raw += f"{crontab.month_of_year} {crontab.day_of_week} ({zone})"
    days = _days_of_week(crontab.day_of_week)
    if days is None:
        return raw
    dom, month = crontab.day_of_month, crontab.month_of_year
    if dom != "*":
        if _number(dom) is None and dom.upper() != "L":
            return raw
        day = "the last day" if dom.upper() == "L" else f"day {dom}"
        days = f"on {day} of the month" if days == "every day" else f"{days} and on {day}"
    if month != "*":
        number = _MONTH_NUMBERS.get(month.lower(), _number(month))
        if number is None or not 1 <= number <= 12:
            return raw
        days += f" in {_MONTHS[number - 1]}"
    second, minute, hour = (
        _number(crontab.second),
        _number(crontab.minute),
        _number(crontab.hour),
    )
    if second is not None and minute is not None and hour is not None:
        time = f"{hour:02}:{minute:02}" + (f":{second:02}" if second else "")
        return f"{days} at {time} {zone}"
    hours = crontab.hour.split(",")
    if second is not None and minute is not None and all(h.isdigit() for h in hours):
        times = [f"{int(h):02}:{minute:02}" + (f":{second:02}" if second else "") for h in hours]
        return f"{days} at {_join(times)} {zone}"
    prefix = "" if days == "every day" else f"{days}, "
    if crontab.hour == "*" and second is not None and minute is not None:
        return f"{prefix}every hour at minute {minute} {zone}".strip()
    if crontab.hour == "*" and crontab.minute == "*" and second is not None:
        return f"{prefix}every minute" + (f" at second {second}" if second else "")
    if crontab.hour == "*" and crontab.minute.startswith("*/") and second == 0:
        step = crontab.minute[2:]
        if step.isdigit():
            return f"{prefix}every {step} minutes"
    if crontab.hour == "*" and crontab.minute == "*" and crontab.second == "*":
        return f"{prefix}every second"
    if crontab.hour == "*" and crontab.minute == "*" and crontab.second.startswith("*/"):
        step = crontab.second[2:]
        if step.isdigit():
            return f"{prefix}every {step} seconds"
    return raw


class ChartBar:
    """One bar of the run chart (SVG coordinates in a 600 x 120 view box), with its mark in
    the outcome strip below the bars (from ``strip_y`` down)."""

    __slots__ = ("height", "label", "status", "width", "x", "y")

    def __init__(self, x: float, y: float, width: float, height: float, status: str, label: str):
        self.x, self.y, self.width, self.height = x, y, width, height
        self.status, self.label = status, label


CHART_WIDTH = 600.0
CHART_HEIGHT = 120.0
CHART_SLOTS = 30
STRIP_HEIGHT = 10.0
"""The outcome strip under the bars: a failure shows there however short it ran."""


def run_chart(runs: Sequence[SchedulerRun]) -> tuple[list[ChartBar], str]:
    """Bars of the runs' durations (oldest left), coloured by status, and a sentence saying
    what they show (for screen readers, and under the chart)."""
    ordered = sorted(runs, key=lambda run: run.scheduled_for)
    if not ordered:
        return [], "No runs yet."
    durations = [run.duration_seconds for run in ordered if run.duration_seconds is not None]
    longest = max(durations, default=0.0) or 1.0
    room = CHART_HEIGHT - STRIP_HEIGHT - 4
    # At least CHART_SLOTS slots, the newest run on the right: a few runs make thin bars.
    slot = CHART_WIDTH / max(len(ordered), CHART_SLOTS)
    offset = CHART_WIDTH - slot * len(ordered)
    bars = []
    for index, run in enumerate(ordered):
        status = run.status.value
        if run.duration_seconds is None:
            height = 4.0  # no duration yet (sent, running): a stub
            duration = "no duration yet"
        else:
            height = max(4.0, run.duration_seconds / longest * room)
            duration = duration_text(run.duration_seconds)
        label = f"{utc_text(run.scheduled_for)}: {status}, {duration}"
        bars.append(
            ChartBar(
                offset + index * slot + slot * 0.1,
                CHART_HEIGHT - STRIP_HEIGHT - 4 - height,
                max(slot * 0.8, 1.0),
                height,
                status,
                label,
            )
        )
    counts: dict[str, int] = {}
    for run in ordered:
        counts[run.status.value] = counts.get(run.status.value, 0) + 1
    lead = "The last run" if len(ordered) == 1 else f"The last {len(ordered)} runs"
    summary = f"{lead}: " + ", ".join(
        f"{count} {status}" for status, count in sorted(counts.items())
    )
    if durations:
        summary += (
            f"; median duration {duration_text(statistics.median(durations))}, "
            f"longest {duration_text(longest)}"
        )
    return bars, summary + "."


def duration_text(seconds: float | None) -> str:
    """``8 ms``, ``52.00 s``, ``3.5 min``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"
