"""The one writer of `vouchers` and `voucher_events`: apply an RM voucher snapshot.

Callbacks, reconciliation, backfill and merchant actions all come through ``apply_snapshot``, or
through the ``plan_apply`` it is built on (callbacks committed together on PostgreSQL). It never
commits: the request, job or command that owns the work owns the transaction.

It runs on every callback and every reconciled voucher, so it uses a handful of pre-built Core
statements, compiled once per dialect and run on the DBAPI cursor (db.Direct), instead of
loading ORM objects. What a snapshot does is decided first (plan_apply) and run after, so that
on PostgreSQL the writes of several callbacks in one transaction go to the server together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, NamedTuple

from sqlalchemy import Connection, Insert, TextClause, bindparam, exists, func, insert, literal, select, text, true, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from .db import Direct, connection_of, insert_unless_conflict
from .metrics import note_apply
from .models import Source, Voucher, VoucherEvent, utcnow
from .snapshot import VoucherSnapshot
from .state_machine import Decision, Observed, Outcome, decide

_V = Voucher.__table__
_E = VoucherEvent.__table__


@dataclass(frozen=True)
class ApplyResult:
    """What one snapshot did: its outcome, and the event recorded (None when nothing new was seen)."""

    code: str
    outcome: Outcome
    from_status: str | None
    to_status: str
    event_id: int | None
    changed: bool
    reinstatement: bool = False


def _observed(snapshot: VoucherSnapshot) -> Observed:
    return Observed(snapshot.status, snapshot.rm_updated_ns, snapshot.fingerprint)


def _snapshot_columns(snapshot: VoucherSnapshot) -> dict[str, Any]:
    return {
        "status": snapshot.status,
        "rm_updated_at": snapshot.rm_updated_at,
        "rm_updated_ns": snapshot.rm_updated_ns,
        "raw": snapshot.raw,
        "snapshot_sha256": snapshot.fingerprint,
        **snapshot.fields,
    }


# Columns a snapshot (plus our bookkeeping) writes when it is applied.
_APPLIED_COLUMNS = [
    c.name for c in _V.columns if c.name not in ("id", "code", "first_seen_at")
]

# FOR UPDATE on PostgreSQL serialises deliveries for one code; on SQLite the transaction already
# holds the write lock (BEGIN IMMEDIATE), and the clause compiles to nothing. The same round trip
# says whether this snapshot was recorded before (and whether as applied): every writer of a
# code's events holds this lock first, so the answer stays true until the commit.
_SEEN = _E.c.voucher_code == bindparam("code"), _E.c.snapshot_sha256 == bindparam("sha")
_LOCK_SELECT = (
    select(
        _V.c.id, _V.c.status, _V.c.rm_updated_ns, _V.c.snapshot_sha256, _V.c.needs_reconcile,
        exists().where(*_SEEN).label("seen"),
        exists().where(*_SEEN, _E.c.outcome == Outcome.APPLIED.value).label("seen_applied"),
        # As stored (raw DBAPI values): see _APPLY_SAME_KEYS.
        _V.c.batch_key, _V.c.expires_at,
    )
    .where(_V.c.code == bindparam("code"))
    .with_for_update()
)
_LOCK = Direct(_LOCK_SELECT)


def insert_then_lock(insert: Insert) -> Direct:
    """PostgreSQL: run ``insert`` (``RETURNING id``; no row when it conflicts), then lock the voucher, in one statement.

    Parameters: the insert's, plus ``code`` and ``sha`` (the snapshot's code and fingerprint).
    One row comes back: the inserted id (or None) followed by the voucher's locked row (all None
    when there is no voucher yet), for ``apply_snapshot(..., locked=locked_row(row[1:]))``. One round
    trip instead of two on every callback. The insert runs before the row lock (the lock's WHERE
    waits on it), as when they were two statements: two copies of one delivery meet at its unique
    key before either locks the voucher, so they cannot deadlock on the pair.
    """
    inserted = insert.cte("inserted")
    gate = select(func.count()).select_from(inserted).scalar_subquery()
    voucher = _LOCK_SELECT.where(gate >= 0).cte("locked")
    one = select(literal(1).label("one")).subquery("one")
    return Direct(
        select(select(inserted.c.id).scalar_subquery().label("inserted_id"), *voucher.c)
        .select_from(one.outerjoin(voucher, true()))
    )


class _Locked(NamedTuple):
    id: int
    status: str
    rm_updated_ns: int | None
    snapshot_sha256: str | None
    needs_reconcile: bool
    seen: bool
    seen_applied: bool
    batch_key: str | None
    expires_at: Any


_apply_core = update(_V).where(_V.c.id == bindparam("b_id")).values({n: bindparam(f"b_{n}") for n in _APPLIED_COLUMNS})
_APPLY = Direct(_apply_core)
# SQLite rewrites an index entry for every indexed column an UPDATE sets, changed or not. A
# voucher's batch and expiry rarely change, so when they are as stored, this UPDATE leaves them
# (and their two indexes) alone: 19.7 -> 17.8 WAL pages per lifecycle callback. PostgreSQL writes a new
# entry in every index anyway (the status changes), so it always runs _APPLY.
_SAME_KEYS_COLUMNS = [n for n in _APPLIED_COLUMNS if n not in ("batch_key", "expires_at")]
_APPLY_SAME_KEYS = Direct(
    update(_V).where(_V.c.id == bindparam("b_id")).values({n: bindparam(f"b_{n}") for n in _SAME_KEYS_COLUMNS})
)
_CONFIRM = Direct(
    update(_V)
    .where(_V.c.id == bindparam("b_id"))
    .values(last_confirmed_at=bindparam("b_now"), needs_reconcile=False, rm_missing_at=None)
)
_FLAG = Direct(update(_V).where(_V.c.id == bindparam("b_id")).values(needs_reconcile=True))
_EVENT_COLUMNS = [c for c in _E.columns if c.name != "id"]
_insert_event_core = insert(_E).values(
    {c.name: bindparam(f"e_{c.name}", type_=c.type) for c in _EVENT_COLUMNS}
).returning(_E.c.id)
_INSERT_EVENT = Direct(_insert_event_core)
# PostgreSQL runs a voucher write and its event in one statement (a data-modifying CTE), one
# round trip instead of two; SQLite has no such CTEs and runs them in turn (in-process, cheap).
_APPLY_AND_RECORD = Direct(_insert_event_core.add_cte(_apply_core.cte("applied")))


# The voucher's columns except the surrogate key; `code` is unique, so a concurrent insert is a conflict.
_VOUCHER_COLUMNS = [c for c in _V.columns if c.name != "id"]
_insert_voucher_text = insert_unless_conflict(_V, [c.name for c in _VOUCHER_COLUMNS])
_INSERT_VOUCHER = Direct(_insert_voucher_text)


def _new_and_record(insert_voucher: TextClause) -> Direct:
    """PostgreSQL: the new voucher and its first event in one statement (a data-modifying CTE)."""
    return Direct(text(
        f"WITH inserted AS ({insert_voucher.text}) "
        f"INSERT INTO {_E.name} ({', '.join(c.name for c in _EVENT_COLUMNS)}) "
        # Casts: a bare parameter in a SELECT list would be typed text, and NULLs would not fit the columns.
        f"SELECT {', '.join(f'CAST(:e_{c.name} AS {c.type.compile(dialect=postgresql.dialect())})' for c in _EVENT_COLUMNS)}"
        " FROM inserted RETURNING id"
    ).bindparams(
        *(bindparam(c.name, type_=c.type) for c in _VOUCHER_COLUMNS),
        *(bindparam(f"e_{c.name}", type_=c.type) for c in _EVENT_COLUMNS),
    ))


# No row back means the insert conflicted (another transaction created the voucher) and no event was written.
_INSERT_NEW_AND_RECORD = _new_and_record(_insert_voucher_text)
# For a plan whose COMMIT goes with its statements: nothing can run after them, so a conflict fails
# the transaction (IntegrityError) instead of answering with no row.
_INSERT_NEW_OR_FAIL_AND_RECORD = _new_and_record(
    insert_unless_conflict(_V, [c.name for c in _VOUCHER_COLUMNS], conflict_fails=True)
)


def _new_voucher_values(snapshot: VoucherSnapshot, source: Source, now: datetime) -> dict[str, Any]:
    return {
        "code": snapshot.code,
        **_snapshot_columns(snapshot),
        "last_source": source.value,
        "first_seen_at": now,
        "last_changed_at": now,
        "last_confirmed_at": now,
        "needs_reconcile": False,
        "rm_missing_at": None,
    }


def _already_recorded(row: _Locked, outcome: Outcome) -> bool:
    """A snapshot seen before adds no event, unless it is now applied where before it was not."""
    if not row.seen:
        return False
    return outcome != Outcome.APPLIED or bool(row.seen_applied)


# apply_snapshot's default: the voucher is not locked yet (it takes the lock itself).
NOT_LOCKED: Any = object()


def locked_row(values: tuple) -> _Locked | None:
    """The voucher part of an insert_then_lock row, as apply_snapshot's ``locked``."""
    return None if values[0] is None else _Locked._make(values)


