"""Backfill: walk RM's voucher batches and their vouchers into the database, resumably."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from .apply import apply_snapshot
from .client import RMClient
from .db import WRITER_TURN_BUDGET_SECONDS as TURN_BUDGET_SECONDS, turn_budget
from .models import BackfillBatch, Source, utcnow
from .snapshot import SnapshotError, VoucherSnapshot, snapshot_from_item
from .state_machine import Outcome

log = logging.getLogger(__name__)


@dataclass
class BackfillSummary:
    """What one backfill run did."""

    batches: int = 0
    batches_skipped: int = 0
    vouchers: int = 0
    changed: int = 0
    unusable: int = 0

    def line(self) -> str:
        """One human line for the CLI."""
        return (
            f"backfill: {self.batches} batches walked ({self.batches_skipped} already complete), "
            f"{self.vouchers} vouchers seen, {self.changed} new or changed, {self.unusable} unusable"
        )


def backfill(
    factory: sessionmaker[Session],
    client: RMClient,
    *,
    restart: bool = False,
    on_page: Callable[[str, int], None] | None = None,
) -> BackfillSummary:
    """Apply every voucher of every batch (source 'backfill'); each page's last transaction commits its resume cursor.

    A page goes in transactions that each end once they have held the writer turn for
    TURN_BUDGET_SECONDS (as a reconciliation pass does), so callbacks wait at most about that long
    behind a backfill. Re-running skips completed batches and resumes a half-done one from its
    cursor; ``restart`` forgets the progress and walks everything again (which adds no events for
    unchanged vouchers).
    """
    summary = BackfillSummary()
    if restart:
        with factory.begin() as session:
            session.execute(delete(BackfillBatch))
    for batch in client.voucher_batches():
        key = batch.get("key")
        if not key:
            continue
        with factory() as session:
            progress = session.get(BackfillBatch, key)
        if progress is not None and progress.completed_at is not None:
            summary.batches_skipped += 1
            continue
        summary.batches += 1
        cursor = progress.cursor if progress is not None else None
        for items, next_cursor in client.batch_voucher_pages(key, cursor):
            # Parsed before the transaction, which on SQLite holds the writer turn (db.TurnTakingSessions).
            snapshots = []
            for item in items:
                summary.vouchers += 1
                try:
                    snapshots.append(snapshot_from_item(item))
                except SnapshotError as exc:
                    summary.unusable += 1
                    log.warning("backfill: unusable voucher in batch %s: %s", key, exc)
            def save_progress(session: Session) -> None:
                _save_progress(session, key, batch.get("label"), next_cursor, len(items), done=not next_cursor)

            applied = 0
            while True:
                applied, changed = _apply_some(factory, snapshots, applied, save_progress)
                summary.changed += changed  # only once its transaction committed
                if applied == len(snapshots):
                    break
            if on_page is not None:
                on_page(key, len(items))
    return summary


def _apply_some(
    factory: sessionmaker[Session], snapshots: list[VoucherSnapshot], start: int, at_end: Callable[[Session], None]
) -> tuple[int, int]:
    """Apply ``snapshots[start:]`` in one transaction that stops after TURN_BUDGET_SECONDS; (index reached, changed).

    The transaction that reaches the end of the page also runs ``at_end`` (the page's resume
    cursor): a run stopped before it redoes the page, which adds no event for vouchers applied.
    """
    changed = 0
    index = start
    with factory.begin() as session:
        more = turn_budget(TURN_BUDGET_SECONDS)
        while index < len(snapshots) and more():
            result = apply_snapshot(session, snapshots[index], source=Source.BACKFILL)
            index += 1
            if result.changed and result.outcome is not Outcome.DUPLICATE:
                changed += 1
        if index == len(snapshots):
            at_end(session)
    return index, changed


def _save_progress(session: Session, key: str, label: str | None, cursor: str | None, seen: int, *, done: bool) -> None:
    row = session.get(BackfillBatch, key, with_for_update=True)
    if row is None:
        row = BackfillBatch(batch_key=key, label=label, vouchers_seen=0, started_at=utcnow())
        session.add(row)
    row.cursor = cursor
    row.vouchers_seen = (row.vouchers_seen or 0) + seen
    if done:
        row.completed_at = utcnow()
