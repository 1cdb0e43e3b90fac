"""Recording callback deliveries and applying verified ones, exactly once per distinct body."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence

from sqlalchemy import Connection, Dialect, Engine, and_, bindparam, insert, or_, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .apply import (
    NOT_LOCKED,
    ApplyPlan,
    ApplyResult,
    apply_after_conflict,
    apply_snapshot,
    insert_then_lock,
    locked_row,
    plan_apply,
)
from .db import (
    Bound,
    Direct,
    connection_of,
    insert_unless_conflict,
    once_more_if_connection_died,
    pipelined,
    transaction_on,
)
from .metrics import count_apply
from .models import DeliveryOutcome, Source, WebhookDelivery, utcnow
from .snapshot import VoucherSnapshot
from .state_machine import Outcome

MAX_BODY_BYTES = 64 * 1024
# What a rejected delivery keeps of its body: enough to see what it was, bounded so that
# forged traffic cannot fill the disk at 64 KiB a request.
TRUNCATED_BODY_BYTES = 4 * 1024
REJECTED_BODY_BYTES = 8 * 1024
_HEADER_VALUE_LIMIT = 512
STORED_HEADERS = (
    "Content-Type",
    "Content-Length",
    "User-Agent",
    "X-Nonce-Str",
    "X-Timestamp",
    "X-Signature",
    "X-Forwarded-For",
    "X-Request-Id",
)


class RejectionLimiter:
    """Token buckets deciding which rejected deliveries are stored (this process only): one per source, one for all sources.

    Genuine callbacks are never limited; rejected ones beyond ``per_minute`` from one address, or
    beyond ``total_per_minute`` from all addresses together, are answered as usual but not
    written, so forged floods cost neither disk nor database time. Source addresses are cheap to
    vary (an IPv6 block, a botnet), and each new one starts with a full bucket: without the
    bucket for all of them, a flood from many addresses would be stored nearly whole.
    A bucket that starts rejecting has at most ``MAX_BURST`` stored at once, the rest at the rate.
    """

    # Each stored rejection is a transaction with its own durable commit. At the start of a flood
    # a burst of 60 per worker queued ~180 commits on PostgreSQL's WAL flush within a second, and
    # the genuine callbacks' commits waited behind them: stalls of 180-370 ms (bench_abuse.py,
    # default threaded workers), where a bucket of 10 left a p99 of 17-25 ms.
    MAX_BURST = 10

    def __init__(self, per_minute: int, total_per_minute: int, max_sources: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(max(1, min(per_minute, self.MAX_BURST)))
        self.total_rate = total_per_minute / 60.0
        self.total_burst = float(max(1, min(total_per_minute, self.MAX_BURST)))
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._total = (self.total_burst, time.monotonic())
        self._lock = threading.Lock()

    def allow(self, source: str | None) -> bool:
        """Take one token for ``source`` and one for all sources; False when either bucket is empty."""
        if self.rate <= 0 or self.total_rate <= 0:
            return False
        key = source or "-"
        now = time.monotonic()
        with self._lock:
            tokens = _refilled(self._buckets.pop(key, (self.burst, now)), now, self.rate, self.burst)
            total = _refilled(self._total, now, self.total_rate, self.total_burst)
            allowed = tokens >= 1 and total >= 1
            self._buckets[key] = (tokens - 1 if allowed else tokens, now)
            self._total = (total - 1 if allowed else total, now)
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
            return allowed


def _refilled(bucket: tuple[float, float], now: float, rate: float, burst: float) -> float:
    """The tokens of a (tokens, last update) bucket at ``now``, refilled at ``rate`` a second up to ``burst``."""
    tokens, last = bucket
    return min(burst, tokens + (now - last) * rate)


class NonceReused(Exception):
    """A signed nonce was seen before with a different body: a replayed signature."""


@dataclass(frozen=True)
class IncomingCallback:
    """One callback POST as received: the bytes, the headers we keep, and where it came from."""

    body: bytes
    headers: dict[str, str]
    remote_addr: str | None
    content_type: str | None
    # False when only a prefix of an oversized body was read.
    complete: bool = True
    received_at: datetime = field(default_factory=utcnow)

    @functools.cached_property
    def body_sha256(self) -> str:
        """Hash of the exact bytes received."""
        return hashlib.sha256(self.body).hexdigest()

    @property
    def nonce(self) -> str | None:
        """X-Nonce-Str, bounded."""
        value = self.headers.get("X-Nonce-Str")
        return value[:128] if value else None


def environ_key(header: str) -> str:
    """Where a WSGI server puts a request header in the environ (CGI's names)."""
    key = header.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"


_STORED_ENVIRON_KEYS = tuple((name, environ_key(name)) for name in STORED_HEADERS)


def pick_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The headers worth keeping, read from the WSGI environ and each bounded; credentials are never among them."""
    kept = {}
    for name, key in _STORED_ENVIRON_KEYS:
        value = environ.get(key)
        if value is not None:
            kept[name] = value[:_HEADER_VALUE_LIMIT]
    return kept


@dataclass(frozen=True)
class CallbackResult:
    """The outcome of a verified delivery: what to answer RM, and what the apply service did."""

    status: DeliveryOutcome
    delivery_id: int
    attempts: int
    apply: ApplyResult | None = None


_STATUS_FOR_OUTCOME = {
    Outcome.APPLIED: DeliveryOutcome.ACCEPTED,
    Outcome.ILLEGAL: DeliveryOutcome.ACCEPTED,
    Outcome.UNKNOWN_STATUS: DeliveryOutcome.ACCEPTED,
    Outcome.STALE: DeliveryOutcome.STALE,
    Outcome.DUPLICATE: DeliveryOutcome.DUPLICATE,
}


_HEADERS_JSON = json.JSONEncoder(sort_keys=True).encode  # built once, not per json.dumps call


def _bounded_body(body: bytes, limit: int) -> tuple[str, bool]:
    # NUL cannot be stored in PostgreSQL text; a body that has one was not a real callback anyway.
    return body[:limit].decode("utf-8", errors="replace").replace("\x00", "\ufffd"), len(body) > limit


def _delivery_values(incoming: IncomingCallback, *, body_limit: int = MAX_BODY_BYTES, **values: Any) -> dict[str, Any]:
    body, truncated = _bounded_body(incoming.body, body_limit)
    return {
        "received_at": incoming.received_at,
        "last_received_at": incoming.received_at,
        "body_sha256": incoming.body_sha256,
        "attempts": 1,
        "nonce": incoming.nonce,
        "remote_addr": (incoming.remote_addr or "")[:64] or None,
        "content_type": (incoming.content_type or "")[:255] or None,
        "headers": _HEADERS_JSON(incoming.headers),
        "body": body,
        "body_truncated": truncated or not incoming.complete,
        "dedupe_key": None,
        "voucher_code": None,
        "signature_verified": False,
        "error": None,
        **values,
    }


# Every callback runs these; built once so SQLAlchemy compiles them once (see apply.py).
_D = WebhookDelivery.__table__
_INSERT = insert(_D).returning(_D.c.id)
# A verified delivery conflicts with an earlier one of the same bytes (dedupe_key) or of the same
# signed nonce; either way no row comes back and the rare path below looks at what is there.
_VERIFIED_COLUMNS = [c for c in _D.columns if c.name not in ("id", "replayed_at", "purged_at")]
_INSERT_VERIFIED = Direct(insert_unless_conflict(_D, [c.name for c in _VERIFIED_COLUMNS]))
# PostgreSQL: the same insert and the voucher's row lock in one round trip (apply.insert_then_lock).
_INSERT_VERIFIED_AND_LOCK = insert_then_lock(
    postgresql.insert(_D)
    .values({c.name: bindparam(c.name, type_=c.type) for c in _VERIFIED_COLUMNS})
    .on_conflict_do_nothing()
    .returning(_D.c.id)
)
_PRIOR = (
    select(_D.c.id, _D.c.outcome, _D.c.dedupe_key, _D.c.body_sha256, _D.c.nonce)
    .where(or_(_D.c.dedupe_key == bindparam("sha"), and_(_D.c.nonce == bindparam("nonce"), _D.c.signature_verified)))
    .limit(10)
    .with_for_update()
)
_BUMP = (
    update(_D)
    .where(_D.c.id == bindparam("b_id"))
    .values(attempts=_D.c.attempts + 1, last_received_at=bindparam("b_now"))
    .returning(_D.c.attempts)
)
_SET_OUTCOME = Direct(
    update(_D).where(_D.c.id == bindparam("b_id")).values(outcome=bindparam("b_outcome"), http_status=200, error=None)
)


def record_rejection(
    session: Session,
    incoming: IncomingCallback,
    *,
    outcome: DeliveryOutcome,
    http_status: int,
    error: str,
    voucher_code: str | None = None,
) -> int:
    """Store a rejected delivery (bounded) with why it was rejected; return its id."""
    values = _delivery_values(
        incoming,
        body_limit=TRUNCATED_BODY_BYTES if http_status == 413 else REJECTED_BODY_BYTES,
        outcome=outcome.value,
        http_status=http_status,
        voucher_code=voucher_code,
        error=error[:2000],
    )
    return session.execute(_INSERT, values).scalar_one()


def _verified_values(incoming: IncomingCallback, snapshot: VoucherSnapshot) -> dict[str, Any]:
    # Built before the first statement: on SQLite that statement takes the database's write lock.
    return _delivery_values(
        incoming,
        dedupe_key=incoming.body_sha256,
        outcome=DeliveryOutcome.ACCEPTED.value,
        http_status=200,
        voucher_code=snapshot.code,
        signature_verified=True,
    )


def prepare_verified(dialect: Dialect, incoming: IncomingCallback, snapshot: VoucherSnapshot) -> Bound:
    """The delivery insert's arguments, made before the transaction (on SQLite, outside the write lock)."""
    return _INSERT_VERIFIED.bind(dialect, _verified_values(incoming, snapshot))


def accept_verified(
    session: Session | Connection, incoming: IncomingCallback, snapshot: VoucherSnapshot, prepared: Bound | None = None
) -> CallbackResult:
    """Record a signature-verified delivery and apply its snapshot, in the caller's transaction.

    A redelivery of the same bytes bumps ``attempts`` and has no new effect, unless the earlier
    attempt failed on our side, in which case it is applied now. A signed nonce reused for other
    bytes is a replayed signature. New deliveries, the common case, cost one insert: only when it
    conflicts does a second query find out which of those it was. The owner of the transaction
    counts the outcome in /metrics once it has committed (count_committed). ``prepared``: what
    prepare_verified made for this callback (SQLite), so the transaction need not build it.
    """
    conn = connection_of(session)
    if conn.dialect.name == "postgresql":
        return _raised(accept_verified_together(conn, [(incoming, snapshot)]))
    inserted = _INSERT_VERIFIED.run_bound(conn, prepared or prepare_verified(conn.dialect, incoming, snapshot))
    return _after_insert(conn, incoming, snapshot, inserted[0][0] if inserted else None, NOT_LOCKED)


def _raised(outcomes: list[CallbackResult | NonceReused]) -> CallbackResult:
    """The one callback's result; its NonceReused raised."""
    (outcome,) = outcomes
    if isinstance(outcome, NonceReused):
        raise outcome
    return outcome


def accept_verified_together(
    conn: Connection, callbacks: Sequence[tuple[IncomingCallback, VoucherSnapshot]], *, commit: bool = False
) -> list[CallbackResult | NonceReused]:
    """PostgreSQL: accept_verified for callbacks of distinct vouchers, in order, their statements sent together.

    All the delivery inserts (each locking its voucher) go in one round trip, the BEGIN with them;
    then all the voucher writes and events in a second. A delivery whose insert conflicted (a
    redelivery, a replayed nonce) or whose new voucher was created meanwhile by another
    transaction takes the one-statement-at-a-time path. A replayed nonce comes back as its
    NonceReused in place of a result, having written nothing; any other error is raised.

    ``commit``: only for the owner of the transaction, as its last act in it. The COMMIT then goes
    with the second round trip (db.pipelined), so the transaction waits for the server twice.
    Nothing can run after that round trip: the deliveries' outcomes other than ``accepted`` are
    written in it, and a new voucher created meanwhile by another transaction fails the whole
    transaction (IntegrityError, nothing committed) for the owner to run again, when it would
    otherwise be applied on top of.
    """
    found = pipelined(conn, [
        (_INSERT_VERIFIED_AND_LOCK, {**_verified_values(incoming, snapshot), "code": snapshot.code, "sha": snapshot.fingerprint})
        for incoming, snapshot in callbacks
    ])
    outcomes: list[CallbackResult | NonceReused | None] = [None] * len(callbacks)
    plans: list[tuple[int, int, ApplyPlan]] = []
    for index, ((incoming, snapshot), rows) in enumerate(zip(callbacks, found)):
        delivery_id, locked = rows[0][0], locked_row(rows[0][1:])
        if delivery_id is None:
            try:
                outcomes[index] = _after_insert(conn, incoming, snapshot, None, locked)
            except NonceReused as exc:
                outcomes[index] = exc
            continue
        plan = plan_apply(
            conn, snapshot, source=Source.CALLBACK, delivery_id=delivery_id, now=incoming.received_at, locked=locked,
            conflict_fails=commit,
        )
        plans.append((index, delivery_id, plan))
    steps = [step for _index, _id, plan in plans for step in plan.steps]
    if commit:
        # What _conclude would write after the results, written with the rest.
        steps += [
            (_SET_OUTCOME, {"b_id": delivery_id, "b_outcome": _STATUS_FOR_OUTCOME[plan.outcome].value})
            for _index, delivery_id, plan in plans
            if _STATUS_FOR_OUTCOME[plan.outcome] is not DeliveryOutcome.ACCEPTED
        ]
    # With no statement left to send, the owner's COMMIT goes alone as usual.
    written = iter(pipelined(conn, steps, commit=commit and bool(steps)))
    for index, delivery_id, plan in plans:
        result = plan.finish(conn, [next(written) for _step in plan.steps])
        if commit:
            assert result is not None and result.outcome is plan.outcome, "a plan sent with the COMMIT ran as planned"
            outcomes[index] = CallbackResult(_STATUS_FOR_OUTCOME[result.outcome], delivery_id, 1, result)
            continue
        outcomes[index] = _conclude(conn, delivery_id, None, 1, result or apply_after_conflict(conn, plan))
    return outcomes  # type: ignore[return-value] - every slot is filled above


def _after_insert(
    conn: Connection, incoming: IncomingCallback, snapshot: VoucherSnapshot, delivery_id: int | None, locked: Any
) -> CallbackResult:
    """The rest of accept_verified once the delivery insert ran: ``delivery_id`` None when it conflicted."""
    prior = None
    attempts = 1
    if delivery_id is None:
        sha = incoming.body_sha256
        rows = conn.execute(_PRIOR, {"sha": sha, "nonce": incoming.nonce}).all()
        if any(row.nonce == incoming.nonce and row.body_sha256 != sha for row in rows):
            raise NonceReused("X-Nonce-Str was already used with a different body")
        prior = next((row for row in rows if row.dedupe_key == sha), None)
        if prior is None:
            raise RuntimeError("the delivery insert conflicted, but no earlier delivery matches it")
        attempts = conn.execute(_BUMP, {"b_id": prior.id, "b_now": incoming.received_at}).scalar_one()
        if prior.outcome != DeliveryOutcome.ERROR.value:
            return CallbackResult(DeliveryOutcome.DUPLICATE, prior.id, attempts)
        delivery_id = prior.id

    result = apply_snapshot(
        conn, snapshot, source=Source.CALLBACK, delivery_id=delivery_id, now=incoming.received_at, locked=locked
    )
    return _conclude(conn, delivery_id, prior, attempts, result)


def _conclude(conn: Connection, delivery_id: int, prior: Any, attempts: int, result: ApplyResult) -> CallbackResult:
    """Record on the delivery what its snapshot did, where that is not the ``accepted`` it was inserted with."""
    status = _STATUS_FOR_OUTCOME[result.outcome]
    if prior is not None or status is not DeliveryOutcome.ACCEPTED:
        _SET_OUTCOME.rows(conn, {"b_id": delivery_id, "b_outcome": status.value})
    return CallbackResult(status, delivery_id, attempts, result)


class NotReplayable(Exception):
    """A stored delivery that replay must not apply (never verified, or its body is gone)."""


def replay(session: Session, delivery_id: int, now: datetime | None = None) -> CallbackResult:
    """Re-run one stored delivery through the apply path, exactly once: an applied one stays a duplicate."""
    from .snapshot import SnapshotError, snapshot_from_item, voucher_item_from_envelope

    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None:
        raise LookupError(f"no delivery with id {delivery_id}")
    if not delivery.signature_verified:
        raise NotReplayable(f"delivery {delivery_id} was {delivery.outcome}: its signature was never verified")
    if delivery.body is None or delivery.body_truncated:
        raise NotReplayable(f"delivery {delivery_id} has no complete stored body (purged by retention?)")
    now = now or utcnow()
    delivery.replayed_at = now
    if delivery.outcome != DeliveryOutcome.ERROR.value:
        # Already applied (or recorded as stale/duplicate) when it arrived: nothing to redo.
        return CallbackResult(DeliveryOutcome.DUPLICATE, delivery.id, delivery.attempts)
    try:
        snapshot = snapshot_from_item(voucher_item_from_envelope(json.loads(delivery.body)))
    except (ValueError, SnapshotError) as exc:
        raise NotReplayable(f"delivery {delivery_id} body is not a voucher callback: {exc}") from None
    result = apply_snapshot(session, snapshot, source=Source.CALLBACK, delivery_id=delivery.id, now=now)
    status = _STATUS_FOR_OUTCOME[result.outcome]
    delivery.outcome, delivery.http_status, delivery.error = status.value, 200, None
    return CallbackResult(status, delivery.id, delivery.attempts, result)


def failed_delivery_ids(session: Session) -> list[int]:
    """Verified deliveries that failed on our side and are still waiting to be applied."""
    return list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.outcome == DeliveryOutcome.ERROR.value, WebhookDelivery.signature_verified.is_(True))
            .order_by(WebhookDelivery.id)
        )
    )