def apply_snapshot(
    session: Session | Connection,
    snapshot: VoucherSnapshot,
    *,
    source: Source,
    delivery_id: int | None = None,
    now: datetime | None = None,
    locked: _Locked | None = NOT_LOCKED,
) -> ApplyResult:
    """Merge one RM snapshot into the voucher's state and history; the caller commits.

    ``locked``: the voucher's row as this transaction already locked it (insert_then_lock), None
    when it found none; by default apply_snapshot takes the lock itself. In a Session the outcome
    is counted in /metrics when it commits; on a bare Connection (the callback hot path, which
    skips the ORM) the owner of the transaction counts it after its commit (metrics.count_apply).
    """
    conn = connection_of(session)
    row = _lock(conn, {"code": snapshot.code, "sha": snapshot.fingerprint}) if locked is NOT_LOCKED else locked
    plan = plan_apply(conn, snapshot, source=source, delivery_id=delivery_id, now=now or utcnow(), locked=row)
    result = plan.run(conn) or apply_after_conflict(conn, plan)
    if isinstance(session, Session):
        note_apply(session, source.value, result.outcome.value)
    return result


@dataclass(frozen=True)
class ApplyPlan:
    """What applying one snapshot to a voucher locked in this transaction takes, decided before any of it runs.

    ``steps`` are the statements to run, in order; ``finish`` turns their rows into the result,
    whose outcome is ``outcome``. On PostgreSQL ``finish`` runs nothing more, so the statements of
    several callbacks can be sent together (db.pipelined). It answers None when a concurrent
    transaction created the voucher first, and nothing was written: apply_after_conflict then
    applies on top of that row (unless the plan was made with ``conflict_fails``).
    """

    snapshot: VoucherSnapshot
    source: Source
    delivery_id: int | None
    now: datetime
    outcome: Outcome
    steps: tuple[tuple[Direct, dict[str, Any]], ...]
    finish: Callable[[Connection, list[list[tuple]]], ApplyResult | None]

    def run(self, conn: Connection) -> ApplyResult | None:
        """Run the steps one after the other and finish; None as ``finish`` says."""
        return self.finish(conn, [statement.rows(conn, params) for statement, params in self.steps])


