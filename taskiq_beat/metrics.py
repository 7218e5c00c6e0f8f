"""Prometheus metrics of a scheduler process (the ``metrics`` extra: ``prometheus_client``).

``taskiq-beat run ... --metrics-port 9100`` serves them; from code,
``serve_metrics(scheduler_app, port)``. The values are read from the process's own counters
when Prometheus scrapes (no database query per scrape):

- ``taskiq_beat_fires_sent_total``, ``taskiq_beat_fires_failed_total`` (counters);
- ``taskiq_beat_jobs_loaded``, ``taskiq_beat_scheduler_running`` (gauges);
- ``taskiq_beat_lateness_seconds{quantile="0.5"|"0.99"}`` over the last minute;
- ``taskiq_beat_last_sync_timestamp_seconds``, ``taskiq_beat_last_pass_timestamp_seconds``;
- where the process also runs tasks: ``taskiq_beat_runs_started_total``,
  ``taskiq_beat_duplicates_skipped_total``, ``taskiq_beat_outcomes_written_total``,
  ``taskiq_beat_outcomes_dropped_total``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskiq_beat.app import SchedulerApp

__all__ = ["SchedulerCollector", "serve_metrics"]


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.metrics_core
    except ImportError:  # pragma: no cover - depends on the extra
        raise ImportError(
            "metrics need prometheus_client: pip install 'taskiq-beat[metrics]'"
        ) from None
    return prometheus_client


class SchedulerCollector:
    """A Prometheus collector reading one ``SchedulerApp``'s counters at each scrape."""

    def __init__(self, scheduler_app: SchedulerApp) -> None:
        self._app = scheduler_app

    def collect(self) -> Iterator[Any]:
        core = _prometheus().metrics_core
        stats = self._app.engine.stats
        sent = core.CounterMetricFamily(
            "taskiq_beat_fires_sent", "Fires this scheduler sent to the broker."
        )
        sent.add_metric([], stats.fires_sent)
        yield sent
        failed = core.CounterMetricFamily(
            "taskiq_beat_fires_failed", "Sends that failed (retried, or their job disabled)."
        )
        failed.add_metric([], stats.fires_failed)
        yield failed
        yield core.GaugeMetricFamily(
            "taskiq_beat_jobs_loaded",
            "Jobs held in memory (due within the look-ahead window).",
            value=self._app.engine.loaded_jobs,
        )
        yield core.GaugeMetricFamily(
            "taskiq_beat_scheduler_running",
            "1 while the scheduling loop runs.",
            value=1 if self._app.is_running else 0,
        )
        p50, p99 = stats.lateness_percentiles()
        lateness = core.GaugeMetricFamily(
            "taskiq_beat_lateness_seconds",
            "Lateness of the fires sent over the last minute (sampled).",
            labels=["quantile"],
        )
        lateness.add_metric(["0.5"], p50)
        lateness.add_metric(["0.99"], p99)
        yield lateness
        for name, moment in (
            ("taskiq_beat_last_sync_timestamp_seconds", stats.last_sync_at),
            ("taskiq_beat_last_pass_timestamp_seconds", stats.last_pass_at),
        ):
            if moment is not None:
                yield core.GaugeMetricFamily(name, "Unix time.", value=moment.timestamp())
        lifecycle = self._app.lifecycle
        if lifecycle is not None:
            for name, value, text in (
                ("runs_started", lifecycle.stats.started, "Executions started here."),
                (
                    "duplicates_skipped",
                    lifecycle.stats.duplicates_skipped,
                    "Second deliveries of a fire not executed here.",
                ),
                ("outcomes_written", lifecycle.stats.finished_written, "Outcomes written."),
                ("outcomes_dropped", lifecycle.stats.finished_dropped, "Outcomes not written."),
            ):
                counter = core.CounterMetricFamily(f"taskiq_beat_{name}", text)
                counter.add_metric([], value)
                yield counter


def serve_metrics(scheduler_app: SchedulerApp, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve the app's metrics over HTTP on ``addr:port`` (a thread); returns the server."""
    prometheus = _prometheus()
    registry = prometheus.CollectorRegistry()
    registry.register(SchedulerCollector(scheduler_app))
    server, _thread = prometheus.start_http_server(port, addr=addr, registry=registry)
    return server
