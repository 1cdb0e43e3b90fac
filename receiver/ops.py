"""Operator queries and chores shared by the CLI and the ops API: voucher timelines, listings, retention."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from .db import WRITER_TURN_BUDGET_SECONDS as TURN_BUDGET_SECONDS, turn_budget
from .models import Voucher, VoucherEvent, WebhookDelivery, utcnow

# Rows emptied per statement: between statements the purge checks whether its transaction has
# held the writer turn for TURN_BUDGET_SECONDS, so a transaction holds it for the budget and at
# most one statement more. A batch of 500 in one transaction held it 6-13 ms (median) with 3 KB
# bodies and 73-76 ms with 30 KB ones; statements of 50 keep the purge's rate (~25,000 rows/s
# with 3 KB bodies, against ~13,000 with 20).
PURGE_STATEMENT_ROWS = 50

VOUCHER_FIELDS = (
    "code", "status", "rm_updated_at", "batch_key", "label", "voucher_type", "amount", "discount_rate",
    "minimum_spend_amount", "origin", "expiry_type", "expiry_day", "expires_at", "assigned_at", "redeemed_at",
    "used_at", "rm_created_at", "first_seen_at", "last_changed_at", "last_confirmed_at", "last_source",
    "needs_reconcile", "rm_missing_at",
)
EVENT_FIELDS = (
    "id", "recorded_at", "from_status", "to_status", "rm_updated_at", "source", "outcome", "delivery_id", "detail",
)
DELIVERY_FIELDS = (
    "id", "received_at", "last_received_at", "outcome", "http_status", "attempts", "voucher_code",
    "signature_verified", "remote_addr", "error", "replayed_at", "purged_at",
)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def row_dict(row: object, fields: tuple[str, ...]) -> dict[str, Any]:
    """The named attributes of a model row, JSON-ready."""
    return {name: _jsonable(getattr(row, name)) for name in fields}


def voucher_with_history(session: Session, code: str) -> dict[str, Any] | None:
    """A voucher's current state and its whole timeline, oldest event first; None for an unknown code."""
    voucher = session.scalars(select(Voucher).where(Voucher.code == code)).one_or_none()
    if voucher is None:
        return None
    events = session.scalars(
        select(VoucherEvent).where(VoucherEvent.voucher_code == code).order_by(VoucherEvent.id)
    ).all()
    return {
        "voucher": row_dict(voucher, VOUCHER_FIELDS),
        "raw": json.loads(voucher.raw),
        "history": [row_dict(e, EVENT_FIELDS) for e in events],
    }


def keyset_page(session: Session, model: Any, filters: list[Any], *, limit: int, after: int) -> tuple[list[Any], int | None]:
    """Rows of ``model`` by id after ``after`` (keyset, no offset scans), and the next cursor (None on the last page)."""
    query = select(model).where(model.id > after, *filters).order_by(model.id).limit(limit + 1)
    rows = session.scalars(query).all()
    page = rows[:limit]
    return page, (page[-1].id if len(rows) > limit else None)


def list_vouchers(
    session: Session, *, status: str | None = None, batch: str | None = None, limit: int = 50, after: int = 0
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of vouchers by id (keyset: pass the returned cursor as ``after``); the cursor is None on the last page."""
    filters = []
    if status:
        filters.append(Voucher.status == status.upper())
    if batch:
        filters.append(Voucher.batch_key == batch)
    page, cursor = keyset_page(session, Voucher, filters, limit=limit, after=after)
    return [{"id": v.id, **row_dict(v, VOUCHER_FIELDS)} for v in page], cursor


_SINCE = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """'90m', '2h', '7d' (ago) or an ISO time; ValueError otherwise."""
    now = now or utcnow()
    match = _SINCE.match(text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        seconds = amount * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        return now - timedelta(seconds=seconds)
    parsed = datetime.fromisoformat(text.strip())
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=now.tzinfo)


def list_deliveries(
    session: Session, *, outcomes: tuple[str, ...] = (), since: datetime | None = None, limit: int = 50
) -> list[WebhookDelivery]:
    """Recent deliveries, newest first."""
    query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if outcomes:
        query = query.where(WebhookDelivery.outcome.in_(outcomes))
    if since is not None:
        query = query.where(WebhookDelivery.received_at >= since)
    return list(session.scalars(query))


def purge_delivery_bodies(
    factory: sessionmaker[Session],
    *,
    older_than_days: int,
    batch_size: int = 500,
    now: datetime | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Drop body and headers of deliveries older than the retention window, in short batches; return how many.

    Rows, hashes, outcomes and every voucher_events row stay: the history keeps its evidence.
    A batch's rows are found by a reading session (no writer turn on SQLite), then emptied in
    transactions that each end once they have held the writer turn for TURN_BUDGET_SECONDS, so
    callbacks wait at most about that long behind the purge.
    """
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    purged = 0
    while True:
        with factory() as session:
            # Served by ix_webhook_deliveries_purged_at_received_at: purged rows are never scanned again.
            ids = list(
                session.scalars(
                    select(WebhookDelivery.id)
                    .where(WebhookDelivery.purged_at.is_(None), WebhookDelivery.received_at < cutoff)
                    .limit(batch_size)
                )
            )
        if not ids:
            return purged
        emptied = 0
        done = 0
        while done < len(ids):
            done, count = _purge_some(factory, ids, done)
            emptied += count  # only once its transaction committed
        purged += emptied
        if on_batch is not None:
            on_batch(emptied)


def _purge_some(factory: sessionmaker[Session], ids: list[int], start: int) -> tuple[int, int]:
    """Empty deliveries ``ids[start:]`` in one transaction that stops after TURN_BUDGET_SECONDS; (index reached, rows emptied)."""
    emptied = 0
    index = start
    with factory.begin() as session:
        more = turn_budget(TURN_BUDGET_SECONDS)
        while index < len(ids) and more():
            chunk = ids[index:index + PURGE_STATEMENT_ROWS]
            index += len(chunk)
            # purged_at IS NULL: a row another purge (the CLI beside the scheduler) emptied meanwhile keeps its time.
            emptied += session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(chunk), WebhookDelivery.purged_at.is_(None))
                .values(body=None, headers=None, purged_at=utcnow()),
                execution_options={"synchronize_session": False},  # nothing loaded to keep in step
            ).rowcount
    return index, emptied