def plan_apply(
    conn: Connection, snapshot: VoucherSnapshot, *, source: Source, delivery_id: int | None, now: datetime,
    locked: _Locked | None, conflict_fails: bool = False,
) -> ApplyPlan:
    """Decide what ``snapshot`` does to the voucher row this transaction holds (None: no voucher yet).

    ``conflict_fails`` (PostgreSQL): a new voucher's insert that meets one created meanwhile by
    another transaction raises IntegrityError, failing the transaction, instead of finishing None.
    """
    def plan(outcome: Outcome, steps: tuple[tuple[Direct, dict[str, Any]], ...], finish: Callable) -> ApplyPlan:
        return ApplyPlan(snapshot, source, delivery_id, now, outcome, steps, finish)

    # Anything other than a pushed callback is RM answering our own question: authoritative.
    authoritative = source is not Source.CALLBACK
    combine = conn.dialect.name == "postgresql"
    row = locked
    if row is None:
        decision = decide(None, _observed(snapshot))
        event = _event_params(None, snapshot, decision, source, delivery_id, now)
        voucher = _new_voucher_values(snapshot, source, now)
        if combine:
            # No row back: the insert conflicted (another transaction created the voucher), no event written.
            insert_new = _INSERT_NEW_OR_FAIL_AND_RECORD if conflict_fails else _INSERT_NEW_AND_RECORD
            return plan(decision.outcome, ((insert_new, {**voucher, **event}),), lambda _conn, rows: (
                _result(None, snapshot, decision, rows[0][0][0], changed=True) if rows[0] else None
            ))

        def new_voucher(conn: Connection, rows: list[list[tuple]]) -> ApplyResult | None:
            # RETURNING, not rowcount: psycopg reports -1 for an ON CONFLICT insert whichever way it went.
            if not rows[0]:
                return None
            return _record(conn, _INSERT_EVENT, event, None, snapshot, decision, changed=True)

        return plan(decision.outcome, ((_INSERT_VOUCHER, voucher),), new_voucher)

    current = Observed(row.status, row.rm_updated_ns, row.snapshot_sha256)
    decision = decide(current, _observed(snapshot), authoritative=authoritative)

    if decision.outcome is Outcome.DUPLICATE:
        duplicate = ApplyResult(snapshot.code, Outcome.DUPLICATE, row.status, snapshot.status, None, changed=False)
        steps = ((_CONFIRM, {"b_id": row.id, "b_now": now}),) if authoritative else ()
        return plan(Outcome.DUPLICATE, steps, lambda _conn, _rows: duplicate)

    record = not _already_recorded(row, decision.outcome)
    event = _event_params(row.status, snapshot, decision, source, delivery_id, now) if record else {}
    steps: tuple[tuple[Direct, dict[str, Any]], ...] = ()
    if decision.apply:
        values = {
            **_snapshot_columns(snapshot),
            "last_source": source.value,
            "last_changed_at": now,
            "last_confirmed_at": now,
            # Only RM's answer to our own question clears the flag: a callback applied after an
            # illegal one may still be older than it, and the voucher must not settle unchecked.
            "needs_reconcile": bool(row.needs_reconcile) and not authoritative,
            "rm_missing_at": None,
        }
        params = {"b_id": row.id, **{f"b_{k}": v for k, v in values.items()}}
        if record and combine:
            return plan(decision.outcome, ((_APPLY_AND_RECORD, {**params, **event}),), lambda _conn, rows: _result(
                row.status, snapshot, decision, rows[-1][0][0], changed=True
            ))
        same_keys = not combine and row.batch_key == values["batch_key"] and (
            row.expires_at == _APPLY.bind_value(conn.dialect, "b_expires_at", values["expires_at"])
        )
        steps = ((_APPLY_SAME_KEYS if same_keys else _APPLY, params),)
    elif decision.needs_reconcile:
        steps = ((_FLAG, {"b_id": row.id}),)

    if not record:
        unrecorded = ApplyResult(snapshot.code, Outcome.DUPLICATE, row.status, snapshot.status, None, changed=decision.apply)
        return plan(Outcome.DUPLICATE, steps, lambda _conn, _rows: unrecorded)
    return plan(decision.outcome, (*steps, (_INSERT_EVENT, event)), lambda _conn, rows: _result(
        row.status, snapshot, decision, rows[-1][0][0], changed=decision.apply
    ))


