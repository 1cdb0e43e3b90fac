"""Group commit: verified callbacks that arrive together in one web worker share one transaction.

Most of a callback's database cost is per transaction, not per row: the BEGIN and COMMIT round
trips, the WAL flush at COMMIT, and on SQLite the one write lock that every worker queues for.
Threaded workers answer several callbacks at once; those that arrive while a transaction is
committing wait for it and then commit together in the next one, so under load one BEGIN, one
lock and one flush serve many callbacks. Nothing is delayed on purpose: a callback that finds no
transaction in progress starts one at once (at low load every batch holds one callback).

On PostgreSQL the group's statements go to the server together, in one message each way
(pg_pipeline, deliveries.accept_verified_together): the transaction waits for the server twice (BEGIN with the
delivery inserts; the voucher writes and events with the COMMIT; db.begin_with_first_statements,
db.pipelined) whatever the group's size, where one statement at a time it waited twice per
callback besides BEGIN and COMMIT.

On SQLite the writer turn (db.WriterTurn) admits one writer of all the processes at a time, so
the time it is held bounds everyone's throughput: only the transaction runs in it. The delivery
insert's arguments are made and the connection checked out before it; the metrics are counted
and the flush that makes the commit durable (db.WalSync) done after it, so the next group takes
the turn while this one's commit reaches the disk.

A 200 still means committed, and on disk: every caller waits until the transaction holding its
delivery has committed and been flushed, and learns its own outcome. If one callback in a batch
fails for a reason of its own, the batch is rolled back and each callback is retried in a
transaction of its own, so one bad delivery cannot fail the others; if the database is
unavailable, every callback in it gets that error (a 503 that RM retries).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from sqlalchemy import Connection, Engine

from .db import (
    Bound,
    WalSyncError,
    WriterTurn,
    catch_up_before_turn,
    deferred_wal_syncs,
    is_unavailable,
    once_more_if_connection_died,
    transaction_on,
)
from .deliveries import (
    CallbackResult,
    IncomingCallback,
    NonceReused,
    accept_verified,
    accept_verified_together,
    commit_verified,
    count_committed,
    prepare_verified,
)
from .metrics import GROUP_COMMIT_CALLBACKS
from .snapshot import VoucherSnapshot

# Bounds one transaction's length (and on PostgreSQL the row locks it holds at once).
DEFAULT_MAX_BATCH = 32


@dataclass(eq=False)
class _Waiting:
    incoming: IncomingCallback
    snapshot: VoucherSnapshot
    # SQLite: the delivery insert's arguments, made before the writer turn (deliveries.prepare_verified).
    prepared: Bound | None = None
    # Set when the callback is done, or when its thread is to lead the next batch. Only a callback
    # that queues behind a running batch waits, so only it gets one (most callbacks lead).
    wake: threading.Event | None = None
    lead: bool = False
    done: bool = False
    result: CallbackResult | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    """Counts since start (tests and benchmarks read them): transactions run and callbacks in them."""

    batches: int = 0
    callbacks: int = 0
    largest: int = 0
    fallbacks: int = 0


class GroupCommit:
    """Apply verified callbacks in shared transactions; ``submit`` returns once its callback committed."""

    def __init__(self, engine: Engine, max_batch: int = DEFAULT_MAX_BATCH, turn: WriterTurn | None = None) -> None:
        self.engine = engine
        self.turn = turn
        self.max_batch = max(1, max_batch)
        self.stats = BatchStats()
        self._lock = threading.Lock()
        self._queue: deque[_Waiting] = deque()
        self._leading = False

    def submit(self, incoming: IncomingCallback, snapshot: VoucherSnapshot) -> CallbackResult:
        """Record and apply one verified callback; raise (NonceReused, database errors) as commit_verified does."""
        # On SQLite everything that needs no write lock is done before the turn, which only one
        # writer of all the processes holds at a time: the time it is held bounds the throughput.
        me = _Waiting(incoming, snapshot, prepare_verified(self.engine.dialect, incoming, snapshot) if self.turn else None)
        with self._lock:
            if self._leading:
                me.wake = threading.Event()
            else:
                self._leading = me.lead = True
            self._queue.append(me)
        if me.wake is not None:
            me.wake.wait()
        if not me.done:
            # Leader: run the batches queued so far (this one's included), then hand over.
            self._lead()
        if me.error is not None:
            raise me.error
        assert me.result is not None
        return me.result

    def _lead(self) -> None:
        with self._lock:
            batch = self._take()
        try:
            with deferred_wal_syncs() as flush:
                try:
                    with self._in_turn() as conn:
                        self._run(batch, conn)
                finally:
                    # The next group may take the turn while this one's commit reaches the disk.
                    self._hand_over()
                GROUP_COMMIT_CALLBACKS.observe(len(batch))
                for item in batch:
                    if item.result is not None:
                        count_committed(item.result)
                try:
                    flush()
                except WalSyncError as exc:
                    # Committed, but not known to be on disk: no 200 for it. RM's retry finds it
                    # recorded and is answered "duplicate" once the disk takes writes again.
                    for item in batch:
                        item.result, item.error = None, item.error or exc
        except BaseException as exc:  # e.g. the lock file cannot be opened: every caller must hear of it
            for item in batch:
                if item.result is None and item.error is None:
                    item.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for item in batch:
                item.done = True
                if item.wake is not None:
                    item.wake.set()

    @contextlib.contextmanager
    def _in_turn(self) -> Iterator[Connection | None]:
        """SQLite: the writer turn, on a connection checked out before it and returned after it. Else nothing (None)."""
        if self.turn is None:
            yield None
            return
        with self.engine.connect() as conn:
            catch_up_before_turn(self.engine, conn)
            with self.turn.hold():
                yield conn

    def _hand_over(self) -> None:
        with self._lock:
            if self._queue:
                # The oldest waiting callback's thread runs the next batch; this thread answers its own.
                successor = self._queue[0]
                successor.lead = True
                assert successor.wake is not None  # it queued behind this batch
                successor.wake.set()
            else:
                self._leading = False

    def _take(self) -> list[_Waiting]:
        """The next group, oldest first: at most one callback per voucher code (the others wait their turn).

        A second callback for a code in the same transaction would take that delivery's unique-key
        lock after the voucher's row lock, and two workers' groups could then deadlock on PostgreSQL.
        """
        batch: list[_Waiting] = []
        codes: set[str] = set()
        kept: deque[_Waiting] = deque()
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if item.snapshot.code in codes:
                kept.append(item)
            else:
                codes.add(item.snapshot.code)
                batch.append(item)
        kept.extend(self._queue)
        self._queue = kept
        return batch

    def _run(self, batch: list[_Waiting], conn: Connection | None = None) -> None:
        """Commit the batch, on ``conn`` if given (else on a connection of the engine's)."""
        stats = self.stats
        stats.batches += 1
        stats.callbacks += len(batch)
        stats.largest = max(stats.largest, len(batch))
        bind = self.engine if conn is None else conn
        if len(batch) == 1:
            self._alone(batch[0], bind)
            return
        # One order for every batch: two workers' transactions then lock vouchers (PostgreSQL
        # row locks) in the same order and cannot deadlock on them.
        ordered = sorted(batch, key=lambda w: w.snapshot.code)

        def transaction() -> None:
            for item in ordered:  # a second run starts afresh
                item.result = item.error = None
            with transaction_on(bind) as conn:
                if conn.dialect.name == "postgresql":
                    # The group's statements sent together, the COMMIT with the last of them: two
                    # waits for the server, not two per callback. A voucher created meanwhile by
                    # another transaction fails the group (IntegrityError): each is then run alone.
                    pairs = [(item.incoming, item.snapshot) for item in ordered]
                    outcomes = accept_verified_together(conn, pairs, commit=True)
                    for item, outcome in zip(ordered, outcomes):
                        # A replayed nonce wrote nothing; the others go on.
                        item.result, item.error = (None, outcome) if isinstance(outcome, NonceReused) else (outcome, None)
                    return
                for item in ordered:
                    try:
                        item.result = accept_verified(conn, item.incoming, item.snapshot, item.prepared)
                    except NonceReused as exc:
                        # Raised before this delivery wrote anything; the others go on.
                        item.error = exc

        try:
            once_more_if_connection_died(transaction)
            return
        except Exception as exc:  # noqa: BLE001 - sorted out below, per callback
            failure = exc
        # A deadlock with another worker's group is no outage: each callback is retried alone.
        unavailable = is_unavailable(failure) and getattr(getattr(failure, "orig", None), "sqlstate", None) != "40P01"
        for item in batch:
            item.result = None
            item.error = failure if unavailable else None
        if unavailable:
            return
        stats.fallbacks += 1
        for item in batch:
            self._alone(item, bind)

    def _alone(self, item: _Waiting, bind: Engine | Connection) -> None:
        try:
            item.result = commit_verified(bind, item.incoming, item.snapshot, item.prepared)
        except Exception as exc:  # noqa: BLE001 - each caller maps its own error to a response
            item.error = exc
