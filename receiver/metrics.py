"""Prometheus metrics: in-process counters (shared across gunicorn workers) plus figures read from the database.

Counters live in prometheus_client's multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set
(gunicorn.conf.py sets it), so /metrics adds up every worker. Reconciliation figures and the
oldest-unconfirmed age come from the database at scrape time, so they are right whichever
process (web, scheduler, CLI) did the work.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from .models import ReconcileRun, Voucher
from .state_machine import FINAL_STATUSES

CALLBACKS = Counter("rmvs_callbacks_total", "Callback POSTs answered, by outcome.", ["outcome"])
REQUEST_SECONDS = Histogram(
    "rmvs_http_request_duration_seconds",
    "Time to answer an HTTP request, by endpoint.",
    ["endpoint", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
GROUP_COMMIT_CALLBACKS = Histogram(
    "rmvs_group_commit_callbacks",
    "Callbacks committed together in one group-commit transaction (receiver/group_commit.py).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
APPLY_OUTCOMES = Counter(
    "rmvs_apply_outcomes_total", "Committed results of applying voucher snapshots.", ["source", "outcome"]
)
REJECTIONS_NOT_STORED = Counter(
    "rmvs_rejected_callbacks_not_stored_total",
    "Rejected callbacks answered but not stored: over REJECTED_DELIVERIES_PER_MINUTE from one address.",
)
RM_API_CALLS = Counter("rmvs_rm_api_calls_total", "Calls to RM's API, by endpoint and result.", ["endpoint", "result"])

_PENDING = "rmvs_apply_outcomes"


@functools.lru_cache(maxsize=1024)
def labelled(metric: Counter | Histogram, *values: str):  # noqa: ANN201 - the metric's child
    """``metric.labels(*values)``, looked up once: labels() takes a lock and builds a key on every call."""
    return metric.labels(*values)


def note_apply(session: Session, source: str, outcome: str) -> None:
    """Count an apply outcome once the session's transaction commits (a rollback discards it)."""
    session.info.setdefault(_PENDING, []).append((source, outcome))


def count_apply(source: str, outcome: str) -> None:
    """Count an apply outcome that its owner has just committed on a bare Connection."""
    labelled(APPLY_OUTCOMES, source, outcome).inc()


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for source, outcome in session.info.pop(_PENDING, ()):
        count_apply(source, outcome)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def note_rm_call(endpoint: str, result: str) -> None:
    """RMClient's on_request hook."""
    labelled(RM_API_CALLS, endpoint, result).inc()


class DatabaseCollector(Collector):
    """Figures that belong to the database, not to a process."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterable:  # noqa: D102 - prometheus_client interface
        runs = CounterMetricFamily("rmvs_reconcile_runs", "Finished reconciliation runs (reconcile_runs).")
        vouchers = CounterMetricFamily(
            "rmvs_reconcile_vouchers", "Vouchers checked, changed and failed by reconciliation.", labels=["result"]
        )
        last = GaugeMetricFamily("rmvs_reconcile_last_duration_seconds", "Duration of the last finished run.")
        last_end = GaugeMetricFamily("rmvs_reconcile_last_finished_timestamp_seconds", "When the last run finished.")
        oldest = GaugeMetricFamily(
            "rmvs_oldest_unconfirmed_voucher_age_seconds",
            "Age of the oldest last_confirmed_at among non-final vouchers RM still knows.",
        )
        up = GaugeMetricFamily("rmvs_database_up", "1 when the database answered this scrape.")
        try:
            with self.sessions() as session:
                finished = ReconcileRun.finished_at.is_not(None)
                count, checked, changed, failed = session.execute(
                    select(
                        func.count(ReconcileRun.id),
                        func.coalesce(func.sum(ReconcileRun.checked), 0),
                        func.coalesce(func.sum(ReconcileRun.changed), 0),
                        func.coalesce(func.sum(ReconcileRun.failed), 0),
                    ).where(finished)
                ).one()
                latest = session.execute(
                    select(ReconcileRun.started_at, ReconcileRun.finished_at)
                    .where(finished)
                    .order_by(ReconcileRun.finished_at.desc())
                    .limit(1)
                ).first()
                oldest_confirmed = session.scalar(
                    select(func.min(Voucher.last_confirmed_at)).where(
                        Voucher.status.not_in(sorted(FINAL_STATUSES)), Voucher.rm_missing_at.is_(None)
                    )
                )
        except Exception:  # noqa: BLE001 - a scrape must answer even when the database does not
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        runs.add_metric([], count)
        for result, value in (("checked", checked), ("changed", changed), ("failed", failed)):
            vouchers.add_metric([result], value)
        if latest is not None:
            last.add_metric([], (latest.finished_at - latest.started_at).total_seconds())
            last_end.add_metric([], latest.finished_at.timestamp())
        if oldest_confirmed is not None:
            oldest.add_metric([], max(0.0, time.time() - _as_timestamp(oldest_confirmed)))
        yield from (up, runs, vouchers, last, last_end, oldest)


def _as_timestamp(value) -> float:  # noqa: ANN001
    # SQLite's aggregate comes back as text, not through the column type.
    if isinstance(value, str):
        from datetime import datetime, timezone

        return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()
    return value.timestamp()


class _Forward(Collector):
    """Expose another registry's metrics through this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable:  # noqa: D102 - prometheus_client interface
        yield from self.source.collect()


def render(sessions: sessionmaker[Session]) -> tuple[bytes, str]:
    """The /metrics page: every worker's counters (multiprocess) or this process's, plus the database's."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    registry.register(DatabaseCollector(sessions))
    return generate_latest(registry), CONTENT_TYPE_LATEST