def apply_after_conflict(conn: Connection, plan: ApplyPlan) -> ApplyResult:
    """A concurrent transaction created the voucher ``plan`` meant to create: apply on top of its row."""
    snapshot = plan.snapshot
    row = _lock(conn, {"code": snapshot.code, "sha": snapshot.fingerprint})
    assert row is not None, "voucher vanished after a conflicting insert"
    again = plan_apply(conn, snapshot, source=plan.source, delivery_id=plan.delivery_id, now=plan.now, locked=row)
    result = again.run(conn)
    assert result is not None, "a voucher row that exists cannot conflict"
    return result


def record_not_found(session: Session, code: str, *, source: Source, now: datetime | None = None) -> ApplyResult | None:
    """RM no longer knows a code we hold: record it once and stop polling it. None if we never held it."""
    now = now or utcnow()
    voucher = session.scalars(select(Voucher).where(Voucher.code == code).with_for_update()).one_or_none()
    if voucher is None:
        return None
    voucher.needs_reconcile = False
    if voucher.rm_missing_at is not None:
        return ApplyResult(code, Outcome.DUPLICATE, voucher.status, voucher.status, None, changed=False)
    voucher.rm_missing_at = now
    event = VoucherEvent(
        voucher_code=code,
        from_status=voucher.status,
        to_status=voucher.status,
        rm_updated_at=None,
        source=source.value,
        outcome=Outcome.NOT_FOUND.value,
        recorded_at=now,
        payload="{}",
        # One not-found event per disappearance; a voucher that comes back and vanishes again gets another.
        snapshot_sha256=f"not_found:{voucher.snapshot_sha256}"[:64],
        detail="RM answered VOUCHER_NOT_FOUND; polling stops until RM reports this code again",
    )
    session.add(event)
    session.flush()
    note_apply(session, source.value, Outcome.NOT_FOUND.value)
    return ApplyResult(code, Outcome.NOT_FOUND, voucher.status, voucher.status, event.id, changed=True)