def commit_verified(
    bind: Engine | Connection, incoming: IncomingCallback, snapshot: VoucherSnapshot, prepared: Bound | None = None
) -> CallbackResult:
    """Own the transaction for one verified delivery: commit it, or raise with nothing committed.

    On a Connection already checked out, the transaction runs on it; the caller counts the result
    in /metrics (count_committed). A bare Connection, not an ORM Session: nothing here loads
    objects, and the Session's bookkeeping cost ~0.1 ms a callback. Two identical deliveries
    racing each other collide on the unique dedupe key, and on PostgreSQL two first snapshots of
    a voucher on its code (accept_verified_together's ``commit``); the loser retries and finds
    the winner's row.
    """
    def transaction() -> CallbackResult:
        with transaction_on(bind) as conn:
            if conn.dialect.name == "postgresql":
                # This function owns the transaction: its COMMIT goes with the last statements.
                return _raised(accept_verified_together(conn, [(incoming, snapshot)], commit=True))
            return accept_verified(conn, incoming, snapshot, prepared)

    for attempt in range(3):
        try:
            return once_more_if_connection_died(transaction)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def count_committed(result: CallbackResult) -> None:
    """After the commit: count what the callback's snapshot did in /metrics."""
    if result.apply is not None:
        count_apply(Source.CALLBACK.value, result.apply.outcome.value)


def record_failure(
    factory: sessionmaker[Session], incoming: IncomingCallback, snapshot: VoucherSnapshot | None, error: str
) -> int:
    """After a failed apply, commit the delivery as ``error`` in its own transaction so it can be replayed."""
    with factory.begin() as session:
        prior = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.dedupe_key == incoming.body_sha256).with_for_update()
        ).one_or_none()
        if prior is not None:
            # Only overwrite an earlier failure; a concurrent success stays a success.
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == prior.id, WebhookDelivery.outcome == DeliveryOutcome.ERROR.value)
                .values(
                    error=error[:2000],
                    attempts=WebhookDelivery.attempts + 1,
                    last_received_at=incoming.received_at,
                    http_status=500,
                )
            )
            return prior.id
        values = _delivery_values(
            incoming,
            dedupe_key=incoming.body_sha256,
            outcome=DeliveryOutcome.ERROR.value,
            http_status=500,
            voucher_code=snapshot.code if snapshot else None,
            signature_verified=True,
            error=error[:2000],
        )
        return session.execute(_INSERT, values).scalar_one()
