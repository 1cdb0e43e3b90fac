"""The one writer of `vouchers` and `voucher_events`: apply an RM voucher snapshot.

Callbacks, reconciliation, backfill and merchant actions all come through ``apply_snapshot``.
It never commits: the request, job or command that owns the work owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .models import Source, Voucher, VoucherEvent, utcnow
from .snapshot import VoucherSnapshot
from .state_machine import Decision, Observed, Outcome, decide


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


def _lock_voucher(session: Session, code: str) -> Voucher | None:
    # FOR UPDATE on PostgreSQL; on SQLite the transaction already holds the write lock (BEGIN IMMEDIATE).
    return session.scalars(select(Voucher).where(Voucher.code == code).with_for_update()).one_or_none()


def _snapshot_columns(snapshot: VoucherSnapshot) -> dict:
    return {
        "status": snapshot.status,
        "rm_updated_at": snapshot.rm_updated_at,
        "rm_updated_ns": snapshot.rm_updated_ns,
        "raw": snapshot.raw,
        "snapshot_sha256": snapshot.fingerprint,
        **snapshot.fields,
    }


def _insert_new(session: Session, snapshot: VoucherSnapshot, source: Source, now: datetime) -> bool:
    """Insert the voucher unless a concurrent transaction just did; True when this one inserted it."""
    values = {
        "code": snapshot.code,
        **_snapshot_columns(snapshot),
        "last_source": source.value,
        "first_seen_at": now,
        "last_changed_at": now,
        "last_confirmed_at": now,
        "needs_reconcile": False,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Voucher).values(values).on_conflict_do_nothing(index_elements=["code"]).returning(Voucher.id)
    # RETURNING, not rowcount: psycopg reports -1 for a skipped-or-not ON CONFLICT insert.
    return session.execute(stmt).first() is not None


def _already_recorded(session: Session, code: str, fingerprint: str, outcome: Outcome) -> bool:
    """A snapshot seen before adds no event, unless it is now applied where before it was not."""
    prior = set(
        session.scalars(
            select(VoucherEvent.outcome).where(
                VoucherEvent.voucher_code == code, VoucherEvent.snapshot_sha256 == fingerprint
            )
        )
    )
    if not prior:
        return False
    return outcome != Outcome.APPLIED or Outcome.APPLIED.value in prior


def apply_snapshot(
    session: Session,
    snapshot: VoucherSnapshot,
    *,
    source: Source,
    delivery_id: int | None = None,
    now: datetime | None = None,
) -> ApplyResult:
    """Merge one RM snapshot into the voucher's state and history; the caller commits."""
    now = now or utcnow()
    # Anything other than a pushed callback is RM answering our own question: authoritative.
    authoritative = source is not Source.CALLBACK
    voucher = _lock_voucher(session, snapshot.code)
    if voucher is None:
        if _insert_new(session, snapshot, source, now):
            decision = decide(None, _observed(snapshot))
            return _record(session, None, snapshot, decision, source, delivery_id, now, changed=True)
        voucher = _lock_voucher(session, snapshot.code)
        assert voucher is not None, "voucher vanished after a conflicting insert"

    current = Observed(voucher.status, voucher.rm_updated_ns, voucher.snapshot_sha256)
    decision = decide(current, _observed(snapshot), authoritative=authoritative)
    from_status = voucher.status

    if decision.outcome is Outcome.DUPLICATE:
        if authoritative:
            voucher.last_confirmed_at = now
            voucher.needs_reconcile = False
        return ApplyResult(snapshot.code, Outcome.DUPLICATE, from_status, snapshot.status, None, changed=False)

    if decision.apply:
        for name, value in _snapshot_columns(snapshot).items():
            setattr(voucher, name, value)
        voucher.last_source = source.value
        voucher.last_changed_at = now
        voucher.last_confirmed_at = now
        voucher.needs_reconcile = False
    elif decision.needs_reconcile:
        voucher.needs_reconcile = True

    if _already_recorded(session, snapshot.code, snapshot.fingerprint, decision.outcome):
        return ApplyResult(snapshot.code, Outcome.DUPLICATE, from_status, snapshot.status, None, changed=decision.apply)
    return _record(session, from_status, snapshot, decision, source, delivery_id, now, changed=decision.apply)


def _record(
    session: Session,
    from_status: str | None,
    snapshot: VoucherSnapshot,
    decision: Decision,
    source: Source,
    delivery_id: int | None,
    now: datetime,
    *,
    changed: bool,
) -> ApplyResult:
    event = VoucherEvent(
        voucher_code=snapshot.code,
        from_status=from_status,
        to_status=snapshot.status,
        rm_updated_at=snapshot.rm_updated_at,
        source=source.value,
        outcome=decision.outcome.value,
        delivery_id=delivery_id,
        recorded_at=now,
        payload=snapshot.raw,
        snapshot_sha256=snapshot.fingerprint,
        detail=decision.reason or None,
    )
    session.add(event)
    session.flush()
    return ApplyResult(
        code=snapshot.code,
        outcome=decision.outcome,
        from_status=from_status,
        to_status=snapshot.status,
        event_id=event.id,
        changed=changed,
        reinstatement=decision.reinstatement,
    )
