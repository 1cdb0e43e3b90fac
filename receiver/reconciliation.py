"""Reconciliation: ask RM (Get Voucher By Code) wherever a callback may have been missed, and apply its answer.

Due vouchers are streamed by id in batches, fetched with bounded parallelism, and applied through the
apply service in short transactions, so memory stays flat and SQLite's write lock is never held
while waiting on RM.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable, Iterator

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from .apply import apply_snapshot, record_not_found
from .client import RMClient, RMError, RMNotFound
from .db import WRITER_TURN_BUDGET_SECONDS, is_unavailable, turn_budget
from .models import ReconcileRun, Source, Voucher, utcnow
from .snapshot import SnapshotError, VoucherSnapshot, snapshot_from_item
from .state_machine import FINAL_STATUSES, Outcome

log = logging.getLogger(__name__)

SELECT_BATCH = 500
APPLY_CHUNK = 100
# A transaction of the pass holds SQLite's writer turn, and every callback waits for it: measured
# beside 100 callbacks/s, a chunk of 100 held it 13 ms (median) to 135 ms (the pass's process
# competing for its GIL and the cores). Each transaction therefore ends once it has held the turn
# this long, and the rest of the chunk goes in the next one: a few more commits a second.
TURN_BUDGET_SECONDS = WRITER_TURN_BUDGET_SECONDS


@dataclass
class ReconcileSummary:
    """Counts of one pass, as written to reconcile_runs (plus what the table has no column for)."""

    run_id: int
    checked: int = 0
    changed: int = 0
    failed: int = 0
    not_found: int = 0
    reinstated: int = 0
    seconds: float = 0.0
    error: str | None = None

    def line(self) -> str:
        """One human line for the CLI and logs."""
        text = (
            f"reconcile run #{self.run_id}: checked {self.checked}, changed {self.changed}, failed {self.failed}, "
            f"not found {self.not_found}, reinstated {self.reinstated} in {self.seconds:.1f}s"
        )
        return text + (f" (stopped: {self.error})" if self.error else "")


def due_clause(now: datetime, stale_after_seconds: int):  # noqa: ANN201
    """Which vouchers a pass checks: flagged ones, and non-final ones unconfirmed for too long or past expiry."""
    non_final = Voucher.status.not_in(sorted(FINAL_STATUSES))
    unconfirmed = or_(
        Voucher.last_confirmed_at.is_(None),
        Voucher.last_confirmed_at < now - timedelta(seconds=stale_after_seconds),
    )
    return and_(
        Voucher.rm_missing_at.is_(None),
        or_(Voucher.needs_reconcile.is_(True), and_(non_final, or_(unconfirmed, Voucher.expires_at < now))),
    )


def iter_due_codes(
    factory: sessionmaker[Session], now: datetime, stale_after_seconds: int, batch: int = SELECT_BATCH
) -> Iterator[str]:
    """Stream due codes by primary key, one small query per batch (keyset pagination, no offset scans)."""
    last_id = 0
    clause = due_clause(now, stale_after_seconds)
    while True:
        with factory() as session:
            rows = session.execute(
                select(Voucher.id, Voucher.code).where(clause, Voucher.id > last_id).order_by(Voucher.id).limit(batch)
            ).all()
        if not rows:
            return
        for row in rows:
            yield row.code
        last_id = rows[-1].id


@dataclass
class _Fetched:
    code: str
    item: dict | None = None
    not_found: bool = False
    error: str | None = None


def _fetch(client: RMClient, code: str) -> _Fetched:
    try:
        return _Fetched(code, item=client.get_voucher(code))
    except RMNotFound:
        return _Fetched(code, not_found=True)
    except RMError as exc:
        return _Fetched(code, error=f"{exc.code} {exc.message}".strip())
    except Exception as exc:  # noqa: BLE001 - one voucher's surprise must not end the pass
        return _Fetched(code, error=f"{type(exc).__name__}: {exc}")


class Reconciler:
    """One pass over a set of codes: fetch from RM in parallel, apply in short transactions, count."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        client: RMClient,
        *,
        concurrency: int = 8,
        should_stop: Callable[[], str | None] | None = None,
        on_progress: Callable[[ReconcileSummary], None] | None = None,
    ) -> None:
        self.factory = factory
        self.client = client
        self.concurrency = concurrency
        # Returns why the pass must stop early (lease lost, shutting down), or None to go on.
        self.should_stop = should_stop or (lambda: None)
        self.on_progress = on_progress

    def _start_run(self, trigger: str) -> ReconcileSummary:
        with self.factory.begin() as session:
            run = ReconcileRun(started_at=utcnow(), trigger=trigger, checked=0, changed=0, failed=0)
            session.add(run)
            session.flush()
            return ReconcileSummary(run_id=run.id)

    def _finish_run(self, summary: ReconcileSummary) -> None:
        with self.factory.begin() as session:
            run = session.get(ReconcileRun, summary.run_id)
            run.finished_at = utcnow()
            run.checked, run.changed, run.failed = summary.checked, summary.changed, summary.failed
            run.not_found, run.reinstated = summary.not_found, summary.reinstated
            run.duration_ms = int(summary.seconds * 1000)
            run.error = summary.error

    def run(self, codes: Iterable[str], *, trigger: str) -> ReconcileSummary:
        """Check every code in ``codes`` against RM and record a reconcile_runs row."""
        started = time.monotonic()
        summary = self._start_run(trigger)
        try:
            self._pipeline(codes, summary)
        except Exception as exc:  # noqa: BLE001 - the run row must say why it stopped
            summary.error = ("database unavailable: " if is_unavailable(exc) else "") + f"{type(exc).__name__}: {exc}"
            log.exception("reconciliation run #%s stopped", summary.run_id)
        reason = self.should_stop()
        if reason and not summary.error:
            summary.error = f"stopped early: {reason}"
        summary.seconds = time.monotonic() - started
        try:
            self._finish_run(summary)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not record the end of run #%s: %s", summary.run_id, type(exc).__name__)
        log.info(summary.line())
        return summary

    def _pipeline(self, codes: Iterable[str], summary: ReconcileSummary) -> None:
        # At most a few fetches per worker in flight: memory is bounded however many codes are due.
        window = self.concurrency * 4
        pending: deque[_Fetched] = deque()
        in_flight: set[Future[_Fetched]] = set()
        source = iter(codes)
        exhausted = False
        # Twice as many threads as calls: a thread signs its next request or reads its last answer
        # while `concurrency` others wait on RM, and the client's cap keeps RM at `concurrency`.
        with (
            self.client.in_flight_cap(self.concurrency),
            ThreadPoolExecutor(self.concurrency * 2, thread_name_prefix="reconcile") as pool,
        ):
            while True:
                while not exhausted and len(in_flight) < window and not self.should_stop():
                    code = next(source, None)
                    if code is None:
                        exhausted = True
                        break
                    in_flight.add(pool.submit(_fetch, self.client, code))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)
                pending.extend(f.result() for f in done)
                if len(pending) >= APPLY_CHUNK or (not in_flight and pending) or (done and exhausted):
                    self._apply(pending, summary)
            if pending:
                self._apply(pending, summary)

    def _apply(self, pending: deque[_Fetched], summary: ReconcileSummary) -> None:
        chunk = list(pending)
        pending.clear()
        counts: Counter[str] = Counter()
        usable = self._usable(chunk, counts)
        start, isolate = 0, False
        try:
            while start < len(usable):
                try:
                    start = self._apply_some(usable, start, counts, isolate=isolate)
                except Exception as exc:
                    if is_unavailable(exc) or isolate:
                        raise
                    # Rare: something in this transaction broke. The rest of the chunk goes one
                    # voucher per savepoint, so one bad answer costs only itself (savepoints for
                    # every voucher would double the cost, so only after a failure).
                    log.warning("applying a chunk failed (%s); retrying voucher by voucher", type(exc).__name__)
                    isolate = True
        finally:
            # What earlier transactions of the chunk committed counts even if a later one failed.
            for name, value in counts.items():
                setattr(summary, name, getattr(summary, name) + value)
        if self.on_progress is not None:
            self.on_progress(summary)

    @staticmethod
    def _usable(chunk: list[_Fetched], counts: Counter[str]) -> list[tuple[str, VoucherSnapshot | None]]:
        """RM's answers as snapshots (None: not found); errors and unusable answers are counted as failed."""
        # Parsed before any transaction: on SQLite it holds the writer turn (db.TurnTakingSessions),
        # and every callback waits while it does.
        usable: list[tuple[str, VoucherSnapshot | None]] = []
        for fetched in chunk:
            counts["checked"] += 1
            if fetched.error:
                counts["failed"] += 1
                log.warning("reconcile %s failed: %s", fetched.code, fetched.error)
                continue
            try:
                usable.append((fetched.code, None if fetched.not_found else snapshot_from_item(fetched.item)))
            except SnapshotError as exc:
                counts["failed"] += 1
                log.warning("RM's answer for %s is unusable: %s", fetched.code, exc)
        return usable

    def _apply_some(
        self, usable: list[tuple[str, VoucherSnapshot | None]], start: int, counts: Counter[str], *, isolate: bool
    ) -> int:
        """Apply ``usable[start:]`` in one transaction that ends once it has held the writer turn for TURN_BUDGET_SECONDS; the index reached."""
        done: Counter[str] = Counter()  # counted only if the transaction commits
        index = start
        with self.factory.begin() as session:
            more = turn_budget(TURN_BUDGET_SECONDS)
            while index < len(usable) and more():
                code, snapshot = usable[index]
                index += 1
                if not isolate:
                    self._apply_one(session, code, snapshot, done)
                    continue
                try:
                    with session.begin_nested():
                        self._apply_one(session, code, snapshot, done)
                except Exception as exc:
                    if is_unavailable(exc):
                        raise
                    done["failed"] += 1
                    log.exception("applying RM's answer for %s failed", code)
        counts.update(done)
        return index

    @staticmethod
    def _apply_one(session: Session, code: str, snapshot: VoucherSnapshot | None, counts: Counter[str]) -> None:
        if snapshot is None:
            result = record_not_found(session, code, source=Source.RECONCILE)
            counts["not_found"] += 1
            if result is not None and result.outcome is Outcome.NOT_FOUND:
                counts["changed"] += 1
            return
        result = apply_snapshot(session, snapshot, source=Source.RECONCILE)
        if result.changed:
            counts["changed"] += 1
        if result.reinstatement:
            counts["reinstated"] += 1


def reconcile_due(
    factory: sessionmaker[Session],
    client: RMClient,
    *,
    stale_after_seconds: int,
    concurrency: int,
    trigger: str,
    should_stop: Callable[[], str | None] | None = None,
    on_progress: Callable[[ReconcileSummary], None] | None = None,
) -> ReconcileSummary:
    """One scheduled-style pass over every due voucher."""
    reconciler = Reconciler(factory, client, concurrency=concurrency, should_stop=should_stop, on_progress=on_progress)
    return reconciler.run(iter_due_codes(factory, utcnow(), stale_after_seconds), trigger=trigger)


def reconcile_codes(
    factory: sessionmaker[Session], client: RMClient, codes: list[str], *, concurrency: int, trigger: str
) -> ReconcileSummary:
    """Check exactly these codes, final or not, known to us or not."""
    return Reconciler(factory, client, concurrency=concurrency).run(codes, trigger=trigger)
