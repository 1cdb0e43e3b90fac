"""The scheduler process: APScheduler runs reconciliation every RECONCILE_INTERVAL_SECONDS under a database lease."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime, timezone
from typing import Callable

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from .client import RMClient, RMNotConfigured
from .lease import Lease
from .reconciliation import ReconcileSummary, reconcile_due
from .runtime import Runtime

log = logging.getLogger(__name__)

RECONCILE_LEASE = "reconcile"
RETENTION_LEASE = "retention"
RETENTION_EVERY_HOURS = 6


def lease_ttl(interval_seconds: int) -> float:
    """Long enough to survive slow renewals (every ttl/3), short enough that a crashed holder is replaced soon."""
    return float(min(max(interval_seconds * 3, 5), 120))


def run_reconcile_under_lease(
    runtime: Runtime,
    client: RMClient,
    *,
    trigger: str,
    stopping: threading.Event | None = None,
    on_progress: Callable[[ReconcileSummary], None] | None = None,
) -> ReconcileSummary | None:
    """Run one due-voucher pass if no other process is; None when another holds the lease."""
    stopping = stopping or threading.Event()
    settings = runtime.settings
    with Lease(runtime.sessions, RECONCILE_LEASE, ttl=lease_ttl(settings.reconcile_interval_seconds)) as lease:
        if not lease.acquired:
            log.info("reconciliation skipped: another process holds the %r lease", RECONCILE_LEASE)
            return None
        return reconcile_due(
            runtime.sessions,
            client,
            stale_after_seconds=settings.reconcile_stale_after_seconds,
            concurrency=settings.reconcile_concurrency,
            trigger=trigger,
            should_stop=lambda: (
                "the lease was lost" if lease.lost.is_set() else "shutting down" if stopping.is_set() else None
            ),
            on_progress=on_progress,
        )


def run_retention(runtime: Runtime) -> int | None:
    """Drop bodies and headers of deliveries older than DELIVERY_RETENTION_DAYS, once across all schedulers."""
    from .ops import purge_delivery_bodies

    try:
        with Lease(runtime.sessions, RETENTION_LEASE, ttl=300) as lease:
            if not lease.acquired:
                return None
            purged = purge_delivery_bodies(
                runtime.sessions, older_than_days=runtime.settings.delivery_retention_days
            )
    except Exception:  # noqa: BLE001 - a failed purge must not stop the scheduler
        log.exception("retention job failed")
        return None
    if purged:
        log.info("retention: dropped bodies of %s deliveries older than %s days", purged,
                 runtime.settings.delivery_retention_days)
    return purged


def build_scheduler(runtime: Runtime, stopping: threading.Event) -> BlockingScheduler:
    """The APScheduler with this process's jobs; reconciliation only when RM credentials are configured."""
    settings = runtime.settings
    scheduler = BlockingScheduler(
        timezone=timezone.utc,
        # One run at a time; runs missed while one was going are merged into a single next run.
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": settings.reconcile_interval_seconds},
    )
    scheduler.add_job(
        lambda: run_retention(runtime),
        IntervalTrigger(hours=RETENTION_EVERY_HOURS),
        id="retention",
        name="purge old delivery bodies",
        next_run_time=datetime.now(timezone.utc),
    )
    try:
        client = RMClient.from_settings(settings)
    except RMNotConfigured as exc:
        log.warning("reconciliation is disabled: %s; the receiver keeps working without it", exc.message)
        return scheduler

    def reconcile_job() -> None:
        if stopping.is_set():
            return
        try:
            run_reconcile_under_lease(runtime, client, trigger="scheduler", stopping=stopping)
        except Exception:  # noqa: BLE001 - a failed run must not stop the scheduler
            log.exception("scheduled reconciliation failed")

    scheduler.add_job(
        reconcile_job,
        IntervalTrigger(seconds=settings.reconcile_interval_seconds),
        id="reconcile",
        name="reconcile due vouchers",
        next_run_time=datetime.now(timezone.utc),
    )
    return scheduler


def run_forever(runtime: Runtime) -> None:
    """Run the scheduler in the foreground until SIGTERM or Ctrl-C; leases are released on the way out."""
    stopping = threading.Event()
    scheduler = build_scheduler(runtime, stopping)

    def _stop(signum: int, _frame: object) -> None:
        # A running pass stops taking new codes, applies what it fetched, records its run, and
        # releases the lease; only then does the process exit.
        log.info("scheduler stopping (signal %s)", signum)
        stopping.set()
        scheduler.shutdown(wait=True)

    signal.signal(signal.SIGTERM, _stop)
    log.info(
        "scheduler started: reconcile every %ss, stale after %ss, concurrency %s",
        runtime.settings.reconcile_interval_seconds,
        runtime.settings.reconcile_stale_after_seconds,
        runtime.settings.reconcile_concurrency,
    )
    signal.signal(signal.SIGINT, _stop)
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        stopping.set()
