"""Backfill: walk RM's voucher batches and their vouchers into the database, resumably."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from .apply import apply_snapshot
from .client import RMClient
from .models import BackfillBatch, Source, utcnow
from .snapshot import SnapshotError, snapshot_from_item
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
    """Apply every voucher of every batch (source 'backfill'); each page commits with its resume cursor.

    Re-running skips completed batches and resumes a half-done one from its cursor; ``restart``
    forgets the progress and walks everything again (which adds no events for unchanged vouchers).
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
            with factory.begin() as session:
                for snapshot in snapshots:
                    result = apply_snapshot(session, snapshot, source=Source.BACKFILL)
                    if result.changed and result.outcome is not Outcome.DUPLICATE:
                        summary.changed += 1
                _save_progress(session, key, batch.get("label"), next_cursor, len(items), done=not next_cursor)
            if on_page is not None:
                on_page(key, len(items))
    return summary


def _save_progress(session: Session, key: str, label: str | None, cursor: str | None, seen: int, *, done: bool) -> None:
    row = session.get(BackfillBatch, key, with_for_update=True)
    if row is None:
        row = BackfillBatch(batch_key=key, label=label, vouchers_seen=0, started_at=utcnow())
        session.add(row)
    row.cursor = cursor
    row.vouchers_seen = (row.vouchers_seen or 0) + seen
    if done:
        row.completed_at = utcnow()
