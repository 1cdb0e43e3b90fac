"""The callback path's shortcuts keep SQLAlchemy's behaviour: wrapped errors, the same stored values, the same headers."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, event, exc, insert, select, text

from receiver.apply import apply_snapshot
from receiver.db import Direct, is_unavailable, make_engine
from receiver.deliveries import pick_headers
from receiver.models import Source, UTCDateTime, Voucher
from receiver.snapshot import snapshot_from_item
from tests.support import voucher_item


def test_begin_on_a_locked_sqlite_database_is_an_unavailable_sqlalchemy_error(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE runs on the DBAPI connection, yet a lock timeout is still SQLAlchemy's OperationalError (503)."""
    path = tmp_path / "locked.db"
    engine = make_engine(f"sqlite:///{path}", sqlite_busy_timeout=0.2)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(exc.OperationalError) as raised, engine.begin():
            pytest.fail("BEGIN IMMEDIATE succeeded while another connection held the write lock")
        assert "locked" in str(raised.value.orig)
        assert is_unavailable(raised.value)
    finally:
        blocker.rollback()
        blocker.close()
    # The connection went back to the pool in a usable state.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
    engine.dispose()


def test_remembered_time_conversions_depend_on_the_instant_only(tmp_path: Path) -> None:
    """Direct remembers datetime conversions: one instant in any zone is stored alike, distinct instants apart."""
    engine = make_engine(f"sqlite:///{tmp_path / 'times.db'}")
    table = Table("times", MetaData(), Column("id", Integer, primary_key=True), Column("at", UTCDateTime()))
    table.metadata.create_all(engine)
    statement = Direct(insert(table))
    utc = datetime(2026, 1, 1, 0, 0, tzinfo=timezone.utc)
    values = [
        utc,
        utc.astimezone(timezone(timedelta(hours=8))),  # equal to utc, written differently
        utc.replace(tzinfo=None),  # naive means UTC
        utc + timedelta(microseconds=1),
        utc.astimezone(timezone(timedelta(hours=8))) + timedelta(hours=1),
        None,
    ]
    with engine.begin() as conn:
        for i, at in enumerate(values):
            statement.rows(conn, {"id": i, "at": at})
        stored = [row[0] for row in conn.execute(text("SELECT at FROM times ORDER BY id"))]
    assert stored == [
        "2026-01-01 00:00:00.000000",
        "2026-01-01 00:00:00.000000",
        "2026-01-01 00:00:00.000000",
        "2026-01-01 00:00:00.000001",
        "2026-01-01 01:00:00.000000",
        None,
    ]
    engine.dispose()


def test_stored_headers_come_from_the_wsgi_environ_bounded_and_without_credentials() -> None:
    """Content-Type and Content-Length have no HTTP_ prefix in the environ; everything kept is cut at 512 characters."""
    environ = {
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "17",
        "HTTP_X_SIGNATURE": "sha256 " + "A" * 700,
        "HTTP_X_NONCE_STR": "nonce-1",
        "HTTP_X_TIMESTAMP": "1767225600",
        "HTTP_AUTHORIZATION": "Bearer secret-token",
        "HTTP_COOKIE": "session=secret",
        "REMOTE_ADDR": "10.0.0.1",
    }
    kept = pick_headers(environ)
    assert kept == {
        "Content-Type": "application/json",
        "Content-Length": "17",
        "X-Signature": ("sha256 " + "A" * 700)[:512],
        "X-Nonce-Str": "nonce-1",
        "X-Timestamp": "1767225600",
    }


def test_an_update_leaves_batch_and_expiry_alone_only_while_they_are_as_stored(migrated_url: str) -> None:
    """Unchanged batch and expiry are left out of the UPDATE (SQLite then skips their indexes); changed ones are written."""
    engine = make_engine(migrated_url)
    updates: list[str] = []
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _trace(dbapi_connection, _record) -> None:  # noqa: ANN001
            dbapi_connection.set_trace_callback(
                lambda sql: updates.append(sql) if sql.startswith("UPDATE vouchers") else None
            )

    def apply(status: str, step: int, **overrides) -> None:  # noqa: ANN003
        with engine.begin() as conn:
            apply_snapshot(conn, snapshot_from_item(voucher_item("KEYS1", status, step, **overrides)), source=Source.CALLBACK)

    def stored() -> tuple:
        with engine.connect() as conn:
            row = conn.execute(select(Voucher.status, Voucher.batch_key, Voucher.expires_at).where(Voucher.code == "KEYS1"))
            return tuple(row.one())

    apply("VALID", 1)
    apply("ISSUE", 2)
    assert stored() == ("ISSUE", "batch-1", datetime(2027, 1, 1, tzinfo=timezone.utc))
    moved = {"voucherBatchKey": "batch-2", "expiry": {"type": "FIXED", "day": 0, "expiredAt": "2027-06-01T00:00:00Z"}}
    apply("REDEEMED", 3, **moved)
    assert stored() == ("REDEEMED", "batch-2", datetime(2027, 6, 1, tzinfo=timezone.utc))
    apply("VOID", 4, expiry={"type": "FIXED", "day": 0, "expiredAt": "2027-07-01T00:00:00Z"}, voucherBatchKey="batch-2")
    assert stored() == ("VOID", "batch-2", datetime(2027, 7, 1, tzinfo=timezone.utc))
    if engine.dialect.name == "sqlite":
        assert len(updates) == 3
        assert "batch_key" not in updates[0] and "expires_at" not in updates[0]  # ISSUE: both as stored
        assert "batch_key" in updates[1] and "expires_at" in updates[1]  # REDEEMED: both moved
        assert "expires_at" in updates[2]  # VOID: the expiry moved again
    engine.dispose()