def _event_params(
    from_status: str | None,
    snapshot: VoucherSnapshot,
    decision: Decision,
    source: Source,
    delivery_id: int | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "e_voucher_code": snapshot.code,
        "e_from_status": from_status,
        "e_to_status": snapshot.status,
        "e_rm_updated_at": snapshot.rm_updated_at,
        "e_source": source.value,
        "e_outcome": decision.outcome.value,
        "e_delivery_id": delivery_id,
        "e_recorded_at": now,
        "e_payload": snapshot.raw,
        "e_snapshot_sha256": snapshot.fingerprint,
        "e_detail": decision.reason or None,
    }


def _lock(conn: Connection, params: dict[str, Any]) -> _Locked | None:
    found = _LOCK.first(conn, params)
    return _Locked._make(found) if found is not None else None


def _record(
    conn: Connection,
    statement: Direct,
    params: dict[str, Any],
    from_status: str | None,
    snapshot: VoucherSnapshot,
    decision: Decision,
    *,
    changed: bool,
) -> ApplyResult:
    """Run the statement that writes the event (and maybe the voucher) and describe what happened."""
    (event_id,) = statement.rows(conn, params)[0]
    return _result(from_status, snapshot, decision, event_id, changed=changed)


def _result(
    from_status: str | None, snapshot: VoucherSnapshot, decision: Decision, event_id: int, *, changed: bool
) -> ApplyResult:
    return ApplyResult(
        code=snapshot.code,
        outcome=decision.outcome,
        from_status=from_status,
        to_status=snapshot.status,
        event_id=event_id,
        changed=changed,
        reinstatement=decision.reinstatement,
    )
